"""What the heads decoders (medusa, medusa2, hydra) share: where the heads are, the tree, the proposer's setup.

The heads themselves share their contract in `heads/common.py`; this is the decoder side.
"""

from __future__ import annotations

from pathlib import Path

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
