"""Medusa heads: batched drafting vs a slow reference, and every checkpoint format's round trip."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from medusa_bench.errors import UserError
from medusa_bench.heads import io
from medusa_bench.heads.medusa import (
    MedusaHeads,
    detect_format,
    load_heads,
    load_medusa2_heads,
    save_heads,
    save_medusa2,
)

H, V = 16, 50


def random_heads(K=3, L=1, shared=False, seed=0, dtype=torch.float32) -> MedusaHeads:
    """Heads with every weight random (zero-init W would hide ResBlock bugs)."""
    torch.manual_seed(seed)
    heads = MedusaHeads(K, H, None if shared else V, L, dtype=dtype)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.5)
    if shared:
        heads.attach_lm_head(torch.randn(V, H, dtype=dtype))
    return heads


def slow_logits(heads: MedusaHeads, hidden: torch.Tensor) -> torch.Tensor:
    """One head at a time, one layer at a time: the obvious reading of the Medusa paper."""
    out = []
    for h in range(heads.num_heads):
        x = hidden
        for layer in range(heads.num_layers):
            w, b = heads.res_weight[layer, h], heads.res_bias[layer, h]
            x = x + F.silu(x @ w.T + b)
        proj = heads.lm_head_weight if heads.shares_lm_head else heads.proj_weight[h]
        out.append(x @ proj.T)
    return torch.stack(out)  # [K, ..., V]


def tiny_llama(hidden=H, vocab=V, tie=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=vocab,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


class RefResBlock(nn.Module):
    """The reference code's ResBlock, so its state_dict keys are the real ones."""

    def __init__(self, hidden):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


def assert_same_heads(a: MedusaHeads, b: MedusaHeads, hidden: torch.Tensor, exact: bool = True):
    """Same logits (bit for bit unless the two compute differently) and the same drafts."""
    tol = {"rtol": 0, "atol": 0} if exact else {}
    torch.testing.assert_close(a(hidden), b(hidden), **tol)
    assert torch.equal(a.draft_topk(hidden[0, 0], 5), b.draft_topk(hidden[0, 0], 5))


# ---------------------------------------------------------------------- compute


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("L", [0, 1, 2])
def test_draft_topk_matches_slow_reference(shared, L):
    heads = random_heads(K=4, L=L, shared=shared)
    row = torch.randn(H)
    expected = slow_logits(heads, row).topk(7, dim=-1).indices  # [K, 7]
    assert torch.equal(heads.draft_topk(row, 7), expected)
    assert heads.draft_topk(row, 7).dtype == torch.long

    batch = torch.randn(3, H)
    assert torch.equal(heads.draft_topk(batch, 2), slow_logits(heads, batch).topk(2, dim=-1).indices)  # [K, 3, 2]
    assert torch.equal(heads.draft_topk(row, 3, head=slice(2)), expected[:2, :3])
    torch.testing.assert_close(heads.draft_logits(row), slow_logits(heads, row))


def test_forward_shape_and_grad():
    heads = random_heads(K=3, L=2)
    hidden = torch.randn(2, 5, H)
    logits = heads(hidden)
    assert logits.shape == (3, 2, 5, V)
    torch.testing.assert_close(logits, slow_logits(heads, hidden))
    logits.sum().backward()
    assert heads.res_weight.grad is not None and heads.proj_weight.grad is not None


def test_shared_lm_head_is_a_reference_not_a_parameter():
    base = nn.Linear(H, V, bias=False)
    heads = MedusaHeads(2, H, None, 1)
    heads.attach_lm_head(base)
    assert heads.lm_head_weight is base.weight
    assert set(heads.state_dict()) == {"res_weight", "res_bias"}
    assert all(p is not base.weight for p in heads.parameters())
    assert heads.vocab_size == V


def test_shared_heads_without_lm_head_say_how_to_attach():
    heads = MedusaHeads(2, H, None, 1)
    with pytest.raises(RuntimeError, match="base_model="):
        heads.draft_topk(torch.randn(H), 2)


def test_fresh_heads_start_as_identity_resblocks():
    model = tiny_llama()
    heads = MedusaHeads.for_model(model, num_heads=2, shared_lm_head=False)
    assert torch.count_nonzero(heads.res_weight) == 0
    assert torch.equal(heads.proj_weight[1], model.lm_head.weight)
    shared = MedusaHeads.for_model(model, num_heads=2)
    assert shared.lm_head_weight is model.lm_head.weight


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_follows_dtype(dtype):
    heads = random_heads(K=2, shared=True).to(dtype)
    heads.attach_lm_head(heads.lm_head_weight.to(dtype))
    ids = heads.draft_topk(torch.randn(H, dtype=dtype), 3)
    assert ids.shape == (2, 3) and ids.dtype == torch.long
    assert heads(torch.randn(4, H, dtype=dtype)).dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    heads = random_heads(K=3, L=2)
    row = torch.randn(H)
    expected = heads.draft_topk(row, 4)
    assert torch.equal(heads.to("cuda").draft_topk(row.cuda(), 4).cpu(), expected)


# ---------------------------------------------------------------------- Medusa-1


def test_medusa1_round_trip(tmp_path):
    heads = random_heads(K=3, L=2)
    file = save_heads(heads, tmp_path, base_model_name_or_path="org/base")
    assert file.name == "medusa_lm_head.pt"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["medusa_num_heads"] == 3 and config["medusa_num_layers"] == 2
    assert config["hidden_size"] == H and config["vocab_size"] == V
    assert config["base_model_name_or_path"] == "org/base" and "medusa_bench_version" in config
    assert detect_format(tmp_path) == "medusa1"

    loaded = load_heads(tmp_path)
    assert loaded.format == "medusa1" and loaded.base_model_name_or_path == "org/base"
    assert_same_heads(heads, loaded, torch.randn(2, 3, H))
    keys = set(torch.load(file, weights_only=True))
    assert {"0.0.linear.weight", "2.1.linear.bias", "2.2.weight"} <= keys


def test_reads_reference_medusa_code_layout(tmp_path):
    """A state dict written by Medusa's own nn.ModuleList(nn.Sequential(ResBlock..., Linear))."""
    torch.manual_seed(1)
    ref = nn.ModuleList(nn.Sequential(RefResBlock(H), nn.Linear(H, V, bias=False)) for _ in range(2))
    torch.save(ref.state_dict(), tmp_path / "medusa_lm_head.pt")
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    heads = load_heads(tmp_path)
    x = torch.randn(4, H)
    with torch.no_grad():
        torch.testing.assert_close(heads(x), torch.stack([head(x) for head in ref]))


def test_medusa1_safetensors_file_is_accepted(tmp_path):
    heads = random_heads(K=2)
    io.save_tensors(tmp_path / "medusa_lm_head.safetensors", heads.medusa_state_dict())
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    assert_same_heads(heads, load_heads(tmp_path), torch.randn(1, 2, H))
    assert_same_heads(heads, load_heads(tmp_path / "medusa_lm_head.safetensors"), torch.randn(1, 2, H))


def test_config_with_fewer_heads_than_the_file_trusts_the_file(tmp_path):
    heads = random_heads(K=5)
    save_heads(heads, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["medusa_num_heads"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="medusa_num_heads=3 but the weights hold 5"):
        loaded = load_heads(tmp_path)
    assert loaded.num_heads == 5
    assert_same_heads(heads, loaded, torch.randn(1, 1, H))


def test_shared_heads_saved_as_medusa1_get_lm_head_copies(tmp_path):
    heads = random_heads(K=2, shared=True)
    save_heads(heads, tmp_path, format="medusa1")
    loaded = load_heads(tmp_path)
    assert not loaded.shares_lm_head
    assert_same_heads(heads, loaded, torch.randn(1, 2, H), exact=False)  # bmm vs one shared matmul


# ---------------------------------------------------------------------- v2 (TGI / LoRAX)


def test_v2_round_trip(tmp_path):
    heads = random_heads(K=3, shared=True)
    file = save_heads(heads, tmp_path, base_model_name_or_path="org/base")
    assert file.name == "medusa_lm_head.safetensors"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["version"] == "2" and "architectures" not in config
    assert detect_format(tmp_path) == "v2"
    with safe_open(str(file), framework="pt") as f:
        assert set(f.keys()) == {f"{h}.0.linear.{p}" for h in range(3) for p in ("weight", "bias")}

    loaded = load_heads(tmp_path)
    assert loaded.format == "v2" and loaded.shares_lm_head
    loaded.attach_lm_head(heads.lm_head_weight)
    assert_same_heads(heads, loaded, torch.randn(2, 2, H))


def test_head_file_without_projections_is_v2_whatever_its_config_says(tmp_path):
    """LoRAX's rule: no '{head}.{L}.weight' keys means the heads use the base lm_head."""
    heads = random_heads(K=2, shared=True)
    io.save_tensors(tmp_path / "medusa_lm_head.safetensors", heads.medusa_state_dict())
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    assert detect_format(tmp_path) == "v2"
    assert load_heads(tmp_path).shares_lm_head


def test_config_v2_with_projections_is_read_as_medusa1(tmp_path):
    save_heads(random_heads(K=2), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "version": "2"}))
    with pytest.warns(UserWarning, match="reading it as Medusa-1"):
        assert load_heads(tmp_path).format == "medusa1"


def test_v2_heads_with_own_projections_are_refused():
    with pytest.raises(UserError, match="save as medusa1"):
        save_heads(random_heads(K=2), "/nonexistent", format="v2")


def test_load_with_base_model_attaches_lm_head_and_follows_dtype(tmp_path):
    model = tiny_llama()
    heads = MedusaHeads.for_model(model, num_heads=2)
    with torch.no_grad():
        heads.res_weight.normal_()
    save_heads(heads, tmp_path)
    model = model.to(torch.bfloat16)
    loaded = load_heads(tmp_path, base_model=model)
    assert loaded.lm_head_weight is model.lm_head.weight
    assert loaded.res_weight.dtype == torch.bfloat16
    row = torch.randn(H, dtype=torch.bfloat16)
    assert torch.equal(loaded.draft_topk(row, 4), slow_logits(loaded, row).topk(4, dim=-1).indices)


# ---------------------------------------------------------------------- Medusa-2


def test_medusa2_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(tie=True)
    heads = random_heads(K=2, L=1)
    save_medusa2(tmp_path, model, None, heads)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["medusa_num_heads"] == 2 and config["model_type"] == "llama"
    assert detect_format(tmp_path) == "medusa2"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(backbone.state_dict()[name], tensor), name

    loaded = load_heads(tmp_path, base_model=backbone)
    assert loaded.format == "medusa2"
    assert_same_heads(heads, loaded, torch.randn(1, 3, H))
    assert loaded.fingerprint() == load_heads(tmp_path).fingerprint()


def _write_sharded(folder, tensors: dict, torch_bin: bool):
    """Two shards plus an index, as transformers writes large models."""
    names = sorted(tensors)
    ext = "bin" if torch_bin else "safetensors"
    prefix = "pytorch_model" if torch_bin else "model"
    shards = {f"{prefix}-0000{i}-of-00002.{ext}": names[i - 1 :: 2] for i in (1, 2)}
    for file, keys in shards.items():
        io.save_tensors(folder / file, {k: tensors[k] for k in keys})
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    index = f"{prefix}.{ext}.index.json" if torch_bin else "model.safetensors.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "llama", "medusa_num_heads": 2, "medusa_num_layers": 1}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("torch_bin", [False, True])
def test_medusa2_sharded_folder_reads_only_head_tensors(tmp_path, torch_bin):
    heads = random_heads(K=2)
    tensors = {"model.embed_tokens.weight": torch.randn(V, H), "lm_head.weight": torch.randn(V, H)}
    tensors.update(heads.medusa_state_dict(prefix="medusa_head."))
    _write_sharded(tmp_path, tensors, torch_bin)
    loaded = load_medusa2_heads(tmp_path)
    assert_same_heads(heads, loaded, torch.randn(1, 1, H))


def test_model_folder_without_heads_says_so(tmp_path):
    io.save_tensors(tmp_path / "model.safetensors", {"lm_head.weight": torch.randn(V, H)})
    with pytest.raises(UserError, match="no medusa_head"):
        load_heads(tmp_path)


# ---------------------------------------------------------------------- errors


def test_hidden_size_mismatch_names_both_sizes(tmp_path):
    save_heads(random_heads(K=2), tmp_path, base_model_name_or_path="org/big-model")
    with pytest.raises(UserError, match=r"hidden size 16 vs the base model's 32.*org/big-model"):
        load_heads(tmp_path, base_model=tiny_llama(hidden=32))


def test_vocab_mismatch_names_both_sizes(tmp_path):
    save_heads(random_heads(K=2), tmp_path, base_model_name_or_path="org/big-model")
    with pytest.raises(UserError, match=r"vocabulary 50 vs the base model's 64.*org/big-model"):
        load_heads(tmp_path, base_model=tiny_llama(vocab=64))


def test_missing_files_lists_what_was_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="medusa_lm_head.pt.*pytorch_model.bin"):
        load_heads(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_heads(tmp_path / "no" / "such" / "dir")


class Payload:
    """Any pickled object: weights_only loading must refuse it rather than run its code."""


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"0.0.linear.weight": torch.zeros(H, H), "evil": Payload()}, tmp_path / "medusa_lm_head.pt")
    with pytest.raises(UserError, match="pickled"):
        load_heads(tmp_path)


def test_non_tensor_entries_are_refused(tmp_path):
    torch.save({"state_dict": {"0.0.linear.weight": torch.zeros(H, H)}}, tmp_path / "medusa_lm_head.pt")
    with pytest.raises(UserError, match="non-tensor entry 'state_dict'"):
        load_heads(tmp_path)


def test_incomplete_heads_are_refused(tmp_path):
    tensors = random_heads(K=2).medusa_state_dict()
    del tensors["1.0.linear.bias"]
    io.save_tensors(tmp_path / "medusa_lm_head.safetensors", tensors)
    with pytest.raises(UserError, match="ResBlock 1.0 lacks its bias"):
        load_heads(tmp_path)


def test_fingerprint_tracks_the_weight_bytes(tmp_path):
    save_heads(random_heads(seed=1), tmp_path / "a")
    save_heads(random_heads(seed=2), tmp_path / "c")
    fa = load_heads(tmp_path / "a").fingerprint()
    assert len(fa) == 64
    assert load_heads(tmp_path / "c").fingerprint() != fa
    assert load_heads(tmp_path / "a" / "medusa_lm_head.pt").fingerprint() == fa


# ---------------------------------------------------------------------- int8 storage


def test_int8_storage_round_trip_is_close_and_half_the_bytes(tmp_path):
    """Matrices of >= INT8_MIN_SIZE elements go to int8 + a float32 scale per row; loading gives
    float32 back within half a step of each row's scale; vectors stay bfloat16."""
    torch.manual_seed(0)
    tensors = {"w": torch.randn(512, 256), "b": torch.randn(512), "small": torch.randn(8, 8)}
    stored = io.quantize_int8(tensors)
    assert stored["w"].dtype == torch.int8 and stored["w_scale"].shape == (512, 1)
    assert stored["b"].dtype == torch.bfloat16 and stored["small"].dtype == torch.bfloat16
    io.save_tensors(tmp_path / "int8.safetensors", stored)
    io.save_tensors(tmp_path / "fp16.safetensors", {k: v.half() for k, v in tensors.items()})
    back = io.load_tensors(tmp_path / "int8.safetensors")
    assert set(back) == set(tensors) and all(v.dtype == torch.float32 for v in back.values())
    step = tensors["w"].abs().amax(1, keepdim=True) / 127
    assert ((back["w"] - tensors["w"]).abs() <= step / 2 + 1e-6).all()
    assert (tmp_path / "int8.safetensors").stat().st_size < 0.52 * (tmp_path / "fp16.safetensors").stat().st_size
    assert set(io.load_tensors(tmp_path / "int8.safetensors", keep=lambda k: k == "w")) == {"w"}  # the scale follows its key


def test_compressed_heads_folder_loads_to_the_round_trip_weights(tmp_path):
    """`heads compress` rewrites a folder in place; the loader then gives exactly what
    io.round_trip predicts (the trainers measure held-out accuracy on that), drafts unchanged here."""
    torch.manual_seed(0)
    heads = MedusaHeads(3, 256, None, 1)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.05)
    lm_head = torch.randn(V, 256)
    heads.attach_lm_head(lm_head)
    save_heads(heads, tmp_path, base_model_name_or_path="org/base")
    before = (tmp_path / "medusa_lm_head.safetensors").stat().st_size
    assert [p.name for p in io.compress_folder(tmp_path)] == ["medusa_lm_head.safetensors"]
    assert (tmp_path / "medusa_lm_head.safetensors").stat().st_size < 0.3 * before  # fp32 -> int8
    assert io.compress_folder(tmp_path) == []  # already int8: left alone
    loaded = load_heads(tmp_path)
    loaded.attach_lm_head(lm_head)
    expected = io.round_trip(heads, "int8")
    assert_same_heads(expected, loaded, torch.randn(2, 3, 256))


def test_short_draft_vocab_file_goes_on_with_unseen_ids(tmp_path):
    """draft_vocab.json lists the seen tokens only; asking for more appends the rest in id order."""
    from medusa_bench.heads.common import DRAFT_VOCAB_FILE, apply_draft_vocab

    heads = random_heads(K=2, shared=True)
    (tmp_path / DRAFT_VOCAB_FILE).write_text(json.dumps({"token_ids": [7, 3, 9]}))
    apply_draft_vocab(heads, tmp_path, 6)
    assert heads._draft_vocab.tolist() == [7, 3, 9, 0, 1, 2]
    apply_draft_vocab(heads, tmp_path, 2)
    assert heads._draft_vocab.tolist() == [7, 3]
