"""The report's tables assembled: run folders' data in, every table (name → DataFrame, in display
order) with the banner and notes out, one convention throughout (README, "How the numbers are
measured"), so that a table, its CSV export and the HTML report can never disagree.

Where each table is computed: speed.py (speed, noise floor), summary.py (at a glance, banner,
notes), categories.py, spec_bench.py (Spec-Bench's leaderboard layout), acceptance.py (acceptance,
tokens per step), prediction.py (the optimiser's prediction against the run), repeat.py (runs of one command side by side), quality.py (MT-Bench scores), drift_table.py (drift against the baseline and
fp32), configuration.py, sweep.py (endpoint concurrency levels), batch.py (the batch sweep); runs.py loads the folders,
stats.py holds the bootstrap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from medusa_bench.results.acceptance import acceptance_tables
from medusa_bench.results.batch import batch_notes, batch_table
from medusa_bench.results.categories import category_table
from medusa_bench.results.configuration import config_table
from medusa_bench.results.drift_table import drift_notes, precision_table, verdict_notes
from medusa_bench.results.prediction import TITLE as PREDICTION_TITLE
from medusa_bench.results.prediction import prediction_notes, prediction_table
from medusa_bench.results.quality import quality_table
from medusa_bench.results.repeat import repeat_notes, repeat_table
from medusa_bench.results.runs import RunData, question_frame
from medusa_bench.results.spec_bench import NOTE as SPEC_BENCH_NOTE
from medusa_bench.results.spec_bench import spec_bench_table
from medusa_bench.results.speed import speed_table
from medusa_bench.results.summary import banner, notes, summary_table
from medusa_bench.results.sweep import sweep_table

TABLE_TITLES = {
    "summary": "At a glance",
    "speed": "Speed",
    "precision": "Drift: exact match and first divergence",
    "acceptance": "Acceptance",
    "tokens_per_step": "Tokens per step (histogram)",
    "prediction": PREDICTION_TITLE,
    "repeat": "Repeats: the same command, run again",
    "quality": "Quality (MT-Bench single grading)",
    "spec_bench": "Spec-Bench: speedup per task (leaderboard: A100, Vicuna-13B)",
    "categories": "Per category",
    "config": "Configuration",
    "sweep": "Concurrency sweep (endpoints)",
    "batch": "Batch sweep: speedup against batch size",
}


@dataclass
class ReportTables:
    """All tables of a report (name → DataFrame, in display order) plus notes for the reader."""

    runs: list[RunData]
    tables: dict[str, pd.DataFrame]
    notes: list[str]
    # What a reader must see before any number: the noise floor and shared-CPU warnings.
    banner: list[str] = field(default_factory=list)
    # (run, decoder) -> drift.drift_summary(...): the per-turn divergences behind "precision".
    drift: dict = field(default_factory=dict)

    def is_reference(self, run_label: str, decoder: str) -> bool:
        """True for plain-decoding rows (a baseline, the A/A control), which plots of drafting
        behaviour and the headline's per-decoder claims leave out."""
        run = next(r for r in self.runs if r.label == run_label)
        model_id = run.model_id_of(decoder)
        return model_id is None or run.is_reference(model_id)

    def drafting_rows(self, table: pd.DataFrame) -> pd.DataFrame:
        if table.empty:
            return table
        return table[[not self.is_reference(r, d) for r, d in zip(table.run, table.decoder)]]


def build_tables(runs: list[RunData]) -> ReportTables:
    frames = {run.label: question_frame(run) for run in runs}
    speed = speed_table(runs, frames)
    acceptance, histogram = acceptance_tables(runs, frames)
    quality = quality_table(runs)
    precision, drift_details = precision_table(runs, quality)
    tables = {
        "summary": summary_table(runs, speed, quality),
        "speed": speed,
        "precision": precision,
        "acceptance": acceptance,
        "tokens_per_step": histogram,
        "prediction": prediction_table(runs, speed, frames),  # --tree auto decoders (prediction.json; dropped below when empty)
        "repeat": repeat_table(runs, speed, frames),  # runs of one command side by side (dropped below when there are none)
        "quality": quality,
        "spec_bench": spec_bench_table(runs, frames),  # runs over Spec-Bench's questions only (dropped below when empty)
        "categories": category_table(runs, frames),
        "config": config_table(runs),
    }
    for optional in ("spec_bench", "prediction", "repeat"):
        if tables[optional].empty:
            del tables[optional]
    sweep = sweep_table(runs)
    if not sweep.empty:  # endpoint runs with --concurrency only
        tables["sweep"] = sweep
    batch = batch_table(runs)
    if not batch.empty:  # runs with --batch-size only
        tables["batch"] = batch
    caveats = notes(runs, speed) + [n for run in runs for n in drift_notes(run, precision) + verdict_notes(run)]
    caveats += [SPEC_BENCH_NOTE] if "spec_bench" in tables else []
    if "prediction" in tables:
        caveats += prediction_notes(tables["prediction"])
        tables["prediction"] = tables["prediction"].drop(columns=["calibration_trained_on"], errors="ignore")  # said in its note
    if "repeat" in tables:
        caveats += repeat_notes(tables["repeat"])
        tables["repeat"] = tables["repeat"].drop(columns=["pairs", "pairs_inside"])  # counted in its note
    caveats += batch_notes(batch)
    return ReportTables(runs=runs, tables=tables, notes=caveats, banner=banner(runs, speed), drift=drift_details)


def glance_tables(runs: list[RunData]) -> ReportTables:
    """Only what the at-a-glance view needs (summary table and banner): no drift, categories or
    acceptance tables, so printing it at the end of a run costs little."""
    frames = {run.label: question_frame(run) for run in runs}
    speed = speed_table(runs, frames)
    summary = summary_table(runs, speed, quality_table(runs))
    return ReportTables(runs=runs, tables={"summary": summary}, notes=[], banner=banner(runs, speed))
