"""Medusa decoders: heads draft every depth at once from the accepted node's hidden state.

The heads run on one row per step (the last accepted node), all heads in one batched matmul,
top-k on the device; the tree's gather indices place each head's candidates into the tree.
The reference implementation runs every head over every tree token and the whole prompt,
which is why it is slower than plain decoding on small models.

- `medusa`: Medusa-1 or v2 heads (`--medusa-heads`) on the frozen base model.
- `medusa2`: a Medusa-2 model folder (`--medusa2-model`): fine-tuned backbone + heads; its
  lossless reference is its own backbone (`medusa2-baseline`), not the original model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from medusa_bench.decoders.base import DecoderOptions, register
from medusa_bench.decoders.spec import Acceptance, Draft, Proposer, SpeculativeDecoder
from medusa_bench.errors import UserError
from medusa_bench.trees.tree import Tree

PACKAGE_HEADS = Path(__file__).resolve().parents[1] / "data" / "heads"


class MedusaProposer(Proposer):
    """Top-k of each head → the tree's candidate tokens (tokens[0] is the root, set by the loop)."""

    needs_hidden = True

    def __init__(self, heads, tree: Tree, device: torch.device):
        tree.check_fits(num_heads=heads.num_heads)
        self.heads = heads
        self.tree = tree
        self.buffers = tree.buffers(device)
        self.top_k = max(tree.top_k, 1)
        self.draft_size = tree.num_nodes - 1
        self.draft_index = self.buffers.draft_index  # [n-1] into the flat [depth * top_k] table

    def propose(self, root: int, hidden: Optional[torch.Tensor], context: list[int]) -> Optional[Draft]:
        topk = self.heads.draft_topk(hidden, self.top_k, num_heads=self.tree.depth)  # [depth, top_k]
        tokens = torch.empty(self.tree.num_nodes, dtype=torch.long, device=topk.device)  # [n]
        tokens[0] = root
        tokens[1:] = topk.reshape(-1)[self.draft_index]
        return Draft(tokens, self.buffers)


def acceptance_of(options: DecoderOptions) -> Acceptance:
    return Acceptance(options.acceptance, options.posterior_threshold, options.posterior_alpha)


def default_heads(loaded, kind: str) -> Optional[Path]:
    """Heads shipped in the package for the embedded model (`data/heads/<model>-<kind>`)."""
    folder = PACKAGE_HEADS / f"{loaded.name}-{kind}"
    return folder if folder.is_dir() else None


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


@register("medusa")
def build_medusa(loaded, options: DecoderOptions):
    from medusa_bench.heads.medusa import load_heads

    path = options.medusa_heads or default_heads(loaded, "medusa")
    if path is None:
        raise UserError(f"the medusa decoder needs heads: pass --medusa-heads PATH (no default heads ship for {loaded.name}); "
                        "train some with `medusa-bench train medusa`")
    heads = load_heads(path, base_model=loaded.model)
    tree, auto = resolve_tree(options, heads.num_heads, loaded, lambda t: MedusaProposer(heads, t, loaded.device), path)
    proposer = MedusaProposer(heads, tree, loaded.device)
    decoder = SpeculativeDecoder("medusa", loaded, proposer, acceptance_of(options))
    decoder.autotree = auto  # the run folder keeps its tables (bench/autotree.store_in_run)
    return decoder


_MEDUSA2_MODELS: dict = {}


def load_medusa2(loaded, options: DecoderOptions):
    """The Medusa-2 backbone (loaded once per folder, same device and dtype) and its heads."""
    from medusa_bench.heads.medusa import fit_to_base, load_medusa2_heads
    from medusa_bench.models import load_model

    path = options.medusa2_model or default_heads(loaded, "medusa2")
    if path is None:
        raise UserError(f"the medusa2 decoder needs a Medusa-2 model folder: pass --medusa2-model PATH (none ships for {loaded.name}); "
                        "train one with `medusa-bench train medusa2`")
    key = (str(path), str(loaded.device), str(loaded.dtype))
    if key not in _MEDUSA2_MODELS:
        backbone = load_model(str(path), device=loaded.device.type, dtype=str(loaded.dtype).replace("torch.", ""))
        backbone.name = loaded.name
        heads = fit_to_base(load_medusa2_heads(path), backbone.model)
        _MEDUSA2_MODELS[key] = (backbone, heads)
    return _MEDUSA2_MODELS[key]


@register("medusa2")
def build_medusa2(loaded, options: DecoderOptions):
    backbone, heads = load_medusa2(loaded, options)
    path = options.medusa2_model or default_heads(loaded, "medusa2")
    tree, auto = resolve_tree(options, heads.num_heads, backbone, lambda t: MedusaProposer(heads, t, backbone.device),
                              path, kind="medusa2")
    proposer = MedusaProposer(heads, tree, backbone.device)
    decoder = SpeculativeDecoder("medusa2", backbone, proposer, acceptance_of(options))
    decoder.baseline_name = "medusa2-baseline"
    decoder.autotree = auto
    return decoder


@register("medusa2-baseline")
def build_medusa2_baseline(loaded, options: DecoderOptions):
    """Plain decoding on the Medusa-2 backbone: the lossless reference and speed baseline of medusa2."""
    backbone, _ = load_medusa2(loaded, options)
    return SpeculativeDecoder("medusa2-baseline", backbone, Proposer())
