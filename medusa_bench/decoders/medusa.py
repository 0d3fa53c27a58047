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


# Drafting projects every head's state onto the vocabulary; on a small model that projection is
# most of the drafting cost. On smollm2-135m (fp32, 2 CPU threads) 4 heads onto all 49152 tokens
# took 26% of a one-token forward; onto the 4096 most frequent training tokens (which held 96% of
# the drafts Hydra's heads got accepted on 10 MT-Bench questions) it is a few percent.
DEFAULT_DRAFT_VOCAB = 4096


def apply_draft_vocab(heads, folder, size: int) -> None:
    """Restrict drafting to the heads' most frequent tokens (see MedusaHeads.restrict_draft_vocab).

    size -1: the folder's draft_vocab.json, up to DEFAULT_DRAFT_VOCAB tokens, if it has one, else all tokens;
    0: the whole vocabulary; N: the N most frequent tokens (needs draft_vocab.json).
    """
    from medusa_bench.heads.medusa import DRAFT_VOCAB_FILE, read_draft_vocab

    if size == 0:
        return
    ids = read_draft_vocab(folder)
    if ids is None:
        if size > 0:
            raise UserError(f"--draft-vocab {size} needs token frequencies in {DRAFT_VOCAB_FILE} beside the heads; "
                            "heads trained by `medusa-bench train` have one; or pass --draft-vocab 0")
        return
    heads.restrict_draft_vocab(torch.tensor(ids[: DEFAULT_DRAFT_VOCAB if size < 0 else size]))


@register("medusa")
def build_medusa(loaded, options: DecoderOptions):
    from medusa_bench.heads.medusa import load_heads

    path = options.medusa_heads or default_heads(loaded, "medusa")
    if path is None:
        raise UserError(f"the medusa decoder needs heads: pass --medusa-heads PATH (no default heads ship for {loaded.name}); "
                        "train some with `medusa-bench train medusa`")
    heads = load_heads(path, base_model=loaded.model)
    apply_draft_vocab(heads, path, options.draft_vocab)
    tree, auto = resolve_tree(options, heads.num_heads, loaded, lambda t: MedusaProposer(heads, t, loaded.device), path)
    proposer = MedusaProposer(heads, tree, loaded.device)
    decoder = SpeculativeDecoder("medusa", loaded, proposer, acceptance_of(options))
    decoder.autotree = auto  # the run folder keeps its tables (bench/autotree.store_in_run)
    return decoder


_MEDUSA2_MODELS: dict = {}


def load_medusa2(loaded, options: DecoderOptions):
    """The Medusa-2 backbone (loaded once per folder, same device and dtype) and its heads.

    Two layouts: a full Medusa-2 model folder, or a compact adapter folder (peft LoRA adapter +
    v2 heads + config.json naming the base), whose LoRA is merged into a fresh copy of the base:
    `loaded`'s own weights when the adapter names that model (or nothing), else the named base.
    """
    from medusa_bench.heads import io
    from medusa_bench.heads.medusa import fit_to_base, load_heads, load_medusa2_heads
    from medusa_bench.models import load_model, model_name

    path = options.medusa2_model or default_heads(loaded, "medusa2")
    if path is None:
        raise UserError(f"the medusa2 decoder needs a Medusa-2 model folder: pass --medusa2-model PATH (none ships for {loaded.name}); "
                        "train one with `medusa-bench train medusa2`")
    key = (str(path), str(loaded.device), str(loaded.dtype))
    if key not in _MEDUSA2_MODELS:
        dtype = str(loaded.dtype).replace("torch.", "")
        if (Path(path) / "adapter_config.json").is_file():
            from peft import PeftModel

            base = io.read_json(Path(path) / "config.json").get("base_model_name_or_path") if (Path(path) / "config.json").is_file() else None
            own = base is None or base in (loaded.spec, loaded.source) or model_name(str(base)) == loaded.name
            backbone = load_model(loaded.source if own else str(base), device=loaded.device.type, dtype=dtype)
            backbone.model = PeftModel.from_pretrained(backbone.model, str(path)).merge_and_unload().eval()
            backbone.model.requires_grad_(False)
            heads = fit_to_base(load_heads(path), backbone.model)
        else:
            backbone = load_model(str(path), device=loaded.device.type, dtype=dtype)
            heads = fit_to_base(load_medusa2_heads(path), backbone.model)
        backbone.name = loaded.name
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
    decoder = SpeculativeDecoder("medusa2-baseline", backbone, Proposer())
    decoder.baseline_name = "medusa2-baseline"  # a reference itself: another model than `baseline`
    return decoder
