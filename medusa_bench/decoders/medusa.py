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

from medusa_bench.decoders.drafting import HeadsProposer, find_heads, heads_decoder
from medusa_bench.decoders.options import DecoderOptions, Option, declare
from medusa_bench.decoders.registry import register
from medusa_bench.decoders.spec import Draft, Proposer, SpeculativeDecoder
from medusa_bench.runtime.engine import engine_of
from medusa_bench.trees.tree import Tree


class MedusaProposer(HeadsProposer):
    """Top-k of each head → the tree's candidate tokens (tokens[0] is the root, set by the loop)."""

    def __init__(self, heads, tree: Tree, device: torch.device):
        super().__init__(heads, tree, device)
        self.top_k = max(tree.top_k, 1)
        self.used = slice(0, tree.depth)  # a tree of depth d drafts with the first d heads only
        self.draft_index = self.buffers.draft_index  # [n-1] into the flat [depth * top_k] table

    def propose(self, root: int, hidden: Optional[torch.Tensor], context: list[int]) -> Optional[Draft]:
        topk = self.heads.draft_topk(hidden, self.top_k, head=self.used)  # [depth, top_k]
        tokens = torch.empty(self.tree.num_nodes, dtype=torch.long, device=topk.device)  # [n]
        tokens[0] = root
        tokens[1:] = topk.reshape(-1)[self.draft_index]
        return Draft(tokens, self.buffers)

    def true_ranks(self, hidden, tokens, positions, depth: int, top_k: int):
        return self.heads.true_ranks(hidden, tokens, positions, depth, top_k)


declare(
    Option("medusa_heads", None, "Medusa-1 / v2 heads folder or hub id (default: the heads shipped for the model)."),
    Option("medusa2_model", None, "A Medusa-2 model folder (backbone + heads)."),
)


@register("medusa", heads=("medusa_heads", "medusa"), tree=True)
def build_medusa(loaded, options: DecoderOptions):
    from medusa_bench.heads.medusa import load_heads

    path = find_heads(options.medusa_heads, loaded, "medusa", "--medusa-heads")
    return heads_decoder("medusa", loaded, load_heads(path, base_model=loaded.model), path, MedusaProposer, options,
                         draft_vocab=options.draft_vocab)


def medusa2_folder(loaded, options: DecoderOptions):
    return find_heads(options.medusa2_model, loaded, "medusa2", "--medusa2-model", what="a Medusa-2 model folder")


def load_medusa2(loaded, path):
    """The Medusa-2 backbone (same device and dtype as `loaded`) and its heads, loaded once per folder.

    They are kept in `loaded.companions` (see models.LoadedModel): medusa2 and medusa2-baseline
    built on one model share one load, and it goes when that model goes.
    """
    key = ("medusa2", str(path))
    if key not in loaded.companions:
        loaded.companions[key] = _read_medusa2(loaded, path)
    return loaded.companions[key]


def _read_medusa2(loaded, path):
    """(backbone, heads) of a Medusa-2 folder.

    Two layouts: a full Medusa-2 model folder, or a compact adapter folder (peft LoRA adapter +
    v2 heads + config.json naming the base), whose LoRA is merged into a fresh copy of the base:
    `loaded`'s own weights when the adapter names that model (or nothing), else the named base.
    """
    from medusa_bench.heads import io
    from medusa_bench.heads.medusa import load_heads, load_medusa2_heads
    from medusa_bench.models import load_model, model_name

    dtype = str(loaded.dtype).replace("torch.", "")
    if (Path(path) / "adapter_config.json").is_file():
        from peft import PeftModel

        base = io.read_config(Path(path)).get("base_model_name_or_path")
        own = base is None or base in (loaded.spec, loaded.source) or model_name(str(base)) == loaded.name
        backbone = load_model(loaded.source if own else str(base), device=loaded.device.type, dtype=dtype)
        backbone.model = PeftModel.from_pretrained(backbone.model, str(path)).merge_and_unload().eval()
        backbone.model.requires_grad_(False)
        heads = load_heads(path).fit_to_base(backbone.model)
    else:
        backbone = load_model(str(path), device=loaded.device.type, dtype=dtype)
        heads = load_medusa2_heads(path).fit_to_base(backbone.model)
    backbone.name = loaded.name
    backbone.engine = engine_of(loaded).like(backbone.model)  # timed on the run's engine, as every decoder
    return backbone, heads


@register("medusa2", heads=("medusa2_model", "medusa2"), tree=True)
def build_medusa2(loaded, options: DecoderOptions):
    path = medusa2_folder(loaded, options)
    backbone, heads = load_medusa2(loaded, path)
    # Its heads draft among their draft_vocab.json tokens as medusa's do (published Medusa-2 models have none: whole
    # vocabulary). Over the whole vocabulary (4 heads x 49152 tokens) medusa2:tree-16 stepped at 157 ms on MT-Bench
    # in fp32 on the 2-core EPYC, medusa:tree-16 (4096 tokens) at 122 ms, the one-token baseline at 68 ms.
    return heads_decoder("medusa2", backbone, heads, path, MedusaProposer, options,
                         draft_vocab=options.draft_vocab, baseline_name="medusa2-baseline")


@register("medusa2-baseline", heads=("medusa2_model", "medusa2"))
def build_medusa2_baseline(loaded, options: DecoderOptions):
    """Plain decoding on the Medusa-2 backbone: the lossless reference and speed baseline of medusa2."""
    backbone, _ = load_medusa2(loaded, medusa2_folder(loaded, options))
    # a reference itself: another model than `baseline`
    return SpeculativeDecoder("medusa2-baseline", backbone, Proposer(), baseline_name="medusa2-baseline")
