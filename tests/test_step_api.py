"""The drafting contract: prefill/step/rewind, Draft.probs (sampled drafts), feature_layers."""

from __future__ import annotations

import pytest
import torch

from medusa_bench.inputs.chat import build_prompt
from medusa_bench.decoders.base import Sampling
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.decoders.registry import build_decoder
from medusa_bench.decoders.hydra import HydraProposer
from medusa_bench.decoders.acceptance import accept_sampled, warp
from medusa_bench.decoders.spec import Draft, Proposer, SpeculativeDecoder
from medusa_bench.models import LoadedModel
from medusa_bench.runtime.forward import forward
from medusa_bench.trees.tree import Tree, TreeBuffers


@pytest.fixture(scope="module")
def prompt(smollm):
    return build_prompt(smollm, [{"role": "user", "content": "Repeat this sentence three times: the quick brown fox jumps over the lazy dog."}])


# ------------------------------------------------------------------------------ prefill / step / rewind
@pytest.mark.parametrize("spec", ["baseline", "pld"])
def test_steps_reproduce_generate(smollm, prompt, spec):
    decoder = build_decoder(spec, smollm, DecoderOptions(extra={"pld_adaptive": False}))
    expected = decoder.generate(prompt, 24, logprobs=2)
    state = decoder.prefill(prompt)
    lengths, logprobs = [], []
    while len(state.tokens) < 23:
        rows = [state.logits]
        result = decoder.step(state, rows=True)
        assert result.tokens == state.tokens[-len(result.tokens):] and len(result.path) == len(result.tokens)
        rows.extend(result.rows)
        logp = torch.log_softmax(torch.stack(rows[:len(result.tokens)]), -1)
        logprobs.extend(float(logp[i, t]) for i, t in enumerate(result.tokens))
        lengths.append(len(result.tokens))
    n = len(expected.token_ids)  # generate stops at EOS, the steps go on
    assert n >= 8 and state.tokens[:n] == expected.token_ids
    assert logprobs[:n] == pytest.approx([lp for lp, _ in expected.logprobs], abs=1e-5)
    if spec == "pld":
        assert max(lengths) > 1  # the repeat is drafted and accepted


def recording(proposer):
    """Record every draft the proposer makes."""
    propose, proposer.drafts = proposer.propose, []

    def record(root, hidden, context):
        draft = propose(root, hidden, context)
        proposer.drafts.append(None if draft is None else draft.tokens.tolist())
        return draft

    proposer.propose = record
    return proposer


@pytest.mark.parametrize("kind", ["hydra++", "pld"])
def test_rewind_replays_steps_exactly_with_stateful_proposers(smollm, prompt, kind):
    from test_hydra import random_heads

    from medusa_bench.decoders.pld import PromptLookupProposer

    if kind == "pld":
        proposer = PromptLookupProposer(adaptive=False)
    else:
        heads = random_heads(smollm.model, "prefix-mlp", shared=True, K=3, scale=0.3)
        proposer = HydraProposer(heads, Tree.parse("[[0],[1],[0,0],[0,0,0]]"), smollm.device)
    decoder = SpeculativeDecoder(kind, smollm, recording(proposer))
    state = decoder.prefill(prompt)
    for _ in range(3):  # move into the answer: the proposer holds more than the prompt
        decoder.step(state)
    mark = state.checkpoint()
    first = [decoder.step(state).tokens for _ in range(4)]
    logits, drafts = state.logits.clone(), proposer.drafts[-4:]
    decoder.rewind(state, mark)
    assert state.length == mark.length == state.cache.get_seq_length()
    again = [decoder.step(state).tokens for _ in range(4)]
    assert again == first and proposer.drafts[-4:] == drafts  # the proposer's state came back too
    torch.testing.assert_close(state.logits, logits)
    baseline = build_decoder("baseline", smollm).generate(prompt, state.length - len(prompt)).token_ids
    assert state.tokens[:len(baseline)] == baseline
    if kind == "pld":
        assert any(d is not None for d in drafts) and max(map(len, first)) > 1


def test_prefix_layer_refuses_a_cache_moved_behind_its_back(smollm, prompt):
    from medusa_bench.runtime.cache import crop_cache
    from test_hydra import random_heads

    heads = random_heads(smollm.model, "prefix-mlp", shared=True, K=2, scale=0.3)
    decoder = SpeculativeDecoder("hydra++", smollm, HydraProposer(heads, Tree.parse("chain-2"), smollm.device))
    state = decoder.prefill(prompt)
    decoder.step(state)
    crop_cache(state.cache, len(prompt))  # what the profiler used to do
    del state.tokens[:]
    with pytest.raises(RuntimeError, match="out of step"):
        decoder.step(state)


# ------------------------------------------------------------------------------ hidden states from hooks
def tiny(name: str, vocab: int = 64) -> LoadedModel:
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, bos_token_id=0, eos_token_id=None, pad_token_id=None)
    config = {
        "llama": lambda: tf.LlamaConfig(**common),
        "gemma2": lambda: tf.Gemma2Config(**common, head_dim=8, sliding_window=8, final_logit_softcapping=5.0),
        "gpt2": lambda: tf.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                                      eos_token_id=None),
    }[name]()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=None, name=f"tiny-{name}", spec=name, device=torch.device("cpu"),
                       dtype=torch.float32, eos_token_ids=[], attn_implementation="eager")


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
@torch.inference_mode()
def test_forward_hooks_give_the_hidden_states_transformers_gives(name):
    from transformers import DynamicCache

    model = tiny(name).model
    ids = torch.randint(1, 60, (1, 9), generator=torch.Generator().manual_seed(1))
    reference = model(ids, output_hidden_states=True)
    for want, index in [(True, [-1]), ((0, 1, -1), [0, 1, -1]), ((2,), [2]), ((-2,), [-2])]:
        logits, hidden = forward(model, ids, DynamicCache(), torch.arange(9)[None], None, want)
        torch.testing.assert_close(logits, reference.logits[0])  # softcapping etc. untouched
        torch.testing.assert_close(hidden, torch.cat([reference.hidden_states[i][0] for i in index], -1))
    logits, hidden = forward(model, ids, DynamicCache(), torch.arange(9)[None], None, False, last_only=True)
    assert hidden is None and logits.shape == (1, 64)


class FeatureSpy(Proposer):
    """Declares feature layers; records what the loop hands it, drafts a one-node chain of junk."""

    feature_layers = (1, -1)
    draft_size = 1

    def reset(self, prompt_ids):
        self.rows, self.hiddens = [], []

    def observe(self, rows):
        self.rows.append(rows)

    def propose(self, root, hidden, context):
        self.hiddens.append((len(context), hidden))
        return Draft(torch.tensor([root, 3]), TreeBuffers.from_parents([-1, 0]))


@torch.inference_mode()
def test_feature_layers_reach_the_proposer():
    loaded = tiny("llama")
    spy = FeatureSpy()
    decoder = SpeculativeDecoder("spy", loaded, spy)
    assert decoder.hidden_layers == (1, -1)
    prompt = [1, 5, 9, 2, 7]
    result = decoder.generate(prompt, 12)
    context = prompt + result.token_ids
    states = loaded.model(torch.tensor([context]), output_hidden_states=True).hidden_states
    expected = torch.cat([states[1][0], states[-1][0]], -1)  # [T, 2H]
    observed = torch.cat(spy.rows)  # every kept token's rows, in context order
    torch.testing.assert_close(observed, expected[:observed.shape[0]], atol=1e-5, rtol=1e-4)
    for length, hidden in spy.hiddens:
        assert hidden.shape == (32,)
        torch.testing.assert_close(hidden, expected[length - 1], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------ Draft.probs: sampled drafts
def test_sampled_acceptance_algebra_emits_p_whatever_q():
    """Hand-made p and q, a root with two independently drawn children: the depth-1 token is ~ p."""
    V, trials = 5, 20000
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.05, 0.05]] + [[0.2] * V] * 2))  # [3, V]: root's p, children's
    q = torch.tensor([0.05, 0.05, 0.1, 0.4, 0.4])  # mostly on tokens p rarely picks
    sampling = Sampling(temperature=1.0)
    buffers = TreeBuffers.from_parents([-1, 0, 0])
    g, draw = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    counts = torch.zeros(V)
    for _ in range(trials):
        tokens = torch.cat([torch.zeros(1, dtype=torch.long), torch.multinomial(q, 2, replacement=True, generator=draw)])
        probs = torch.stack([q, q, q])
        path, residual = accept_sampled(tokens, logits, buffers, sampling, g, probs)
        token = int(tokens[path[1]]) if len(path) > 1 else int(torch.multinomial(residual, 1, generator=g))
        counts[token] += 1
    p = warp(logits[0], sampling)
    sigma = (p * (1 - p) / trials).sqrt()
    assert ((counts / trials - p).abs() < 5 * sigma).all(), (counts / trials, p)
    # q = p: every draft is accepted (min(1, p/q) = 1); a point-mass rule would accept with p(x) only
    tokens = torch.tensor([0, 3, 1])
    assert accept_sampled(tokens, logits, buffers, sampling, g, torch.stack([p, p, p]))[0] == [0, 1]


class SamplingDrafter(Proposer):
    """Drafts a chain by sampling each token from a fixed q (its own generator), or from the base's own p."""

    draft_size = 2

    def __init__(self, q: torch.Tensor, seed: int, model=None):
        self.q, self.seed, self.model = q, seed, model

    def reset(self, prompt_ids):
        self.g = torch.Generator().manual_seed(self.seed)

    def propose(self, root, hidden, context):
        tokens, probs = [root], [self.q]
        for _ in range(2):
            q = self.q if self.model is None else torch.softmax(self.model(torch.tensor([context + tokens])).logits[0, -1], -1)
            tokens.append(int(torch.multinomial(q, 1, generator=self.g)))
            probs.append(q)
        return Draft(torch.tensor(tokens), TreeBuffers.from_parents([-1, 0, 1]), torch.stack(probs))


@pytest.fixture
def one_thread():
    """Tiny matmuls: a second thread only adds contention on a shared machine (10x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.inference_mode()
def test_sampled_drafts_keep_the_base_distribution(one_thread):
    """A stochastic drafter with probs at T = 1 on a tiny model: each position's token frequencies
    over many seeds match the base's exact distribution (computed by enumeration). Dropping the
    residual after a rejection (sampling from p instead) fails this at position 2 by > 10 sigma."""
    loaded = tiny("llama", vocab=8)
    model, prompt, V, runs = loaded.model, [1, 2, 3], 8, 1500
    sampling = lambda seed: Sampling(temperature=1.0, seed=seed)  # noqa: E731

    def p(context):
        return torch.softmax(model(torch.tensor([context])).logits[0, -1], -1)

    p1 = p(prompt)
    p2 = sum(p1[a] * p(prompt + [a]) for a in range(V))
    p3 = sum(p1[a] * p(prompt + [a])[b] * p(prompt + [a, b]) for a in range(V) for b in range(V))
    q = torch.tensor([0.5, 0.3, 0.1, 0.04, 0.03, 0.01, 0.01, 0.01])
    counts = torch.zeros(3, V)
    accepted = 0
    for seed in range(runs):
        decoder = SpeculativeDecoder("sampled", loaded, SamplingDrafter(q, seed + 10_000))
        result = decoder.generate(prompt, 3, sampling(seed))
        accepted += result.accept_lengths[0] - 1
        for i, token in enumerate(result.token_ids):
            counts[i, token] += 1
    for i, exact in enumerate([p1, p2, p3]):
        sigma = (exact * (1 - exact) / runs).sqrt()
        assert ((counts[i] / runs - exact).abs() < 5 * sigma + 1e-3).all(), (i, counts[i] / runs, exact)
    assert 0 < accepted  # drafts were accepted, not only residual draws
    # a drafter that samples from the base's own p gets every draft accepted
    oracle = SpeculativeDecoder("oracle", loaded, SamplingDrafter(q, 1, model=model))
    result = oracle.generate(prompt, 9, sampling(7))
    assert result.accept_lengths == [3, 3, 3]
