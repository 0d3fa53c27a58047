"""Honest numbers (#15): drift against the baseline and an fp32 reference, the A/A noise floor,
shared-CPU turns, the dtype choice, and terminal tables that fit 80 columns.

Run folders are hand-written in the run side's format (tests/test_report.py's builders), with
token ids crafted so every expected rate and position below is counted by hand.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from medusa_bench.results.drift import first_divergence
from medusa_bench.results.html import headline_items
from medusa_bench.results.report import build_report, collect
from medusa_bench.results.stats import bootstrap_speedup_ci
from medusa_bench.results.terminal import render_terminal
from test_report import BASELINE_Q, answer, image_sources, judgment, row, write_run

# ------------------------------------------------------------------------- first_divergence


@pytest.mark.parametrize("a, b, expected", [
    ([5, 6, 7], [5, 6, 7], None),  # identical
    ([9, 6, 7], [5, 6, 7], 0),  # differs at the first token
    ([5, 6, 7, 8], [5, 6, 0, 8], 2),  # differs mid-way (and agrees again after: still 2)
    ([5, 6], [5, 6, 7, 8], 2),  # a prefix: they part where the shorter one stops
    ([5, 6, 7, 8], [5, 6], 2),
    ([], [], None),  # both empty
    ([], [4], 0),
])
def test_first_divergence(a, b, expected):
    assert first_divergence(a, b) == expected


# ------------------------------------------------------------------------------ a bf16 run


def base_ids(q: int, turn: int) -> list[int]:
    """The bf16 baseline's tokens of one turn: 10 distinct ids."""
    return [100 * q + 10 * turn + i for i in range(10)]


def diverge(tokens: list[int], at: int) -> list[int]:
    return tokens[:at] + [-1] + tokens[at + 1:]


# Six questions (12 turns): enough for a bootstrap interval (stats.MIN_QUESTIONS_FOR_CI = 5).
QUESTIONS = {**BASELINE_Q, 5: ("coding", [30, 20], [1.5, 1.0], [30, 20]), 6: ("coding", [45, 15], [2.2, 0.8], [45, 15])}

# Hand-crafted divergences (question, turn) -> position, everything else token-identical:
# fp32 baseline vs bf16 baseline: (1,1) at 5, (4,2) at 2        -> 10/12 match, median 3.5
# hydra vs bf16 baseline: (1,1) at 5 (it took the fp32 path), (2,2) at 3, (3,1) a 4-token prefix
#                                                               -> 9/12 match, median 4
FP32 = {(1, 1): diverge(base_ids(1, 1), 5), (4, 2): diverge(base_ids(4, 2), 2)}
HYDRA = {(1, 1): FP32[(1, 1)], (2, 2): diverge(base_ids(2, 2), 3), (3, 1): base_ids(3, 1)[:4]}
# hydra vs fp32 turn by turn: (1,1) same (both took the fp32 token), (1,2) same, (2,1) same,
# (2,2) at 3, (3,1) at 4, (3,2) same, (4,1) same, (4,2) at 2, questions 5 and 6 same -> 9/12 match,
# median of [2, 3, 4] = 3.


def token_ids(q: int, crafted: dict) -> list[list[int]]:
    return [crafted.get((q, t), base_ids(q, t)) for t in (1, 2)]


def bf16_records(decoder: str, time_factor: dict[int, float], crafted: dict | None = None, contended: dict | None = None) -> list[dict]:
    """Answers with the baseline's token counts and wall times scaled per question (speed is set by hand)."""
    out = []
    for q, (category, tokens, times, _) in QUESTIONS.items():
        record = answer(q, category, decoder, tokens, [t * time_factor[q] for t in times])
        record["baseline"] = "baseline"
        choice = record["choices"][0]
        choice["token_ids"] = token_ids(q, crafted or {})
        choice["contended"] = list((contended or {}).get(q, [False, False]))
        choice["cpu_share"] = [0.98, 0.97]
        choice["load_avg"] = [1.1, 1.2]
        out.append(record)
    return out


CONTROL_TIMES = {1: 0.9, 2: 1.1, 3: 0.95, 4: 1.05, 5: 1.02, 6: 0.97}  # an A/A copy: the baseline's work, noisy times
HYDRA_TIMES = {q: 0.5 for q in QUESTIONS}  # exactly twice as fast on every question
MEDUSA_TIMES = {1: 0.96, 2: 1.0, 3: 0.93, 4: 1.02, 5: 0.97, 6: 1.01}  # a hair faster: inside the noise
SLOW_TIMES = {q: 2.0 for q in QUESTIONS}
SAME_TIMES = {q: 1.0 for q in QUESTIONS}
HYDRA_CONTENDED = {1: [True, False], 3: [True, True]}
CONTROL_CONTENDED = {2: [False, True]}
DTYPE_AUTO = {"chosen": "bfloat16", "ms_per_forward": {"float32": 61.2, "bfloat16": 39.8}, "native_bf16": True,
              "reason": "bfloat16 is 1.54x faster per forward"}


def set_bf16(run: Path) -> None:
    """Turn a write_run folder into a bf16 run as the run side writes it (dtype auto + fp32 reference)."""
    info = json.loads((run / "run.json").read_text())
    info["settings"]["dtype"] = "auto"
    info["device"].update(dtype="bfloat16", dtype_auto=DTYPE_AUTO)
    info["precision_reference"] = {"dtype": "float32", "file": "precision_reference/tiny-baseline-float32.jsonl"}
    (run / "precision_reference").mkdir()
    fp32 = [dict(r, model_id="tiny-baseline-float32") for r in bf16_records("baseline", SAME_TIMES, FP32)]
    (run / "precision_reference" / "tiny-baseline-float32.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fp32))
    (run / "run.json").write_text(json.dumps(info))


HYDRA_SCORES = {(1, 1): 7, (1, 2): 5, (2, 1): 8, (2, 2): 6, (3, 1): 4, (3, 2): 4, (4, 1): 9, (4, 2): 7}


@pytest.fixture
def bf16_run(tmp_path):
    decoders = ["baseline", "control", "hydra", "medusa", "slow"]
    answers = {
        "tiny-baseline": bf16_records("baseline", SAME_TIMES),
        "tiny-control": bf16_records("control", CONTROL_TIMES, contended=CONTROL_CONTENDED),
        "tiny-hydra": bf16_records("hydra", HYDRA_TIMES, HYDRA, contended=HYDRA_CONTENDED),
        "tiny-medusa": bf16_records("medusa", MEDUSA_TIMES),
        "tiny-slow": bf16_records("slow", SLOW_TIMES),
    }
    judgments = [judgment("tiny-hydra", q, t, s) for (q, t), s in HYDRA_SCORES.items()]
    run = write_run(tmp_path / "bf16", answers, judgments=judgments, decoders=decoders)
    set_bf16(run)
    return run


def control_interval() -> tuple[float, float, float]:
    """The control's speedup (ratio of sums) and bootstrap interval, from the raw lists."""
    tokens = [sum(t) for _, t, _, _ in QUESTIONS.values()]
    base = [sum(w) for _, _, w, _ in QUESTIONS.values()]
    control = [sum(w) * CONTROL_TIMES[q] for q, (_, _, w, _) in QUESTIONS.items()]
    speedup = (sum(tokens) / sum(control)) / (sum(tokens) / sum(base))
    return (speedup, *bootstrap_speedup_ci(tokens, control, tokens, base))


# -------------------------------------------------------------------------------- precision


def test_precision_table_counts_drift_against_baseline_and_fp32(bf16_run):
    report = collect([bf16_run])
    precision = report.tables["precision"]
    hydra = row(precision, decoder="hydra")
    assert hydra.turns == 12 and hydra["dtype"] == "bfloat16"
    assert hydra.exact_vs_baseline == pytest.approx(9 / 12) and hydra.divergence_vs_baseline == 4.0
    assert hydra.exact_vs_fp32 == pytest.approx(9 / 12) and hydra.divergence_vs_fp32 == 3.0
    assert hydra.baseline_exact_vs_fp32 == pytest.approx(10 / 12)  # the floor the precision sets anyway
    assert hydra.score == pytest.approx(sum(HYDRA_SCORES.values()) / 8)  # the judge's score sits beside the drift
    medusa = row(precision, decoder="medusa")  # token-identical to the bf16 baseline: drifts from fp32 exactly as it does
    assert medusa.exact_vs_baseline == 1.0 and math.isnan(medusa.divergence_vs_baseline)
    assert medusa.exact_vs_fp32 == pytest.approx(10 / 12) and medusa.divergence_vs_fp32 == 3.5
    base = row(precision, decoder="baseline")
    assert math.isnan(base.exact_vs_baseline) and base.exact_vs_fp32 == pytest.approx(10 / 12) and base.divergence_vs_fp32 == 3.5
    assert any("baseline itself matches its float32 decoding on only 83.3% of turns" in n for n in report.notes)
    hydra_claim = next(item for item in headline_items(report) if "<b>hydra</b>" in item)
    assert "75.0% token-identical to the float32 reference (the baseline itself: 83.3%)" in hydra_claim
    # the plot's raw positions are the same hand-counted ones
    assert sorted(d for d in report.drift[("bf16", "hydra")]["vs_baseline"].values() if d is not None) == [3, 4, 5]
    assert sorted(d for d in report.drift[("bf16", "baseline")]["baseline_vs_fp32"].values() if d is not None) == [2, 5]


def test_fp32_run_without_reference_shows_match_against_baseline_only(tmp_path):
    answers = {"tiny-baseline": bf16_records("baseline", SAME_TIMES),
               "tiny-hydra": bf16_records("hydra", HYDRA_TIMES, HYDRA)}
    for record in answers["tiny-hydra"]:  # the run loop's own field, from the same ids
        record["choices"][0]["exact_match"] = [(record["question_id"], t) not in HYDRA for t in (1, 2)]
    run = write_run(tmp_path / "fp32", answers)  # write_run's runs are float32, no precision_reference
    report = collect([run])
    precision = report.tables["precision"]
    assert "exact_vs_fp32" not in precision.columns and "baseline_exact_vs_fp32" not in precision.columns
    assert row(precision, decoder="hydra").exact_vs_baseline == pytest.approx(9 / 12)
    assert row(report.tables["speed"], decoder="hydra").exact_match == pytest.approx(9 / 12)  # one truth, two tables
    assert any("hydra matched the reference's tokens on only 75.0% of turns in float32" in n for n in report.notes)
    assert "exact vs fp32" not in build_report([run], fmt="markdown")


def test_runs_without_token_ids_have_no_drift_table(tmp_path):
    answers = {"tiny-baseline": bf16_records("baseline", SAME_TIMES), "tiny-hydra": bf16_records("hydra", HYDRA_TIMES)}
    for records in answers.values():
        for record in records:
            del record["choices"][0]["token_ids"]
    report = collect([write_run(tmp_path / "old", answers)])
    assert report.tables["precision"].empty


# ------------------------------------------------------------------------------ noise floor


def test_noise_floor_is_printed_and_speedups_are_judged_against_it(bf16_run):
    report = collect([bf16_run])
    speedup, low, high = control_interval()
    banner = f"A/A control: {speedup:.2f}× (95% CI {low:.2f}–{high:.2f}) — speedups inside this band are noise"
    assert report.banner[0] == banner
    speed = report.tables["speed"]
    assert row(speed, decoder="control").speedup == pytest.approx(speedup)
    assert row(speed, decoder="hydra").vs_noise == "faster"  # CI 2.00–2.00, above the band
    assert row(speed, decoder="slow").vs_noise == "slower"
    medusa = row(speed, decoder="medusa")
    assert medusa.speedup_ci_low <= high and medusa.vs_noise == "inside noise"  # overlaps the band though it is > 1.00
    assert row(speed, decoder="control").vs_noise == "noise floor" and row(speed, decoder="baseline").vs_noise == "reference"
    # at the top of every format
    assert build_report([bf16_run], fmt="markdown").split("## ")[0].count(banner) == 1
    terminal = build_report([bf16_run], fmt="table")
    assert terminal.index("A/A control") < terminal.index("At a glance")
    page = build_report([bf16_run]).read_text()
    assert page.index(banner) < page.index('id="glance"')


def test_control_is_never_a_contender(bf16_run):
    report = collect([bf16_run])
    items = headline_items(report)  # the HTML's per-decoder claims
    assert not any("<b>control</b>" in item for item in items) and any("<b>hydra</b>" in item for item in items)
    assert any("<b>medusa</b>" in item and "inside the noise band" in item for item in items)
    assert report.drafting_rows(report.tables["summary"]).decoder.tolist() == ["hydra", "medusa", "slow"]
    assert list(report.tables["summary"].decoder[:2]) == ["baseline", "control"]  # reference-like rows lead


def test_without_control_a_speedup_must_exclude_one(tmp_path):
    answers = {"tiny-baseline": bf16_records("baseline", SAME_TIMES),
               "tiny-medusa": bf16_records("medusa", MEDUSA_TIMES), "tiny-hydra": bf16_records("hydra", HYDRA_TIMES)}
    report = collect([write_run(tmp_path / "nocontrol", answers)])
    medusa = row(report.tables["speed"], decoder="medusa")
    assert medusa.speedup > 1.0 and medusa.speedup_ci_low <= 1.0 <= medusa.speedup_ci_high and medusa.vs_noise == "inside noise"
    assert row(report.tables["speed"], decoder="hydra").vs_noise == "faster"
    assert report.banner[0].startswith("no A/A control in this run")


def test_too_few_questions_give_no_noise_floor(tmp_path):
    """Three questions: the control has no interval to be a band, and no speedup is judged against it."""
    def first_three(records: list[dict]) -> list[dict]:
        return [r for r in records if r["question_id"] <= 3]

    answers = {"tiny-baseline": first_three(bf16_records("baseline", SAME_TIMES)),
               "tiny-control": first_three(bf16_records("control", CONTROL_TIMES)),
               "tiny-hydra": first_three(bf16_records("hydra", HYDRA_TIMES))}
    run = write_run(tmp_path / "three", answers, decoders=["baseline", "control", "hydra"])
    report = collect([run])
    assert "(n=3, no CI: an interval needs 5 questions)" in report.banner[0]
    hydra = row(report.tables["speed"], decoder="hydra")
    assert hydra.speedup == pytest.approx(2.0) and math.isnan(hydra.speedup_ci_low) and hydra.vs_noise == "no CI"
    assert "n=3, no CI" in build_report([run], fmt="markdown")


# ------------------------------------------------------------------------------- contention


def test_contended_turns_are_counted_and_announced(bf16_run, tmp_path):
    report = collect([bf16_run])
    speed = report.tables["speed"]
    counts = {d: row(speed, decoder=d).contended_turns for d in ("baseline", "control", "hydra", "medusa", "slow")}
    assert counts == {"baseline": 0, "control": 1, "hydra": 3, "medusa": 0, "slow": 0}
    assert "4 of 60 turns were measured while the CPU was shared; rerun with --remeasure-flagged on a quiet machine" in report.banner
    assert "shared-CPU turns" in build_report([bf16_run], fmt="markdown")
    # an older run without the flags: no column, no claim that its CPU was quiet
    old = write_run(tmp_path / "old", {"tiny-baseline": [answer(1, "writing", "baseline", [10], [1.0])]})
    old_report = collect([old])
    assert "contended_turns" not in old_report.tables["speed"].columns
    assert not any("CPU was shared" in line for line in old_report.banner)


def test_config_shows_the_dtype_choice(bf16_run):
    config = collect([bf16_run]).tables["config"].set_index("setting")["bf16"]
    assert config["device.dtype_auto"] == "bfloat16 (per forward: float32 61.2 ms, bfloat16 39.8 ms)"
    assert config["device.dtype_auto.reason"] == DTYPE_AUTO["reason"]
    assert config["precision_reference"] == "float32: precision_reference/tiny-baseline-float32.jsonl"


# --------------------------------------------------------------------------------- terminal

LONG_NAMES = ["medusa2-baseline", "hydra-prefix-mlp-auto", "medusa-vicuna-7b-v1.3", "pld-ngram-3-lookup"]


def test_terminal_tables_fit_80_columns_without_breaking_words(bf16_run, tmp_path):
    answers = {"tiny-baseline": bf16_records("baseline", SAME_TIMES),
               "tiny-control": bf16_records("control", CONTROL_TIMES, contended=CONTROL_CONTENDED)}
    for i, name in enumerate(LONG_NAMES):
        answers[f"tiny-{name}"] = bf16_records(name, HYDRA_TIMES if i % 2 else MEDUSA_TIMES, HYDRA if i % 2 else None)
    judgments = [judgment(f"tiny-{d}", q, t, s) for d in ["baseline", *LONG_NAMES] for (q, t), s in HYDRA_SCORES.items()]
    run = write_run(tmp_path / "many", answers, judgments=judgments, decoders=["baseline", "control", *LONG_NAMES])
    set_bf16(run)
    buffer = io.StringIO()
    render_terminal(collect([run]), Console(file=buffer, width=80, color_system=None, force_terminal=False))
    text = buffer.getvalue()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    for name in ["baseline", "control", *LONG_NAMES]:
        assert name in text
    # A header cell split over two lines makes a table's header two lines tall; a wrapped body
    # cell makes a continuation line whose first (name) cell is blank.
    for before, line in zip(lines, lines[1:]):
        assert not (before.startswith("┃") and line.startswith("┃")), f"header wrapped:\n{before}\n{line}"
    tables, config = text.split("Configuration")
    for line in tables.splitlines():
        if line.startswith("│"):
            assert line.split("│")[1].strip(), f"a cell wrapped onto a second line:\n{line}"
    # the configuration may wrap a long value (a path), never a setting's name
    assert "device.dtype_auto.native_bf16" in config and "precision_reference " in config
    for title in ("Speed", "Drift: exact match and first divergence", "Per category", "Quality", "Configuration"):
        assert title in text
    assert "vs noise" in text and "shared CPU" in text  # the new columns survive the compact view
    # markdown keeps every column under its full name
    markdown = build_report([run], fmt="markdown")
    assert "speedup (Spec-Bench)" in markdown and "shared-CPU turns" in markdown and "median first divergence" in markdown


# ------------------------------------------------------------------------------------- HTML


def test_html_has_drift_section_and_plot_escaped(tmp_path):
    evil = "hy<b>dra</b>$x$"
    answers = {"tiny-baseline": bf16_records("baseline", SAME_TIMES),
               "tiny-control": bf16_records("control", CONTROL_TIMES),
               "tiny-evil": bf16_records(evil, HYDRA_TIMES, HYDRA)}
    run = write_run(tmp_path / "evil", answers, decoders=["baseline", "control", evil])
    set_bf16(run)
    page = build_report([run]).read_text()
    assert "Drift: exact match and first divergence" in page and 'alt="First divergence"' in page
    assert "<b>dra" not in page and "hy&lt;b&gt;dra&lt;/b&gt;$x$" in page
    assert "float32 61.2 ms" in page
    assert len(image_sources(page)) == 3  # speedup (with the noise band), tokens per step, first divergence
