"""MT-Bench scores from the run's judgments, FastChat `show_result.py` style.

Score = mean of graded judgments; score −1 is a failed grade: missing, counted in coverage =
graded / answered turns. The overall score is the mean over all graded turns, not the mean of
the two turn means.
"""

from __future__ import annotations

import math

import pandas as pd

from medusa_bench.results.runs import RunData, answered_turns, is_number
from medusa_bench.results.stats import ratio


def primary_judge(run: RunData) -> str | None:
    """The judge file with the most judgments (a run usually has exactly one)."""
    if not run.judgments:
        return None
    return max(sorted(run.judgments), key=lambda j: len(run.judgments[j]))


def graded(records: list[dict], model_id: str, answered: dict) -> pd.DataFrame:
    """Valid grades of one model on its answered questions: question_id, turn, score, reused."""
    rows = []
    for r in records:
        score = r.get("score")
        if r.get("model") != model_id or r.get("question_id") not in answered:
            continue
        if not is_number(score) or score < 0:
            continue  # -1: the judge's output had no parseable [[rating]]
        rows.append({"question_id": r["question_id"], "turn": int(r.get("turn") or 1), "score": float(score),
                     "reused": bool(r.get("reused_from"))})
    return pd.DataFrame(rows, columns=["question_id", "turn", "score", "reused"])


def score_and_coverage(grades: pd.DataFrame, answered: dict) -> dict:
    """Mean score of the valid grades and the share of answered turns they cover."""
    return {"score": grades.score.mean() if len(grades) else math.nan, "coverage": ratio(len(grades), sum(answered.values()))}


def quality_table(runs: list[RunData]) -> pd.DataFrame:
    """Per run, judge and decoder: MT-Bench scores per turn and overall, with coverage."""
    rows = []
    for run in runs:
        for judge, records in run.judgments.items():
            max_turns = max([n for m in run.model_ids() for n in answered_turns(run, m).values()] or [1])
            for model_id in run.model_ids():
                answered = answered_turns(run, model_id)
                grades = graded(records, model_id, answered)
                ref_id = run.reference_id(model_id)
                ref_grades = graded(records, ref_id, answered_turns(run, ref_id)) if ref_id and ref_id != model_id else None
                row = {"run": run.label, "judge": judge, "decoder": run.decoder_of(model_id)}
                for turn in range(1, max_turns + 1):
                    expected = sum(1 for n in answered.values() if n >= turn)
                    in_turn = grades[grades.turn == turn]
                    row[f"score_turn{turn}"] = in_turn.score.mean() if len(in_turn) else math.nan
                    row[f"coverage_turn{turn}"] = ratio(len(in_turn), expected)
                overall = score_and_coverage(grades, answered)
                row["score"] = overall["score"]
                row["graded"] = len(grades)
                row["reused"] = int(grades.reused.sum())  # token-identical answers inherit the reference's grade
                row["expected"] = sum(answered.values())
                row["coverage"] = overall["coverage"]
                row["score_vs_baseline"] = _paired_score_delta(grades, ref_grades)
                rows.append(row)
    return pd.DataFrame(rows)


def _paired_score_delta(grades: pd.DataFrame, base_grades: pd.DataFrame | None) -> float:
    """Mean score difference to the baseline on the (question, turn) pairs graded for both."""
    if base_grades is None or grades.empty or base_grades.empty:
        return math.nan
    both = grades.merge(base_grades, on=["question_id", "turn"], suffixes=("", "_base"))
    return float((both.score - both.score_base).mean()) if len(both) else math.nan
