"""SpS (`sps`): the layer-skipping draft, its cache, the calibration search, and losslessness."""

import dataclasses
import json

import pytest
import torch

from conftest import SHORT_NEW, run_cli
from medusa_bench.decoders.base import Sampling
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.decoders.registry import build_decoder
from medusa_bench.decoders.sps import choose_skip, search_skip
from medusa_bench.errors import UserError
from medusa_bench.runtime.engine import Engine
from medusa_bench.runtime.layer_skip import DraftRunner, skipping
from test_architectures import save_tiny, tiny_model

# The calibration search's choices on SmolLM2-135M (fp32): its best pair (top-1 match 0.65 on the calibration
# answers) and its default set, 14 of 30 layers (--sps-skip-ratio 0.45: match 0.20, rarely confident enough to draft).
SKIP = "3,14"
FOUND = "3,5,9,12,14,16,17,18,19,21,22,23,25,26"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small forwards, where a second thread only contends


# ------------------------------------------------------------------------------ the skip mechanism
def test_skipping_no_layers_is_the_full_model_and_skipping_is_undone(smollm):
    model = smollm.model
    ids = smollm.tokenizer("The lighthouse keeper counted the ships every night.", return_tensors="pt").input_ids
    with torch.inference_mode():
        full = model(input_ids=ids, use_cache=False).logits[0]  # [T, V]
        runner = DraftRunner(model, ())
        runner.reset(64)
        assert torch.equal(runner.feed(ids[0].tolist()), full)  # the draft's cache path, nothing skipped: exact
        with skipping(model, (3,)):
            states = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
            assert torch.equal(states[4], states[3])  # layer 3 handed its input on
            assert not torch.equal(states[5], states[4])
        assert torch.equal(model(input_ids=ids, use_cache=False).logits[0], full)  # the layers are themselves again


def test_the_draft_cache_catches_up_after_drafts_it_did_not_keep(smollm):
    ids = smollm.tokenizer("One, two, three, four, five, six, seven, eight, nine, ten.", return_tensors="pt").input_ids[0].tolist()
    with torch.inference_mode():
        runner = DraftRunner(smollm.model, (3, 5, 7))
        runner.reset(64)
        runner.catch_up(ids[:6])
        runner.feed([17, 42])  # drafts the verify step rejected
        runner.rewind(6)
        caught_up = runner.catch_up(ids[:9])  # the accepted tokens and the new root, in one forward
        fresh = DraftRunner(smollm.model, (3, 5, 7))
        fresh.reset(64)
        assert runner.tokens == ids[:9] and torch.allclose(caught_up, fresh.catch_up(ids[:9]), atol=1e-4)


def test_a_bad_skip_set_and_an_unskippable_model_are_one_line(smollm):
    with pytest.raises(UserError, match="comma-separated layer numbers"):
        DecoderOptions(sps_skip="3,x")
    with pytest.raises(UserError, match=r"layers are 0 … 29, got 30"):
        build_decoder("sps", smollm, DecoderOptions(sps_skip="2,30"))
    with pytest.raises(UserError) as error:
        DraftRunner(tiny_model("mistral").model, (0,))  # sliding-window layers: the draft cache cannot serve them
    assert "\n" not in str(error.value) and "sps" in str(error.value)


# ------------------------------------------------------------------------------ the calibration search
def test_search_adds_the_layers_that_cost_least():
    cost = [0.30, 0.01, 0.20, 0.02, 0.25, 0.03]

    def score(skip):
        return 1.0 - sum(cost[layer] for layer in skip)

    skip, rate, scored = search_skip(score, 6, 3, budget=100, width=2)
    assert skip == (1, 3, 5) and rate == pytest.approx(0.94) and scored == 6 + 2 * 2
    skip, _, scored = search_skip(score, 6, 2, budget=3, width=2)  # round 1 scores what the budget leaves
    assert len(set(skip)) == 2 and scored <= 3


def test_calibration_search_returns_a_valid_set_and_caches_it(smollm, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_BENCH_CACHE", str(tmp_path))
    tiny = dict(budget=4, width=1, instructions=("Name a colour.",), tokens=8)
    found = choose_skip(smollm, 0.07, **tiny)  # round(0.07 * 30) = 2 layers
    assert len(found["skip"]) == 2 == len(set(found["skip"])) and all(0 <= i < 30 for i in found["skip"])
    assert 0 <= found["match"] <= 1 and found["scored"] <= 4
    (cached,) = (tmp_path / "sps").glob("smollm2-135m-*.json")
    assert json.loads(cached.read_text())["skip"] == found["skip"]
    monkeypatch.setattr("medusa_bench.decoders.sps.match_rate", lambda *a: pytest.fail("searched again"))
    assert choose_skip(smollm, 0.07, **tiny) == found  # paid once


# ------------------------------------------------------------------------------ decoding
NEW = SHORT_NEW  # new tokens per prompt (conftest.short_references: the baseline's answers)


@pytest.mark.parametrize("variant", [
    {"sps_skip": SKIP},
    {"sps_skip": FOUND, "sps_threshold": 0.0, "sps_max_draft": 4},  # every step drafts: rejections exercise the crop
    {"sps_skip": SKIP, "sps_tree": "[[0],[1],[0,0],[0,1],[1,0],[0,0,0],[0,0,0,0]]"},
], ids=["chain", "found-set-always-drafting", "tree"])
def test_greedy_sps_is_lossless(smollm, short_references, variant):
    decoder = build_decoder("sps", smollm, DecoderOptions(**variant))
    steps = tokens = drafted = 0
    for ids, expected in short_references:
        result = decoder.generate(ids, NEW)
        assert result.token_ids == expected
        assert sum(result.accept_lengths) == len(result.token_ids) and result.steps == len(result.accept_lengths)
        steps, tokens, drafted = steps + result.steps, tokens + len(result.token_ids), drafted + result.draft_tokens
    assert drafted > 0 and tokens / steps > (1.0 if variant["sps_skip"] == FOUND else 1.2)  # tau: 1.35 chain, 1.64 tree


def test_captured_draft_steps_give_the_same_tokens(smollm, short_references):
    """The captured path (on CPU without recording: every piece but the CUDA graph) for verify and draft steps."""
    handle = dataclasses.replace(smollm)
    handle.engine = Engine(handle.model, handle.device, "static", "cuda-graphs")
    decoder = build_decoder("sps", handle, DecoderOptions(sps_skip=SKIP, sps_threshold=0.0, sps_max_draft=3))
    assert decoder.proposer.runner.engine is not None
    ids, expected = short_references[1]
    result = decoder.generate(ids, NEW)
    assert result.token_ids == expected and result.steps < len(expected)


def test_a_separate_draft_model_is_lossless_and_agrees(smollm, short_references):
    decoder = build_decoder("sps", smollm, DecoderOptions(draft_model="smollm2-135m", sps_threshold=0.3))
    assert decoder.proposer.runner.model is not smollm.model  # a real second load
    steps = tokens = 0
    for ids, expected in short_references:
        result = decoder.generate(ids, NEW)
        assert result.token_ids == expected
        steps, tokens = steps + result.steps, tokens + len(result.token_ids)
    assert tokens / steps > 2.5  # the same weights draft: every confident draft is accepted


def test_a_draft_model_with_another_vocabulary_is_refused(smollm, tmp_path):
    save_tiny("llama", tmp_path)  # a word-level tokenizer of 64 tokens
    with pytest.raises(UserError) as error:
        build_decoder("sps", smollm, DecoderOptions(draft_model=str(tmp_path)))
    assert "\n" not in str(error.value) and "another vocabulary" in str(error.value)


def test_sampled_drafts_carry_their_distribution(smollm, short_references):
    decoder = build_decoder("sps", smollm, DecoderOptions(sps_skip=SKIP, sps_threshold=0.3))
    ids = short_references[0][0]
    state = decoder.prefill(ids, Sampling(temperature=0.7, seed=1), 16)
    root = decoder.next_root(state)
    draft = decoder.proposer.propose(root, None, state.prompt_ids + state.tokens)
    assert draft is not None and draft.probs.shape == (draft.tokens.numel(), smollm.vocab_size)
    assert torch.allclose(draft.probs[1:].sum(-1), torch.ones(draft.tokens.numel() - 1), atol=1e-4)
    runs = [decoder.generate(ids, 16, Sampling(temperature=0.7, seed=3)).token_ids for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) > 0  # seeded: the draws repeat


def test_cli_run_with_sps(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    code, _, stderr = run_cli(capsys, monkeypatch, "run", "--bench", "quick", "--limit", "1", "--max-new-tokens", "6",
                              "--decoders", "baseline,sps", "--sps-skip", SKIP, "--warmup", "0", "--device", "cpu",
                              "--dtype", "float32", "--precision-reference", "none", "--out", out)
    assert code == 0, stderr
    (record,) = [json.loads(line) for line in (out / "model_answer" / "smollm2-135m-sps.jsonl").read_text().splitlines()]
    assert record["choices"][0]["exact_match"] == [True] * len(record["choices"][0]["turns"])
    assert json.loads((out / "run.json").read_text())["settings"]["sps_skip"] == SKIP
