"""What the tree decoders (medusa, medusa2, hydra, eagle*) share: where the heads are, the tree, the proposer's setup.

The heads themselves share their contract in `heads/common.py`; this is the decoder side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from medusa_bench.decoders.base import TreeSizing
from medusa_bench.decoders.options import DecoderOptions, Option, declare, within
from medusa_bench.decoders.spec import Proposer, SpeculativeDecoder
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
    0: the whole vocabulary). The tree is `options.tree` (a Tree: the registry resolved it).
    """
    apply_draft_vocab(heads, path, draft_vocab)

    def make_proposer(tree: Tree) -> Proposer:
        return proposer_class(heads, tree, loaded.device)

    return tree_decoder(name, loaded, options, TreeSizing(make_proposer, heads.num_heads, name, path),
                        baseline_name=baseline_name)


def tree_decoder(name: str, loaded, options: DecoderOptions, sizing: TreeSizing,
                 proposer: Optional[Callable[[Tree], Proposer]] = None, baseline_name: str = "baseline") -> SpeculativeDecoder:
    """`name` drafting on `options.tree` with `proposer(tree)` (default: `sizing.make_proposer`), which
    carries `sizing`: how `--tree auto` sizes another tree for it (bench/autotree.py)."""
    tree = Tree.parse(options.tree, num_heads=sizing.depth)
    decoder = SpeculativeDecoder(name, loaded, (proposer or sizing.make_proposer)(tree), baseline_name=baseline_name)
    decoder.sizing = sizing
    return decoder
