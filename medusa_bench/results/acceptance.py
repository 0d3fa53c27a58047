"""Acceptance: τ with per-depth acceptance rates, the histogram of tokens per step, and what the
tree optimiser predicted for the tree it chose.

- acceptance length τ = Σ new_tokens / Σ decoding_steps: the mean tokens a step emits, the
  base model's own token included (baseline: 1.00);
- per-depth acceptance = fraction of steps that accepted at least d drafted tokens.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pandas as pd

from medusa_bench.results.runs import OPTIONAL_FILES, RunData, accept_lengths_of, is_number, load_optional_json
from medusa_bench.results.stats import ratio, tau_of


def acceptance_counts(run: RunData, model_id: str) -> Counter:
    """How many steps emitted 1, 2, 3 … tokens (root + accepted drafts)."""
    counts: Counter = Counter()
    for record in run.answers[model_id]:
        counts.update(accept_lengths_of(record))
    return counts


def tree_files(run: RunData, decoder: str) -> dict[str, Any]:
    """The tree optimiser's files (tree, calibration, latency JSON) behind one decoder's tree.

    run.json's "trees" says which decoders had their tree chosen by `--tree auto` and where
    their files are; a decoder on a fixed tree has none. Runs without that record (or with a
    tree.json put there by hand) fall back to the folder's own tree.json.
    """
    records = run.info.get("trees") or {}
    if decoder not in records:
        return run.extras if not records else {}
    record = records[decoder]
    if not record.get("auto"):
        return {}
    names = record.get("files") or {name: f"{name}.json" for name in OPTIONAL_FILES}
    loaded = {name: load_optional_json(run.path / str(file), run.notes) for name, file in names.items()}
    return {name: data for name, data in loaded.items() if data is not None}


def predicted(files: dict[str, Any], key: str) -> float:
    """The tree optimiser's prediction for the chosen tree (key "tau" or "speedup"), if saved.

    Read tolerantly: `medusa-bench tree` writes {"search": {"tau", "speedup", …}} into tree.json;
    other writers may use {"predicted": {key: x}} or "predicted_<key>"; calibration.json likewise.
    """
    for extra in (files.get("tree"), files.get("calibration")):
        if not isinstance(extra, dict):
            continue
        for holder in (extra.get("predicted"), extra.get("search")):
            if isinstance(holder, dict) and is_number(holder.get(key)):
                return float(holder[key])
        if is_number(extra.get(f"predicted_{key}")):
            return float(extra[f"predicted_{key}"])
    return math.nan


def acceptance_tables(runs: list[RunData], frames: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """τ with per-depth acceptance rates, and the histogram of tokens per step (fractions)."""
    counts = {(run.label, m): acceptance_counts(run, m) for run in runs for m in run.model_ids()}
    longest = max((max(c) for c in counts.values() if c), default=1)
    accept_rows, hist_rows = [], []
    for run in runs:
        q = frames[run.label]
        for model_id in run.model_ids():
            dec = q[q.model_id == model_id]
            c = counts[(run.label, model_id)]
            steps = sum(c.values())
            decoder = run.decoder_of(model_id)
            row = {"run": run.label, "decoder": decoder, "steps": int(dec.steps.sum()) if dec.steps.notna().any() else math.nan,
                   "tau": tau_of(dec)}
            files = {} if run.is_reference(model_id) else tree_files(run, decoder)
            row["tau_predicted"] = predicted(files, "tau")
            row["speedup_predicted"] = predicted(files, "speedup")
            for depth in range(1, longest):
                row[f"accept_ge_{depth}"] = ratio(sum(n for k, n in c.items() if k - 1 >= depth), steps)
            accept_rows.append(row)
            hist = {"run": run.label, "decoder": decoder, "logged_steps": steps}
            for k in range(1, longest + 1):
                hist[f"tokens_{k}"] = ratio(c.get(k, 0), steps)
            hist_rows.append(hist)
    accept = pd.DataFrame(accept_rows)
    for column in ("tau_predicted", "speedup_predicted"):
        if not accept.empty and accept[column].isna().all():
            accept = accept.drop(columns=column)  # no tree search behind this run
    return accept, pd.DataFrame(hist_rows)
