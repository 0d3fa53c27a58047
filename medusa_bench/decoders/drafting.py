"""What the heads decoders (medusa, medusa2, hydra) share: where the heads are, the tree, the proposer's setup.

The heads themselves share their contract in `heads/common.py`; this is the decoder side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from medusa_bench.decoders.base import DecoderOptions
from medusa_bench.decoders.options import Option, declare, within
from medusa_bench.decoders.spec import Acceptance, Proposer, SpeculativeDecoder
from medusa_bench.errors import UserError
from medusa_bench.heads.common import apply_draft_vocab, default_heads
from medusa_bench.trees.tree import Tree


class HeadsProposer(Proposer):
    """A proposer that fills a fixed tree from draft heads; subclasses draft (`propose`)."""

    needs_hidden = True

    def __init__(self, heads, tree: Tree, device: torch.device):
        tree.check_fits(num_heads=heads.num_heads)
        self.heads = heads
        self.tree = tree
        self.buffers = tree.buffers(device)
        self.draft_size = tree.num_nodes - 1


class ContextRows:
    """Base hidden rows a proposer's own layer takes in as the context grows (Hydra++'s prefix layer,
    EAGLE's draft model), one row per context token, fed in order through the layer's KV cache.

    `observe` queues what `Proposer.observe` hands over (the prompt's rows, then each accepted
    path's); `take` returns the rows not fed yet; `rewind` follows `Proposer.rewind`.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.fed = 0  # rows the layer has taken in (its cache holds exactly these)
        self.pending: list[torch.Tensor] = []  # rows observed since, in context order

    def observe(self, rows: torch.Tensor) -> None:
        self.pending.append(rows)

    def rewind(self, length: int, crop: Callable[[int], None]) -> None:
        """Back to a context of `length` tokens: the rows of the first length - 1 stay (`crop(n)` cuts the
        layer's cache to n rows); the newest token's row comes with the next `take` (its `hidden`)."""
        keep = length - 1
        if self.fed > keep:
            crop(keep)
            self.fed, self.pending = keep, []
        elif self.pending:
            self.pending = [torch.cat(self.pending)[: keep - self.fed]]

    def take(self, context_length: int, hidden: torch.Tensor, who: str) -> torch.Tensor:
        """The rows to feed now [q, W] (context positions fed … context_length - 1), counted as fed.

        `hidden` [W] is the newest row: normally the last observed one, after a rewind the one row still to feed.
        """
        rows = self.pending
        observed = sum(r.shape[0] for r in rows)
        if self.fed + observed == context_length - 1:  # rewound: the newest row is `hidden`
            rows = rows + [hidden[None]]
        elif self.fed + observed != context_length:
            raise RuntimeError(f"{who} out of step: {self.fed} rows fed + {observed} observed, context "
                               f"{context_length} (a cache changed without Proposer.rewind?)")
        new = torch.cat(rows) if len(rows) > 1 else rows[0]  # [q, W]
        self.pending = []
        self.fed += new.shape[0]
        return new


declare(Option("draft_vocab", -1, "Heads draft among the N most frequent tokens (-1: the heads' default, 0: all).",
               check=within(-1, integer=True)))


def find_heads(given, loaded, kind: str, option: str, what: str = "heads") -> Path | str:
    """The heads a decoder drafts with: `given` (its option's value), else the ones shipped for the model."""
    path = given or default_heads(loaded, kind)
    if path is None:
        raise UserError(f"the {kind} decoder needs {what}: pass {option} PATH (none ship for {loaded.name}); "
                        f"`medusa-bench train {kind}` makes them")
    return path


def heads_decoder(name: str, loaded, heads, path, proposer_class, options: DecoderOptions,
                  draft_vocab: int = 0, baseline_name: str = "baseline") -> SpeculativeDecoder:
    """The decoder `name`: `proposer_class` drafting with `heads` (read from `path`) on `loaded`.

    `draft_vocab` restricts drafting to the heads' most frequent tokens (`apply_draft_vocab`;
    0: the whole vocabulary). The tree is `options.tree`, or measured for these heads (`auto`).
    """
    apply_draft_vocab(heads, path, draft_vocab)

    def make_proposer(tree: Tree) -> Proposer:
        return proposer_class(heads, tree, loaded.device)

    tree, auto = tree_for(options, loaded, make_proposer, heads.num_heads, name, path)
    acceptance = Acceptance(options.acceptance, options.posterior_threshold, options.posterior_alpha)
    # the run folder keeps the optimiser's tables (bench/autotree.store_in_run)
    return SpeculativeDecoder(name, loaded, make_proposer(tree), acceptance, baseline_name=baseline_name, autotree=auto)


def tree_for(options: DecoderOptions, loaded, make_proposer, depth: int, kind: str, path=None):
    """(tree, the optimiser's search or None): `options.tree`, or measured for this proposer (`auto`).

    Any proposer built by `make_proposer(tree)` that answers `true_ranks` can be sized by the
    optimiser; `path` (heads folder) supplies shipped acceptance statistics when it has them.
    """
    if options.tree != "auto":
        return Tree.parse(options.tree, num_heads=depth), None
    from medusa_bench.bench.autotree import auto_tree  # it lives in the bench layer: this lazy import is the one hook

    auto = auto_tree(loaded, make_proposer, path, depth, kind, options.extra.get("autotree"))
    return auto.tree, auto
