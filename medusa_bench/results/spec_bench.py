"""Spec-Bench's layout: a run over its questions as one row per decoder, its leaderboard's columns.

Spec-Bench (hemingkx/Spec-Bench) has six tasks of 80 questions (inputs/questions.BENCH_TASKS):
multi-turn (MT-Bench's eight categories), translation, summarization, QA, math reasoning and RAG.
Its leaderboard shows per method a speedup per task, the overall speedup and τ. `spec_bench_table`
gives a run the same row, with the project's one convention (speed.py): each speedup is against
the run's own baseline on the questions both answered (ratio of summed tokens/s); the overall one
carries its paired bootstrap interval and the noise verdict against the A/A control. Beside it,
the leaderboard's own overall speedup and τ for the method. Those are Spec-Bench's numbers (an
A100, Vicuna-13B, the mean of per-question ratios), not this machine's: compare the order of the
rows and τ, not the speedups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from medusa_bench.inputs.questions import BENCH_TASKS, task_of
from medusa_bench.results.runs import RunData
from medusa_bench.results.speed import (by_device, drop_unused_device, noise_band, noise_verdict, same_group,
                                        speedup_against_reference)
from medusa_bench.results.stats import tau_of

BENCH = "spec_bench"
TASK_LABELS = {"multi_turn": "Multi-turn", "translation": "Translation", "summarization": "Summarization",
               "qa": "QA", "math_reasoning": "Math", "rag": "RAG"}
LEADERBOARD_NAME = "Spec-Bench leaderboard (A100, Vicuna-13B)"
LEADERBOARD_OVERALL = f"{LEADERBOARD_NAME}: Overall"
LEADERBOARD_TAU = f"{LEADERBOARD_NAME}: τ"
NOTE = (f"Spec-Bench table: each speedup is against this run's baseline on this machine (the report's convention); "
        f"the {LEADERBOARD_NAME} columns are Spec-Bench's own numbers (Vicuna-13B-v1.3, fp16, greedy, mean of per-question "
        "ratios), so compare the order of the rows and τ, not the speedups.")


@dataclass(frozen=True)
class LeaderboardRow:
    decoder: str  # our decoder's name for the method
    method: str  # the leaderboard's name
    tasks: tuple[float, ...]  # speedup per task, in TASK_LABELS' order
    tau: float  # "#Mean Accepted Tokens"
    overall: float


# Leaderboard.md of hemingkx/Spec-Bench at fd2c1cd (2025-04-22), "Leaderboard on A100" /
# "Vicuna-13B-v1.3": one A100 80GB, greedy, fp16, batch size 1; rows in its order.
LEADERBOARD = (
    LeaderboardRow("eagle3", "EAGLE3", (3.48, 2.36, 3.14, 2.94, 3.42, 2.78), 5.71, 3.02),
    LeaderboardRow("samd-eagle2", "SAMD[EAGLE2]", (3.38, 2.11, 2.96, 2.35, 3.16, 2.67), 4.52, 2.77),
    LeaderboardRow("eagle2", "EAGLE2", (2.95, 1.96, 2.43, 2.20, 2.95, 2.25), 4.43, 2.46),
    LeaderboardRow("hydra", "Hydra", (2.58, 1.99, 1.94, 2.08, 2.62, 1.95), 3.35, 2.20),
    LeaderboardRow("recycling", "Recycling", (2.30, 2.02, 2.10, 2.05, 2.60, 1.94), 2.73, 2.17),
    LeaderboardRow("eagle", "EAGLE", (2.52, 1.84, 2.12, 1.91, 2.52, 2.01), 3.64, 2.16),
    LeaderboardRow("medusa", "Medusa", (2.05, 1.71, 1.62, 1.69, 2.08, 1.61), 2.39, 1.80),
    LeaderboardRow("pld", "PLD", (1.54, 1.03, 2.30, 1.05, 1.65, 1.82), 1.67, 1.56),
    LeaderboardRow("sps", "SpS", (1.67, 1.15, 1.71, 1.43, 1.58, 1.70), 2.19, 1.54),
    LeaderboardRow("rest", "REST", (1.52, 1.17, 1.37, 1.53, 1.19, 1.55), 1.82, 1.38),
    LeaderboardRow("lookahead", "Lookahead", (1.43, 1.09, 1.28, 1.18, 1.59, 1.21), 1.63, 1.30),
)
LEADERBOARD_DECODERS = tuple(row.decoder for row in LEADERBOARD)
_BY_DECODER = {row.decoder: row for row in LEADERBOARD}

COLUMNS = ["run", "decoder", "device", "reference", "n_compared", *TASK_LABELS.values(), "Overall", "speedup_ci_low", "speedup_ci_high",
           "vs_noise", "tau", LEADERBOARD_OVERALL, LEADERBOARD_TAU]


def leaderboard_row(decoder: str) -> LeaderboardRow | None:
    """The leaderboard's row for a decoder of a run ('medusa:chain-2' is Medusa on another tree)."""
    return _BY_DECODER.get(decoder.partition(":")[0])


def row_order(decoder: str, run_order: list[str]) -> tuple:
    """Leaderboard rows in its order, then the run's other decoders in the run's order (control last)."""
    base = decoder.partition(":")[0]
    if base in LEADERBOARD_DECODERS:
        return (0, LEADERBOARD_DECODERS.index(base), decoder)
    return (1, decoder == "control", run_order.index(decoder) if decoder in run_order else len(run_order), decoder)


def with_tasks(frame: pd.DataFrame) -> pd.DataFrame:
    """One run's question frame with each question's Spec-Bench task; questions of no task dropped."""
    tasks = [task_of(BENCH, category) for category in frame.category]
    return frame.assign(task=tasks)[[task is not None for task in tasks]]


def is_spec_bench(run: RunData, frame: pd.DataFrame) -> bool:
    """A run over Spec-Bench's questions: its bench, or its questions in a Spec-Bench-only task."""
    own_tasks = {category for task, categories in BENCH_TASKS[BENCH].items() if task != "multi_turn" for category in categories}
    return run.settings.get("bench") == BENCH or bool(own_tasks & set(frame.category))


def spec_bench_table(runs: list[RunData], frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per Spec-Bench run (and device type) and decoder: speedup per task, overall (+ interval, vs
    noise), τ, and the leaderboard's overall and τ. Empty when no run is over Spec-Bench's questions."""
    rows = []
    for run in runs:
        if frames[run.label].empty or not is_spec_bench(run, frames[run.label]):
            continue
        for device, q in by_device(with_tasks(frames[run.label])):
            rows += _run_rows(run, q, device)
    table = pd.DataFrame(rows, columns=COLUMNS)
    if table.empty:
        return table
    table["vs_noise"] = [noise_verdict(row, noise_band(same_group(table, row.run, row.device))) for _, row in table.iterrows()]
    return drop_unused_device(table)


def _run_rows(run: RunData, q: pd.DataFrame, device: str | None) -> list[dict]:
    """One run's rows on one device type: every decoder but the references (1.00× themselves)."""
    order = [str(d) for d in run.info.get("decoders") or []]
    model_ids = [m for m in run.model_ids() if run.reference_of(m) != run.decoder_of(m) and not q[q.model_id == m].empty]
    rows = []
    for model_id in sorted(model_ids, key=lambda m: row_order(run.decoder_of(m), order)):
        decoder = run.decoder_of(model_id)
        overall = speedup_against_reference(run, q, model_id)
        board = leaderboard_row(decoder)
        rows.append({
            "run": run.label, "decoder": decoder, "device": device, "reference": run.reference_of(model_id),
            "n_compared": overall["n_compared"],
            **{label: speedup_against_reference(run, q[q.task == task], model_id)["speedup"] for task, label in TASK_LABELS.items()},
            "Overall": overall["speedup"], "speedup_ci_low": overall["speedup_ci_low"], "speedup_ci_high": overall["speedup_ci_high"],
            "tau": tau_of(q[q.model_id == model_id]),
            LEADERBOARD_OVERALL: board.overall if board else math.nan, LEADERBOARD_TAU: board.tau if board else math.nan,
        })
    return rows
