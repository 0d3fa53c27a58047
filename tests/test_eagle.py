"""EAGLE heads: the published layouts against a from-scratch reading of the papers' formulas, the draft
cache's rollback, lossless static and dynamic trees, training."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from medusa_bench.inputs.chat import build_prompt
from medusa_bench.decoders.base import Sampling
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.decoders.registry import build_decoder
from medusa_bench.decoders.eagle import EagleProposer
from medusa_bench.decoders.spec import Draft, SpeculativeDecoder
from medusa_bench.errors import UserError
from medusa_bench.heads import io
from medusa_bench.heads.eagle import load_eagle_heads, new_eagle_heads, save_eagle_heads
from medusa_bench.trees.tree import Tree

H, V, HEADS, KV_HEADS, FF = 16, 50, 4, 2, 24
PROMPTS = ["Explain why the sky is blue.", "Write a haiku about autumn."]
TREES = ["chain-3", "[[0],[1],[2],[0,0],[0,1],[1,0],[0,0,0],[0,0,1],[2,0]]", "mc_sim_7b_63"]


def tiny_llama(hidden=H, vocab=V, layers=6, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, vocab_size=vocab, max_position_embeddings=128, rope_theta=10000.0)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def published_tensors(variant: str, seed: int = 0, draft_vocab: int = 20) -> dict[str, torch.Tensor]:
    """Random tensors under exactly the keys SafeAILab/EAGLE saves (cnets1.py: EAGLE-1/2, cnets.py: EAGLE-3)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    d = H // HEADS
    wide = 2 * H if variant == "eagle3" else H
    prefix = "midlayer." if variant == "eagle3" else "layers.0."
    t = {
        f"{prefix}self_attn.q_proj.weight": r(HEADS * d, wide),
        f"{prefix}self_attn.k_proj.weight": r(KV_HEADS * d, wide),
        f"{prefix}self_attn.v_proj.weight": r(KV_HEADS * d, wide),
        f"{prefix}self_attn.o_proj.weight": r(H, HEADS * d),
        f"{prefix}mlp.gate_proj.weight": r(FF, H),
        f"{prefix}mlp.up_proj.weight": r(FF, H),
        f"{prefix}mlp.down_proj.weight": r(H, FF),
        f"{prefix}post_attention_layernorm.weight": 1 + r(H),
        "embed_tokens.weight": r(V, H),
    }
    if variant == "eagle":
        t.update({"fc.weight": r(H, 2 * H), "fc.bias": r(H)})
    else:
        ids = torch.sort(torch.randperm(V, generator=g)[:draft_vocab]).values
        t2d = torch.zeros(V, dtype=torch.bool)
        t2d[ids] = True
        t.update({"fc.weight": r(H, 3 * H), "midlayer.hidden_norm.weight": 1 + r(H),
                  "midlayer.input_layernorm.weight": 1 + r(H), "norm.weight": 1 + r(H),
                  "lm_head.weight": r(draft_vocab, H), "d2t": ids - torch.arange(draft_vocab), "t2d": t2d})
    return t


def write_published(folder, variant: str, as_bin: bool, **config):
    folder.mkdir(parents=True, exist_ok=True)
    tensors = published_tensors(variant)
    if as_bin:
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        io.save_tensors(folder / "model.safetensors", tensors)
    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": H, "intermediate_size": FF, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "num_hidden_layers": 1, "rms_norm_eps": 1e-6, "vocab_size": V, "bias": True}
    if variant == "eagle3":
        base.update(draft_vocab_size=20, target_hidden_size=H)
    (folder / "config.json").write_text(json.dumps({**base, **config}))
    return tensors


# ------------------------------------------------------------------------------ the formulas, by hand
def rms(x, w, eps=1e-6):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def attention(x, t, prefix):
    """Llama attention over one causal sequence x [S, W], written out: rotary, grouped keys, softmax."""
    S, d = x.shape[0], H // HEADS
    q = (x @ t[prefix + "self_attn.q_proj.weight"].T).view(S, HEADS, d)
    k = (x @ t[prefix + "self_attn.k_proj.weight"].T).view(S, KV_HEADS, d)
    v = (x @ t[prefix + "self_attn.v_proj.weight"].T).view(S, KV_HEADS, d)
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    angles = torch.arange(S).float()[:, None] * inv  # [S, d/2]
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]
    rotate = lambda y: torch.cat([-y[..., d // 2:], y[..., : d // 2]], -1)  # noqa: E731
    q, k = q * cos + rotate(q) * sin, k * cos + rotate(k) * sin
    k, v = k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    scores = scores.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(S, HEADS * d)
    return out @ t[prefix + "self_attn.o_proj.weight"].T


def mlp(x, t, prefix):
    return (F.silu(x @ t[prefix + "mlp.gate_proj.weight"].T) * (x @ t[prefix + "mlp.up_proj.weight"].T)) @ t[prefix + "mlp.down_proj.weight"].T


def reference_logits(variant, t, model, features, ids):
    """Depth-1 draft logits over the base vocabulary, straight from the papers' equations."""
    emb = model.get_input_embeddings().weight[ids[1:]]  # the next tokens' embeddings [S-1, H]
    if variant == "eagle":
        x = torch.cat([emb, features[:-1]], -1) @ t["fc.weight"].T + t["fc.bias"]
        h = x + attention(x, t, "layers.0.")
        h = h + mlp(rms(h, t["layers.0.post_attention_layernorm.weight"]), t, "layers.0.")
        return h @ model.lm_head.weight.T
    fused = features[:-1] @ t["fc.weight"].T
    a = torch.cat([rms(emb, t["midlayer.input_layernorm.weight"]), rms(fused, t["midlayer.hidden_norm.weight"])], -1)
    h = fused + attention(a, t, "midlayer.")
    h = h + mlp(rms(h, t["midlayer.post_attention_layernorm.weight"]), t, "midlayer.")
    draft = rms(h, t["norm.weight"]) @ t["lm_head.weight"].T  # [S-1, Vd]
    full = torch.full((draft.shape[0], V), float("-inf"))
    full[:, torch.arange(draft.shape[1]) + t["d2t"]] = draft
    return full


@pytest.mark.parametrize("variant", ["eagle", "eagle3"])
@pytest.mark.parametrize("as_bin", [True, False])
def test_published_layouts_load_and_compute_the_papers_formulas(tmp_path, variant, as_bin):
    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight.normal_(1, 0.1)
    tensors = write_published(tmp_path / "heads", variant, as_bin, rms_norm_eps=1e-6)
    model.config.rms_norm_eps = 1e-6
    heads = load_eagle_heads(tmp_path / "heads", base_model=model)
    assert heads.variant == variant
    assert heads.feature_layers == ((-1,) if variant == "eagle" else (2, 3, 3))  # L = 6: inputs of layers 2, L // 2, L - 3
    ids = torch.randint(0, V, (12,))
    features = torch.randn(12, len(heads.feature_layers) * H)
    with torch.no_grad():
        g = heads.unroll(features, ids, 1)[0]
        ours = heads.logits(g)
        expected = reference_logits(variant, tensors, model, features, ids)
    if variant == "eagle3":  # ours are over the draft vocabulary; map them back
        full = torch.full_like(expected, float("-inf"))
        full[:, heads.draft_ids] = ours
        ours = full
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    # writing them back gives the same keys and tensors
    save_eagle_heads(heads, tmp_path / "again")
    back = io.load_tensors(tmp_path / "again" / "model.safetensors")
    assert set(back) == set(tensors) - {"embed_tokens.weight"}
    for key, value in back.items():
        torch.testing.assert_close(value, tensors[key].to(value.dtype))


def test_model_prefix_and_missing_t2d_are_accepted(tmp_path):
    model = tiny_llama()
    tensors = published_tensors("eagle3")
    tensors = {f"model.{k}": v for k, v in tensors.items() if k != "t2d"}
    (tmp_path / "h").mkdir()
    io.save_tensors(tmp_path / "h" / "model.safetensors", tensors)
    heads = load_eagle_heads(tmp_path / "h", base_model=model)
    assert int(heads.t2d.sum()) == 20 and torch.equal(torch.nonzero(heads.t2d).flatten(), heads.draft_ids)


def test_mismatches_are_one_clear_line(tmp_path):
    write_published(tmp_path / "e1", "eagle", as_bin=False)
    with pytest.raises(UserError, match="hidden size 16 but the base model has 32") as error:
        load_eagle_heads(tmp_path / "e1", base_model=tiny_llama(hidden=32))
    assert "\n" not in str(error.value)
    write_published(tmp_path / "e3", "eagle3", as_bin=True)
    with pytest.raises(UserError, match="vocabulary of 50 tokens but the base model has 60"):
        load_eagle_heads(tmp_path / "e3", base_model=tiny_llama(vocab=60))
    (tmp_path / "hydra").mkdir()
    io.save_tensors(tmp_path / "hydra" / "model.safetensors", {"hydra_mlp.0.0.linear.weight": torch.zeros(2, 2)})
    with pytest.raises(UserError, match="holds no EAGLE tensors"):
        load_eagle_heads(tmp_path / "hydra", base_model=tiny_llama())
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no EAGLE heads"):
        load_eagle_heads(tmp_path / "empty", base_model=tiny_llama())
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=H, n_layer=2, n_head=HEADS, vocab_size=V)).eval()
    with pytest.raises(UserError, match="need a Llama-style decoder layer") as error:
        new_eagle_heads(gpt2)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------ decoding on SmolLM2
@pytest.fixture(scope="module")
def references(smollm):
    baseline = build_decoder("baseline", smollm)
    prompts = [build_prompt(smollm, [{"role": "user", "content": p}]) for p in PROMPTS]
    return [(ids, baseline.generate(ids, 24).token_ids) for ids in prompts]


def random_heads(smollm, variant, scale=0.02, seed=0):
    """Fresh heads with every weight disturbed (the identity start would hide bugs in the layer)."""
    heads = new_eagle_heads(smollm.model, variant, torch.arange(4096) if variant == "eagle3" else None)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * scale)
    return heads.requires_grad_(False).eval()


@pytest.fixture(scope="module")
def random_folders(smollm, tmp_path_factory):
    folders = {}
    for variant in ("eagle", "eagle3"):
        folders[variant] = tmp_path_factory.mktemp(variant)
        save_eagle_heads(random_heads(smollm, variant), folders[variant], base_model_name_or_path="smollm2-135m")
    return folders


@pytest.mark.parametrize("name, mode", [("eagle", "static"), ("eagle2", "dynamic"), ("eagle3", "static"), ("eagle3", "dynamic")])
def test_greedy_eagle_is_lossless_on_many_trees(smollm, random_folders, references, name, mode):
    variant = "eagle3" if name == "eagle3" else "eagle"
    for tree in TREES:
        options = DecoderOptions(**{f"{variant}_heads": str(random_folders[variant])}, tree=tree, eagle3_tree=mode,
                                 eagle_top_k=3, draft_vocab=0)
        decoder = build_decoder(name, smollm, options)
        assert decoder.proposer.dynamic == (mode == "dynamic")
        for ids, expected in references[:1] if tree == "mc_sim_7b_63" else references:  # 64 nodes: one prompt is enough
            result = decoder.generate(ids, 24)
            assert result.token_ids == expected, (tree, mode)
            assert sum(result.accept_lengths) == len(result.token_ids)


def test_dynamic_trees_keep_the_best_nodes(smollm, random_folders, references):
    decoder = build_decoder("eagle2", smollm, DecoderOptions(eagle_heads=str(random_folders["eagle"]), tree="tree-16",
                                                             eagle_top_k=4))
    proposer = decoder.proposer
    ids, _ = references[0]
    state = decoder.prefill(ids)
    root = decoder.next_root(state)
    draft = proposer.propose(root, state.hidden, ids)
    tree = Tree.parse("tree-16")
    assert draft.buffers.num_nodes == tree.num_nodes and draft.buffers.max_depth <= tree.depth
    assert int(draft.tokens[0]) == root
    # every node's token is among its parent's top-4 drafts, and the draft cache is back to the context rows
    assert proposer.fed == len(ids) and proposer.cache.get_seq_length() == len(ids)
    assert (draft.buffers.ranks[1:] < 4).all()


class OracleEagle(EagleProposer):
    """Real EAGLE drafting with the known answer written onto one branch, so steps accept all, some or none
    of it in turn; records the depth-1 draft output at every step to compare with a full recomputation."""

    def __init__(self, *args, answer, **kwargs):
        super().__init__(*args, **kwargs)
        self.answer, self.outputs, self.calls = answer, [], 0

    def reset(self, prompt_ids):
        super().reset(prompt_ids)
        self.prompt_len, self.outputs, self.calls = len(prompt_ids), [], 0

    def propose(self, root, hidden, context):
        g_root = self.catch_up(root, hidden, context)
        self.outputs.append((len(context), g_root.clone()))
        tokens = self.static_tree(root, g_root)
        from medusa_bench.runtime.cache import crop_cache

        crop_cache(self.cache, self.fed)
        produced = len(context) - self.prompt_len + 1
        truth = torch.tensor((self.answer + [0] * 8)[produced: produced + 3])
        right = [3, 1, 0][self.calls % 3]  # all three, one, none
        branch = truth.clone()
        branch[right:] = (truth[right:] + 1) % 49152  # surely wrong past `right`
        tokens[torch.tensor([1, 3, 5])] = branch  # the chain [0], [0,0], [0,0,0] in ORACLE_TREE
        self.calls += 1
        return Draft(tokens, self.buffers)


ORACLE_TREE = "[[0],[1],[0,0],[1,0],[0,0,0]]"


@pytest.mark.parametrize("variant", ["eagle", "eagle3"])
def test_draft_cache_rolls_back_to_the_accepted_path(smollm, references, variant):
    """Steps accepting all, some and none of the draft, and turns ending mid-step: the draft's rows,
    fed incrementally, equal one pass over the whole text."""
    heads = random_heads(smollm, variant)
    for ids, expected in references:
        for limit in (24, 11):  # 11: the turn ends inside a step that accepted several tokens
            proposer = OracleEagle(heads, Tree.parse(ORACLE_TREE), smollm.device, dynamic=False, answer=expected)
            result = SpeculativeDecoder("oracle", smollm, proposer).generate(ids, limit)
            assert result.token_ids == expected[:limit]
            assert {1, 2, 4} <= set(result.accept_lengths[:-1]) or limit == 11
            text = ids + expected
            with torch.no_grad():
                states = smollm.model.model(torch.tensor([text]), output_hidden_states=True).hidden_states
                features = torch.cat([states[i][0] for i in heads.feature_layers], -1)
                full = heads.unroll(features, torch.tensor(text), 1)[0]  # [S - 1, H]
            for context_len, g in proposer.outputs:
                torch.testing.assert_close(g, full[context_len - 1], atol=2e-4, rtol=1e-4)


def test_rewind_then_step_repeats_the_same_draft(smollm, random_folders, references):
    decoder = build_decoder("eagle", smollm, DecoderOptions(eagle_heads=str(random_folders["eagle"]), tree="tree-16"))
    ids, expected = references[1]
    state = decoder.prefill(ids)
    decoder.step(state)
    checkpoint = state.checkpoint()
    first = decoder.step(state)
    decoder.step(state)
    decoder.rewind(state, checkpoint)
    again = decoder.step(state)
    assert again.tokens == first.tokens and again.path == first.path
    assert state.tokens == expected[: len(state.tokens)]


def test_typical_and_sampled_decoding_run(smollm, random_folders, references):
    options = DecoderOptions(eagle_heads=str(random_folders["eagle"]), tree="[[0],[1],[0,0]]", acceptance="typical")
    decoder = build_decoder("eagle", smollm, options)
    ids, expected = references[0]
    assert decoder.generate(ids, 12).token_ids == expected[:12]  # typical at temperature 0 is greedy
    sampled = decoder.generate(ids, 10, Sampling(temperature=0.8, seed=3))
    assert 1 <= len(sampled.token_ids) <= 10 and sum(sampled.accept_lengths) == len(sampled.token_ids)


# ------------------------------------------------------------------------------ training
@pytest.mark.parametrize("variant", ["eagle", "eagle3"])
def test_training_lowers_the_loss_and_writes_heads_that_decode_losslessly(smollm, references, tmp_path, variant):
    from medusa_bench.train.eagle import EagleFitConfig, train_eagle

    answers = [smollm.tokenizer.decode(expected) for _, expected in references]
    with open(tmp_path / "data.jsonl", "w") as handle:
        for prompt, answer in zip(PROMPTS * 3, answers * 3):
            handle.write(json.dumps({"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}) + "\n")
    config = EagleFitConfig(variant=variant, num_heads=3, ttt_steps=2, epochs=4, batch_size=40, heldout=0.2, patience=5,
                            hidden_cache="none", top_k=4, draft_vocab=512,
                            # a constant rate until a plateau: EAGLE-1's feature loss rose 3.5 -> 4.5 at 2e-3 (its default is 5e-4)
                            lr=5e-4 if variant == "eagle" else 2e-3)
    result = train_eagle(smollm, tmp_path / "data.jsonl", tmp_path / "heads", config)
    assert result.curve[-1]["train_loss"] < result.curve[0]["train_loss"]
    for name in ("model.safetensors", "config.json", "calibration.json", "curve.csv", "training.json"):
        assert (tmp_path / "heads" / name).is_file()
    assert (tmp_path / "heads" / "draft_vocab.json").is_file() == (variant == "eagle")
    trained = json.loads((tmp_path / "heads" / "training.json").read_text())
    assert trained["kind"] == variant and {"top1_depth0", "top1_depth2"} <= set(trained["heldout"])
    assert json.loads((tmp_path / "heads" / "calibration.json").read_text())["kind"] == "conditional"

    decoder = build_decoder(variant, smollm, DecoderOptions(**{f"{variant}_heads": str(tmp_path / "heads")}, tree="[[0],[1],[0,0]]"))
    for ids, expected in references:
        assert decoder.generate(ids, 16).token_ids == expected[:16]


@pytest.mark.parametrize("name", ["eagle", "eagle2", "eagle3"])
def test_default_heads_ship_and_decode_losslessly(smollm, references, name):
    from medusa_bench.heads.common import default_heads

    kind = "eagle3" if name == "eagle3" else "eagle"
    if default_heads(smollm, kind) is None:
        pytest.skip(f"no default {kind} heads in medusa_bench/data/heads")
    decoder = build_decoder(name, smollm, DecoderOptions(tree="tree-16"))
    assert decoder.proposer.heads.variant == kind and decoder.proposer.dynamic == (name != "eagle")
    ids, expected = references[0]
    result = decoder.generate(ids, 24)
    assert result.token_ids == expected
    assert result.steps < len(expected)  # trained heads draft something right on ordinary text
