"""The drift table ("precision"): exact match and first divergence of every decoder against its
own-precision reference and against the fp32 reference decoding, recomputed from token ids
(drift.py), and the notes that say when lost exactness is the precision's doing or a bug.
"""

from __future__ import annotations

import pandas as pd

from medusa_bench.results import drift
from medusa_bench.results.quality import primary_judge
from medusa_bench.results.runs import BASELINE, RunData, is_sampled, load_optional_json

PRECISION_FP32_COLUMNS = ["exact_vs_fp32", "divergence_vs_fp32", "baseline_exact_vs_fp32"]
VERDICT_FILE = "verdict.json"  # bench/run_verdict.py writes it, verdict_notes reads it


def precision_table(runs: list[RunData], quality: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Per run and decoder: exact match and median first divergence against the own-precision
    baseline, the same against the fp32 reference, and the baseline's own match against fp32 on
    those turns (the floor the precision sets anyway), with the primary judge's score beside them.

    Also returns the per-turn comparisons behind it, {(run, decoder): drift.drift_summary(...)},
    for the first-divergence plot. Decoders measured against another reference (medusa2 against
    its own backbone) get no fp32 columns: the fp32 file holds the plain baseline's answers.
    That backbone (medusa2-baseline, its own reference) is compared with the plain baseline:
    how different a model the fine-tuning made.
    """
    rows, details = [], {}
    for run in runs:
        if is_sampled(run):
            continue
        fp32 = drift.turn_token_ids(run.precision_reference) if run.precision_reference else None
        judge = primary_judge(run)
        scores = quality[(quality.run == run.label) & (quality.judge == judge)].set_index("decoder") if judge and not quality.empty else None
        for model_id in run.model_ids():
            decoder = run.decoder_of(model_id)
            summary = _drift_of(run, model_id, fp32)
            details[(run.label, decoder)] = summary
            row = {"run": run.label, "decoder": decoder, "dtype": run.dtype, "turns": summary["turns"],
                   "exact_vs_baseline": summary["exact_match"], "divergence_vs_baseline": summary["first_divergence_median"],
                   "exact_vs_fp32": summary["exact_match_fp32"], "divergence_vs_fp32": summary["first_divergence_fp32_median"],
                   "baseline_exact_vs_fp32": summary["baseline_exact_match_fp32"]}
            if scores is not None and decoder in scores.index:
                row["score"] = scores.loc[decoder, "score"]
                row["score_vs_baseline"] = scores.loc[decoder, "score_vs_baseline"]
            rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty or table[["exact_vs_baseline", *PRECISION_FP32_COLUMNS]].isna().all().all():
        return pd.DataFrame(), details  # no token ids to compare (an older run, or sampled decoding)
    if not any(run.precision_reference for run in runs):
        table = table.drop(columns=PRECISION_FP32_COLUMNS)  # an fp32 run is its own reference
    return table, details


def _drift_of(run: RunData, model_id: str, fp32: dict | None) -> dict:
    """One decoder's drift.drift_summary against its reference and, where it is measured against
    the plain baseline, against the fp32 decoding."""
    decoder = run.decoder_of(model_id)
    ref_id = run.reference_id(model_id)
    own = drift.turn_token_ids(run.answers[model_id])
    if ref_id == model_id:  # its own reference (medusa2-baseline, a fine-tuned model): how far from the base model
        ref_id = run.model_id_of(BASELINE)
    base = drift.turn_token_ids(run.answers[ref_id]) if ref_id and ref_id != model_id else None
    against_fp32 = fp32 if run.reference_of(model_id) == BASELINE or decoder == BASELINE else None
    if decoder != BASELINE:
        return drift.drift_summary(own, base, against_fp32)
    summary = drift.drift_summary(own, None, against_fp32)  # the baseline against fp32 is its own floor
    summary["baseline_vs_fp32"] = summary["vs_fp32"]
    summary["baseline_exact_match_fp32"] = summary["exact_match_fp32"]
    return summary


def drift_notes(run: RunData, precision: pd.DataFrame) -> list[str]:
    """Say where lost exactness is the precision's doing: the baseline itself drifts from fp32."""
    if precision.empty or "baseline_exact_vs_fp32" not in precision.columns:
        return []
    rows = precision[(precision.run == run.label) & (precision.decoder == BASELINE)]
    if rows.empty or pd.isna(rows.iloc[0].baseline_exact_vs_fp32) or rows.iloc[0].baseline_exact_vs_fp32 >= 1.0:
        return []
    floor = rows.iloc[0].baseline_exact_vs_fp32
    return [f"{run.label}: in {run.dtype or 'this dtype'} the baseline itself matches its {run.precision_dtype} decoding on only "
            f"{100 * floor:.1f}% of turns; a decoder's exact match near that level is the precision's rounding, not the decoder "
            "(see the drift table)."]


def precision_notes(run: RunData, speed: pd.DataFrame) -> list[str]:
    """Flag lost exactness where it should not happen: greedy decoding in float32 must match 100%."""
    if run.dtype not in ("float32", "fp32"):
        return []
    return [f"{run.label}: {row.decoder} matched the reference's tokens on only {100 * row.exact_match:.1f}% of turns in float32, "
            "where greedy decoding with draft heads should be exact: check the verify step."
            for _, row in speed.iterrows() if pd.notna(row.exact_match) and row.exact_match < 1.0]


def verdict_notes(run: RunData) -> list[str]:
    """One line per decoder of verdict.json: lossless (100% exact), lossless up to rounding, or NOT lossless with its margins."""
    verdicts = load_optional_json(run.path / VERDICT_FILE, run.notes) or {}
    return [f"{run.label}: {decoder} vs {entry.get('reference', BASELINE)}: {entry['verdict']}"
            + (f" [{entry.get('exact')} of {entry.get('answers')} answers identical]" if entry.get("exact") != entry.get("answers") else "")
            for decoder, entry in verdicts.items() if isinstance(entry, dict) and entry.get("verdict")]
