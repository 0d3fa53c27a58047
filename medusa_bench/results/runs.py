"""Run folders in, `RunData` and per-question frames out: what every report table is built from.

A run folder (architecture.md, "Run folder") holds run.json, one answer file per decoder,
judgments and optional JSON files of the tree optimiser. `load_runs` reads whatever is there
(a partial run is fine) and `question_frame` turns one run's answers into one row per
(decoder, question) with the sums every table divides: new tokens, wall time, steps, and the
per-turn exact-match and shared-CPU flags.

Only `choices[0]` of an answer is used, as in Spec-Bench and FastChat's single grading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from medusa_bench.errors import UserError
from medusa_bench.results.files import JUDGMENT_DIR, load_answers, load_run, read_json, read_jsonl

BASELINE = "baseline"
CONTROL = "control"  # the A/A copy of the baseline: its speedup is the measured noise floor
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


def load_optional_json(path: Path, notes: list[str]) -> Any:
    """A JSON file the report can do without: None when absent, a note when unreadable."""
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


def _load_precision_reference(run_dir: Path, info: dict, notes: list[str]) -> tuple[list[dict], str]:
    """The fp32 baseline answers named by run.json's "precision_reference" (absent in fp32 runs)."""
    reference = info.get("precision_reference")
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


def load_run_data(run_dir: Path, label: str | None = None) -> RunData:
    """Read a run folder: run.json (required), answers, judgments and optional JSON files."""
    run_dir = Path(run_dir)
    info = load_run(run_dir)
    info = info if isinstance(info, dict) else {}
    notes: list[str] = []
    answers = {
        model_id: _dedupe([r for r in records if "question_id" in r and r.get("choices")], lambda r: r["question_id"])
        for model_id, records in load_answers(run_dir).items()
    }
    extras = {name: load_optional_json(run_dir / f"{name}.json", notes) for name in OPTIONAL_FILES}
    run = RunData(
        label=label or run_dir.resolve().name,
        path=run_dir,
        info=info,
        answers={k: v for k, v in answers.items() if v},
        judgments=_load_judgments(run_dir),
        extras={k: v for k, v in extras.items() if v is not None},
        notes=notes,
    )
    run.questions = _load_questions(run.settings, notes)
    run.precision_reference, run.precision_dtype = _load_precision_reference(run_dir, info, notes)
    return run


def load_runs(run_dirs: Iterable[Path]) -> list[RunData]:
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise UserError("no run folder given; pass one or more folders written by `medusa-bench run`")
    return [load_run_data(path, label) for path, label in zip(paths, unique_labels(paths))]


# ------------------------------------------------------------------------- per-question data


def first_choice(record: dict) -> dict:
    choices = record.get("choices") or [{}]
    return choices[0] if isinstance(choices[0], dict) else {}


def _total(values) -> float:
    """Sum of a per-turn list; NaN when the field is absent (never a silent 0)."""
    if values is None:
        return math.nan
    if isinstance(values, (int, float)):
        return float(values)
    return float(sum(v for v in values if v is not None))


def known_flags(record: dict, key: str) -> list[bool]:
    """An answer's per-turn flags (`exact_match`, `contended`) where known; null turns and runs
    written before the field existed give none (counted as unknown, never as False)."""
    flags = first_choice(record).get(key)
    return [bool(f) for f in flags if f is not None] if isinstance(flags, list) else []


def accept_lengths_of(record: dict) -> list[int]:
    """All steps' accepted-token counts of an answer, over its turns ([[int]] or Spec-Bench's [int])."""
    raw = first_choice(record).get("accept_lengths") or []
    flat: list[int] = []
    for item in raw:
        if isinstance(item, list):
            flat.extend(int(x) for x in item if x is not None)
        elif item is not None:
            flat.append(int(item))
    return flat


def answered_turns(run: RunData, model_id: str) -> dict:
    """question_id -> how many turns this decoder answered (graded coverage counts against it)."""
    return {r["question_id"]: len(first_choice(r).get("turns") or []) or 1 for r in run.answers.get(model_id, [])}


QUESTION_COLUMNS = ["run", "model_id", "decoder", "question_id", "device", "category", "n_turns", "new_tokens", "wall_time", "steps",
                    "em_match", "em_known", "contended", "contended_known"]


def question_frame(run: RunData) -> pd.DataFrame:
    """One row per (decoder, question): the sums every table is built from."""
    rows = []
    for model_id in run.model_ids():
        decoder = run.decoder_of(model_id)
        for record in run.answers[model_id]:
            choice = first_choice(record)
            matches, contended = known_flags(record, "exact_match"), known_flags(record, "contended")
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
                    "em_match": sum(matches),
                    "em_known": len(matches),
                    "contended": sum(contended),  # per-turn flags written by runs since #15
                    "contended_known": len(contended),
                }
            )
    return pd.DataFrame(rows, columns=QUESTION_COLUMNS)


def is_sampled(run: RunData) -> bool:
    """Sampled decoding is not expected to reproduce the baseline's tokens: no drift to measure."""
    try:
        return float(run.settings.get("temperature") or 0) > 0
    except (TypeError, ValueError):
        return False


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
