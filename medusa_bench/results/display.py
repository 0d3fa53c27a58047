"""Tables as a reader sees them: cell formatting, readable headers, the footers that explain τ and
the interval, and the plain exports (markdown, CSV). The terminal (terminal.py) and the HTML page
(html.py) format cells through `display_frame` too, so every format shows the same text."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medusa_bench.results.prediction import NOTE as PREDICTION_NOTE
from medusa_bench.results.runs import BASELINE
from medusa_bench.results.stats import MIN_QUESTIONS_FOR_CI, interval_text
from medusa_bench.results.tables import TABLE_TITLES, ReportTables

# One convention with the README ("How the numbers are measured"): τ counts the base model's own
# token, so the baseline's τ is 1.00 and τ is what Spec-Bench and vLLM report under other names.
TAU_NOTE = ("τ: mean accepted tokens per step, the base model's own token included (Σ new tokens / Σ decoding steps; "
            "baseline 1.00): Spec-Bench's “mean accepted tokens”, vLLM's “mean acceptance length”.")
CI_NOTE = (f"95% CI: paired bootstrap over questions; none where fewer than {MIN_QUESTIONS_FOR_CI} questions were compared "
           f"(“n=2, no CI”): over so few questions a bootstrap interval is not one.")
BATCH_NOTE = ("Batch sweep: each speedup is the decoder's tokens/s over the baseline's at the same batch size, on the same "
              "requests (every turn; turn 2 carries the baseline's turn-1 answer); control's distance from 1.00× is that size's "
              "noise floor. Latency: a request's time from its batch's start to its last token. vs batch 1: exact, lossless up to "
              "rounding (every divergence at a margin below twice the rounding noise), or the divergences that are not.")
# Printed under a table in every format (terminal caption, markdown line, HTML caption).
FOOTERS = {"summary": (TAU_NOTE, CI_NOTE), "categories": (CI_NOTE,), "prediction": (PREDICTION_NOTE,), "batch": (BATCH_NOTE,)}

LABELS = {
    "run": "run", "decoder": "decoder", "device": "device", "model_id": "answer file", "judge": "judge", "category": "category",
    "n_questions": "questions", "n_compared": "compared", "new_tokens": "new tokens", "wall_time_s": "wall time (s)",
    "tokens_per_s": "tokens/s", "speedup": "speedup", "speedup_ci": "95% CI", "speedup_specbench": "speedup (Spec-Bench)",
    "reference": "compared with", "tau": "τ", "tau_predicted": "τ predicted", "speedup_predicted": "speedup predicted", "exact_match": "exact match", "exact_match_turns": "turns compared",
    "steps": "steps", "logged_steps": "steps logged", "score": "score", "graded": "graded", "reused": "grades reused", "expected": "expected",
    "coverage": "coverage", "score_vs_baseline": "Δ score vs baseline", "setting": "setting",
    "vs_noise": "vs noise", "contended_turns": "shared-CPU turns", "dtype": "dtype", "turns": "turns",
    "exact_vs_baseline": "exact vs baseline", "divergence_vs_baseline": "median first divergence",
    "exact_vs_fp32": "exact vs fp32", "divergence_vs_fp32": "median divergence vs fp32",
    "baseline_exact_vs_fp32": "baseline exact vs fp32",
    "concurrency": "in flight", "requests": "requests", "failed": "failed", "server_tok_s": "server tokens/s",
    "request_tok_s_p50": "tokens/s per request p50", "ttft_p50_ms": "TTFT p50 (ms)", "ttft_p90_ms": "TTFT p90 (ms)",
    "ttft_p99_ms": "TTFT p99 (ms)", "itl_p50_ms": "ITL p50 (ms)", "itl_p90_ms": "ITL p90 (ms)", "itl_p99_ms": "ITL p99 (ms)",
    "tree_nodes": "tree nodes", "speedup_error": "speedup error", "tau_on_text": "τ on this text", "tau_error": "τ error",
    "speedup_noise": "± noise", "tau_noise": "τ ± noise",
    "step_predicted": "step × baseline predicted", "step_measured": "step × baseline measured", "step_timed": "step × baseline timed", "step_error": "step error",
    "baseline_moved": "baseline's step against the profile's",
    "speedup_on_text": "speedup on this text", "hindsight_nodes": "hindsight nodes", "hindsight_knobs": "hindsight knobs",
    "hindsight_speedup": "hindsight speedup",
    "best_fixed": "fastest fixed tree or knobs", "knobs": "knobs chosen", "best_fixed_speedup": "its speedup", "auto_over_fixed": "auto / it, paired (95% CI)", "auto_vs_fixed": "auto against it",
    "batch_size": "batch", "tok_s": "tokens/s", "latency_p50_ms": "latency p50 (ms)", "latency_p90_ms": "latency p90 (ms)",
    "same_as_batched_baseline": "= same-B baseline",
    "chosen": "chosen", "repeat_runs": "runs", "speedups": "speedup (95% CI), each run", "taus": "τ, each run",
    "step_ratios": "step × baseline, each run", "baseline_ms": "baseline ms a step, each run", "spread": "apart",
    "inside": "each inside the other's CI", "moved": "what moved", "predicted_speedup": "predicted", "verdict": "vs batch 1",
}
ERROR_COLUMNS = ("speedup_error", "tau_error", "step_error", "baseline_moved")  # measured / predicted − 1
NOISE_COLUMNS = ("speedup_noise", "tau_noise")  # the 95% noise of those errors (results/prediction.error_noise)
COUNT_COLUMNS = ("batch_size", "requests", "tree_nodes", "hindsight_nodes", "new_tokens", "steps", "n_questions", "n_compared", "graded", "reused", "expected", "logged_steps", "contended_turns", "turns")


def column_label(column: str) -> str:
    """A column's header as shown: 'τ' for tau, '≥2 drafts' for accept_ge_2 …"""
    if column in LABELS:
        return LABELS[column]
    for prefix, template in (("accept_ge_", "≥{} drafts"), ("tokens_", "{} tok"), ("score_turn", "score t{}"), ("coverage_turn", "coverage t{}")):
        if column.startswith(prefix):
            return template.format(column[len(prefix):])
    return column


def _is_nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_value(column: str, value: Any) -> str:
    """One cell as text: percentages for rates, ×-suffixed speedups, 'n/a' for missing."""
    if _is_nan(value):
        return "n/a"
    if isinstance(value, (bool, np.bool_)) or isinstance(value, str):
        return str(value)
    if column.startswith(("exact_", "baseline_exact_", "coverage", "accept_ge_", "tokens_")) and column not in ("exact_match_turns", "tokens_per_s"):
        return f"{100 * value:.1f}%"
    if column in ("speedup", "speedup_specbench", "speedup_predicted", "speedup_on_text", "hindsight_speedup", "best_fixed_speedup", "step_predicted",
                  "step_measured", "step_timed", "predicted_speedup"):
        return f"{value:.2f}×"
    if column == "spread":
        return f"{100 * value:.0f}%"
    if column in ERROR_COLUMNS:
        return f"{100 * value:+.0f}%"
    if column in NOISE_COLUMNS:
        return f"±{100 * value:.0f}%"
    if column == "score_vs_baseline":
        return f"{value:+.2f}"
    if column in ("tokens_per_s", "wall_time_s", "divergence_vs_baseline", "divergence_vs_fp32", "tok_s", "latency_p50_ms", "latency_p90_ms"):
        return f"{value:.1f}"
    if isinstance(value, (int, np.integer)) or float(value).is_integer() and column in COUNT_COLUMNS:
        return str(int(value))
    return f"{value:.2f}"


def display_frame(table: pd.DataFrame) -> pd.DataFrame:
    """A table as strings with readable headers; the CI pair becomes one '95% CI' column, which
    says 'n=2, no CI' where too few questions were compared for an interval."""
    table = table.copy()
    if {"speedup_ci_low", "speedup_ci_high"} <= set(table.columns):
        counts = list(table.n_compared) if "n_compared" in table.columns else [None] * len(table)
        if {"reference", "decoder"} <= set(table.columns):  # a reference row is 1.00× itself: no interval to speak of
            counts = [None if r == d else n for r, d, n in zip(table.reference, table.decoder, counts)]
        ci = [interval_text(lo, hi, n) for lo, hi, n in zip(table.speedup_ci_low, table.speedup_ci_high, counts)]
        position = table.columns.get_loc("speedup_ci_low")
        table = table.drop(columns=["speedup_ci_low", "speedup_ci_high"])
        table.insert(position, "speedup_ci", ci)
    if "model_id" in table.columns and "decoder" in table.columns:
        table = table.drop(columns="model_id")
    if "run" in table.columns and table["run"].nunique() <= 1:
        table = table.drop(columns="run")  # one run: its name is in the report's header
    if "reference" in table.columns and all(r in (BASELINE, d) for r, d in zip(table.reference, table.decoder)):
        table = table.drop(columns="reference")  # only worth a column when some decoder has another reference
    return pd.DataFrame({column_label(c): [v if c == "speedup_ci" else format_value(c, v) for v in table[c]] for c in table.columns})


def md_escape(text: Any) -> str:
    """Text from run files made inert in markdown: GitHub renders raw HTML, so `<script>` in a
    decoder, category or device name must not reach the page as a tag, nor `|` split a cell."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no `tabulate` needed); every cell escaped (md_escape)."""
    shown = display_frame(table)
    lines = ["| " + " | ".join(md_escape(c) for c in shown.columns) + " |", "|" + "|".join("---" for _ in shown.columns) + "|"]
    lines += ["| " + " | ".join(md_escape(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines)


def tables_to_markdown(report: ReportTables) -> str:
    """Every table under its own heading, plus the notes: paste-ready for a PR or a paper draft."""
    parts = ["# medusa-bench report", "", "Runs: " + ", ".join(md_escape(run.label) for run in report.runs), ""]
    for line in report.banner:  # one quote block each: consecutive quoted lines would merge into one paragraph
        parts += [f"> **{md_escape(line)}**", ""]
    if report.notes:
        parts += ["Notes:", ""] + [f"- {md_escape(n)}" for n in report.notes] + [""]
    for name, table in report.tables.items():
        parts += [f"## {TABLE_TITLES.get(name, name)}", ""]
        parts += [to_markdown(table) if not table.empty else "_no data_", ""]
        if not table.empty:
            parts += [f"_{md_escape(line)}_\n" for line in FOOTERS.get(name, ())]
    return "\n".join(parts)


def write_csvs(report: ReportTables, folder: Path) -> list[Path]:
    """One CSV per table, raw numbers at full precision (for further analysis, not display)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, table in report.tables.items():
        path = folder / f"{name}.csv"
        table.to_csv(path, index=False)
        paths.append(path)
    return paths
