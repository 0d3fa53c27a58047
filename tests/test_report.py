"""`medusa-bench report`: numbers checked against hand computations, exports, and a real browser.

Run folders are written by hand here (run.json + model_answer/*.jsonl + model_judgment/*.jsonl)
with small known numbers, so every expected value below is computed independently of the
code under test, from the same raw lists the files were written from.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medusa_bench.results.display import TAU_NOTE
from medusa_bench.results.report import at_a_glance, build_report, collect
from medusa_bench.results.stats import MIN_QUESTIONS_FOR_CI, _resampled_sums, bootstrap_speedup_ci, expanded_tail, t_quantile

EVIL = "Sure! <script>alert(1)</script> and </table> then <img src=x onerror=alert(2)> & done"

# ------------------------------------------------------------------------------ run builders


def split_steps(tokens: int, steps: int) -> list[int]:
    """Accept lengths for `steps` steps that emit `tokens` tokens in total (≥ 1 each)."""
    base, extra = divmod(tokens, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def answer(qid, category, decoder, tokens, times, steps=None, exact=None, texts=None, model="tiny"):
    """One FastChat/Spec-Bench answer line; steps default to tokens (the baseline: τ = 1)."""
    steps = steps or list(tokens)
    return {
        "question_id": qid, "answer_id": f"a{qid}{decoder}", "model_id": f"{model}-{decoder}", "decoder": decoder,
        "category": category, "tstamp": 0.0,
        "choices": [{
            "index": 0,
            "turns": texts or [f"answer {qid} turn {i + 1} by {decoder}" for i in range(len(tokens))],
            "new_tokens": list(tokens), "wall_time": list(times), "decoding_steps": list(steps),
            "accept_lengths": [split_steps(n, s) for n, s in zip(tokens, steps)],
            "token_ids": [[1] * n for n in tokens], "exact_match": exact,
        }],
    }


def judgment(model_id, qid, turn, score, judge="gpt-4"):
    return {"question_id": qid, "model": model_id, "judge": [judge, "single-v1" if turn == 1 else "single-v1-multi-turn"],
            "user_prompt": "[Question] ...", "judgment": f"Rating: [[{score}]]", "score": score, "turn": turn, "tstamp": 0.0}


def write_run(folder: Path, answers: dict[str, list[dict]], judgments=None, extras=None, decoders=None, settings=None) -> Path:
    """A run folder as `medusa-bench run` + `judge` would leave it."""
    (folder / "model_answer").mkdir(parents=True)
    decoders = decoders or [records[0]["decoder"] for records in answers.values()]
    run = {
        "tool": "medusa-bench", "version": "0.1.0", "created": "2025-01-01T00:00:00+00:00", "git_hash": "abc123",
        "settings": {"model": "tiny-model", "bench": "mt_bench", "max_new_tokens": 64, "dtype": "float32", "device": "cpu",
                     "tree": "chain-3", "temperature": 0, **(settings or {})}, "warmup": 1,
        "decoders": decoders, "models": {d: f"tiny-{d}" for d in decoders},
        "versions": {"python": "3.11", "torch": "2.4"}, "device": {"type": "cpu", "name": "test-cpu", "dtype": "float32", "threads": 2},
    }
    (folder / "run.json").write_text(json.dumps(run))
    for model_id, records in answers.items():
        (folder / "model_answer" / f"{model_id}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if judgments is not None:
        (folder / "model_judgment").mkdir()
        (folder / "model_judgment" / "gpt-4_single.jsonl").write_text("".join(json.dumps(j) + "\n" for j in judgments))
    for name, data in (extras or {}).items():
        (folder / f"{name}.json").write_text(json.dumps(data))
    return folder


# Raw numbers, per question: (category, tokens per turn, seconds per turn, steps per turn).
BASELINE_Q = {
    1: ("writing", [40, 30], [2.0, 1.5], [40, 30]),
    2: ("writing", [50, 20], [2.5, 1.0], [50, 20]),
    3: ("math", [60, 40], [3.0, 2.0], [60, 40]),
    4: ("math", [20, 10], [1.0, 0.5], [20, 10]),
}
MEDUSA_Q = {
    1: ("writing", [40, 30], [1.0, 1.0], [20, 15]),
    2: ("writing", [50, 20], [1.5, 0.5], [25, 12]),
    3: ("math", [60, 40], [1.0, 1.2], [20, 16]),
    4: ("math", [20, 10], [0.8, 0.4], [12, 6]),
}
HYDRA_Q = {  # cut short: only questions 1 and 3
    1: ("writing", [40, 30], [0.8, 0.7], [14, 11]),
    3: ("math", [60, 40], [0.9, 0.9], [18, 14]),
}
MEDUSA_EXACT = {1: [True, True], 2: [True, False], 3: [True, True], 4: [False, False]}


def records(raw, decoder, exact=None, texts=None):
    return [answer(q, c, decoder, t, w, s, exact=(exact or {}).get(q), texts=(texts or {}).get(q)) for q, (c, t, w, s) in raw.items()]


def diverge_where_not_exact(answers: list[dict]) -> list[dict]:
    """Make token ids agree with `exact_match`: a turn marked False parts from the baseline's
    all-ones ids at token 3 (so the drift table and its plot have something to show)."""
    for record in answers:
        choice = record["choices"][0]
        for turn, same in enumerate(choice["exact_match"] or []):
            if same is False:
                choice["token_ids"][turn][3] = 2
    return answers


# judgments: baseline all graded; medusa with one failed grade (score -1) on question 2 turn 2.
BASE_SCORES = {(1, 1): 7, (1, 2): 6, (2, 1): 8, (2, 2): 5, (3, 1): 4, (3, 2): 3, (4, 1): 9, (4, 2): 8}
MEDUSA_SCORES = {(1, 1): 7, (1, 2): 5, (2, 1): 8, (2, 2): -1, (3, 1): 5, (3, 2): 3, (4, 1): 9, (4, 2): 7}


def all_judgments():
    return ([judgment("tiny-baseline", q, t, s) for (q, t), s in BASE_SCORES.items()]
            + [judgment("tiny-medusa", q, t, s) for (q, t), s in MEDUSA_SCORES.items()])


def test_reused_grades_are_counted(tmp_path):
    """The judge copies the baseline's grade for token-identical turns (`reused_from`); the report counts them."""
    judgments = [judgment("tiny-baseline", q, t, s) for (q, t), s in BASE_SCORES.items()]
    judgments += [dict(judgment("tiny-medusa", q, t, s), reused_from="tiny-baseline") for (q, t), s in BASE_SCORES.items() if q in (1, 3)]
    run = write_run(tmp_path / "reuse", {"tiny-baseline": records(BASELINE_Q, "baseline"), "tiny-medusa": records(MEDUSA_Q, "medusa")},
                    judgments=judgments)
    medusa = row(collect([run]).tables["quality"], decoder="medusa")
    assert medusa.graded == 4 and medusa.reused == 4 and medusa.coverage == pytest.approx(0.5)
    assert medusa.score_vs_baseline == pytest.approx(0.0)


TREE = {"tree": [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]], "predicted": {"tau": 1.9, "tokens_per_s": 50.0}}
LATENCY = {"device": "cpu", "dtype": "float32", "context_len": 300, "step_time": {"1": 0.033, "4": 0.052, "8": 0.064, "16": 0.071}}


@pytest.fixture
def full_run(tmp_path):
    """Baseline + medusa (complete, judged) + hydra (cut short), with tree and latency files."""
    return write_run(
        tmp_path / "full",
        {"tiny-baseline": records(BASELINE_Q, "baseline"),
         "tiny-medusa": diverge_where_not_exact(records(MEDUSA_Q, "medusa", MEDUSA_EXACT, texts={1: [EVIL, "second turn"]})),
         "tiny-hydra": records(HYDRA_Q, "hydra")},
        judgments=all_judgments(), extras={"tree": TREE, "latency": LATENCY},
    )


def row(table: pd.DataFrame, **match) -> pd.Series:
    selected = table
    for key, value in match.items():
        selected = selected[selected[key] == value]
    assert len(selected) == 1, f"expected one row for {match}, got {len(selected)}"
    return selected.iloc[0]


def sums(raw, ids=None):
    ids = list(raw) if ids is None else ids
    tokens = sum(sum(raw[q][1]) for q in ids)
    seconds = sum(sum(raw[q][2]) for q in ids)
    steps = sum(sum(raw[q][3]) for q in ids)
    return tokens, seconds, steps


# ------------------------------------------------------------------------------- the numbers


def test_speed_table_matches_hand_computation(full_run):
    speed = collect([full_run]).tables["speed"]
    bt, bw, _ = sums(BASELINE_Q)
    mt, mw, ms = sums(MEDUSA_Q)
    base, medusa = row(speed, decoder="baseline"), row(speed, decoder="medusa")

    assert base.tokens_per_s == pytest.approx(bt / bw)
    assert base.speedup == 1.0 and base.tau == pytest.approx(1.0)
    assert medusa.tokens_per_s == pytest.approx(mt / mw)
    assert medusa.n_questions == 4 and medusa.n_compared == 4
    assert medusa.speedup == pytest.approx((mt / mw) / (bt / bw))
    assert medusa.tau == pytest.approx(mt / ms)
    # Spec-Bench: ratio of the means of per-question tokens/s.
    per_q = lambda raw, q: sum(raw[q][1]) / sum(raw[q][2])  # noqa: E731
    expected_sb = np.mean([per_q(MEDUSA_Q, q) for q in MEDUSA_Q]) / np.mean([per_q(BASELINE_Q, q) for q in MEDUSA_Q])
    assert medusa.speedup_specbench == pytest.approx(expected_sb)
    # Exact match over turns: 5 of 8 turns matched.
    assert medusa.exact_match == pytest.approx(5 / 8) and medusa.exact_match_turns == 8
    drift = row(collect([full_run]).tables["precision"], decoder="medusa")  # recomputed from token ids: the same 5 of 8
    assert drift.exact_vs_baseline == pytest.approx(5 / 8) and drift.divergence_vs_baseline == 3.0
    assert math.isnan(base.exact_match)  # null on the baseline: not applicable
    # 4 questions are too few for an interval: none, and nothing judged against the noise floor
    assert math.isnan(medusa.speedup_ci_low) and math.isnan(medusa.speedup_ci_high) and medusa.vs_noise == "no CI"


def test_decoder_cut_short_is_compared_on_its_own_questions(full_run):
    report = collect([full_run])
    hydra = row(report.tables["speed"], decoder="hydra")
    ht, hw, hs = sums(HYDRA_Q)
    bt, bw, _ = sums(BASELINE_Q, [1, 3])
    assert hydra.n_questions == 2 and hydra.n_compared == 2
    assert hydra.tokens_per_s == pytest.approx(ht / hw)
    assert hydra.speedup == pytest.approx((ht / hw) / (bt / bw))
    assert hydra.tau == pytest.approx(ht / hs)
    assert any("hydra answered 2 of baseline's 4 questions" in note for note in report.notes)


def test_bootstrap_interval_is_exact_when_every_question_has_the_same_speedup():
    tokens = np.array([10.0, 50.0, 30.0, 80.0, 20.0])
    base_time = np.array([1.0, 4.0, 2.0, 9.0, 3.0])
    low, high = bootstrap_speedup_ci(tokens, base_time / 2, tokens, base_time)
    assert low == pytest.approx(2.0) and high == pytest.approx(2.0)
    assert MIN_QUESTIONS_FOR_CI == 5
    for n in (1, 2, 4):  # too few questions: no interval, not a fake narrow one
        assert all(math.isnan(v) for v in bootstrap_speedup_ci(tokens[:n], base_time[:n] / 2, tokens[:n], base_time[:n]))
    # Deterministic (fixed seed) and ordered on noisy data.
    rng = np.random.default_rng(1)
    noisy = [rng.uniform(1, 2, 30) for _ in range(4)]
    assert bootstrap_speedup_ci(*noisy) == bootstrap_speedup_ci(*noisy)
    assert bootstrap_speedup_ci(*noisy)[0] < bootstrap_speedup_ci(*noisy)[1]


def test_the_interval_is_the_expanded_percentile_one_over_the_questions_asked():
    # Student's t from the Cornish-Fisher series, against the tables, from MIN_QUESTIONS_FOR_CI - 1 df up.
    for df, exact in ((4, 2.7764), (7, 2.3646), (15, 2.1314), (30, 2.0423), (1000, 1.9623)):
        assert t_quantile(0.975, df) == pytest.approx(exact, abs=0.003)
    assert expanded_tail(16) == pytest.approx(0.0139, abs=0.0003)  # 1.4% and 98.6%, not 2.5% and 97.5%
    assert expanded_tail(5) < expanded_tail(16) < expanded_tail(200) < 0.025 < expanded_tail(200) + 0.0015  # → 2.5% as n grows
    # On 16 noisy questions it holds the plain percentile interval of the same resamples, ~11% wider.
    rng = np.random.default_rng(3)
    tokens, base = rng.uniform(30, 300, 16), rng.uniform(1, 10, 16)
    dec = base / rng.lognormal(np.log(1.4), 0.25, 16)
    low, high = bootstrap_speedup_ci(tokens, dec, tokens, base)
    sums = _resampled_sums((tokens, dec, tokens, base), 2000, 0)
    plain_low, plain_high = np.quantile(sums[3] / sums[1], [0.025, 0.975])
    assert low < plain_low and high > plain_high
    assert 1.05 < (high - low) / (plain_high - plain_low) < 1.3


def seven_questions() -> tuple[dict, dict]:
    """Five writing and two math questions; medusa 1.35×–1.65× faster per question (τ 2)."""
    base, medusa = {}, {}
    for q in range(1, 8):
        category, tokens = ("writing" if q <= 5 else "math"), [40 + 10 * q, 20 + 5 * q]
        times = [t / 20 for t in tokens]
        base[q] = (category, tokens, times, list(tokens))
        medusa[q] = (category, tokens, [t / (1.3 + 0.05 * q) for t in times], [t // 2 for t in tokens])
    return base, medusa


def test_intervals_only_where_enough_questions_were_compared(tmp_path, full_run):
    """A bootstrap over 2 questions is not an interval: those rows say "n=2, no CI" in every format."""
    base_q, medusa_q = seven_questions()
    run = write_run(tmp_path / "seven", {"tiny-baseline": records(base_q, "baseline"), "tiny-medusa": records(medusa_q, "medusa")})
    report = collect([run])
    medusa = row(report.tables["speed"], decoder="medusa")
    assert medusa.n_compared == 7 and medusa.speedup_ci_low < medusa.speedup < medusa.speedup_ci_high
    assert medusa.vs_noise == "faster"  # every question is above 1.30×: the interval excludes 1.00
    categories = report.tables["categories"]
    writing, math_row = row(categories, category="writing", decoder="medusa"), row(categories, category="math", decoder="medusa")
    assert writing.n_compared == 5 and writing.speedup_ci_low < writing.speedup < writing.speedup_ci_high
    assert math_row.n_compared == 2 and math.isnan(math_row.speedup_ci_low) and math.isnan(math_row.speedup_ci_high)
    ci = f"{writing.speedup_ci_low:.2f}–{writing.speedup_ci_high:.2f}"

    markdown = build_report([run], fmt="markdown")
    per_category = markdown.split("## Per category")[1].split("##")[0]
    assert "n=2, no CI" in per_category and ci in per_category
    assert markdown.split("## At a glance")[1].split("##")[0].count(TAU_NOTE) == 1  # τ explained under the table
    terminal = " ".join(build_report([run], fmt="table").split())  # rich wraps the footer lines: compare words
    assert "n=2, no CI" in terminal and TAU_NOTE in terminal
    page = build_report([run]).read_text()
    assert "n=2, no CI" in page and html_text(TAU_NOTE) in page and "vLLM’s “mean acceptance length”" in page.replace("&#x27;", "’")
    # 4 questions overall: the headline says why there is no interval
    assert "on 4 questions (no 95% CI: too few questions, an interval needs 5)" in build_report([full_run]).read_text()


def html_text(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_at_a_glance_is_the_top_of_the_terminal_report(full_run):
    """The summary table with the banner and τ's footer, nothing else (printed at the end of `run`)."""
    glance = at_a_glance([full_run])
    assert "At a glance" in glance and "medusa" in glance and "hydra" in glance
    assert "Speed" not in glance.replace("speedup", "") and "Per category" not in glance and "Configuration" not in glance
    assert TAU_NOTE in " ".join(glance.split())
    assert "n=4, no CI" in glance  # 4 questions: no interval
    full = build_report([full_run], fmt="table")
    assert full.split("Speed")[0].count("At a glance") == 1
    from rich.console import Console

    buffer = io.StringIO()
    assert at_a_glance([full_run], console=Console(file=buffer, width=100, color_system=None)) == ""
    assert "At a glance" in buffer.getvalue()


def test_acceptance_depths_and_histogram(full_run):
    report = collect([full_run])
    medusa_lengths = [n for q, (_, t, _, s) in MEDUSA_Q.items() for tok, st in zip(t, s) for n in split_steps(tok, st)]
    accept, hist = report.tables["acceptance"], report.tables["tokens_per_step"]
    medusa = row(accept, decoder="medusa")
    for depth in (1, 2):
        assert medusa[f"accept_ge_{depth}"] == pytest.approx(np.mean([n - 1 >= depth for n in medusa_lengths]))
    assert medusa.tau_predicted == pytest.approx(1.9)
    assert math.isnan(row(accept, decoder="baseline").tau_predicted)
    h = row(hist, decoder="medusa")
    for k in (1, 2, 3, 4):
        column = f"tokens_{k}"
        expected = np.mean([n == k for n in medusa_lengths])
        assert (h[column] if column in h else 0.0) == pytest.approx(expected)
    assert row(hist, decoder="baseline").tokens_1 == pytest.approx(1.0)


def test_quality_scores_and_coverage(full_run):
    quality = collect([full_run]).tables["quality"]
    medusa, base = row(quality, decoder="medusa"), row(quality, decoder="baseline")
    valid = {k: v for k, v in MEDUSA_SCORES.items() if v >= 0}
    assert medusa.score_turn1 == pytest.approx(np.mean([v for (q, t), v in valid.items() if t == 1]))
    assert medusa.score_turn2 == pytest.approx(np.mean([v for (q, t), v in valid.items() if t == 2]))
    assert medusa.score == pytest.approx(np.mean(list(valid.values())))  # FastChat: mean over all graded turns
    assert medusa.coverage_turn1 == pytest.approx(1.0)
    assert medusa.coverage_turn2 == pytest.approx(3 / 4)
    assert medusa.coverage == pytest.approx(7 / 8) and medusa.graded == 7 and medusa.expected == 8
    assert medusa.score_vs_baseline == pytest.approx(np.mean([valid[k] - BASE_SCORES[k] for k in valid]))
    assert base.score == pytest.approx(np.mean(list(BASE_SCORES.values()))) and base.coverage == 1.0
    assert medusa.reused == 0
    # hydra answered 2 questions and was never graded: coverage 0, score n/a (not silently dropped)
    hydra = row(quality, decoder="hydra")
    assert hydra.coverage == 0.0 and hydra.expected == 4 and math.isnan(hydra.score)


def test_per_category_speedup_and_score(full_run):
    categories = collect([full_run]).tables["categories"]
    for category, ids in (("writing", [1, 2]), ("math", [3, 4])):
        medusa = row(categories, category=category, decoder="medusa")
        mt, mw, ms = sums(MEDUSA_Q, ids)
        bt, bw, _ = sums(BASELINE_Q, ids)
        assert medusa.speedup == pytest.approx((mt / mw) / (bt / bw))
        assert medusa.tau == pytest.approx(mt / ms)
        scores = [v for (q, t), v in MEDUSA_SCORES.items() if q in ids and v >= 0]
        assert medusa.score == pytest.approx(np.mean(scores))
    hydra_math = row(categories, category="math", decoder="hydra")
    assert hydra_math.n_compared == 1 and math.isnan(hydra_math.speedup_ci_low)  # one question: no interval


def test_each_decoder_is_compared_with_its_own_reference(tmp_path):
    """medusa2's answers name `medusa2-baseline` (its fine-tuned backbone) as their reference."""
    backbone = records(BASELINE_Q, "medusa2-baseline")
    medusa2 = records(MEDUSA_Q, "medusa2", MEDUSA_EXACT)
    for record in backbone:
        record["baseline"] = "baseline"
    for record in medusa2:
        record["baseline"] = "medusa2-baseline"
    slow = {q: (c, t, [2 * x for x in w], s) for q, (c, t, w, s) in BASELINE_Q.items()}  # the original model, twice as slow
    run = write_run(tmp_path / "m2", {"tiny-baseline": records(slow, "baseline"), "tiny-medusa2-baseline": backbone, "tiny-medusa2": medusa2},
                    judgments=[judgment("tiny-medusa2-baseline", q, t, s) for (q, t), s in BASE_SCORES.items()]
                    + [judgment("tiny-medusa2", q, t, s) for (q, t), s in MEDUSA_SCORES.items()])
    report = collect([run])
    speed = report.tables["speed"]
    mt, mw, _ = sums(MEDUSA_Q)
    bt, bw, _ = sums(BASELINE_Q)
    m2 = row(speed, decoder="medusa2")
    assert m2.reference == "medusa2-baseline" and m2.speedup == pytest.approx((mt / mw) / (bt / bw))
    assert row(speed, decoder="medusa2-baseline").speedup == pytest.approx(2.0)
    valid = {k: v for k, v in MEDUSA_SCORES.items() if v >= 0}
    quality = report.tables["quality"]
    assert row(quality, decoder="medusa2").score_vs_baseline == pytest.approx(np.mean([valid[k] - BASE_SCORES[k] for k in valid]))
    assert "compared with" in build_report([run], fmt="markdown")  # shown because not every decoder uses `baseline`


def test_a_fine_tuned_backbone_is_compared_with_the_base_model(tmp_path):
    """medusa2-baseline is its own reference for speed and losslessness, but a different model
    from the base: the drift table says on how many turns its greedy tokens are the base's."""
    backbone = records(BASELINE_Q, "medusa2-baseline")
    for record in backbone:
        record["baseline"] = "medusa2-baseline"
        if record["question_id"] in (1, 3):
            record["choices"][0]["token_ids"][1][5] = 7  # turn 2 parts from the base model at token 5
    run = write_run(tmp_path / "m2", {"tiny-baseline": records(BASELINE_Q, "baseline"), "tiny-medusa2-baseline": backbone})
    precision = collect([run]).tables["precision"]
    assert row(precision, decoder="medusa2-baseline").exact_vs_baseline == pytest.approx(6 / 8)
    assert row(precision, decoder="medusa2-baseline").divergence_vs_baseline == 5
    assert math.isnan(row(precision, decoder="baseline").exact_vs_baseline)


def test_tree_search_file_gives_predictions(tmp_path):
    """tree.json as `medusa-bench tree` writes it: {"search": {...}, "candidates": [{"n", "tau", ...}], "tree": [...]}."""
    tree = {"name": "search-n4", "num_nodes": 4, "tree": [[0], [1], [0, 0]],
            "search": {"n": 4, "tau": 1.6, "speedup": 1.3, "step_time": 0.05},
            "candidates": [{"n": 1, "tau": 1.0}, {"n": 2, "tau": 1.3}, {"n": 4, "tau": 1.6}, {"n": 8, "tau": 1.8}]}
    run = write_run(tmp_path / "searched", {"tiny-baseline": records(BASELINE_Q, "baseline"), "tiny-medusa": records(MEDUSA_Q, "medusa")},
                    extras={"tree": tree})
    report = collect([run])
    medusa = row(report.tables["acceptance"], decoder="medusa")
    assert medusa.tau_predicted == pytest.approx(1.6) and medusa.speedup_predicted == pytest.approx(1.3)
    from medusa_bench.results.plots import predicted_curve

    assert predicted_curve(report.runs[0].extras) == [(1.0, 1.0), (2.0, 1.3), (4.0, 1.6), (8.0, 1.8)]
    assert 'alt="Predicted against measured τ"' in build_report([run]).read_text()


def test_predictions_belong_to_the_decoders_whose_tree_was_searched(tmp_path):
    """run.json's "trees" names the auto decoders and their files; a fixed tree gets no prediction."""
    def searched(tau):
        return {"tree": [[0], [1]], "search": {"n": 3, "tau": tau, "speedup": 1.1}, "candidates": [{"n": 3, "tau": tau}]}

    answers = {"tiny-baseline": records(BASELINE_Q, "baseline"), "tiny-medusa": records(MEDUSA_Q, "medusa"),
               "tiny-hydra": records(HYDRA_Q, "hydra"), "tiny-pld": records(MEDUSA_Q, "pld")}
    run = write_run(tmp_path / "auto", answers, extras={"tree": searched(1.5), "tree-hydra": searched(1.9)})
    info = json.loads((run / "run.json").read_text())
    info["trees"] = {
        "medusa": {"name": "auto", "hash": "a", "num_nodes": 3, "depth": 1, "auto": True,
                   "files": {"tree": "tree.json", "calibration": "calibration.json", "latency": "latency.json"}},
        "hydra": {"name": "auto", "hash": "b", "num_nodes": 3, "depth": 1, "auto": True,
                  "files": {"tree": "tree-hydra.json", "calibration": "calibration-hydra.json", "latency": "latency-hydra.json"}},
        "pld": {"name": "chain-3", "hash": "c", "num_nodes": 4, "depth": 3, "auto": False},
    }
    (run / "run.json").write_text(json.dumps(info))
    acceptance = collect([run]).tables["acceptance"]
    assert row(acceptance, decoder="medusa").tau_predicted == pytest.approx(1.5)
    assert row(acceptance, decoder="hydra").tau_predicted == pytest.approx(1.9)
    assert math.isnan(row(acceptance, decoder="pld").tau_predicted)


def test_run_without_judgments_or_baseline(tmp_path):
    run = write_run(tmp_path / "partial", {"tiny-medusa": records(MEDUSA_Q, "medusa")})
    report = collect([run])
    medusa = row(report.tables["speed"], decoder="medusa")
    assert math.isnan(medusa.speedup) and medusa.n_compared == 0
    assert medusa.tokens_per_s == pytest.approx(sums(MEDUSA_Q)[0] / sums(MEDUSA_Q)[1])
    assert report.tables["quality"].empty
    assert any("no `baseline` answers" in n for n in report.notes) and any("no judgments" in n for n in report.notes)
    page = build_report([run]).read_text()
    assert "n/a" in page and "no `baseline` answers" in page


def test_two_runs_side_by_side(tmp_path):
    answers = {"tiny-baseline": records(BASELINE_Q, "baseline"), "tiny-medusa": records(MEDUSA_Q, "medusa")}
    first = write_run(tmp_path / "laptop" / "run", answers)
    second = write_run(tmp_path / "server" / "run", {"tiny-baseline": records(BASELINE_Q, "baseline")},
                       settings={"dtype": "bfloat16"})
    report = collect([first, second])
    assert [r.label for r in report.runs] == ["laptop/run", "server/run"]  # same folder name: parents added
    speed = report.tables["speed"]
    assert set(speed.run) == {"laptop/run", "server/run"} and len(speed) == 3
    config = report.tables["config"].set_index("setting")
    assert config.loc["dtype", "laptop/run"] == "float32" and config.loc["dtype", "server/run"] == "bfloat16"
    page = build_report([first, second], out=tmp_path / "both.html").read_text()
    assert "laptop/run" in page and "server/run" in page


def test_markdown_csv_and_table_exports(full_run, tmp_path):
    text = build_report([full_run], fmt="markdown")
    for title in ("At a glance", "Speed", "Acceptance", "Quality", "Per category", "Configuration"):
        assert f"## {title}" in text
    speed_block = text.split("## Speed")[1].split("##")[0].strip().splitlines()
    header = [c.strip() for c in speed_block[0].strip("|").split("|")]
    assert "speedup" in header and "tokens/s" in header
    assert all(line.count("|") - line.count("\\|") == speed_block[0].count("|") for line in speed_block)
    assert len(speed_block) == 2 + 3  # header, rule, one line per decoder

    folder = build_report([full_run], out=tmp_path / "csv", fmt="csv")
    speed = pd.read_csv(folder / "speed.csv")
    assert set(speed.decoder) == {"baseline", "medusa", "hydra"}
    bt, bw, _ = sums(BASELINE_Q)
    assert speed.set_index("decoder").loc["baseline", "tokens_per_s"] == pytest.approx(bt / bw)
    for name in ("summary", "acceptance", "tokens_per_step", "quality", "categories", "config"):
        assert not pd.read_csv(folder / f"{name}.csv").empty

    terminal = build_report([full_run], fmt="table")
    assert "Speed" in terminal and "medusa" in terminal and "hydra answered 2" in terminal


def test_cli_report_command(full_run, tmp_path):
    from typer.testing import CliRunner

    from medusa_bench.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["report", str(full_run)])
    assert result.exit_code == 0, result.output
    assert Path(result.output.strip()) == full_run / "report.html" and (full_run / "report.html").exists()
    result = runner.invoke(app, ["report", str(full_run), "--format", "markdown"])
    assert result.exit_code == 0 and "## Speed" in result.output
    result = runner.invoke(app, ["report", str(full_run), "-o", str(tmp_path / "csv"), "--format", "csv"])
    assert result.exit_code == 0 and (tmp_path / "csv" / "speed.csv").exists()
    result = runner.invoke(app, ["report", str(full_run), "--format", "table"])
    assert result.exit_code == 0 and "medusa" in result.output


def test_bad_input_is_a_user_error(tmp_path):
    from medusa_bench.errors import UserError

    with pytest.raises(UserError, match="not a medusa-bench run folder"):
        build_report([tmp_path])
    with pytest.raises(UserError, match="unknown report format"):
        build_report([tmp_path], fmt="pdf")


# ---------------------------------------------------------------------------------- the page


def image_sources(page: str) -> list[str]:
    return re.findall(r'<img[^>]*\bsrc="([^"]*)"', page)


def test_html_is_self_contained_and_escaped(full_run):
    page = build_report([full_run]).read_text()
    assert "<script" not in page.lower()  # the page runs nothing, and the answer's script is text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;/table&gt;" in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # no network fetches
    sources = image_sources(page)
    assert len(sources) == 7  # speedup, speed vs quality, first divergence, tokens per step, predicted τ, step time, tree
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "How these numbers were measured" in page


def test_names_from_files_are_escaped_everywhere(tmp_path):
    """A decoder or folder name is file content too: escaped in HTML, literal in plot legends ($ is mathtext)."""
    name = "med<i>usa</i>$x_1$"
    run = write_run(tmp_path / "run<b>$2$", {"tiny-baseline": records(BASELINE_Q, "baseline"), "tiny-odd": records(MEDUSA_Q, name)},
                    decoders=["baseline", name])
    page = build_report([run]).read_text()
    assert "<i>usa" not in page and "med&lt;i&gt;usa&lt;/i&gt;$x_1$" in page and "run&lt;b&gt;$2$" in page
    assert len(image_sources(page)) == 2  # speedup and tokens per step drew without a mathtext error
    assert "med<i>usa</i>$x_1$" in build_report([run], fmt="table")  # rich prints it as text, not markup


def test_plots_present_only_when_their_data_is(tmp_path):
    bare = write_run(tmp_path / "bare", {"tiny-baseline": records(BASELINE_Q, "baseline")})
    assert image_sources(build_report([bare]).read_text()) == []  # nothing to compare: no empty figures
    with_tau = write_run(tmp_path / "tau", {"tiny-baseline": records(BASELINE_Q, "baseline"), "tiny-medusa": records(MEDUSA_Q, "medusa")},
                         extras={"tree": {"tree": TREE["tree"], "per_budget": [{"size": 2, "tau": 1.4}, {"size": 6, "tau": 1.9}]}})
    page = build_report([with_tau]).read_text()
    assert 'alt="Predicted against measured τ"' in page and 'alt="Candidate tree (tau)"' in page


# -------------------------------------------------------------------------- a real browser

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]

# Appended to a *copy* of the report only: records, after load, how many images decoded and
# any error raised, as attributes the dumped DOM carries back to Python.
PROBE = """<script>
window.__errors = [];
addEventListener('error', e => __errors.push(String(e.message || (e.target && e.target.src) || e)), true);
addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-images', imgs.length);
  document.body.setAttribute('data-images-ok', imgs.filter(i => i.complete && i.naturalWidth > 0).length);
  document.body.setAttribute('data-errors', JSON.stringify(__errors));
  document.body.setAttribute('data-scripts', document.scripts.length);
  document.body.setAttribute('data-text', [...document.querySelectorAll('pre')].some(p => p.textContent.includes('<script>alert(1)<' + '/script>')));
});
</script>"""


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian package `chromium` is not installed (the test set-up script installs it)")
def test_report_renders_in_headless_chromium(full_run, tmp_path):
    from PIL import Image

    page = build_report([full_run])
    shot = tmp_path / "report.png"
    done = chromium(f"--screenshot={shot}", "--window-size=1280,2000", "--virtual-time-budget=5000",
                    "--enable-logging=stderr", "--v=0", page.resolve().as_uri(), profile=tmp_path / "profile1")
    assert shot.exists(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2000, 1280) and pixels.std() > 10  # not a blank page
    console_lines = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert console_lines == [], console_lines

    # The page as the browser parsed it: still no script, the hostile answer is text.
    dom = chromium("--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000", "--dump-dom",
                   page.resolve().as_uri(), profile=tmp_path / "profile2").stdout
    assert "</main>" in dom and "<script" not in dom.lower() and "onerror" not in dom.replace("onerror=alert(2)&gt;", "")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom

    # A probed copy: every image decoded in the browser, no error event, the answer shown as text.
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium("--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000", "--dump-dom",
                   probed.resolve().as_uri(), profile=tmp_path / "profile3").stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body))
    assert int(attrs["images"]) == 7 and attrs["images-ok"] == attrs["images"], attrs
    assert json.loads(attrs["errors"].replace("&quot;", '"')) == []
    assert attrs["scripts"] == "1" and attrs["text"] == "true"


def test_auto_against_the_fastest_fixed_tree_is_paired_over_questions():
    """Auto 5% slower than the fixed tree on every question, while questions differ 3× in speed: the two speedup
    intervals overlap, the paired ratio's interval does not reach 1, and the standing says so."""
    from types import SimpleNamespace

    from medusa_bench.results.prediction import against_fixed

    tokens = [100, 120, 90, 110, 100, 130, 95, 105]
    base = [t / 10 for t in tokens]  # seconds: the baseline decodes 10 tok/s on every question
    fixed_s = [b / s for b, s in zip(base, [1.2, 2.4, 3.6, 1.3, 2.5, 3.5, 1.4, 2.6])]  # 1.2×–3.6× by question
    auto_s = [s / 0.95 for s in fixed_s]  # 5% slower than the fixed tree on each question
    rows = [{"model_id": model_id, "question_id": q, "new_tokens": t, "wall_time": s}
            for model_id, seconds in (("m-baseline", base), ("m-fixed", fixed_s), ("m-auto", auto_s))
            for q, (t, s) in enumerate(zip(tokens, seconds))]
    questions = pd.DataFrame(rows)
    speed = pd.DataFrame([
        {"decoder": "control", "model_id": "m-control", "speedup": 1.0, "speedup_ci_low": 0.97, "speedup_ci_high": 1.03},
        {"decoder": "hydra:chain-2", "model_id": "m-fixed", "speedup": 2.0, "speedup_ci_low": 1.4, "speedup_ci_high": 2.8},
        {"decoder": "hydra:auto", "model_id": "m-auto", "speedup": 1.9, "speedup_ci_low": 1.3, "speedup_ci_high": 2.7}])
    row = against_fixed(SimpleNamespace(info={}), "hydra:auto", speed, ["hydra:chain-2"], questions)
    assert row["best_fixed"] == "hydra:chain-2" and row["auto_over_fixed"] == "0.950× (0.95–0.95)"
    assert row["auto_vs_fixed"] == "fixed faster"  # 0.95 is below 1 − the A/A half-width (0.03)
    swings = [0.80, 1.10] * 4  # auto over the fixed tree by question: 6% behind overall, the interval reaching past 1
    noisy = questions.copy()
    for q, speed_ratio in enumerate(swings):
        noisy.loc[(noisy.model_id == "m-auto") & (noisy.question_id == q), "wall_time"] = fixed_s[q] / speed_ratio
    swing = against_fixed(SimpleNamespace(info={}), "hydra:auto", speed, ["hydra:chain-2"], noisy)
    assert swing["auto_vs_fixed"] == "fixed ahead, inside the paired interval", swing
    without = against_fixed(SimpleNamespace(info={}), "hydra:auto", speed, ["hydra:chain-2"])
    assert without["auto_over_fixed"] is None and without["auto_vs_fixed"] == "fixed faster"  # 1.9 / 2.0


def test_runs_of_one_command_are_set_side_by_side_with_what_moved(tmp_path):
    """Repeats: a decoder configuration timed by several runs of one command gets one row; runs of
    another command, or a tree the search chose differently, are never paired with them."""
    base_q, medusa_q = seven_questions()
    slower = {q: (c, t, [w * 1.25 for w in ws], s) for q, (c, t, ws, s) in medusa_q.items()}  # the machine, not τ
    fewer_steps = {q: (c, t, ws, [n - 2 for n in s]) for q, (c, t, ws, s) in medusa_q.items()}

    def run(name, medusa, settings=None, tree_hash="aaa"):
        folder = write_run(tmp_path / name, {"tiny-baseline": records(base_q, "baseline"), "tiny-medusa": records(medusa, "medusa"),
                                             "tiny-hydra": records(medusa_q, "hydra")}, settings=settings)
        info = json.loads((folder / "run.json").read_text())
        info["trees"] = {"medusa": {"name": "search-n4", "hash": tree_hash, "auto": True}, "hydra": {"name": "tree-8", "auto": False}}
        (folder / "run.json").write_text(json.dumps(info))
        return folder

    folders = [run("a", medusa_q), run("b", medusa_q), run("c", slower), run("d", fewer_steps, tree_hash="bbb"),
               run("e", medusa_q, settings={"max_new_tokens": 128})]
    report = collect(folders)
    table = report.tables["repeat"]
    medusa, hydra = row(table, decoder="medusa"), row(table, decoder="hydra")
    assert medusa.repeat_runs == "a · b · c" and medusa.chosen == "search-n4 (aaa)"  # d chose another tree, e asked for more tokens
    assert medusa.taus.endswith(" each") and medusa.moved == "timing (τ the same)"
    a, c = (row(report.tables["speed"], run=name, decoder="medusa") for name in ("a", "c"))
    assert medusa.spread == pytest.approx(a.speedup / c.speedup - 1)
    assert medusa.step_ratios.split(" · ")[2] == f"{1.25 * float(medusa.step_ratios.split(' · ')[0]):.2f}"
    assert medusa.inside == "1 of 3 (not a ↔ c, b ↔ c)"  # a and b are the same timing; c's is 25% slower
    assert hydra.repeat_runs == "a · b · c · d" and hydra.inside == "6 of 6" and hydra.chosen == "–"
    assert any(note.startswith("Repeats: of 9 pairs of runs") and "7 landed inside" in note for note in report.notes)
    assert "## Repeats: the same command, run again" in build_report(folders, fmt="markdown")
    assert "Repeats: the same command, run again</h3>" in build_report(folders, out=tmp_path / "r.html").read_text()
    assert "repeat" not in collect([folders[0], folders[4]]).tables  # two commands: nothing to set side by side
