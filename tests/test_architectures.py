"""Every decoder on tiny random models of many architectures, past their sliding windows.

Each model is built here from its config class (no downloads): hidden 32, 2 layers, 64 tokens,
a 16-token window where the architecture has one (Llama4: 8-token attention chunks). Its greedy output is loopy (large init), so
prompt lookup and heads trained for a few steps on the model's own outputs get drafts accepted
and deep tree paths are verified, not only roots. Two checks:

- logits: every node of a 16-node tree equals a plain forward along its path, step after step
  as the context grows past the window and the cache is compacted to a random path;
- decoders: baseline, Medusa, Hydra, Hydra++ and prompt lookup, chain and 16-node tree, greedy,
  token-identical to the baseline with contexts (24 + 64 tokens) longer than the window.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch

from medusa_bench.decoders.hydra import HydraProposer
from medusa_bench.decoders.medusa import MedusaProposer
from medusa_bench.decoders.pld import PromptLookupProposer
from medusa_bench.decoders.spec import Proposer, SpeculativeDecoder
from medusa_bench.heads.hydra import HydraHeads, load_hydra_heads, save_hydra_heads
from medusa_bench.heads.medusa import MedusaHeads
from medusa_bench.models import LoadedModel
from medusa_bench.runtime.cache import keep_in_cache
from medusa_bench.runtime.forward import attention_layout, forward, tree_mask
from medusa_bench.trees.tree import Tree

V, H, W = 64, 32, 16  # vocabulary, hidden size, sliding window
PROMPT, NEW = 24, 64  # eval contexts reach 88 tokens: well past the window
EVAL = 3  # prompts per decoder
TREES = {"chain": "chain-3", "tree16": "tree-16"}


def _config(name: str):
    import transformers as tf

    common = dict(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=None,
                  pad_token_id=None, initializer_range=0.1)
    plain = dict(bos_token_id=0, eos_token_id=None, initializer_range=0.1)
    return {
        "llama": lambda: tf.LlamaConfig(**common),
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=W),
        "qwen2": lambda: tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=W, max_window_layers=1),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=8),
        "phi3": lambda: tf.Phi3Config(**common, sliding_window=W),
        "olmo2": lambda: tf.Olmo2Config(**common),
        "gemma2": lambda: tf.Gemma2Config(**common, head_dim=8, sliding_window=W, tie_word_embeddings=False),
        "gemma3": lambda: tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=W, tie_word_embeddings=False,
                                              layer_types=["sliding_attention", "full_attention"]),
        "gpt2": lambda: tf.GPT2Config(vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=256, **plain),
        "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=256, **plain),
        "falcon": lambda: tf.FalconConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, **plain),
        "llama4": lambda: tf.Llama4TextConfig(**common, head_dim=8, intermediate_size_mlp=2 * H, num_local_experts=2,
                                              attention_chunk_size=W // 2, no_rope_layers=[1, 0],
                                              layer_types=["chunked_attention", "full_attention"]),
    }[name]()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small forwards, where a second thread only contends


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma2", "gemma3", "gpt2", "gpt_neox", "falcon", "llama4"]
WINDOWED = {"mistral", "qwen2", "phi3", "gemma2", "gemma3", "llama4"}  # llama4: chunked attention (8-token chunks)


def tiny_model(name: str, seed: int = 0) -> LoadedModel:
    """A random 2-layer model of architecture `name`, with the kernel load_model would pick (Gemma2: eager)."""
    from transformers import AutoModelForCausalLM

    from medusa_bench.models import ATTENTION_KERNELS, refuses_kernel

    config = _config(name)
    for kernel in ATTENTION_KERNELS:
        torch.manual_seed(seed)
        try:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=kernel)
            break
        except ValueError as error:
            if not refuses_kernel(error):
                raise
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=None, name=f"tiny-{name}", spec=name, device=torch.device("cpu"),
                       dtype=torch.float32, eos_token_ids=[], attn_implementation=model.config._attn_implementation)


def prompts(seed: int, count: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, (count, PROMPT), generator=g).tolist()


# ------------------------------------------------------------------------------ heads trained on the model's own outputs
@dataclass
class Setup:
    loaded: LoadedModel
    evals: list[list[int]]  # prompts
    reference: list[list[int]]  # the baseline's greedy tokens for them
    medusa: MedusaHeads
    hydra: HydraHeads
    hydra_pp: HydraHeads


def _train(parameters, loss_fn, steps: int = 80, lr: float = 3e-2) -> None:
    opt = torch.optim.Adam(parameters, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()


@functools.lru_cache(maxsize=None)
def setup(name: str) -> Setup:
    """The model plus Medusa, Hydra and Hydra++ heads (3 heads) fitted briefly to its greedy outputs.

    The heads see the eval turns too: this tests verification, not the heads, and deep paths are
    verified only where drafts get accepted.
    """
    loaded = tiny_model(name)
    model = loaded.model
    baseline = SpeculativeDecoder("baseline", loaded, Proposer())
    evals = prompts(seed=1, count=EVAL)
    reference = [baseline.generate(p, NEW).token_ids for p in evals]
    ids = torch.tensor([p + out for p, out in zip(evals, reference)]
                       + [p + baseline.generate(p, NEW).token_ids for p in prompts(seed=100, count=3)])  # [B, T]
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1]  # [B, T, H]
    ce = torch.nn.functional.cross_entropy

    torch.manual_seed(0)
    medusa = MedusaHeads.for_model(model, num_heads=3)
    T = ids.shape[1]
    _train(medusa.parameters(), lambda: sum(ce(medusa(hidden)[k][:, : T - k - 2].reshape(-1, V), ids[:, k + 2:].reshape(-1))
                                            for k in range(3)))
    trained = {}
    for arch in ("mlp", "prefix-mlp"):
        torch.manual_seed(0)
        heads = HydraHeads.for_model(model, num_heads=3, arch=arch)

        def loss(heads=heads):
            states = heads.prefix_states(hidden)  # [B, T, H]
            return sum(ce(heads.head_logits(k, heads.path_inputs(states, ids, k).flatten(0, 1)), ids[:, k + 2:].reshape(-1))
                       for k in range(3))

        _train([p for p in heads.parameters() if p.requires_grad], loss)
        trained[arch] = heads.eval().requires_grad_(False)
    return Setup(loaded, evals, reference, medusa.eval().requires_grad_(False), trained["mlp"], trained["prefix-mlp"])


# ------------------------------------------------------------------------------ logits: tree nodes vs plain forwards
def plain_logits(model, context: list[int]) -> torch.Tensor:
    """The last position's logits [V] of one causal forward without cache or mask: the reference."""
    return model(torch.tensor([context])).logits[0, -1]


@pytest.mark.parametrize("name", ARCHS)
@torch.inference_mode()
def test_tree_logits_equal_plain_forward_past_the_window(name):
    from transformers import DynamicCache

    model = tiny_model(name).model
    layout = attention_layout(model.config)
    assert (layout is not None) == (name in WINDOWED)  # windowed models pay for the per-layer mask, others do not
    buffers = Tree.parse(TREES["tree16"]).buffers()
    paths = buffers.retrieve  # [L, D + 1]
    g = torch.Generator().manual_seed(7)
    context = torch.randint(1, V, (8,), generator=g).tolist()
    cache = DynamicCache()
    forward(model, torch.tensor([context]), cache, torch.arange(len(context))[None], None, False)
    for step in range(8):  # the context grows from 8 to ~35 tokens: across the 16-token window
        prefix = len(context)
        tokens = torch.randint(1, V, (buffers.num_nodes,), generator=g)  # [n]
        mask = tree_mask(buffers, prefix, model.dtype, layout)
        logits, _ = forward(model, tokens[None], cache, (prefix + buffers.depths)[None], mask, False)  # [n, V]
        for node in range(buffers.num_nodes):
            path = paths[(paths == node).any(dim=1)][0]  # a root→leaf row through the node
            along = tokens[path[: int((path == node).nonzero()) + 1]].tolist()
            torch.testing.assert_close(logits[node], plain_logits(model, context + along), atol=1e-5, rtol=1e-4,
                                       msg=f"{name} step {step} (prefix {prefix}) node {node}")
        keep = paths[int(torch.randint(0, paths.shape[0], (1,), generator=g))]  # compact to a random root→leaf path
        keep = keep[keep >= 0]
        keep_in_cache(cache, prefix, keep, contiguous=keep.tolist() == list(range(keep.numel())))
        context += tokens[keep].tolist()
        assert cache.get_seq_length() == len(context)
    # after the last compaction, a plain one-token step still reads the right keys
    logits, _ = forward(model, torch.tensor([[5]]), cache, torch.tensor([[len(context)]]), None, False)
    torch.testing.assert_close(logits[0], plain_logits(model, context + [5]), atol=1e-5, rtol=1e-4)


def test_local_mask_counts_the_window_like_transformers():
    """A query at position p sees keys k > p - window (masking_utils.sliding_window_overlay)."""
    buffers = Tree.parse("[[0],[1],[0,0]]").buffers()  # depths 0, 1, 1, 2
    visible = tree_mask_bool(buffers.local_mask(5, window=4))  # [4, 9]
    # root at position 5 sees 2..5; node 3 (depth 2, position 7) sees 4 and its ancestors 0, 1 (positions 5, 6)
    assert visible[0].tolist() == [False, False, True, True, True, True, False, False, False]
    assert visible[3].tolist() == [False, False, False, False, True, True, True, False, True]
    chunked = tree_mask_bool(buffers.local_mask(5, chunk=4))  # chunks [4..7]: position 5 sees 4, 5
    assert chunked[0].tolist() == [False, False, False, False, True, True, False, False, False]
    assert torch.equal(buffers.local_mask(5), buffers.additive_mask(5))


def tree_mask_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask[0, 0] == 0


def test_sliding_window_cache_layers_are_refused():
    """A DynamicSlidingWindowLayer evicts prefix keys when a tree is appended: compaction must refuse it."""
    from transformers import DynamicCache

    model = tiny_model("mistral").model
    cache = DynamicCache(config=model.config)
    forward(model, torch.arange(1, 21)[None], cache, torch.arange(20)[None], None, False)
    assert any(layer.is_sliding for layer in cache.layers)  # transformers would keep only the last W - 1 keys
    with pytest.raises(ValueError, match="keeps every key"):
        keep_in_cache(cache, 20, torch.tensor([0]), contiguous=True)


# ------------------------------------------------------------------------------ decoders: lossless, drafts accepted
def proposers(s: Setup, tree: str) -> dict[str, Proposer]:
    t = Tree.parse(TREES[tree])
    device = s.loaded.device
    pld = (PromptLookupProposer(max_tokens=3, branches=1, adaptive=False) if tree == "chain"
           else PromptLookupProposer(max_tokens=5, branches=3, adaptive=False))  # up to 16 nodes
    return {"medusa": MedusaProposer(s.medusa, t, device), "hydra": HydraProposer(s.hydra, t, device),
            "hydra++": HydraProposer(s.hydra_pp, t, device), "pld": pld}


MATRIX: dict = {}  # (arch, decoder, tree) -> (identical turns, turns, mean accept length): printed at the end


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("tree", list(TREES))
def test_greedy_decoders_are_lossless_past_the_window(name, tree):
    s = setup(name)
    evals, reference = s.evals, s.reference
    failures, accepted = [], {}
    for decoder_name, proposer in proposers(s, tree).items():
        decoder = SpeculativeDecoder(decoder_name, s.loaded, proposer)
        outs = [decoder.generate(p, NEW) for p in evals]
        same = sum(out.token_ids == ref for out, ref in zip(outs, reference))
        lengths = [a for out in outs for a in out.accept_lengths]
        accepted[decoder_name] = sum(lengths) / len(lengths)
        MATRIX[(name, decoder_name, tree)] = (same, len(evals), accepted[decoder_name])
        if same != len(evals):
            failures.append(f"{decoder_name}: {same}/{len(evals)} turns identical")
    print(f"\n{name:9s} {tree:6s} " + "  ".join(f"{d} {accepted[d]:.2f}" for d in accepted))
    assert not failures, f"{name} {tree}: " + "; ".join(failures)
    # drafts are accepted, so deep paths were verified: the heads and prompt lookup beat one token per step
    for decoder_name, mean in accepted.items():
        assert mean > 1.2, f"{name} {tree} {decoder_name}: mean accept length {mean:.2f}; the test verifies little"


# ------------------------------------------------------------------------------ Hydra++ on every base
@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "falcon", "gemma2"])
def test_hydra_pp_heads_save_and_load_on_any_base(name, tmp_path):
    s = setup(name)
    save_hydra_heads(s.hydra_pp, tmp_path)
    back = load_hydra_heads(tmp_path, base_model=s.loaded.model)
    hidden = torch.randn(1, 10, H)
    torch.testing.assert_close(back.prefix_states(hidden), s.hydra_pp.prefix_states(hidden))


def test_unloadable_hydra_heads_are_not_saved(tmp_path):
    from medusa_bench.errors import UserError

    heads = HydraHeads.for_model(tiny_model("llama").model, num_heads=2, arch="prefix-mlp")
    heads.prefix.config.num_hidden_layers = 2  # the saved config would rebuild another layer stack
    heads.prefix.config.hidden_size = H * 2
    with pytest.raises(UserError, match="would not load back"):
        save_hydra_heads(heads, tmp_path / "heads")
    assert not (tmp_path / "heads").exists()


# ------------------------------------------------------------------------------ loading: the kernel that runs, one-line errors
def save_tiny(name: str, folder) -> None:
    """A tiny model folder load_model can read: weights, config and a word-level tokenizer (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_model(name).model.save_pretrained(folder)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="t1").save_pretrained(folder)


@pytest.mark.parametrize("name, kernel", [("llama", "sdpa"), ("gemma2", "eager")])
def test_load_model_picks_a_kernel_the_model_accepts(name, kernel, tmp_path):
    from medusa_bench.bench.device import device_info
    from medusa_bench.models import load_model

    save_tiny(name, tmp_path)
    loaded = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert loaded.attn_implementation == kernel  # Gemma2 refuses sdpa (softcapping): eager, not a traceback
    assert device_info(loaded)["attn_implementation"] == kernel  # recorded in run.json


def test_load_failure_is_one_line(tmp_path):
    import json

    from medusa_bench.errors import UserError
    from medusa_bench.models import load_model

    save_tiny("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))  # weights no longer fit
    with pytest.raises(UserError) as error:
        load_model(str(tmp_path), device="cpu", dtype="float32")
    assert "\n" not in str(error.value) and "cannot load model" in str(error.value)
