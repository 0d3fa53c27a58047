"""Question files in FastChat's format, resolved by bench name, and selection options.

Lookup order for a bench's file: an explicit path, `$MEDUSA_BENCH_DATA/<bench>/<file>`, the
user cache, then a download from the public FastChat / Spec-Bench repositories (cached).
Offline with none of these: a clear error that says what to pass.
"""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

from medusa_bench.errors import UserError, unknown_name
from medusa_bench.paths import cache_dir

_FASTCHAT = "https://raw.githubusercontent.com/lm-sys/FastChat/main/fastchat/llm_judge/data/mt_bench"
BENCH_URLS = {
    "mt_bench": {
        "question.jsonl": f"{_FASTCHAT}/question.jsonl",
        "judge_prompts.jsonl": "https://raw.githubusercontent.com/lm-sys/FastChat/main/fastchat/llm_judge/data/judge_prompts.jsonl",
        "reference_answer/gpt-4.jsonl": f"{_FASTCHAT}/reference_answer/gpt-4.jsonl",
    },
    "spec_bench": {
        "question.jsonl": "https://raw.githubusercontent.com/hemingkx/Spec-Bench/main/data/spec_bench/question.jsonl",
    },
}
BENCHES = ("mt_bench", "spec_bench", "quick")
# FastChat's temperature_config (gen_model_answer.py): sampled categories get > 0.
CATEGORY_TEMPERATURE = {
    "writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
    "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0,
}
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
# A bench's tasks (what `--per-task N` takes N questions of): task → its categories in the question file.
# Spec-Bench's multi-turn task is MT-Bench's 80 questions; the other five are one category each.
BENCH_TASKS = {
    "spec_bench": {"multi_turn": MT_BENCH_CATEGORIES, "translation": ("translation",), "summarization": ("summarization",),
                   "qa": ("qa",), "math_reasoning": ("math_reasoning",), "rag": ("rag",)},
}


@dataclass
class Question:
    question_id: int | str
    category: str
    turns: list[str]
    reference: Optional[list[str]] = None
    extra: dict = field(default_factory=dict)


def data_file(bench: str, name: str, explicit: Optional[Path] = None, option: str = "--questions") -> Path:
    """Find a bench's data file (see module docstring); download and cache as a last resort."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise UserError(f"{option} {path}: file not found")
        return path
    if bench == "quick" and name == "question.jsonl":
        return Path(str(resources.files("medusa_bench") / "data" / "quick_question.jsonl"))
    env = os.environ.get("MEDUSA_BENCH_DATA")
    candidates = ([Path(env) / bench / name] if env else []) + [cache_dir() / "data" / bench / name]
    for path in candidates:
        if path.is_file():
            return path
    url = BENCH_URLS.get(bench, {}).get(name)
    target = candidates[-1]
    if url:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(url, timeout=20) as response:
                data = response.read()
            target.write_bytes(data)
            return target
        except OSError:
            pass
    looked = ", ".join(str(p) for p in candidates)
    raise UserError(f"no {bench}/{name} found (looked in {looked}; download failed or offline); "
                    f"pass {option} PATH or set MEDUSA_BENCH_DATA to a folder holding {bench}/{name}")


def read_questions(path: Path) -> list[Question]:
    """Parse a FastChat question.jsonl; a bad line is an error naming the file and line number."""
    questions, seen = [], set()
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{where}: not valid JSON ({error.msg}); each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise UserError(f"{where}: expected a JSON object with question_id, category and turns")
            for key in ("question_id", "turns"):
                if key not in record:
                    raise UserError(f"{where}: missing {key!r}; each line needs question_id, category and turns")
            turns = record["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
                raise UserError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
            qid = record["question_id"]
            if qid in seen:
                raise UserError(f"{where}: duplicate question_id {qid!r}")
            seen.add(qid)
            reference = record.get("reference")
            extra = {k: v for k, v in record.items() if k not in ("question_id", "category", "turns", "reference")}
            questions.append(Question(qid, str(record.get("category", "general")), turns, reference, extra))
    if not questions:
        raise UserError(f"{path} holds no questions")
    return questions


def task_of(bench: str, category: str) -> Optional[str]:
    """The task of `bench` that a question of `category` belongs to (None: no task of it)."""
    return next((task for task, categories in BENCH_TASKS.get(bench, {}).items() if category in categories), None)


def check_per_task(bench: str, n: int) -> None:
    """`--per-task N` needs a bench with tasks and N >= 1 (one line each when not)."""
    if bench not in BENCH_TASKS:
        raise UserError(f"--per-task: {bench} has no tasks (benches with tasks: {', '.join(BENCH_TASKS)}); "
                        "add --bench spec_bench, or select with --limit or --categories")
    if n < 1:
        raise UserError(f"--per-task must be >= 1, got {n}")


def take_per_task(questions: list[Question], bench: str, n: int) -> list[Question]:
    """The first `n` questions of each of the bench's tasks, in file order. A task of several
    categories takes them round-robin (first of each, then second of each …): Spec-Bench's
    multi-turn task with n=8 gets one question of each MT-Bench category."""
    check_per_task(bench, n)
    chosen = set()
    for categories in BENCH_TASKS[bench].values():
        columns = [[q for q in questions if q.category == category] for category in categories]
        round_robin = [column[i] for i in range(max(map(len, columns))) for column in columns if i < len(column)]
        chosen.update(id(q) for q in round_robin[:n])
    return [q for q in questions if id(q) in chosen]


def load_questions(bench: str = "mt_bench", path: Optional[Path] = None, limit: Optional[int] = None,
                   question_ids: Optional[list] = None, categories: Optional[list[str]] = None,
                   per_task: Optional[int] = None) -> tuple[Path, list[Question]]:
    """Resolve, parse and select (categories, ids, `per_task` questions of each task, then the
    first `limit`); selection errors say which ids or categories exist."""
    if path is None and bench not in BENCHES:
        raise unknown_name("bench", bench, BENCHES)
    if per_task is not None:
        check_per_task(bench, per_task)  # refused before the file is read or downloaded
    file = data_file(bench, "question.jsonl", path)
    questions = read_questions(file)
    if categories:
        known = sorted({q.category for q in questions})
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise UserError(f"unknown categories {', '.join(unknown)} in {file.name}; valid: {', '.join(known)}")
        questions = [q for q in questions if q.category in categories]
    if question_ids:
        by_id = {str(q.question_id): q for q in questions}
        missing = [str(i) for i in question_ids if str(i) not in by_id]
        if missing:
            raise UserError(f"question ids {', '.join(missing)} not in {file}")
        questions = [by_id[str(i)] for i in question_ids]
    if per_task is not None:
        questions = take_per_task(questions, bench, per_task)
        if not questions:
            raise UserError(f"--per-task: no question of {file} is in one of {bench}'s tasks ({', '.join(BENCH_TASKS[bench])})")
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be >= 1, got {limit}")
        questions = questions[:limit]
    return file, questions
