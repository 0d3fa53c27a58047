"""The engine (runtime/engine.py): the static KV cache and the captured-step path give the dynamic cache's tokens.

On CPU the captured path runs without CUDA graphs (each step calls the model again over the
whole static buffer with the mask, positions and slots in static inputs): that checks every
piece of a captured step except the recording itself, which tests/test_engine_cuda.py checks
on a GPU.
"""

import dataclasses

import pytest
import torch

from medusa_bench.inputs.chat import build_prompt
from medusa_bench.decoders.registry import build_decoder
from medusa_bench.errors import UserError
from medusa_bench.runtime.cache import SlotCache
from medusa_bench.runtime.engine import Engine, resolve, use_engine

TREES = [
    "baseline",
    "medusa:chain-4",  # a chain: no tree mask, the model's causal one
    "medusa:[[0],[1],[2],[3],[4],[5],[6],[7]]",  # wide: eight siblings
    "medusa:[[0],[0,0],[0,0,0],[0,0,0,0],[1],[1,0]]",  # deep, two branches
    "medusa:mc_sim_7b_63",
    "hydra:tree-16",  # Hydra drafts level by level
    "pld",  # a new tree shape every step
]


def engines(smollm):
    """dynamic, static (eager) and static with captured-step shapes, each on its own copy of the model handle."""
    dynamic, static, shapes = (dataclasses.replace(smollm) for _ in range(3))
    use_engine(dynamic, "dynamic", "off")
    use_engine(static, "static", "off")
    shapes.engine = Engine(shapes.model, shapes.device, "static", "cuda-graphs")  # on CPU: no recording
    return {"dynamic": dynamic, "static": static, "captured-shapes": shapes}


@pytest.fixture(scope="module")
def handles(smollm):
    return engines(smollm)


@pytest.fixture(scope="module")
def prompts(smollm):
    story = ("The lighthouse keeper counted the ships every night. He wrote each name in a book, and the book "
             "grew thick with names of ships that came and went. ")
    return {
        "short": build_prompt(smollm, [{"role": "user", "content": "Explain how a bicycle gear works, step by step."}]),
        # ~1,500 tokens of repeated text: long attention spans, and prompt lookup drafts long matches
        "long": build_prompt(smollm, [{"role": "user", "content": story * 45 + "Continue the story."}]),
    }


@pytest.mark.parametrize("name", TREES)
def test_static_cache_gives_the_dynamic_caches_tokens(handles, prompts, name):
    for which, prompt in prompts.items():
        if which == "long" and name not in ("baseline", "medusa:mc_sim_7b_63", "pld"):
            continue
        limit = 23  # odd: the last step is cut mid-way
        results = {kind: build_decoder(name, loaded).generate(prompt, limit) for kind, loaded in handles.items()}
        reference = results["dynamic"]
        assert len(reference.token_ids) == limit or reference.finish == "stop"
        for kind, result in results.items():
            assert result.token_ids == reference.token_ids, (name, which, kind)
            assert result.accept_lengths == reference.accept_lengths, (name, which, kind)


def test_a_slot_cache_grows_when_a_state_outlives_its_guess(handles, prompts):
    """prefill sized for 2 new tokens, then 12 steps of a 16-node tree: the buffers grow (copying) and stay right."""
    tokens = {}
    for kind in ("dynamic", "static"):
        decoder = build_decoder("medusa:tree-16", handles[kind])
        state = decoder.prefill(prompts["short"], max_new_tokens=2)
        capacity = getattr(state.cache, "capacity", None)
        for _ in range(12):
            decoder.step(state)
        tokens[kind] = list(state.tokens)
        if kind == "static":
            assert isinstance(state.cache, SlotCache) and state.cache.capacity > capacity
            assert state.cache.length == state.length
    assert tokens["static"] == tokens["dynamic"]


def test_captured_caches_are_reused_only_when_free(handles, prompts):
    loaded = handles["captured-shapes"]
    decoder = build_decoder("baseline", loaded)
    decoder.generate(prompts["short"], 4)
    first = decoder.prefill(prompts["short"], max_new_tokens=4)
    second = decoder.prefill(prompts["short"], max_new_tokens=4)  # first is alive: another cache
    assert first.cache is not second.cache
    caches = len(loaded.engine.caches)
    del first, second
    decoder.generate(prompts["short"], 4)  # both free again: no new cache
    assert len(loaded.engine.caches) == caches
    assert all(cache.graphs is not None for cache in loaded.engine.caches)


def test_rewind_on_a_static_cache(handles, prompts):
    decoder = build_decoder("medusa:tree-16", handles["static"])
    state = decoder.prefill(prompts["short"], max_new_tokens=32)
    mark = state.checkpoint()
    first = [decoder.step(state).tokens for _ in range(3)]
    decoder.rewind(state, mark)
    assert state.cache.length == mark.length == state.cache.get_seq_length()
    assert [decoder.step(state).tokens for _ in range(3)] == first


def test_engine_choices_and_refusals(smollm):
    engine = resolve(smollm.model, torch.device("cpu"), "auto", "auto")
    assert engine.describe() == {"cache": "static", "compile": "off", "reason": "eager on CPU"}
    assert resolve(smollm.model, torch.device("cpu"), "dynamic", "off").describe() == {"cache": "dynamic", "compile": "off"}
    with pytest.raises(UserError, match="valid values are: auto, static, dynamic"):
        resolve(smollm.model, torch.device("cpu"), "paged", "off")
    assert resolve(smollm.model, torch.device("cpu"), "auto", "on").describe() == {"cache": "static", "compile": "torch-compile"}
    with pytest.raises(UserError, match="needs the static cache"):
        resolve(smollm.model, torch.device("cpu"), "dynamic", "on")


def test_sliding_window_models_keep_the_dynamic_cache():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, sliding_window=8, max_position_embeddings=128)
    model = MistralForCausalLM(config).eval()
    engine = resolve(model, torch.device("cpu"), "auto", "off")
    assert engine.cache == "dynamic" and "sliding-window" in engine.reason
    with pytest.raises(UserError, match="--cache static is not possible"):
        resolve(model, torch.device("cpu"), "static", "off")


@pytest.mark.slow
def test_compiled_steps_on_cpu_give_eager_tokens(smollm, prompts):
    """--compile on, on CPU: torch.compile over the captured-step shapes (about 40 s of compiling per shape here)."""
    compiled = dataclasses.replace(smollm)
    assert use_engine(compiled, "static", "on").compile == "torch-compile"
    eager = dataclasses.replace(smollm)
    use_engine(eager, "dynamic", "off")
    for name in ("baseline", "medusa:[[0],[1],[0,0]]"):
        expected = build_decoder(name, eager).generate(prompts["short"], 12)
        result = build_decoder(name, compiled).generate(prompts["short"], 12)
        assert result.token_ids == expected.token_ids, name
        assert result.accept_lengths == expected.accept_lengths, name
