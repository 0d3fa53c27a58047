"""Honest numbers: --dtype auto by measurement, the fp32 precision reference, the A/A control,
contention flags and --remeasure-flagged. Real model, real timings, short generations."""

import json
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from medusa_bench.bench import precision
from medusa_bench.bench.answer import question_order
from medusa_bench.bench.loop import RunConfig, run_benchmark
from medusa_bench.cli import main
from medusa_bench.errors import UserError
from medusa_bench.results import files


def quick(out, **kw) -> RunConfig:
    base = dict(bench="quick", limit=1, max_new_tokens=8, warmup=0, out=out, device="cpu")
    base.update(kw)
    return RunConfig(**base)


def answers(out, name: str) -> list[dict]:
    return files.read_jsonl(out / "model_answer" / f"smollm2-135m-{name}.jsonl")


@contextmanager
def cpu_burners(count: int = 2):
    """Real processes spinning on every core while the body runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.3)  # let them reach the run queue
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_dtype_auto_measures_and_a_resume_keeps_the_choice(tmp_path, data_dir, monkeypatch):
    out = tmp_path / "run"
    run_benchmark(quick(out, dtype="auto", precision_reference="none"))
    run = json.loads((out / "run.json").read_text())
    auto = run["device"]["dtype_auto"]
    ms = auto["ms_per_forward"]
    assert auto["native_bf16"] == (precision.native_bf16_flag() is not None) and auto["reason"]
    if auto["native_bf16"]:
        assert ms["float32"] > 0 and ms["bfloat16"] > 0
        assert auto["chosen"] == min(ms, key=ms.get)  # the faster one measured
    else:
        assert auto["chosen"] == "float32" and "no native bf16" in auto["reason"]
    assert run["settings"]["dtype"] == run["device"]["dtype"] == auto["chosen"]
    # A resume reuses the folder's choice: measuring again could flip it and mix precisions.
    monkeypatch.setattr(precision, "choose_dtype", lambda loaded: pytest.fail("measured the dtype again on resume"))
    run_benchmark(quick(out, dtype="auto", precision_reference="none", max_new_tokens=8))
    again = json.loads((out / "run.json").read_text())
    assert again["settings"]["dtype"] == auto["chosen"] and again["device"]["dtype_auto"] == auto


def test_no_native_bf16_stays_fp32_without_timing_bf16(smollm, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    before = smollm.model
    record = precision.choose_dtype(smollm)
    assert record["chosen"] == "float32" and not record["native_bf16"]
    assert list(record["ms_per_forward"]) == ["float32"] and "no native bf16" in record["reason"]
    assert smollm.model is before and str(smollm.dtype) == "torch.float32"


def test_bf16_run_with_fp32_reference_and_control(tmp_path, data_dir):
    from medusa_bench.models import load_model

    bf16 = load_model("smollm2-135m", device="cpu", dtype="bfloat16")
    out = tmp_path / "run"
    run_benchmark(quick(out, limit=2, decoders=["baseline", "control"]), loaded=bf16)
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["dtype"] == "bfloat16" and run["settings"]["precision_reference"] == "float32"
    assert run["precision_reference"] == {"dtype": "float32", "file": "precision_reference/smollm2-135m-baseline-float32.jsonl"}
    assert "dtype_auto" not in run["device"]  # --dtype was explicit
    reference = files.read_jsonl(out / run["precision_reference"]["file"])
    baseline = answers(out, "baseline")
    assert [r["question_id"] for r in reference] == [r["question_id"] for r in baseline]
    for ref, base in zip(reference, baseline):
        assert ref["model_id"] == "smollm2-135m-baseline-float32" and ref["decoder"] == "baseline@float32"
        choice = ref["choices"][0]
        assert len(choice["token_ids"]) == len(choice["turns"]) == len(base["choices"][0]["turns"])
        assert all(choice["token_ids"]) and choice["new_tokens"] == [len(t) for t in choice["token_ids"]]
        assert len(choice["exact_match"]) == len(choice["turns"])  # fp32 vs the bf16 baseline, per turn
    control = answers(out, "control")
    assert [r["question_id"] for r in control] == [r["question_id"] for r in baseline]
    for record in control:  # the second question ran control before the baseline; exact match still known
        assert record["baseline"] == "baseline" and len(record["choices"][0]["exact_match"]) == len(record["choices"][0]["turns"])
    # Resuming redoes nothing, the reference included.
    snapshot = (out / run["precision_reference"]["file"]).read_text()
    run_benchmark(quick(out, limit=2, decoders=["baseline", "control"]), loaded=bf16)
    assert (out / run["precision_reference"]["file"]).read_text() == snapshot


def test_control_and_baseline_take_turns_going_first():
    names = ["baseline", "control", "medusa"]
    assert question_order(names, 0) == names
    assert question_order(names, 1) == ["control", "baseline", "medusa"]
    assert question_order(["baseline", "medusa", "control"], 0) == names
    assert question_order(["baseline", "medusa", "control"], 3) == ["control", "baseline", "medusa"]
    assert question_order(["baseline", "medusa"], 1) == ["baseline", "medusa"]


def test_contended_turns_are_flagged_and_remeasured(smollm, tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    config = dict(max_new_tokens=16, decoders=["baseline", "control"])
    with cpu_burners(2):
        run_benchmark(quick(out, **config), loaded=smollm)
    busy = answers(out, "baseline")[0]
    busy_choice = busy["choices"][0]
    turns = len(busy_choice["turns"])
    assert len(busy_choice["cpu_share"]) == len(busy_choice["load_avg"]) == turns
    assert all(busy_choice["contended"]), busy_choice["cpu_share"]
    from medusa_bench.results.report import at_a_glance  # what `run` prints at its end

    assert "were measured while the CPU was shared; rerun with --remeasure-flagged" in " ".join(at_a_glance([out]).split())
    # An answer whose tokens come out different on the re-run keeps its old record.
    control_file = out / "model_answer" / "smollm2-135m-control.jsonl"
    [control] = files.read_jsonl(control_file)
    control["choices"][0]["token_ids"][0] = [0, 1, 2]
    files.rewrite_jsonl(control_file, [control])

    run_benchmark(quick(out, remeasure_flagged=True, **config), loaded=smollm)
    assert "kept the old answer and timing of control on question 1001" in " ".join(capsys.readouterr().err.split())
    assert files.read_jsonl(control_file) == [control]
    [again] = answers(out, "baseline")
    choice = again["choices"][0]
    assert again["remeasured"] is True and again["answer_id"] == busy["answer_id"]
    assert choice["token_ids"] == busy_choice["token_ids"] and choice["turns"] == busy_choice["turns"]
    assert choice["wall_time"] != busy_choice["wall_time"]
    # Other engineers' jobs may share this CPU too, so "quiet" is only: more CPU than beside two burners.
    assert sum(choice["cpu_share"]) > sum(busy_choice["cpu_share"])


def test_run_options_fail_in_one_line(tmp_path, capsys, monkeypatch):
    with pytest.raises(UserError, match="control is asked for twice"):
        RunConfig.from_cli(**cli_args(decoders="baseline,control", control=True))
    with pytest.raises(UserError, match="--precision-reference must be float32 or none"):
        RunConfig.from_cli(**cli_args(precision_reference="fp16"))
    config = RunConfig.from_cli(**cli_args(control=True))
    assert config.decoders == ["baseline", "control"]
    monkeypatch.setattr(sys, "argv", ["medusa-bench", "run", "--bench", "quick", "--control", "--decoders", "control",
                                      "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and "control is asked for twice" in capsys.readouterr().err


def cli_args(**kw) -> dict:
    base = dict(decoders="baseline", question_ids=None, categories=None, temperature="0", tree="mc_sim_7b_63",
                medusa_heads=None, medusa2_model=None, hydra_heads=None, acceptance="greedy", posterior_threshold=0.09,
                posterior_alpha=0.3, max_new_tokens=8, warmup=0)
    base.update(kw)
    return base


def test_with_native_bf16_the_fastest_predicted_configuration_picks_the_precision(smollm, monkeypatch, tmp_path, data_dir):
    """Tree and precision chosen together: each precision's optimiser answer (real, tiny settings), the faster wins."""
    import copy
    import dataclasses

    from medusa_bench.bench.autotree import AutoTreeSettings
    from medusa_bench.bench.build import fastest_prediction
    from medusa_bench.decoders.options import DecoderOptions

    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "amx_bf16"})  # as on the Xeon: bf16 is timed
    settings = AutoTreeSettings(cache_dir=str(tmp_path / "cache"), prompts=1, tokens=4, turns=1, max_nodes=2, sizes=(1, 2),
                                repeats=1, warmup=0, context_len=16)
    options = DecoderOptions(extra={"autotree": settings})
    asked = []

    def predict(candidate):
        asked.append(str(candidate.dtype))
        return fastest_prediction(["baseline", "medusa", "pld:auto"], candidate, options)

    mine = dataclasses.replace(smollm, model=copy.deepcopy(smollm.model))  # choose_dtype converts in place
    record = precision.choose_dtype(mine, predict)
    assert asked == ["torch.float32", "torch.bfloat16"] and set(record["predicted"]) == {"float32", "bfloat16"}
    rows = record["predicted"]
    for dtype, row in rows.items():  # the speedup over the one-token step both precisions had timed in turn
        assert row["tokens_per_s_at_timed_step"] == pytest.approx(row["speedup"] * 1000 / record["ms_per_forward"][dtype], rel=1e-3)
    assert record["chosen"] == max(rows, key=lambda dtype: rows[dtype]["tokens_per_s_at_timed_step"])
    assert str(mine.dtype) == f"torch.{record['chosen']}" and "fastest predicted configuration" in record["reason"]
    for row in rows.values():
        assert row["decoder"] in ("baseline", "medusa", "pld:auto") and row["tokens_per_s"] > 0
        assert row["nodes"] in (1, 2) if row["decoder"] == "medusa" else True
    # prompt lookup's knob search is weighed too: its speedup over its own profile's one-token step
    from medusa_bench.bench.build import knob_prediction
    from medusa_bench.bench.tree_cache import cached_step_profile

    from medusa_bench.decoders.registry import spec_options

    row = knob_prediction("pld:auto", mine, spec_options("pld:auto", options)[1])
    one = cached_step_profile(mine, settings)["chain"]["1"]
    assert row["baseline_tokens_per_s"] == pytest.approx(1 / one, rel=1e-3) and row["knobs"].startswith("ngram")
    assert row["tokens_per_s"] == pytest.approx(row["speedup"] * row["baseline_tokens_per_s"], rel=1e-2)
    assert fastest_prediction(["pld:auto"], mine, options)["tokens_per_s"] == row["tokens_per_s"]
