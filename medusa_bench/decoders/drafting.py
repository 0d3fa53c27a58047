"""What the heads decoders (medusa, medusa2, hydra) share: where the heads are, the tree, the proposer's setup.

The heads themselves share their contract in `heads/common.py`; this is the decoder side.
"""

from __future__ import annotations

from pathlib import Path

import torch

from medusa_bench.decoders.base import DecoderOptions
from medusa_bench.decoders.spec import Acceptance, Proposer, SpeculativeDecoder
from medusa_bench.errors import UserError
from medusa_bench.heads.common import default_heads
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


def find_heads(given, loaded, kind: str, option: str, what: str = "heads") -> Path | str:
    """The heads a decoder drafts with: `given` (its option's value), else the ones shipped for the model."""
    path = given or default_heads(loaded, kind)
    if path is None:
        raise UserError(f"the {kind} decoder needs {what}: pass {option} PATH (none ship for {loaded.name}); "
                        f"train some with `medusa-bench train {kind}`")
    return path


def acceptance_of(options: DecoderOptions) -> Acceptance:
    return Acceptance(options.acceptance, options.posterior_threshold, options.posterior_alpha)


def resolve_tree(options: DecoderOptions, num_heads: int, loaded=None, make_proposer=None, heads_path=None,
                 kind: str = "medusa"):
    """(tree, the optimiser's AutoTree or None). `auto` measures these heads on this model and device.

    `make_proposer(tree)` builds the decoder's proposer for any tree (calibration and profiling
    use it). The optimiser lives in the bench layer; importing it here, lazily, is the one hook.
    """
    if options.tree != "auto":
        return Tree.parse(options.tree, num_heads=num_heads), None
    if loaded is None or make_proposer is None:
        raise UserError(f"--tree auto is not available for {kind}; pass a preset such as chain-2 or mc_sim_7b_63")
    from medusa_bench.bench.autotree import auto_tree

    auto = auto_tree(loaded, make_proposer, heads_path, num_heads, kind, options.extra.get("autotree"))
    return auto.tree, auto


def heads_decoder(name: str, loaded, heads, path, make_proposer, options: DecoderOptions) -> SpeculativeDecoder:
    """The decoder `name` drafting with `heads` (read from `path`) on `loaded`, its tree resolved."""
    tree, auto = resolve_tree(options, heads.num_heads, loaded, make_proposer, path, kind=name)
    decoder = SpeculativeDecoder(name, loaded, make_proposer(tree), acceptance_of(options))
    decoder.autotree = auto  # the run folder keeps the optimiser's tables (bench/autotree.store_in_run)
    return decoder
