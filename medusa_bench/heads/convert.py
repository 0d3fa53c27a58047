"""Our heads in the reference implementations' checkpoint layouts (FasterDecoding/Medusa, SafeAILab/EAGLE).

- Medusa-1 (`to_medusa1`): ``medusa_lm_head.pt`` with every head's own [V, H] vocabulary
  projection (``{h}.{L}.weight``), as FasterDecoding/Medusa's ``MedusaModel`` loads it. Heads that
  share the base ``lm_head`` (ours: the v2 layout) get a copy of it per head: 4 × 49152 × 576
  floats, 453 MB for SmolLM2-135M, which is what the reference's layout costs.
- EAGLE-1/2 (`to_eagle`): ``model.safetensors`` with ``fc.*`` and ``layers.0.*`` (what
  `save_eagle_heads` writes) and a ``config.json`` that the reference's ``EConfig`` reads as a
  Llama config: it builds the draft layer from it, not from the base model, so the fields the
  layer needs and our config does not name (``rope_theta``: without it the reference's rotary
  embedding falls back to base 10000, SmolLM2 uses 100000; ``hidden_act``,
  ``max_position_embeddings``) come from the base model's config.

`benchmarks/vs_reference.py` runs the reference code on these; `tests/test_convert.py` loads
them back with our own loaders and checks the logits are the same.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from medusa_bench.heads.eagle import load_eagle_heads, save_eagle_heads
from medusa_bench.heads.medusa import load_heads, save_heads
from medusa_bench.models import text_config


def to_medusa1(heads_path: str | Path, folder: str | Path, base_model: nn.Module, base_model_name_or_path: str) -> Path:
    """Write the Medusa heads at `heads_path` as a Medusa-1 folder naming `base_model_name_or_path`; returns the head file."""
    heads = load_heads(heads_path, base_model=base_model)
    return save_heads(heads, folder, format="medusa1", base_model_name_or_path=base_model_name_or_path)


def to_eagle(heads_path: str | Path, folder: str | Path, base_model: nn.Module, base_model_name_or_path: str) -> Path:
    """Write the EAGLE-1/2 heads at `heads_path` in the reference's layout; returns the weight file."""
    heads = load_eagle_heads(heads_path, base_model=base_model)
    config = text_config(base_model.config)
    rope = getattr(config, "rope_parameters", None) or {}
    extra = {
        "rope_theta": rope.get("rope_theta", getattr(config, "rope_theta", None)),
        "hidden_act": getattr(config, "hidden_act", None),
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "pad_token_id": getattr(config, "pad_token_id", None),
    }
    return save_eagle_heads(heads, folder, base_model_name_or_path, **{k: v for k, v in extra.items() if v is not None})

