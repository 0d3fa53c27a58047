"""What a reader sees first: the at-a-glance table (how fast, why, whether quality held), the
banner above every format (noise floor, engine, shared-CPU turns) and the notes (what is missing,
what was compared on fewer questions)."""

from __future__ import annotations

import pandas as pd

from medusa_bench.results.configuration import engine_words
from medusa_bench.results.drift_table import precision_notes
from medusa_bench.results.quality import primary_judge
from medusa_bench.results.runs import CONTROL, RunData, known_flags
from medusa_bench.results.speed import by_device, control_row, noise_band
from medusa_bench.results.stats import MIN_QUESTIONS_FOR_CI, too_few_for_ci

SUMMARY_COLUMNS = ["run", "decoder", "device", "reference", "n_questions", "n_compared", "tokens_per_s", "speedup", "speedup_ci_low",
                   "speedup_ci_high", "vs_noise", "tau", "exact_match"]


def summary_table(runs: list[RunData], speed: pd.DataFrame, quality: pd.DataFrame) -> pd.DataFrame:
    """The at-a-glance table: how fast, why (τ), and whether quality held, per decoder (primary judge)."""
    summary = speed[[c for c in SUMMARY_COLUMNS if c in speed.columns]].copy()  # "device": runs timed on several device types
    if not quality.empty:
        primary = {run.label: primary_judge(run) for run in runs}
        judged = quality[[primary.get(r) == j for r, j in zip(quality.run, quality.judge)]]
        summary = summary.merge(judged[["run", "decoder", "score", "coverage", "score_vs_baseline"]], on=["run", "decoder"], how="left")
    return summary


def banner(runs: list[RunData], speed: pd.DataFrame) -> list[str]:
    """Top-of-report lines: each run's A/A noise floor, and how many turns were timed on a shared CPU."""
    lines = []
    for run in runs:
        prefix = f"{run.label}: " if len(runs) > 1 else ""
        for device, rows in by_device(speed[speed.run == run.label]):
            lines += _noise_floor_lines(f"{prefix}{device}: " if device else prefix, rows)
        engine = engine_words((run.info.get("device") or {}).get("engine"))
        if engine:
            lines.append(f"{prefix}engine: {engine}, the same for the baseline and every decoder")
        records = [record for model_id in run.model_ids() for record in run.answers[model_id]]
        flags = [known_flags(record, "contended") for record in records]
        flagged, known = sum(sum(f) for f in flags), sum(len(f) for f in flags)
        if flagged:
            lines.append(f"{prefix}{flagged} of {known} turns were measured while the CPU was shared; "
                         "rerun with --remeasure-flagged on a quiet machine")
        remeasured = sum(bool(record.get("remeasured")) for record in records)
        if remeasured:
            lines.append(f"{prefix}{remeasured} answers were re-measured after a shared-CPU first pass (their timings replace the first ones)")
    return lines


def _noise_floor_lines(where: str, rows: pd.DataFrame) -> list[str]:
    """The control's interval, or what a speedup is judged against without one."""
    control = control_row(rows)
    if control is not None and pd.notna(control.speedup):
        band = noise_band(rows)
        if band:
            interval = f"95% CI {band[0]:.2f}–{band[1]:.2f}"
        elif too_few_for_ci(control.n_compared):
            interval = f"n={int(control.n_compared)}, no CI: an interval needs {MIN_QUESTIONS_FOR_CI} questions"
        else:
            interval = "no interval"
        return [f"{where}A/A control: {control.speedup:.2f}× ({interval}) — speedups inside this band are noise"]
    contenders = rows[[v not in ("reference", "noise floor") for v in rows.vs_noise]]
    if len(contenders):
        return [f"{where}no A/A control in this run: a speedup counts only where its 95% CI excludes 1.00× "
                f"(add `{CONTROL}` to --decoders to measure the noise floor)"]
    return []


def notes(runs: list[RunData], speed: pd.DataFrame) -> list[str]:
    """Plain-language caveats: what is missing and what was compared on fewer questions."""
    lines = []
    for run in runs:
        lines += [f"{run.label}: {n}" for n in run.notes]
        if not run.answers:
            lines.append(f"{run.label}: no answers yet (model_answer/ is empty).")
            continue
        missing = sorted({run.reference_of(m) for m in run.model_ids() if run.reference_id(m) is None})
        for reference in missing:
            lines.append(f"{run.label}: no `{reference}` answers in this run, so speedup against it is n/a; add `{reference}` to --decoders.")
        if not run.judgments:
            lines.append(f"{run.label}: no judgments, so quality scores are n/a; run `medusa-bench judge` on it.")
        own = speed[speed.run == run.label]
        lines += _partial_comparisons(run, own)
        devices = [device for device, _ in by_device(own) if device]
        if devices:
            lines.append(f"{run.label}: timed on {len(devices)} device types ({', '.join(devices)}); speeds and speedups are shown "
                         "per device type, each against its reference's answers on that device type, never pooled.")
        lines += precision_notes(run, own)
        if len(run.judgments) > 1:
            lines.append(f"{run.label}: several judges; per-category scores use {primary_judge(run)}.")
    return lines


def _partial_comparisons(run: RunData, speed: pd.DataFrame) -> list[str]:
    """A decoder cut short is compared on the questions both it and its reference answered: say so."""
    lines = []
    for device, group in by_device(speed):
        rows = group.set_index("decoder")
        on = f" on {device}" if device else ""
        for decoder, row in rows.iterrows():
            if row.reference == decoder or row.reference not in rows.index:
                continue
            total = int(rows.loc[row.reference, "n_questions"])
            if row.n_compared < total:
                lines.append(f"{run.label}: {decoder} answered {row.n_questions} of {row.reference}'s {total} questions{on}; "
                             f"its speedup compares the {row.n_compared} questions both answered.")
    return lines
