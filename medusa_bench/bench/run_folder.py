"""The run folder: its files' names, run.json, the question copy, and claiming (and un-making) the folder.

The layout is FastChat's `data/<bench>/` (docs/architecture.md, "Run folder"): `question.jsonl`,
`model_answer/<model_id>.jsonl`, `model_judgment/`, so FastChat's own scripts read a run folder
as a bench folder; `run.json` beside them says how the answers were made.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

from medusa_bench import __version__
from medusa_bench.bench.autotree import tree_records
from medusa_bench.bench.config import RunConfig
from medusa_bench.bench.device import device_info
from medusa_bench.inputs.questions import Question
from medusa_bench.results import files

QUESTION_FILE = "question.jsonl"  # the questions answered, where FastChat's gen_judgment.py looks for them


# ------------------------------------------------------------------------------ file names
def model_id(loaded, decoder_name: str) -> str:
    """'smollm2-135m' + 'medusa:chain-2' → 'smollm2-135m-medusa-chain-2' (a file-safe name).

    `loaded` is the loaded model or its name (a Ray driver loads none)."""
    name = loaded if isinstance(loaded, str) else loaded.name
    return f"{name}-{decoder_name}".replace(":", "-").replace("/", "-").replace(" ", "")


def reference_file(loaded, dtype: str) -> str:
    """The precision reference's answer file, relative to the run folder (`loaded`: the model or its name)."""
    name = loaded if isinstance(loaded, str) else loaded.name
    return f"precision_reference/{name}-baseline-{dtype}.jsonl"


# ------------------------------------------------------------------------------ claiming the folder
@contextmanager
def claimed_run_dir(path: Path) -> Iterator[Path]:
    """Create `path` if needed and hold its lock (one writer per run folder) while the block runs.

    A run refused or stopped before it wrote anything leaves no trace: when this call created the
    folder and it holds nothing but the lock (and empty subfolders), the folder goes again.
    """
    path = Path(path)
    created = not path.exists()
    run_dir = files.ensure_writable_dir(path)
    lock = files.lock_run_dir(run_dir)
    try:
        yield run_dir
    except BaseException:
        lock.release()
        if created and holds_nothing(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    lock.release()


def holds_nothing(run_dir: Path) -> bool:
    """Only the lock file and empty folders: nothing a run wrote."""
    return all(p.is_dir() or p.name == files.LOCK_FILE for p in run_dir.rglob("*"))


# ------------------------------------------------------------------------------ the question copy
def question_record(question: Question) -> dict:
    """A question as FastChat's question.jsonl writes it."""
    record = {"question_id": question.question_id, "category": question.category, "turns": list(question.turns)}
    if question.reference is not None:
        record["reference"] = question.reference
    return {**record, **question.extra}


def keep_questions(run_dir: Path, questions: list[Question]) -> None:
    """question.jsonl: every question this folder's runs selected, so FastChat's scripts (and a
    judge whose question file moved) find them; a resume that selects more adds them. Only the
    selected ones: FastChat's gen_judgment.py refuses a question file with unanswered questions."""
    path = Path(run_dir) / QUESTION_FILE
    kept = files.read_jsonl(path) if path.exists() else []
    known = {str(record["question_id"]) for record in kept}
    new = [question_record(q) for q in questions if str(q.question_id) not in known]
    if new:
        files.rewrite_jsonl(path, kept + new)


# ------------------------------------------------------------------------------ answer files
def open_answers(run_dir: Path, model, names: list[str], ids: Optional[dict] = None) -> tuple[dict, dict]:
    """(paths, done) of this run's answer files, torn last lines repaired: done {name: {question id: record}}.

    `ids`: answer file ids that are not `model_id(model, name)` (endpoints name theirs after the server's model)."""
    paths = {name: files.answer_path(run_dir, (ids or {}).get(name) or model_id(model, name)) for name in names}
    for path in paths.values():
        files.repair_jsonl(path)
    return paths, {name: {str(r["question_id"]): r for r in files.read_jsonl(path)} for name, path in paths.items()}


def reference_answers(run_dir: Path, model, done: dict, reference_names: Iterable[str]) -> dict:
    """{reference: {question id: record}} of the decoders others are compared with (their own
    `done` when in this run, else read from their files); store_ready keeps it current."""
    return {ref: done.get(ref) or {str(r["question_id"]): r for r in files.read_jsonl(files.answer_path(run_dir, model_id(model, ref)))}
            for ref in set(reference_names)}


# ------------------------------------------------------------------------------ run.json
@dataclass
class AnswerSource:
    """What run.json says about where the answers come from: the model, its device, the decoders' trees.

    In-process runs: one loaded model (`local_source`). Ray runs: the first worker's device, and
    every worker's own record in `workers` (bench/distributed.py), with each device type's trees
    in `device_plans`.
    """

    model_name: str
    decoders: list[str]
    device: dict  # device.device_info()
    trees: dict  # autotree.tree_records(): each drafting decoder's tree + hash
    dtype_auto: Optional[dict] = None  # how --dtype auto chose
    workers: list[dict] = field(default_factory=list)
    device_plans: dict = field(default_factory=dict)
    endpoints: dict = field(default_factory=dict)  # serving endpoints beside the decoders: name → url, file_id, engine info


def local_source(loaded, decoders: dict, served: Optional[dict] = None) -> AnswerSource:
    """In-process decoders on `loaded`, and the remote decoders `served` beside them (name → RemoteDecoder)."""
    endpoints = {name: decoder.describe() for name, decoder in (served or {}).items()}
    return AnswerSource(loaded.name, list(decoders), device_info(loaded), tree_records(decoders), loaded.dtype_auto,
                        endpoints=endpoints)


def write_run_file(run_dir: Path, config: RunConfig, settings: dict, source: AnswerSource, previous: Optional[dict],
                   hashes: Optional[dict] = None) -> dict:
    previous = previous or {}
    names = list(dict.fromkeys(previous.get("decoders", []) + source.decoders))
    run = {
        "tool": "medusa-bench", "version": __version__,
        "created": previous.get("created", files.now_iso()), "updated": files.now_iso(),
        "git_hash": files.git_hash(), "settings": settings, "decoders": names,
        "models": {**previous.get("models", {}), **{name: model_id(source.model_name, name) for name in source.decoders}},
        "questions": previous.get("questions"), "warmup": config.warmup,
        "versions": files.package_versions(), "device": dict(source.device),
        "trees": {**previous.get("trees", {}), **source.trees},  # each drafting decoder's tree + hash
        "content_hashes": hashes or previous.get("content_hashes"),  # questions and heads, checked on resume
    }
    dtype_auto = source.dtype_auto or previous.get("device", {}).get("dtype_auto")
    if dtype_auto:  # how --dtype auto chose (a resume keeps the first choice); absent when --dtype was explicit
        run["device"]["dtype_auto"] = dtype_auto
    if settings.get("precision_reference", "none") != "none":
        run["precision_reference"] = {"dtype": settings["precision_reference"], "file": reference_file(source.model_name, settings["precision_reference"])}
    # Ray runs: every worker that answered, by id (a resume adds its own), and each device type's trees.
    new_ids = {worker["id"] for worker in source.workers}
    workers = [w for w in previous.get("workers", []) if w.get("id") not in new_ids] + source.workers
    if workers:
        run["workers"] = workers
    plans = {**previous.get("device_plans", {}), **source.device_plans}
    if plans:
        run["device_plans"] = plans
    if source.endpoints:  # answer files named after the server's model; the reference endpoint (settings)
        run["decoders"] = list(dict.fromkeys(run["decoders"] + list(source.endpoints)))
        run["models"].update({name: e["file_id"] for name, e in source.endpoints.items()})
        run["endpoints"] = {name: {k: v for k, v in e.items() if k != "file_id"} for name, e in source.endpoints.items()}
        run["reference"] = settings.get("reference")
    files.write_json(run_dir / files.RUN_FILE, run)
    return run
