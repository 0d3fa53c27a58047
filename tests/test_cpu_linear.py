"""fp32 linears on CPU through oneDNN's packed weights (models.py): the same sums, chosen by timing, and
never used where they would be wrong (a gradient asked for, a weight changed since it was packed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medusa_bench.errors import UserError
from medusa_bench.models import LINEAR_ENV, PACKED, choose_linear_kernel, linear, pack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.SiLU(), torch.nn.Linear(96, 300, bias=False))


def test_packed_linears_give_torchs_sums():
    plain = small_model()
    packed = small_model()
    assert pack_linears(packed) == 2
    for rows in (1, 2, 3, 4, 8):
        x = torch.randn(1, rows, 64)
        with torch.no_grad():
            assert torch.allclose(packed(x), plain(x), atol=1e-5)
    weight = packed[2].weight
    assert getattr(weight, PACKED)[1] == weight._version


def test_a_gradient_or_a_changed_weight_takes_torchs_own_linear():
    model = small_model()
    pack_linears(model)
    x = torch.randn(2, 64, requires_grad=True)
    model(x).sum().backward()  # autograd flows: the packed route is skipped when a gradient is asked for
    assert x.grad is not None and model[0].weight.grad is not None
    with torch.no_grad():
        model[2].weight.add_(1.0)  # an optimizer step, say: the packed copy is stale
        y = torch.randn(3, 96)
        assert torch.equal(linear(y, model[2].weight), F.linear(y, model[2].weight))


def test_the_choice_is_timed_or_named(monkeypatch, smollm):
    choice = smollm.linear_kernel  # the session's model: chosen at load on this CPU
    assert choice["kernel"] in ("onednn", "torch") and choice["why"] == "timed at load"
    torch_ms, onednn_ms = choice["lm_head_ms_1_4_rows"]["torch"], choice["lm_head_ms_1_4_rows"]["onednn"]
    assert len(torch_ms) == len(onednn_ms) == 2 and min(torch_ms + onednn_ms) > 0
    layer = choice["layer_linear_ms_1_4_rows"]  # SmolLM2's MLP projection: the layers' linears must not lose either
    assert sorted(layer["shape"]) == [576, 1536] and min(layer["torch"] + layer["onednn"]) > 0
    assert (choice["kernel"] == "onednn") == (torch_ms[1] >= 1.25 * onednn_ms[1] and torch_ms[0] >= onednn_ms[0]
                                              and layer["torch"][0] >= layer["onednn"][0])
    if choice["kernel"] == "onednn":
        assert choice["linears"] > 0 and getattr(smollm.model.get_output_embeddings().weight, PACKED, None) is not None

    model = torch.nn.Sequential(torch.nn.Linear(32, 32))
    model.get_output_embeddings = lambda: model[0]
    monkeypatch.setenv(LINEAR_ENV, "torch")
    assert choose_linear_kernel(model) == {"kernel": "torch", "why": f"{LINEAR_ENV}=torch"}
    assert getattr(model[0].weight, PACKED, None) is None
    monkeypatch.setenv(LINEAR_ENV, "onednn")
    assert choose_linear_kernel(model) == {"kernel": "onednn", "why": f"{LINEAR_ENV}=onednn", "linears": 1}
    monkeypatch.setenv(LINEAR_ENV, "mkl")
    with pytest.raises(UserError, match=rf"^{LINEAR_ENV}='mkl'; valid values are: auto, onednn, torch$"):
        choose_linear_kernel(model)
    assert choose_linear_kernel(model.to(torch.bfloat16)) is None  # bf16 already takes oneDNN


def test_heads_on_a_packed_base_are_packed_too(smollm):
    from medusa_bench.decoders.options import DecoderOptions
    from medusa_bench.decoders.registry import build_decoder

    if smollm.linear_kernel["kernel"] != "onednn":
        pytest.skip("torch's own linears were faster on this CPU: nothing packed")
    hydra = build_decoder("hydra", smollm, DecoderOptions(tree="chain-2"))
    heads = hydra.proposer.heads
    linears = [m for m in heads.modules() if type(m) is torch.nn.Linear]
    assert linears and all(getattr(m.weight, PACKED, None) is not None for m in linears)
    if heads.draft_vocab_size is not None:  # the shipped heads draft among 4,096 tokens: that projection too
        from medusa_bench.heads.common import _matrices

        weights = _matrices(heads._draft_proj)
        assert weights and all(getattr(w, PACKED, None) is not None for w in weights)
        x = torch.randn(3, weights[0].shape[1])
        assert torch.allclose(linear(x, weights[0]), F.linear(x, weights[0]), atol=1e-5)
