"""The endpoint concurrency sweep (`run --endpoint … --concurrency`): `sweep.jsonl` in, one row
per run, endpoint and concurrency level out."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from medusa_bench.results.runs import RunData

SWEEP_FILE = "sweep.jsonl"  # written by bench/endpoints.py: one line per endpoint × concurrency level
LATENCY_PERCENTILES = ("p50", "p90", "p99")


def _latest_levels(path: Path) -> dict[tuple[str, int], dict]:
    """(endpoint, concurrency) -> its latest record: a re-measured level replaces the old one."""
    latest = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            latest[(record["endpoint"], int(record["concurrency"]))] = record
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line: repaired by the next run
    return latest


def _ms(record: dict, key: str, percentile: str) -> float:
    """A latency percentile of a sweep record (seconds there) in milliseconds; NaN where absent."""
    value = (record.get(key) or {}).get(percentile)
    return value * 1000 if value is not None else math.nan


def sweep_table(runs: list[RunData]) -> pd.DataFrame:
    """Per run, endpoint and concurrency level: the server's output tokens/s, its speedup over the
    run's reference endpoint at the same level, latency percentiles (ms) and τ from the counters."""
    rows = []
    for run in runs:
        path = Path(run.path) / SWEEP_FILE
        if not path.is_file():
            continue
        latest = _latest_levels(path)
        reference = run.info.get("reference")
        for (endpoint, level), record in sorted(latest.items(), key=lambda item: (item[0][1], item[0][0])):
            base = latest.get((reference, level)) if reference else None
            rate, base_rate = record.get("output_tokens_per_s"), (base or {}).get("output_tokens_per_s")
            rows.append({
                "run": run.label, "decoder": endpoint, "concurrency": level, "requests": record.get("requests"),
                "failed": record.get("failed"), "server_tok_s": rate if rate is not None else math.nan,
                "speedup": rate / base_rate if rate and base_rate else math.nan,
                "request_tok_s_p50": (record.get("request_tokens_per_s") or {}).get("p50") or math.nan,
                **{f"{key}_{p}_ms": _ms(record, f"{key}_s", p) for key in ("ttft", "itl") for p in LATENCY_PERCENTILES},
                "tau": record.get("tau") if record.get("tau") is not None else math.nan,
            })
    return pd.DataFrame(rows)
