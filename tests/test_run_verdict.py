"""verdict.json (bench/run_verdict.py): an ordinary run's losslessness verdict, per decoder.

fp32: every answer identical, no forward spent on it. A divergence at a large reference margin is
NOT lossless; one at a bf16 near-tie (the reference's runner-up taken where its top two logits are
closer than bf16 moves them) is lossless up to rounding. Real model throughout, 16-token answers.
"""

from __future__ import annotations

import pytest
import torch

from medusa_bench.bench import run_verdict
from medusa_bench.bench.build import build_decoders
from medusa_bench.bench.loop import RunConfig, run_benchmark
from medusa_bench.bench.run_verdict import Measurer, Turn, judge, verdict_line, write_run_verdict
from medusa_bench.bench.verdict import logits_in_batch
from medusa_bench.decoders.registry import build_decoder
from medusa_bench.inputs.chat import build_prompt
from medusa_bench.results import files
from medusa_bench.results.report import collect

pytestmark = pytest.mark.usefixtures("one_thread")  # short forwards on a shared 2-core machine

DRAFTER = "medusa:chain-2"  # a fixed tree: nothing measured before the run
NEW = 16


def margins_along(loaded, prompt: list[int], tokens: list[int]) -> tuple[list[float], list[int]]:
    """The reference's top-1 − top-2 logit at each of its tokens, and its runner-up there (one forward)."""
    (logits,) = logits_in_batch(loaded, [prompt + tokens])
    top = torch.topk(logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)], 2, dim=-1)  # [T, 2]
    return (top.values[:, 0] - top.values[:, 1]).tolist(), top.indices[:, 1].tolist()


def test_fp32_run_is_lossless_at_no_cost_and_a_real_divergence_is_not(smollm, tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = RunConfig(bench="quick", question_ids=["1005"], max_new_tokens=NEW, warmup=0, out=out, device="cpu",
                       decoders=["baseline", DRAFTER])
    run_benchmark(config, loaded=smollm)
    verdicts = files.read_json(out / "verdict.json")
    assert set(verdicts) == {DRAFTER}
    entry = verdicts[DRAFTER]
    assert entry["verdict"] == "lossless (100% exact)" and entry["exact"] == entry["answers"] == 1
    assert entry["divergences"] == [] and entry["noise"] is None and entry["reference"] == "baseline"
    assert f"run: {DRAFTER} vs baseline: lossless (100% exact)" in collect([out]).notes

    # A resume that added no answers rewrites nothing; every answer identical: recomputed without a single forward.
    decoders = build_decoders(["baseline", DRAFTER], smollm)
    written = (out / "verdict.json").stat().st_mtime_ns
    assert write_run_verdict(out, decoders, smollm) == verdicts and (out / "verdict.json").stat().st_mtime_ns == written
    (out / "verdict.json").unlink()
    for name in ("margin_at", "logits_in_batch", "logits_split"):
        monkeypatch.setattr(run_verdict, name, lambda *a, **k: pytest.fail("model work on an all-exact run"))
    assert write_run_verdict(out, decoders, smollm)[DRAFTER]["verdict"] == "lossless (100% exact)"
    monkeypatch.undo()

    # The drafter's turn 1 takes the runner-up where the reference was surest: not rounding.
    drafter_file = files.answer_path(out, f"smollm2-135m-{DRAFTER.replace(':', '-')}")
    [record] = files.read_jsonl(drafter_file)
    [question] = [q for q in files.read_jsonl(out / "question.jsonl")]
    tokens = record["choices"][0]["token_ids"][0]
    prompt = build_prompt(smollm, [{"role": "user", "content": question["turns"][0]}])
    margins, runner_up = margins_along(smollm, prompt, tokens)
    surest = max(range(len(tokens)), key=margins.__getitem__)
    record["choices"][0]["token_ids"][0] = tokens[:surest] + [runner_up[surest]] + tokens[surest + 1:]
    files.rewrite_jsonl(drafter_file, [record])
    entry = write_run_verdict(out, decoders, smollm)[DRAFTER]
    [found] = entry["divergences"]
    assert (found["question_id"], found["turn"], found["position"]) == (1005, 1, surest)
    assert found["margin"] == pytest.approx(margins[surest], abs=1e-3) and found["margin"] > 2 * entry["noise"]["threshold"]
    assert entry["noise"]["threshold_from"] == "verify_shape" and entry["noise"]["fp32_spread"] is None  # fp32: no spread to add
    assert entry["verdict"].startswith(f"NOT lossless: 1 divergence above the rounding noise (margins q1005 turn 1 token {surest}: ")
    assert any(f"{DRAFTER} vs baseline: NOT lossless" in note and "[0 of 1 answers identical]" in note for note in collect([out]).notes)


def test_a_bf16_near_tie_is_lossless_up_to_rounding(smollm):
    """bf16 reference, its runner-up taken at its closest call: a tie the precision can flip, the threshold
    the fp32-vs-bf16 spread where that is the larger (both noises reported)."""
    from medusa_bench.models import load_model

    bf16 = load_model("smollm2-135m", device="cpu", dtype="bfloat16")
    prompt = build_prompt(bf16, [{"role": "user", "content": "Summarize: The committee met on Monday. The committee "
                                                             "approved the budget. The budget funds two new parks."}])
    reference = build_decoder("baseline", bf16).generate(prompt, NEW).token_ids
    margins, runner_up = margins_along(bf16, prompt, reference)
    closest = min(range(len(reference)), key=margins.__getitem__)
    mine = reference[:closest] + [runner_up[closest]]
    entry = judge(Measurer(bf16, lambda: smollm), [[Turn(7, 1, prompt, mine, reference)]])
    noise = entry["noise"]
    assert noise["dtype"] == "bfloat16" and noise["fp32_spread"] > 0 and noise["verify_shape"] >= 0
    assert noise["threshold"] == max(noise["verify_shape"], noise["fp32_spread"])
    assert noise["threshold_from"] == ("fp32_spread" if noise["fp32_spread"] > noise["verify_shape"] else "verify_shape")
    [found] = entry["divergences"]
    # bf16: margin_at's shorter forward rounds differently from the one over the whole answer
    assert found["position"] == closest and abs(found["margin"] - margins[closest]) <= 2 * noise["threshold"]
    assert found["margin"] < 2 * noise["threshold"], (margins, noise)  # SmolLM2 bf16 here: 0 against 2 × 0.66
    assert entry["verdict"].startswith("lossless up to rounding (1 divergence, all at margins < 2×noise=")
    assert entry["exact"] == 0 and entry["answers"] == 1


def test_verdict_lines():
    noise = {"threshold": 0.5, "threshold_from": "fp32_spread", "dtype": "bfloat16"}
    tie, real = {"question_id": 3, "turn": 2, "position": 9, "margin": 0.25}, {"question_id": 4, "turn": 1, "position": 2, "margin": 3.0}
    assert verdict_line([], noise) == "lossless (100% exact)"
    assert verdict_line([tie], noise) == "lossless up to rounding (1 divergence, all at margins < 2×noise=1; noise: fp32-vs-bfloat16 spread)"
    assert verdict_line([tie, real], noise) == ("NOT lossless: 1 divergence above the rounding noise (margins q4 turn 1 token 2: 3; "
                                                "2×noise=1, fp32-vs-bfloat16 spread); 1 tie flip")
    ended = {**real, "margin": None}  # the reference stopped there: nothing a rounding could flip
    assert "q4 turn 1 token 2: reference ended" in verdict_line([ended], noise)
