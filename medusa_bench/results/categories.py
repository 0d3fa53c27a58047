"""The per-category table: speedup (with interval where a category has enough questions), τ and
the primary judge's score, per run, category (and device type) and decoder.

A category holds few questions (MT-Bench: 10 each; a 16-question run: 2), so many of its rows
have no interval (stats.MIN_QUESTIONS_FOR_CI) and say so.
"""

from __future__ import annotations

import pandas as pd

from medusa_bench.results.quality import graded, primary_judge, score_and_coverage
from medusa_bench.results.runs import RunData, answered_turns
from medusa_bench.results.speed import by_device, drop_unused_device, speedup_against_reference
from medusa_bench.results.stats import tau_of


def category_table(runs: list[RunData], frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per run, category and decoder: speedup (with interval), τ and the primary judge's score."""
    rows = []
    for run in runs:
        judge = primary_judge(run)
        for device, q in by_device(frames[run.label]):
            for category in sorted(q.category.unique()):
                in_cat = q[q.category == category]
                for model_id in run.model_ids():
                    dec = in_cat[in_cat.model_id == model_id]
                    if dec.empty:
                        continue
                    row = {"run": run.label, "category": category, "decoder": run.decoder_of(model_id), "device": device,
                           "reference": run.reference_of(model_id), "n_questions": len(dec)}
                    row.update({k: v for k, v in speedup_against_reference(run, in_cat, model_id).items() if k != "speedup_specbench"})
                    row["tau"] = tau_of(dec)
                    if judge:
                        in_category = set(dec.question_id)
                        answered = {qid: n for qid, n in answered_turns(run, model_id).items() if qid in in_category}
                        row.update(score_and_coverage(graded(run.judgments[judge], model_id, answered), answered))
                    rows.append(row)
    return drop_unused_device(pd.DataFrame(rows))
