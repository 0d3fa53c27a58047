"""The speed table and the noise floor it is judged against.

- throughput (tokens/s) = Σ new_tokens / Σ wall_time over a decoder's answered questions;
- speedup against the decoder's reference (stats.paired_speedup: common questions, paired
  bootstrap interval; a decoder cut short is compared only on what it finished: `n_compared`);
- acceptance length τ = Σ new_tokens / Σ decoding_steps (baseline: 1.00);
- exact match = fraction of turns whose token ids equal the reference's (the run loop writes
  `exact_match`; null means "not applicable", e.g. sampled decoding or no baseline);
- noise floor = the `control` decoder's speedup and interval: an A/A copy of the baseline, so
  any speedup whose interval overlaps it is indistinguishable from measurement noise;
- device types are never pooled: a run whose answers were timed on several device types (Ray
  workers on mixed GPUs, each answer's `device`) gets rows per device type, each speedup
  pairing a decoder's and its reference's answers timed on that device type, each with its own
  noise floor (`by_device`).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from medusa_bench.results.runs import CONTROL, RunData
from medusa_bench.results.stats import paired_speedup, ratio, tau_of, too_few_for_ci


def by_device(table: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame]]:
    """One run's rows per device type, [(None, all rows)] when it used one: speedups are compared
    within a device type only (a question's decoders all run on one Ray worker)."""
    if "device" not in table.columns or table.device.nunique(dropna=True) <= 1:
        return [(None, table)]
    return [(device, table[table.device == device]) for device in sorted(table.device.dropna().unique())]


def same_group(table: pd.DataFrame, run: str, device: Any) -> pd.DataFrame:
    """The rows of one run (and device type, where the table has them per device type)."""
    rows = table[table.run == run]
    if "device" in table.columns and isinstance(device, str):
        rows = rows[rows.device == device]
    return rows


def drop_unused_device(table: pd.DataFrame) -> pd.DataFrame:
    """The device column only where some run was timed on several device types."""
    if "device" in table.columns and table.device.isna().all():
        return table.drop(columns="device")
    return table


def speedup_against_reference(run: RunData, questions: pd.DataFrame, model_id: str) -> dict:
    """n_compared, speedup (+ interval, + Spec-Bench's) of one decoder's rows among `questions`
    (one run's question frame, or the part of it on one device type or in one category) against
    its reference's rows there. A reference row is 1.00× itself, with no interval."""
    dec = questions[questions.model_id == model_id]
    ref_id = run.reference_id(model_id)
    if ref_id == model_id:
        return {"n_compared": len(dec), "speedup": 1.0, "speedup_ci_low": math.nan, "speedup_ci_high": math.nan, "speedup_specbench": 1.0}
    return paired_speedup(dec, questions[questions.model_id == ref_id] if ref_id else None)


SPEED_COLUMNS = ["run", "decoder", "device", "model_id", "reference", "n_questions", "n_compared", "new_tokens", "wall_time_s", "tokens_per_s",
                 "speedup", "speedup_ci_low", "speedup_ci_high", "vs_noise", "speedup_specbench", "tau", "exact_match", "exact_match_turns",
                 "contended_turns"]


def speed_table(runs: list[RunData], frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per run (and device type, see `by_device`) and decoder: throughput, speedup (+ interval,
    + Spec-Bench's), τ, exact match."""
    rows = []
    for run in runs:
        for device, q in by_device(frames[run.label]):
            rows += _speed_rows(run, q, device)
    table = pd.DataFrame(rows, columns=SPEED_COLUMNS)
    table["vs_noise"] = [noise_verdict(row, noise_band(same_group(table, row.run, row.device))) for _, row in table.iterrows()]
    if table.contended_turns.isna().all():
        table = table.drop(columns="contended_turns")  # runs from before the contention flags: nothing to count
    return drop_unused_device(table)


def _speed_rows(run: RunData, q: pd.DataFrame, device: str | None) -> list[dict]:
    rows = []
    for model_id in run.model_ids():
        dec = q[q.model_id == model_id]
        if device is not None and dec.empty:
            continue  # this decoder answered nothing on this device type
        rows.append({
            "run": run.label,
            "decoder": run.decoder_of(model_id),
            "device": device,
            "model_id": model_id,
            "reference": run.reference_of(model_id),
            "n_questions": len(dec),
            "new_tokens": dec.new_tokens.sum(),
            "wall_time_s": dec.wall_time.sum(),
            "tokens_per_s": ratio(dec.new_tokens.sum(), dec.wall_time.sum()),
            **speedup_against_reference(run, q, model_id),
            "tau": tau_of(dec),
            "exact_match": ratio(dec.em_match.sum(), dec.em_known.sum()),
            "exact_match_turns": int(dec.em_known.sum()),
            "contended_turns": int(dec.contended.sum()) if dec.contended_known.sum() else math.nan,
        })
    return rows


def control_row(speed: pd.DataFrame) -> pd.Series | None:
    """One run's A/A control row in the speed table, if it ran one."""
    rows = speed[speed.decoder == CONTROL]
    return rows.iloc[0] if len(rows) else None


def noise_band(speed: pd.DataFrame) -> tuple[float, float] | None:
    """One run's measured noise floor: the control's 95% interval (None without a usable control)."""
    control = control_row(speed)
    if control is None or pd.isna(control.speedup_ci_low) or pd.isna(control.speedup_ci_high):
        return None
    return (float(control.speedup_ci_low), float(control.speedup_ci_high))


def noise_verdict(row: pd.Series, band: tuple[float, float] | None) -> str:
    """Is this speedup distinguishable from noise? Its interval against the control's band, or
    against 1.00 when there is no control: any overlap means the data cannot tell it from none."""
    if row.decoder == CONTROL:
        return "noise floor"
    if row.reference == row.decoder:
        return "reference"
    if too_few_for_ci(row.n_compared):
        return "no CI"  # too few questions for an interval: nothing to judge
    if pd.isna(row.speedup_ci_low) or pd.isna(row.speedup_ci_high):
        return "n/a"  # no reference
    low, high = band or (1.0, 1.0)
    if row.speedup_ci_low > high:
        return "faster"
    if row.speedup_ci_high < low:
        return "slower"
    return "inside noise"
