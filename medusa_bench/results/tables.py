"""The report's numbers: run folders in, pandas tables out, one convention throughout.

Every number follows design.md's metric definitions, so that a table, its CSV export and the
HTML report can never disagree:

- throughput (tokens/s) = Σ new_tokens / Σ wall_time over a decoder's answered questions;
- speedup = throughput(decoder) / throughput(baseline) on the questions *both* answered (a
  decoder cut short is compared only on what it finished: see `n_compared`), with a paired
  bootstrap 95% interval over questions (ratio of sums inside every resample);
- Spec-Bench's speedup = mean per-question tokens/s of the decoder / that of the baseline, on
  the same common questions (its `evaluation/speed.py` convention, for its leaderboard);
- acceptance length τ = Σ new_tokens / Σ decoding_steps (baseline: 1.00);
- per-depth acceptance = fraction of steps that accepted at least d drafted tokens;
- exact match = fraction of turns whose token ids equal the baseline's (the run loop writes
  `exact_match`; null means "not applicable", e.g. sampled decoding or no baseline); the
  precision table recomputes it from `token_ids` (drift.py) and adds the fp32 reference;
- noise floor = the `control` decoder's speedup and interval: an A/A copy of the baseline, so
  any speedup whose interval overlaps it is indistinguishable from measurement noise;
- device types are never pooled: a run whose answers were timed on several device types (Ray
  workers on mixed GPUs, each answer's `device`) gets speed rows per device type, each speedup
  pairing a decoder's and its reference's answers timed on that device type, each with its own
  noise floor (`by_device`);
- MT-Bench score = mean of graded judgments (score −1 is a failed grade: missing, counted in
  coverage = graded / answered turns), FastChat `show_result.py` style: the overall score is
  the mean over all graded turns, not the mean of the two turn means.

Only `choices[0]` of an answer is used, as in Spec-Bench and FastChat's single grading.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from medusa_bench.errors import UserError
from medusa_bench.results import drift
from medusa_bench.results.files import JUDGMENT_DIR, load_answers, load_run, read_json, read_jsonl

BASELINE = "baseline"
CONTROL = "control"  # the A/A copy of the baseline: its speedup is the measured noise floor
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95
OPTIONAL_FILES = ("tree", "calibration", "latency")

# ------------------------------------------------------------------------------ loading runs


@dataclass
class RunData:
    """Everything one run folder holds that the report can use; missing parts are empty."""

    label: str
    path: Path
    info: dict
    answers: dict[str, list[dict]]  # model_id -> one record per question (last one wins)
    judgments: dict[str, list[dict]]  # judge name -> records
    extras: dict[str, Any] = field(default_factory=dict)  # tree / calibration / latency JSON
    questions: dict[Any, dict] = field(default_factory=dict)  # question_id -> question record
    notes: list[str] = field(default_factory=list)
    # The baseline decoded again in float32 (run.json "precision_reference"), for bf16/fp16 runs.
    precision_reference: list[dict] = field(default_factory=list)
    precision_dtype: str = ""

    @property
    def settings(self) -> dict:
        return self.info.get("settings") or {}

    def decoder_of(self, model_id: str) -> str:
        """The decoder behind an answer file: the records' own field, then run.json's map."""
        for record in self.answers.get(model_id, []):
            if record.get("decoder"):
                return str(record["decoder"])
        for decoder, mapped in (self.info.get("models") or {}).items():
            if mapped == model_id:
                return str(decoder)
        return model_id

    def model_ids(self) -> list[str]:
        """Answer files in a stable, readable order: baseline first, then run.json's order."""
        order = [str(d) for d in self.info.get("decoders") or []]

        def key(model_id: str) -> tuple:
            decoder = self.decoder_of(model_id)
            rank = order.index(decoder) if decoder in order else len(order)
            return (decoder != BASELINE, decoder != CONTROL, rank, decoder, model_id)

        return sorted(self.answers, key=key)

    def model_id_of(self, decoder: str) -> str | None:
        return next((m for m in self.model_ids() if self.decoder_of(m) == decoder), None)

    def reference_of(self, model_id: str) -> str:
        """The decoder this one is compared with: the answers' `baseline` field (medusa2 →
        medusa2-baseline, its own backbone), else `baseline`. A reference row names itself."""
        for record in self.answers.get(model_id, []):
            if record.get("baseline"):
                return str(record["baseline"])
        return BASELINE

    def reference_id(self, model_id: str) -> str | None:
        """model_id of the reference's answers in this run (None when it was not run)."""
        return self.model_id_of(self.reference_of(model_id))

    def is_reference(self, model_id: str) -> bool:
        """Plain decoding that others are measured against (no drafts of its own), or the A/A
        control copy of it: never a contender in a "which decoder is faster" view."""
        decoder = self.decoder_of(model_id)
        return decoder in (BASELINE, CONTROL) or any(self.reference_of(m) == decoder for m in self.answers)

    @property
    def dtype(self) -> str:
        return str((self.info.get("device") or {}).get("dtype") or self.settings.get("dtype") or "")

    @property
    def device_name(self) -> str:
        """run.json's device: what answers without their own `device` field were timed on."""
        return str((self.info.get("device") or {}).get("name") or self.settings.get("device") or "")


def unique_labels(paths: list[Path]) -> list[str]:
    """Folder names label runs; add parent folders only where two names collide."""
    resolved = [Path(p).resolve() for p in paths]
    depth = 1
    while True:
        labels = ["/".join(p.parts[-depth:]) for p in resolved]
        if len(set(labels)) == len(labels) or depth >= max(len(p.parts) for p in resolved):
            return labels
        depth += 1


def _dedupe(records: list[dict], key) -> list[dict]:
    """Keep the last record per key (a resumed or re-graded item replaces the older one)."""
    latest: dict = {}
    for record in records:
        latest[key(record)] = record
    return list(latest.values())


def _load_optional_json(path: Path, notes: list[str]) -> Any:
    if not path.exists():
        return None
    try:
        return read_json(path)
    except UserError as error:
        notes.append(f"{path.name} skipped: {error}")
        return None


def _load_judgments(run_dir: Path) -> dict[str, list[dict]]:
    judgments = {}
    for path in sorted((run_dir / JUDGMENT_DIR).glob("*_single.jsonl")):
        judge = path.name[: -len("_single.jsonl")]
        records = [r for r in read_jsonl(path) if isinstance(r, dict) and "model" in r]
        judgments[judge] = _dedupe(records, lambda r: (r.get("model"), r.get("question_id"), r.get("turn")))
    return judgments


def _load_questions(settings: dict, notes: list[str]) -> dict[Any, dict]:
    """Question texts, if run.json names a question file that is still on disk (optional)."""
    for key in ("question_file", "questions", "question_path", "questions_path"):
        value = settings.get(key)
        if isinstance(value, str) and value.endswith(".jsonl") and Path(value).is_file():
            try:
                return {q.get("question_id"): q for q in read_jsonl(Path(value))}
            except UserError as error:
                notes.append(f"question file skipped: {error}")
    return {}


def load_run_data(run_dir: Path, label: str | None = None) -> RunData:
    """Read a run folder: run.json (required), answers, judgments and optional JSON files."""
    run_dir = Path(run_dir)
    info = load_run(run_dir)
    notes: list[str] = []
    answers = {
        model_id: _dedupe([r for r in records if "question_id" in r and r.get("choices")], lambda r: r["question_id"])
        for model_id, records in load_answers(run_dir).items()
    }
    extras = {name: _load_optional_json(run_dir / f"{name}.json", notes) for name in OPTIONAL_FILES}
    run = RunData(
        label=label or run_dir.resolve().name,
        path=run_dir,
        info=info if isinstance(info, dict) else {},
        answers={k: v for k, v in answers.items() if v},
        judgments=_load_judgments(run_dir),
        extras={k: v for k, v in extras.items() if v is not None},
        notes=notes,
    )
    run.questions = _load_questions(run.settings, notes)
    run.precision_reference, run.precision_dtype = _load_precision_reference(run_dir, run.info, notes)
    return run


def _load_precision_reference(run_dir: Path, info: dict, notes: list[str]) -> tuple[list[dict], str]:
    """The fp32 baseline answers named by run.json's "precision_reference" (absent in fp32 runs)."""
    reference = info.get("precision_reference") if isinstance(info, dict) else None
    if not isinstance(reference, dict) or not reference.get("file"):
        return [], ""
    path = run_dir / str(reference["file"])
    if not path.exists():
        notes.append(f"precision reference {reference['file']} is missing, so exact match against {reference.get('dtype') or 'float32'} is n/a.")
        return [], ""
    try:
        records = [r for r in read_jsonl(path) if isinstance(r, dict) and "question_id" in r]
    except UserError as error:
        notes.append(f"precision reference skipped: {error}")
        return [], ""
    return _dedupe(records, lambda r: r["question_id"]), str(reference.get("dtype") or "float32")


def load_runs(run_dirs: Iterable[Path]) -> list[RunData]:
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise UserError("no run folder given; pass one or more folders written by `medusa-bench run`")
    return [load_run_data(path, label) for path, label in zip(paths, unique_labels(paths))]


# ------------------------------------------------------------------------- per-question data


def _first_choice(record: dict) -> dict:
    choices = record.get("choices") or [{}]
    return choices[0] if isinstance(choices[0], dict) else {}


def _total(values) -> float:
    """Sum of a per-turn list; NaN when the field is absent (never a silent 0)."""
    if values is None:
        return math.nan
    if isinstance(values, (int, float)):
        return float(values)
    return float(sum(v for v in values if v is not None))


def accept_lengths_of(record: dict) -> list[int]:
    """All steps' accepted-token counts of an answer, over its turns ([[int]] or Spec-Bench's [int])."""
    raw = _first_choice(record).get("accept_lengths") or []
    flat: list[int] = []
    for item in raw:
        if isinstance(item, list):
            flat.extend(int(x) for x in item if x is not None)
        elif item is not None:
            flat.append(int(item))
    return flat


def question_frame(run: RunData) -> pd.DataFrame:
    """One row per (decoder, question): the sums every table is built from."""
    rows = []
    for model_id in run.model_ids():
        decoder = run.decoder_of(model_id)
        for record in run.answers[model_id]:
            choice = _first_choice(record)
            matches = choice.get("exact_match")
            known = [m for m in matches if m is not None] if isinstance(matches, list) else []
            # Per-turn flags written by runs since #15; older runs lack them (counted as unknown, not quiet).
            contended = [c for c in choice.get("contended") or [] if c is not None] if isinstance(choice.get("contended"), list) else []
            rows.append(
                {
                    "run": run.label,
                    "model_id": model_id,
                    "decoder": decoder,
                    "question_id": record["question_id"],
                    "device": str(record.get("device") or run.device_name),  # Ray runs: the worker's device type
                    "category": record.get("category") or "unknown",
                    "n_turns": len(choice.get("turns") or []),
                    "new_tokens": _total(choice.get("new_tokens")),
                    "wall_time": _total(choice.get("wall_time")),
                    "steps": _total(choice.get("decoding_steps")),
                    "em_match": sum(bool(m) for m in known),
                    "em_known": len(known),
                    "contended": sum(bool(c) for c in contended),
                    "contended_known": len(contended),
                }
            )
    columns = ["run", "model_id", "decoder", "question_id", "device", "category", "n_turns", "new_tokens", "wall_time", "steps", "em_match",
               "em_known", "contended", "contended_known"]
    return pd.DataFrame(rows, columns=columns)


# ------------------------------------------------------------------------------- statistics


def ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator and not math.isnan(denominator) else math.nan


def bootstrap_speedup_ci(
    dec_tokens, dec_time, base_tokens, base_time,
    resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED, level: float = CI_LEVEL,
) -> tuple[float, float]:
    """Percentile interval of the ratio-of-sums speedup, resampling questions in pairs.

    Questions (not tokens or steps) are the independent units: a long answer moves both of
    its decoders' times together, so the decoder and baseline rows of a question are drawn
    together. Fewer than two questions give no interval (NaN), not a fake zero-width one.
    """
    arrays = [np.asarray(a, dtype=float) for a in (dec_tokens, dec_time, base_tokens, base_time)]
    n = len(arrays[0])
    if n < 2:
        return (math.nan, math.nan)
    index = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    dt, dw, bt, bw = (a[index].sum(axis=1) for a in arrays)
    with np.errstate(divide="ignore", invalid="ignore"):
        speedups = (dt / dw) / (bt / bw)
    speedups = speedups[np.isfinite(speedups)]
    if not len(speedups):
        return (math.nan, math.nan)
    tail = (1 - level) / 2
    low, high = np.quantile(speedups, [tail, 1 - tail])
    return (float(low), float(high))


def paired_speedup(dec: pd.DataFrame, base: pd.DataFrame | None) -> dict:
    """Speedup of `dec` over `base` on their common questions (both frames: one row per question)."""
    empty = {"n_compared": 0, "speedup": math.nan, "speedup_ci_low": math.nan, "speedup_ci_high": math.nan, "speedup_specbench": math.nan}
    if base is None or base.empty or dec.empty:
        return empty
    d = dec.set_index("question_id")
    b = base.set_index("question_id")
    common = [q for q in d.index if q in b.index]
    if not common:
        return empty
    d, b = d.loc[common], b.loc[common]
    speedup = ratio(d.new_tokens.sum(), d.wall_time.sum()) / ratio(b.new_tokens.sum(), b.wall_time.sum())
    low, high = bootstrap_speedup_ci(d.new_tokens, d.wall_time, b.new_tokens, b.wall_time)
    with np.errstate(divide="ignore", invalid="ignore"):
        dec_rates = (d.new_tokens / d.wall_time).replace([np.inf, -np.inf], np.nan)
        base_rates = (b.new_tokens / b.wall_time).replace([np.inf, -np.inf], np.nan)
    specbench = ratio(dec_rates.mean(), base_rates.mean())
    return {"n_compared": len(common), "speedup": speedup, "speedup_ci_low": low, "speedup_ci_high": high, "speedup_specbench": specbench}


# -------------------------------------------------------------------------------- the tables


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


def speed_table(runs: list[RunData], frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per run (and device type, see `by_device`) and decoder: throughput, speedup (+ interval,
    + Spec-Bench's), τ, exact match."""
    rows = []
    for run in runs:
        for device, q in by_device(frames[run.label]):
            rows += _speed_rows(run, q, device)
    columns = ["run", "decoder", "device", "model_id", "reference", "n_questions", "n_compared", "new_tokens", "wall_time_s", "tokens_per_s",
               "speedup", "speedup_ci_low", "speedup_ci_high", "vs_noise", "speedup_specbench", "tau", "exact_match", "exact_match_turns",
               "contended_turns"]
    table = pd.DataFrame(rows, columns=columns)
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
        ref_id = run.reference_id(model_id)
        row = {
            "run": run.label,
            "decoder": run.decoder_of(model_id),
            "device": device,
            "model_id": model_id,
            "reference": run.reference_of(model_id),
            "n_questions": len(dec),
            "new_tokens": dec.new_tokens.sum(),
            "wall_time_s": dec.wall_time.sum(),
            "tokens_per_s": ratio(dec.new_tokens.sum(), dec.wall_time.sum()),
        }
        if ref_id == model_id:
            row.update(n_compared=len(dec), speedup=1.0, speedup_ci_low=math.nan, speedup_ci_high=math.nan, speedup_specbench=1.0)
        else:
            row.update(paired_speedup(dec, q[q.model_id == ref_id] if ref_id else None))
        row["tau"] = ratio(dec.new_tokens.sum(), dec.steps.sum())
        row["exact_match"] = ratio(dec.em_match.sum(), dec.em_known.sum())
        row["exact_match_turns"] = int(dec.em_known.sum())
        row["contended_turns"] = int(dec.contended.sum()) if dec.contended_known.sum() else math.nan
        rows.append(row)
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
    if pd.isna(row.speedup_ci_low) or pd.isna(row.speedup_ci_high):
        return "n/a"  # too few questions for an interval, or no reference
    low, high = band or (1.0, 1.0)
    if row.speedup_ci_low > high:
        return "faster"
    if row.speedup_ci_high < low:
        return "slower"
    return "inside noise"


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
    loaded = {name: _load_optional_json(run.path / str(file), run.notes) for name, file in names.items()}
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
            if isinstance(holder, dict) and _is_number(holder.get(key)):
                return float(holder[key])
        if _is_number(extra.get(f"predicted_{key}")):
            return float(extra[f"predicted_{key}"])
    return math.nan


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
                   "tau": ratio(dec.new_tokens.sum(), dec.steps.sum())}
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


def _graded(records: list[dict], model_id: str, answered: dict) -> pd.DataFrame:
    """Valid grades of one model on its answered questions: question_id, turn, score."""
    rows = []
    for r in records:
        score = r.get("score")
        if r.get("model") != model_id or r.get("question_id") not in answered:
            continue
        if not isinstance(score, (int, float)) or isinstance(score, bool) or score < 0:
            continue  # -1: the judge's output had no parseable [[rating]]
        rows.append({"question_id": r["question_id"], "turn": int(r.get("turn") or 1), "score": float(score),
                     "reused": bool(r.get("reused_from"))})
    return pd.DataFrame(rows, columns=["question_id", "turn", "score", "reused"])


def _answered_turns(run: RunData, model_id: str) -> dict:
    return {r["question_id"]: len(_first_choice(r).get("turns") or []) or 1 for r in run.answers.get(model_id, [])}


def primary_judge(run: RunData) -> str | None:
    """The judge file with the most judgments (a run usually has exactly one)."""
    if not run.judgments:
        return None
    return max(sorted(run.judgments), key=lambda j: len(run.judgments[j]))


def quality_table(runs: list[RunData]) -> pd.DataFrame:
    """Per run, judge and decoder: MT-Bench scores per turn and overall, with coverage."""
    rows = []
    for run in runs:
        for judge, records in run.judgments.items():
            max_turns = max([n for m in run.model_ids() for n in _answered_turns(run, m).values()] or [1])
            for model_id in run.model_ids():
                answered = _answered_turns(run, model_id)
                graded = _graded(records, model_id, answered)
                ref_id = run.reference_id(model_id)
                ref_graded = _graded(records, ref_id, _answered_turns(run, ref_id)) if ref_id and ref_id != model_id else None
                row = {"run": run.label, "judge": judge, "decoder": run.decoder_of(model_id)}
                for turn in range(1, max_turns + 1):
                    expected = sum(1 for n in answered.values() if n >= turn)
                    in_turn = graded[graded.turn == turn]
                    row[f"score_turn{turn}"] = in_turn.score.mean() if len(in_turn) else math.nan
                    row[f"coverage_turn{turn}"] = ratio(len(in_turn), expected)
                row["score"] = graded.score.mean() if len(graded) else math.nan
                row["graded"] = len(graded)
                row["reused"] = int(graded.reused.sum())  # token-identical answers inherit the reference's grade
                row["expected"] = sum(answered.values())
                row["coverage"] = ratio(len(graded), row["expected"])
                row["score_vs_baseline"] = _paired_score_delta(graded, ref_graded)
                rows.append(row)
    return pd.DataFrame(rows)


def _paired_score_delta(graded: pd.DataFrame, base_graded: pd.DataFrame | None) -> float:
    """Mean score difference to the baseline on the (question, turn) pairs graded for both."""
    if base_graded is None or graded.empty or base_graded.empty:
        return math.nan
    both = graded.merge(base_graded, on=["question_id", "turn"], suffixes=("", "_base"))
    return float((both.score - both.score_base).mean()) if len(both) else math.nan


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
                    ref_id = run.reference_id(model_id)
                    row = {"run": run.label, "category": category, "decoder": run.decoder_of(model_id), "device": device, "n_questions": len(dec)}
                    if ref_id == model_id:
                        row.update(n_compared=len(dec), speedup=1.0, speedup_ci_low=math.nan, speedup_ci_high=math.nan)
                    else:
                        ref = in_cat[in_cat.model_id == ref_id] if ref_id else None
                        row.update({k: v for k, v in paired_speedup(dec, ref).items() if k != "speedup_specbench"})
                    row["tau"] = ratio(dec.new_tokens.sum(), dec.steps.sum())
                    if judge:
                        in_category = set(dec.question_id)
                        answered = {qid: n for qid, n in _answered_turns(run, model_id).items() if qid in in_category}
                        graded = _graded(run.judgments[judge], model_id, answered)
                        row["score"] = graded.score.mean() if len(graded) else math.nan
                        row["coverage"] = ratio(len(graded), sum(answered.values()))
                    rows.append(row)
    return drop_unused_device(pd.DataFrame(rows))


def _is_sampled(run: RunData) -> bool:
    """Sampled decoding is not expected to reproduce the baseline's tokens: no drift to measure."""
    try:
        return float(run.settings.get("temperature") or 0) > 0
    except (TypeError, ValueError):
        return False


PRECISION_FP32_COLUMNS = ["exact_vs_fp32", "divergence_vs_fp32", "baseline_exact_vs_fp32"]


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
        if _is_sampled(run):
            continue
        fp32 = drift.turn_token_ids(run.precision_reference) if run.precision_reference else None
        judge = primary_judge(run)
        scores = quality[(quality.run == run.label) & (quality.judge == judge)].set_index("decoder") if judge and not quality.empty else None
        for model_id in run.model_ids():
            decoder = run.decoder_of(model_id)
            ref_id = run.reference_id(model_id)
            own = drift.turn_token_ids(run.answers[model_id])
            if ref_id == model_id:  # its own reference (medusa2-baseline, a fine-tuned model): how far from the base model
                ref_id = run.model_id_of(BASELINE)
            base = drift.turn_token_ids(run.answers[ref_id]) if ref_id and ref_id != model_id else None
            against_fp32 = fp32 if run.reference_of(model_id) == BASELINE or decoder == BASELINE else None
            if decoder == BASELINE:  # the baseline against fp32 is its own floor
                summary = drift.drift_summary(own, None, against_fp32)
                summary["baseline_vs_fp32"] = summary["vs_fp32"]
                summary["baseline_exact_match_fp32"] = summary["exact_match_fp32"]
            else:
                summary = drift.drift_summary(own, base, against_fp32)
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


CONFIG_ORDER = ("model", "dtype", "device", "tree", "tree_hash", "max_new_tokens", "bench", "acceptance",
                "temperature", "top_p", "seed", "warmup")


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def config_table(runs: list[RunData]) -> pd.DataFrame:
    """What each run measured and on what: settings, device, versions, git hash; runs side by side."""
    per_run: dict[str, dict[str, str]] = {}
    for run in runs:
        info, settings = run.info, run.settings
        values = {key: _as_text(settings[key]) for key in CONFIG_ORDER if key in settings}
        values.update({key: _as_text(v) for key, v in settings.items() if key not in CONFIG_ORDER})
        for key, v in (info.get("device") or {}).items():
            if key == "dtype_auto" and isinstance(v, dict):
                values.update(_dtype_auto_rows(v))
            else:
                values[f"device.{key}"] = _as_text(v)
        reference = info.get("precision_reference")
        if isinstance(reference, dict):
            values["precision_reference"] = f"{_as_text(reference.get('dtype'))}: {_as_text(reference.get('file'))}"
        values["decoders"] = ", ".join(str(d) for d in info.get("decoders") or run.model_ids())
        if info.get("warmup") is not None:
            values["warmup"] = _as_text(info["warmup"])
        values["medusa-bench"] = _as_text(info.get("version"))
        values["git_hash"] = _as_text(info.get("git_hash"))
        values["created"] = _as_text(info.get("created"))
        for package, version in (info.get("versions") or {}).items():
            values[f"version.{package}"] = _as_text(version)
        per_run[run.label] = values
    keys: list[str] = []
    for values in per_run.values():
        keys += [k for k in values if k not in keys]
    table = pd.DataFrame({"setting": keys})
    for label, values in per_run.items():
        table[label] = [values.get(k, "") for k in keys]
    return table


def _dtype_auto_rows(auto: dict) -> dict[str, str]:
    """`--dtype auto`'s choice in words: the dtype, what each candidate cost per forward, and why."""
    timings = auto.get("ms_per_forward") if isinstance(auto.get("ms_per_forward"), dict) else {}
    costs = ", ".join(f"{dtype} {ms:.1f} ms" if _is_number(ms) else f"{dtype} {_as_text(ms)}" for dtype, ms in timings.items())
    chosen = _as_text(auto.get("chosen"))
    rows = {"device.dtype_auto": chosen + (f" (per forward: {costs})" if costs else "")}
    if "native_bf16" in auto:
        rows["device.dtype_auto.native_bf16"] = _as_text(auto["native_bf16"])
    if auto.get("reason"):
        rows["device.dtype_auto.reason"] = _as_text(auto["reason"])
    return rows


def summary_table(runs: list[RunData], speed: pd.DataFrame, quality: pd.DataFrame) -> pd.DataFrame:
    """The at-a-glance table: how fast, why (τ), and whether quality held, per decoder (primary judge)."""
    columns = ["run", "decoder", "device", "reference", "n_questions", "n_compared", "tokens_per_s", "speedup", "speedup_ci_low", "speedup_ci_high",
               "vs_noise", "tau", "exact_match"]
    summary = speed[[c for c in columns if c in speed.columns]].copy()  # "device": runs timed on several device types
    if not quality.empty:
        primary = {run.label: primary_judge(run) for run in runs}
        judged = quality[[primary.get(r) == j for r, j in zip(quality.run, quality.judge)]]
        summary = summary.merge(judged[["run", "decoder", "score", "coverage", "score_vs_baseline"]], on=["run", "decoder"], how="left")
    return summary


# ---------------------------------------------------------------------------------- assembly


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


TABLE_TITLES = {
    "summary": "At a glance",
    "speed": "Speed",
    "precision": "Drift: exact match and first divergence",
    "acceptance": "Acceptance",
    "tokens_per_step": "Tokens per step (histogram)",
    "quality": "Quality (MT-Bench single grading)",
    "categories": "Per category",
    "config": "Configuration",
    "sweep": "Concurrency sweep (endpoints)",
}


SWEEP_FILE = "sweep.jsonl"  # written by bench/endpoints.py: one line per endpoint × concurrency level


def sweep_table(runs: list[RunData]) -> pd.DataFrame:
    """Per run, endpoint and concurrency level: the server's output tokens/s, its speedup over the
    run's reference endpoint at the same level, latency percentiles (ms) and τ from the counters."""
    rows = []
    for run in runs:
        path = Path(run.path) / SWEEP_FILE
        if not path.is_file():
            continue
        latest = {}
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                latest[(record["endpoint"], int(record["concurrency"]))] = record  # a re-measured level replaces the old one
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line: repaired by the next run
        reference = run.info.get("reference")
        ms = lambda record, key, p: (record.get(key) or {}).get(p) * 1000 if (record.get(key) or {}).get(p) is not None else math.nan  # noqa: E731
        for (endpoint, level), record in sorted(latest.items(), key=lambda item: (item[0][1], item[0][0])):
            base = latest.get((reference, level)) if reference else None
            rate, base_rate = record.get("output_tokens_per_s"), (base or {}).get("output_tokens_per_s")
            rows.append({
                "run": run.label, "decoder": endpoint, "concurrency": level, "requests": record.get("requests"),
                "failed": record.get("failed"), "server_tok_s": rate if rate is not None else math.nan,
                "speedup": rate / base_rate if rate and base_rate else math.nan,
                "request_tok_s_p50": (record.get("request_tokens_per_s") or {}).get("p50") or math.nan,
                **{f"{key}_{p}_ms": ms(record, f"{key}_s", p) for key in ("ttft", "itl") for p in ("p50", "p90", "p99")},
                "tau": record.get("tau") if record.get("tau") is not None else math.nan,
            })
    return pd.DataFrame(rows)


def _notes(runs: list[RunData], speed: pd.DataFrame) -> list[str]:
    """Plain-language caveats: what is missing and what was compared on fewer questions."""
    notes = []
    for run in runs:
        notes += [f"{run.label}: {n}" for n in run.notes]
        if not run.answers:
            notes.append(f"{run.label}: no answers yet (model_answer/ is empty).")
            continue
        missing = sorted({run.reference_of(m) for m in run.model_ids() if run.reference_id(m) is None})
        for reference in missing:
            notes.append(f"{run.label}: no `{reference}` answers in this run, so speedup against it is n/a; add `{reference}` to --decoders.")
        if not run.judgments:
            notes.append(f"{run.label}: no judgments, so quality scores are n/a; run `medusa-bench judge` on it.")
        for device, group in by_device(speed[speed.run == run.label]):
            rows = group.set_index("decoder")
            on = f" on {device}" if device else ""
            for decoder, row in rows.iterrows():
                if row.reference == decoder or row.reference not in rows.index:
                    continue
                total = int(rows.loc[row.reference, "n_questions"])
                if row.n_compared < total:
                    notes.append(f"{run.label}: {decoder} answered {row.n_questions} of {row.reference}'s {total} questions{on}; "
                                 f"its speedup compares the {row.n_compared} questions both answered.")
        devices = [device for device, _ in by_device(speed[speed.run == run.label]) if device]
        if devices:
            notes.append(f"{run.label}: timed on {len(devices)} device types ({', '.join(devices)}); speeds and speedups are shown "
                         "per device type, each against its reference's answers on that device type, never pooled.")
        notes += _precision_notes(run, speed[speed.run == run.label])
        for judge in run.judgments:
            if len(run.judgments) > 1 and judge != primary_judge(run):
                notes.append(f"{run.label}: several judges; per-category scores use {primary_judge(run)}.")
                break
    return notes


def engine_words(engine) -> str:
    """run.json's device.engine in words: 'static KV cache, CUDA graphs' (empty for runs before engines)."""
    if not isinstance(engine, dict):
        return ""
    mode = {"cuda-graphs": "CUDA graphs", "torch-compile": "torch.compile", "off": "eager"}.get(engine.get("compile"), str(engine.get("compile")))
    return f"{engine.get('cache')} KV cache, {mode}"


def _banner(runs: list[RunData], speed: pd.DataFrame) -> list[str]:
    """Top-of-report lines: each run's A/A noise floor, and how many turns were timed on a shared CPU."""
    lines = []
    for run in runs:
        prefix = f"{run.label}: " if len(runs) > 1 else ""
        for device, rows in by_device(speed[speed.run == run.label]):
            where = f"{prefix}{device}: " if device else prefix
            control = control_row(rows)
            contenders = rows[[v not in ("reference", "noise floor") for v in rows.vs_noise]]
            if control is not None and pd.notna(control.speedup):
                band = noise_band(rows)
                interval = f"95% CI {band[0]:.2f}–{band[1]:.2f}" if band else "no interval: fewer than two questions"
                lines.append(f"{where}A/A control: {control.speedup:.2f}× ({interval}) — speedups inside this band are noise")
            elif len(contenders):
                lines.append(f"{where}no A/A control in this run: a speedup counts only where its 95% CI excludes 1.00× "
                             f"(add `{CONTROL}` to --decoders to measure the noise floor)")
        engine = engine_words((run.info.get("device") or {}).get("engine"))
        if engine:
            lines.append(f"{prefix}engine: {engine}, the same for the baseline and every decoder")
        flagged = sum(_turn_flags(record, "contended") for model_id in run.model_ids() for record in run.answers[model_id])
        known = sum(_turn_flags(record, "contended", count_all=True) for model_id in run.model_ids() for record in run.answers[model_id])
        if flagged:
            lines.append(f"{prefix}{flagged} of {known} turns were measured while the CPU was shared; "
                         "rerun with --remeasure-flagged on a quiet machine")
        remeasured = sum(bool(record.get("remeasured")) for model_id in run.model_ids() for record in run.answers[model_id])
        if remeasured:
            lines.append(f"{prefix}{remeasured} answers were re-measured after a shared-CPU first pass (their timings replace the first ones)")
    return lines


def _turn_flags(record: dict, key: str, count_all: bool = False) -> int:
    """How many turns of an answer carry a true `key` flag (or any flag, with count_all)."""
    flags = _first_choice(record).get(key)
    if not isinstance(flags, list):
        return 0
    return sum(1 for f in flags if f is not None and (count_all or bool(f)))


def _drift_notes(run: RunData, precision: pd.DataFrame) -> list[str]:
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


def _precision_notes(run: RunData, speed: pd.DataFrame) -> list[str]:
    """Flag lost exactness where it should not happen: greedy decoding in float32 must match 100%."""
    if run.dtype not in ("float32", "fp32"):
        return []
    return [f"{run.label}: {row.decoder} matched the reference's tokens on only {100 * row.exact_match:.1f}% of turns in float32, "
            "where greedy decoding with draft heads should be exact: check the verify step."
            for _, row in speed.iterrows() if pd.notna(row.exact_match) and row.exact_match < 1.0]


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
        "quality": quality,
        "categories": category_table(runs, frames),
        "config": config_table(runs),
    }
    sweep = sweep_table(runs)
    if not sweep.empty:  # endpoint runs with --concurrency only
        tables["sweep"] = sweep
    notes = _notes(runs, speed) + [n for run in runs for n in _drift_notes(run, precision)]
    return ReportTables(runs=runs, tables=tables, notes=notes, banner=_banner(runs, speed), drift=drift_details)


# ------------------------------------------------------------------------ display formatting

LABELS = {
    "run": "run", "decoder": "decoder", "device": "device", "model_id": "answer file", "judge": "judge", "category": "category",
    "n_questions": "questions", "n_compared": "compared", "new_tokens": "new tokens", "wall_time_s": "wall time (s)",
    "tokens_per_s": "tokens/s", "speedup": "speedup", "speedup_ci": "95% CI", "speedup_specbench": "speedup (Spec-Bench)",
    "reference": "compared with", "tau": "τ", "tau_predicted": "τ predicted", "speedup_predicted": "speedup predicted", "exact_match": "exact match", "exact_match_turns": "turns compared",
    "steps": "steps", "logged_steps": "steps logged", "score": "score", "graded": "graded", "reused": "grades reused", "expected": "expected",
    "coverage": "coverage", "score_vs_baseline": "Δ score vs baseline", "setting": "setting",
    "vs_noise": "vs noise", "contended_turns": "shared-CPU turns", "dtype": "dtype", "turns": "turns",
    "exact_vs_baseline": "exact vs baseline", "divergence_vs_baseline": "median first divergence",
    "exact_vs_fp32": "exact vs fp32", "divergence_vs_fp32": "median divergence vs fp32",
    "baseline_exact_vs_fp32": "baseline exact vs fp32",
    "concurrency": "in flight", "requests": "requests", "failed": "failed", "server_tok_s": "server tokens/s",
    "request_tok_s_p50": "tokens/s per request p50", "ttft_p50_ms": "TTFT p50 (ms)", "ttft_p90_ms": "TTFT p90 (ms)",
    "ttft_p99_ms": "TTFT p99 (ms)", "itl_p50_ms": "ITL p50 (ms)", "itl_p90_ms": "ITL p90 (ms)", "itl_p99_ms": "ITL p99 (ms)",
}


def _label(column: str) -> str:
    if column in LABELS:
        return LABELS[column]
    for prefix, template in (("accept_ge_", "≥{} drafts"), ("tokens_", "{} tok"), ("score_turn", "score t{}"), ("coverage_turn", "coverage t{}")):
        if column.startswith(prefix):
            return template.format(column[len(prefix):])
    return column


def _is_nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_value(column: str, value: Any) -> str:
    """One cell as text: percentages for rates, ×-suffixed speedups, 'n/a' for missing."""
    if _is_nan(value):
        return "n/a"
    if isinstance(value, (bool, np.bool_)) or isinstance(value, str):
        return str(value)
    if column.startswith(("exact_", "baseline_exact_", "coverage", "accept_ge_", "tokens_")) and column not in ("exact_match_turns", "tokens_per_s"):
        return f"{100 * value:.1f}%"
    if column in ("speedup", "speedup_specbench", "speedup_predicted"):
        return f"{value:.2f}×"
    if column == "score_vs_baseline":
        return f"{value:+.2f}"
    if column in ("tokens_per_s", "wall_time_s", "divergence_vs_baseline", "divergence_vs_fp32"):
        return f"{value:.1f}"
    if isinstance(value, (int, np.integer)) or float(value).is_integer() and column in ("new_tokens", "steps", "n_questions", "n_compared", "graded", "reused", "expected", "logged_steps",
                                                                                    "contended_turns", "turns"):
        return str(int(value))
    return f"{value:.2f}"


def display_frame(table: pd.DataFrame) -> pd.DataFrame:
    """A table as strings with readable headers; the CI pair becomes one '95% CI' column."""
    table = table.copy()
    if {"speedup_ci_low", "speedup_ci_high"} <= set(table.columns):
        ci = [("n/a" if _is_nan(lo) or _is_nan(hi) else f"{lo:.2f}–{hi:.2f}") for lo, hi in zip(table.speedup_ci_low, table.speedup_ci_high)]
        position = table.columns.get_loc("speedup_ci_low")
        table = table.drop(columns=["speedup_ci_low", "speedup_ci_high"])
        table.insert(position, "speedup_ci", ci)
    if "model_id" in table.columns and "decoder" in table.columns:
        table = table.drop(columns="model_id")
    if "run" in table.columns and table["run"].nunique() <= 1:
        table = table.drop(columns="run")  # one run: its name is in the report's header
    if "reference" in table.columns and all(r in (BASELINE, d) for r, d in zip(table.reference, table.decoder)):
        table = table.drop(columns="reference")  # only worth a column when some decoder has another reference
    shown = pd.DataFrame({_label(c): [v if c in ("speedup_ci",) else format_value(c, v) for v in table[c]] for c in table.columns})
    return shown


def md_escape(text: Any) -> str:
    """Text from run files made inert in markdown: GitHub renders raw HTML, so `<script>` in a
    decoder, category or device name must not reach the page as a tag, nor `|` split a cell."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no `tabulate` needed); every cell escaped (md_escape)."""
    shown = display_frame(table)
    lines = ["| " + " | ".join(md_escape(c) for c in shown.columns) + " |", "|" + "|".join("---" for _ in shown.columns) + "|"]
    lines += ["| " + " | ".join(md_escape(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines)


def tables_to_markdown(report: ReportTables) -> str:
    """Every table under its own heading, plus the notes: paste-ready for a PR or a paper draft."""
    parts = ["# medusa-bench report", "", "Runs: " + ", ".join(md_escape(run.label) for run in report.runs), ""]
    for line in report.banner:  # one quote block each: consecutive quoted lines would merge into one paragraph
        parts += [f"> **{md_escape(line)}**", ""]
    if report.notes:
        parts += ["Notes:", ""] + [f"- {md_escape(n)}" for n in report.notes] + [""]
    for name, table in report.tables.items():
        parts += [f"## {TABLE_TITLES.get(name, name)}", ""]
        parts += [to_markdown(table) if not table.empty else "_no data_", ""]
    return "\n".join(parts)


def write_csvs(report: ReportTables, folder: Path) -> list[Path]:
    """One CSV per table, raw numbers at full precision (for further analysis, not display)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, table in report.tables.items():
        path = folder / f"{name}.csv"
        table.to_csv(path, index=False)
        paths.append(path)
    return paths
