"""The shipped heads written in the reference implementations' layouts, read back by our loaders: same logits."""

import json

import torch

from medusa_bench.heads.common import PACKAGE_HEADS
from medusa_bench.heads.convert import to_eagle, to_medusa1
from medusa_bench.heads.eagle import load_eagle_heads
from medusa_bench.heads.medusa import detect_format, load_heads
from medusa_bench.heads import io


def test_medusa_heads_round_trip_through_the_medusa1_layout(smollm, tmp_path):
    shipped = PACKAGE_HEADS / "smollm2-135m-medusa"
    head_file = to_medusa1(shipped, tmp_path, smollm.model, "/models/smollm2")
    assert head_file.name == "medusa_lm_head.pt" and detect_format(tmp_path) == "medusa1"
    layers = json.loads((shipped / "config.json").read_text())["medusa_num_layers"]  # ResBlocks per head
    tensors = io.load_tensors(head_file)
    assert tensors[f"3.{layers}.weight"].shape == (smollm.vocab_size, smollm.hidden_size)  # each head's own projection
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["medusa_num_heads"], config["medusa_num_layers"], config["base_model_name_or_path"]) == (4, layers, "/models/smollm2")

    ours, theirs = load_heads(shipped, base_model=smollm.model), load_heads(tmp_path, base_model=smollm.model)
    assert ours.shares_lm_head and not theirs.shares_lm_head
    hidden = torch.randn(5, smollm.hidden_size, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(theirs.draft_logits(hidden), ours.draft_logits(hidden), rtol=1e-5, atol=1e-4)
    assert torch.equal(theirs.draft_topk(hidden, 10), ours.draft_topk(hidden, 10))


def test_eagle_heads_round_trip_through_the_reference_layout(smollm, tmp_path):
    shipped = PACKAGE_HEADS / "smollm2-135m-eagle"
    to_eagle(shipped, tmp_path, smollm.model, "/models/smollm2")
    config = json.loads((tmp_path / "config.json").read_text())
    # the reference builds its draft layer from this file alone: SmolLM2's rotary base must be in it
    assert config["rope_theta"] == 100000.0 and config["hidden_act"] == "silu" and config["bias"] is True
    names = set(io.tensor_names(tmp_path / "model.safetensors"))
    assert {"fc.weight", "fc.bias", "layers.0.self_attn.q_proj.weight", "layers.0.post_attention_layernorm.weight"} <= names
    assert not any(name.startswith("layers.0.input_layernorm") for name in names)  # EAGLE-1's layer 0 has none

    ours, theirs = load_eagle_heads(shipped, smollm.model), load_eagle_heads(tmp_path, smollm.model)
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(6, smollm.hidden_size, generator=generator)
    tokens = torch.randint(0, smollm.vocab_size, (6,), generator=generator)
    positions = torch.arange(6)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    with torch.no_grad():
        g_ours = ours.step(features, tokens, positions, DynamicCache(), causal)
        g_theirs = theirs.step(features, tokens, positions, DynamicCache(), causal)
    mine = ours.eagle_state_dict()
    assert all(torch.equal(t, mine[k]) for k, t in theirs.eagle_state_dict().items())
    torch.testing.assert_close(g_theirs, g_ours, rtol=1e-5, atol=1e-4)  # same weights; SDPA's kernel choice varies the last bits
    assert torch.equal(theirs.draft_top(g_theirs, 10)[0], ours.draft_top(g_ours, 10)[0])
