"""Repeats: the same command run more than once, its speedups side by side (`report RUN1 RUN2 …`).

Runs repeat one command when they asked the same thing of the same model: the same questions (run.json's
content hashes), max_new_tokens, temperature, dtype, device, thread count and heads. Every decoder
configuration timed in two or more of them (its name, and what `--tree auto` chose: run.json's tree
hash, or pld:auto's knobs) gets one row: each run's speedup with its 95% interval, τ, the time of a
step against the baseline's, and whether every two runs land inside each other's intervals (the
issue's test of a repeatable figure).

A speedup is τ over that step ratio exactly (speedup = (τ / τ_reference) / ((seconds / steps) /
(reference seconds / reference steps)), each turn's prefill included), so the row says which of the two
moved. Greedy decoding writes the same tokens each time, so τ repeats and what moves is the machine's
timing: on the 2-core Xeon of docs/results/cpu-repeat-xeon-amx-16q.md, eight runs of one command gave
hydra's tree-8 the same τ (1.74) each time while its step cost 1.27 to 1.42 baseline steps. The code's
version is not part of the command: a report over two versions shows what the change moved.
"""

from __future__ import annotations

import itertools
import json
import math

import pandas as pd

from medusa_bench.results.prediction import SEARCH_FILES
from medusa_bench.results.runs import RunData

COLUMNS = ["decoder", "chosen", "repeat_runs", "speedups", "taus", "step_ratios", "baseline_ms", "spread", "inside", "moved",
           "pairs", "pairs_inside"]  # the last two: counts for the note and the CSV, dropped from the shown table
SAME_TAU = 0.005  # τ printed to two decimals: closer than this is the same τ


def command_key(run: RunData) -> str:
    """What two runs must share to repeat one command (a run.json without content hashes: its question file and limit)."""
    settings, device, hashes = run.settings, run.info.get("device") or {}, run.info.get("content_hashes") or {}
    asked = {key: settings.get(key) for key in ("model", "max_new_tokens", "temperature", "top_p", "seed", "dtype", "acceptance")}
    questions = hashes.get("questions") or [settings.get("question_file"), settings.get("limit")]
    heads = sorted((hashes.get("heads") or {}).values())
    return json.dumps([asked, questions, heads, device.get("name"), device.get("threads")], sort_keys=True, default=str)


def configurations(run: RunData) -> dict[str, str]:
    """decoder → what it ran with, where a search chose it: the tree's name and hash, or the knobs pld:auto took."""
    chosen = {}
    for decoder, tree in (run.info.get("trees") or {}).items():
        if isinstance(tree, dict) and tree.get("auto"):
            chosen[decoder] = f"{tree.get('name')} ({tree.get('hash')})"
    for path in sorted(run.path.glob(SEARCH_FILES)):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # prediction.search_rows reads the same files and notes an unreadable one
        if isinstance(record, dict) and record.get("decoder") and record.get("spec"):
            chosen[str(record["decoder"])] = str(record["spec"])
    return chosen


def timing_parts(frame: pd.DataFrame, run: RunData, model_id: str) -> tuple[float, float]:
    """(step ratio, the reference's milliseconds per step) of one decoder on the questions both answered."""
    reference = run.reference_id(model_id)
    mine, theirs = (frame[frame.model_id == m].set_index("question_id") for m in (model_id, reference))
    common = [q for q in mine.index if q in theirs.index]
    if not common or reference is None:
        return math.nan, math.nan
    mine, theirs = mine.loc[common], theirs.loc[common]
    if not (mine.steps.sum() and theirs.steps.sum()):
        return math.nan, math.nan
    their_step = theirs.wall_time.sum() / theirs.steps.sum()
    return (mine.wall_time.sum() / mine.steps.sum()) / their_step, 1000 * their_step


def repeat_table(runs: list[RunData], speed: pd.DataFrame, frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per decoder configuration timed in two or more runs of one command; empty when none was."""
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        groups.setdefault(command_key(run), []).append(run)
    rows = []
    for group in (members for members in groups.values() if len(members) > 1):
        timed: dict[tuple[str, str], list[dict]] = {}
        for run in group:
            chosen = configurations(run)
            for row in speed[(speed.run == run.label) & (speed.decoder != speed.reference)].itertuples():
                ratio, base_ms = timing_parts(frames[run.label], run, row.model_id)
                timed.setdefault((row.decoder, chosen.get(row.decoder, "")), []).append(
                    {"run": run.label, "speedup": row.speedup, "low": row.speedup_ci_low, "high": row.speedup_ci_high,
                     "tau": row.tau, "step_ratio": ratio, "base_ms": base_ms})
        rows += [repeat_row(decoder, chosen, seen) for (decoder, chosen), seen in timed.items() if len(seen) > 1]
    return pd.DataFrame(rows, columns=COLUMNS)


def repeat_row(decoder: str, chosen: str, seen: list[dict]) -> dict:
    """One configuration's runs side by side, and which pairs fall outside each other's interval."""
    pairs = list(itertools.combinations(seen, 2))
    apart = [f"{a['run']} ↔ {b['run']}" for a, b in pairs if not inside_each_other(a, b)]
    taus = [s["tau"] for s in seen]
    same_tau = all(abs(t - taus[0]) < SAME_TAU for t in taus if not math.isnan(t))
    speedups = [s["speedup"] for s in seen]
    return {
        "decoder": decoder, "chosen": chosen or "–", "repeat_runs": " · ".join(s["run"] for s in seen),
        "speedups": " · ".join(f"{s['speedup']:.2f}× ({_interval(s)})" for s in seen),
        "taus": f"{taus[0]:.2f} each" if same_tau else " · ".join(f"{t:.2f}" for t in taus),
        "step_ratios": " · ".join(f"{s['step_ratio']:.2f}" for s in seen),
        "baseline_ms": " · ".join(f"{s['base_ms']:.1f}" for s in seen),
        "spread": max(speedups) / min(speedups) - 1,
        "inside": f"{len(pairs) - len(apart)} of {len(pairs)}" + (f" (not {', '.join(apart)})" if apart else ""),
        "pairs": len(pairs), "pairs_inside": len(pairs) - len(apart),
        "moved": "timing (τ the same)" if same_tau else "τ and timing",
    }


def inside_each_other(a: dict, b: dict) -> bool:
    """Each run's speedup inside the other's 95% interval (False where either has none)."""
    return a["low"] <= b["speedup"] <= a["high"] and b["low"] <= a["speedup"] <= b["high"]


def _interval(seen: dict) -> str:
    return "no CI" if math.isnan(seen["low"]) else f"{seen['low']:.2f}–{seen['high']:.2f}"


def repeat_notes(table: pd.DataFrame) -> list[str]:
    """The table in one line: how many configurations repeated, and what moved."""
    if table.empty:
        return []
    timing_only = int((table.moved == "timing (τ the same)").sum())
    widest = table.loc[table.spread.idxmax()]
    return [f"Repeats: of {int(table.pairs.sum())} pairs of runs of one command timing one decoder configuration, "
            f"{int(table.pairs_inside.sum())} landed inside each other's 95% intervals (an interval covers the sampling of its "
            f"questions, not its machine's state; and two intervals that covered both would still hold each other's figure only "
            f"about 5 times in 6). τ was the "
            f"same in every run for {timing_only} of {len(table)} configurations: what moved there is the machine's timing (the "
            f"widest: {widest.decoder} {100 * widest.spread:.0f}% apart, a step costing {widest.step_ratios} baseline steps). "
            f"One run cannot see its own machine's state; two runs of the command, at least 10 minutes apart, can."]
