"""The batch sweep (`run --batch-size 1,4,16`): `batch.jsonl` in, one row per run, decoder and batch size out.

Each decoder's throughput at batch B (Σ tokens / Σ batch wall time over the same requests) over
the baseline's at the same B: the speedup, like with like. `control` is the baseline's work timed
again at each B: its distance from 1.00× is that level's noise floor, and a speedup within it is
not a speedup. The notes say, per decoder, from which B on speculation stops paying.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from medusa_bench.results.runs import CONTROL, RunData

BATCH_FILE = "batch.jsonl"  # written by bench/batch_sweep.py: one line per decoder × batch size
BASELINE = "baseline"
COLUMNS = ["run", "decoder", "batch_size", "requests", "tok_s", "speedup", "tau", "latency_p50_ms", "latency_p90_ms",
           "same_as_batched_baseline", "tree_nodes", "predicted_speedup", "verdict"]


def _latest(path: Path) -> dict[tuple[str, int], dict]:
    """(decoder, batch size) -> its latest record (a torn last line skipped: the next run repairs it)."""
    latest = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            latest[(record["decoder"], int(record["batch_size"]))] = record
        except (ValueError, KeyError, TypeError):
            continue
    return latest


def batch_table(runs: list[RunData]) -> pd.DataFrame:
    rows = []
    for run in runs:
        path = Path(run.path) / BATCH_FILE
        if not path.is_file():
            continue
        latest = _latest(path)
        for (decoder, size), record in sorted(latest.items(), key=lambda item: (item[0][1], item[0][0] != BASELINE, item[0][0])):
            base = latest.get((BASELINE, size)) or {}
            rate, base_rate = record.get("output_tokens_per_s"), base.get("output_tokens_per_s")
            latency = record.get("latency_s") or {}
            rows.append({
                "run": run.label, "decoder": decoder, "batch_size": size, "requests": record.get("requests"),
                "tok_s": rate if rate is not None else math.nan,
                "speedup": rate / base_rate if rate and base_rate else math.nan,
                "tau": record.get("tau", math.nan),
                "latency_p50_ms": 1000 * latency["p50"] if latency.get("p50") is not None else math.nan,
                "latency_p90_ms": 1000 * latency["p90"] if latency.get("p90") is not None else math.nan,
                "same_as_batched_baseline": f"{record.get('same_as_batched_baseline')}/{record.get('requests')}",
                "tree_nodes": record.get("tree_nodes", math.nan),
                "predicted_speedup": record.get("predicted_speedup", math.nan),
                "verdict": record.get("verdict", ""),
            })
    return pd.DataFrame(rows, columns=COLUMNS)


def noise_at(table: pd.DataFrame, run: str, size: int) -> float:
    """|control − 1| at this batch size (0 where the run timed no control)."""
    control = table[(table.run == run) & (table.decoder == CONTROL) & (table.batch_size == size)]
    return abs(float(control.speedup.iloc[0]) - 1) if len(control) and not math.isnan(control.speedup.iloc[0]) else 0.0


def batch_notes(table: pd.DataFrame) -> list[str]:
    """Per drafting decoder: where it pays and from which batch size on it stops (against the A/A band)."""
    notes = []
    for (run, decoder), group in table.groupby(["run", "decoder"], sort=False):
        if decoder in (BASELINE, CONTROL):
            continue
        group = group.sort_values("batch_size")
        pays = [int(row.batch_size) for row in group.itertuples() if row.speedup > 1 + noise_at(table, run, row.batch_size)]
        sizes = [int(b) for b in group.batch_size]
        curve = ", ".join(f"B={int(row.batch_size)} {row.speedup:.2f}x" for row in group.itertuples())
        if not pays:
            verdict = "does not pay at any batch size measured"
        elif pays == sizes[: len(pays)] and len(pays) < len(sizes):
            verdict = f"pays up to B={pays[-1]} and stops paying from B={sizes[len(pays)]}"
        elif len(pays) == len(sizes):
            verdict = "pays at every batch size measured"
        else:
            verdict = f"pays at B={', '.join(map(str, pays))} only"
        notes.append(f"Batch sweep{'' if table.run.nunique() == 1 else f' ({run})'}: {decoder} {verdict} "
                     f"(speedup against the same-B baseline beyond the A/A band: {curve}).")
    return notes
