"""Training prompts: the files `distill` answers and `instructions` draws seed tasks from.

Self-instruct (`instruction`), GSM8K (`question`) and ShareGPT / OpenAI-style conversations are
read alike, one `Prompt` per record; a `distill` output is read back for `--extend`. Benchmark
questions (MT-Bench, Spec-Bench, the packaged quick bench) are refused: heads trained on the
questions they are measured on would inflate every number.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

from medusa_bench.errors import UserError
from medusa_bench.inputs.calibration import held_out_texts
from medusa_bench.paths import cache_dir
from medusa_bench.train.data import messages_of, read_records, record_turns
from medusa_bench.train.pack import data_reference

# Generic second turns for two-turn data (--follow-up): they fit any first answer.
FOLLOW_UPS = (
    "Can you explain that in more detail?",
    "Please summarize your answer in two sentences.",
    "Can you give an example?",
    "Rewrite your answer so that a ten-year-old can understand it.",
    "What are the main limitations of your answer?",
    "Please make your answer more concise.",
)
BENCH_DIRS = ("mt_bench", "spec_bench")
FOLLOW_UP_MODES = ("none", "generic", "model")


@dataclass
class Prompt:
    """One training conversation to generate: the user turns, answered in order."""

    id: str
    turns: list[Optional[str]]  # None: the model writes this user turn (a follow-up question)
    source: str
    answers: list[str] = field(default_factory=list)  # turns answered so far (earlier ones from --extend)
    finish: list[str] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    follow_up: Optional[str] = None  # who wrote the second turn: "model" or "generic"
    model: Optional[str] = None  # whose answers those earlier ones are (--extend)
    dtype: Optional[str] = None  # the dtype those earlier answers were generated in
    answer_ids: list[list[int]] = field(default_factory=list)  # the generated ids of `answers`, where known
    # [path relative to the shared data folder, record index] where the user turns came from a file
    # there: a distillation pack stores a reference instead of the text (train/pack.py)
    origin: Optional[list] = None


def read_prompts(paths: list[Path], limit: Optional[int] = None, follow_up: str = "none",
                 extend: tuple[Path, ...] = ()) -> list[Prompt]:
    """Prompts from self_instruct, GSM8K and ShareGPT files (detected per record), benchmarks refused.

    `limit` keeps the first N prompts of each file. `follow_up` gives one-turn prompts a second
    turn: "generic" (FOLLOW_UPS) or "model" (written by the model after its first answer).
    `extend`: conversations distilled earlier, continued with their answers kept. The tree optimiser's
    calibration split (inputs/calibration.py) is left out: heads score higher on what they were trained on.
    """
    if follow_up not in FOLLOW_UP_MODES:
        raise UserError(f"unknown --follow-up {follow_up!r}; valid values are {', '.join(FOLLOW_UP_MODES)}")
    if not paths and not extend:
        raise UserError("pass at least one --prompts FILE (self_instruct, GSM8K train or ShareGPT jsonl)")
    prompts: list[Prompt] = [p for path in extend for p in distilled_in(Path(path).expanduser())]
    for path in paths:
        path = Path(path).expanduser()
        refuse_benchmark_path(path)
        found = [p for p in prompts_in(path) if p.turns]
        if not found:
            raise UserError(f"{path} holds no prompts: expected self_instruct (instruction), GSM8K (question) "
                            "or ShareGPT (conversations) records")
        prompts += found[:limit] if limit else found
    if follow_up != "none":
        for i, prompt in enumerate(prompts):
            if len(prompt.turns) == 1:
                prompt.turns.append(FOLLOW_UPS[i % len(FOLLOW_UPS)] if follow_up == "generic" else None)
                prompt.follow_up = follow_up
    refuse_benchmark_text(prompts)
    held_out = held_out_texts()  # the optimiser calibrates on these: heads trained on them would promise too much
    return [p for p in prompts if not (p.turns and p.turns[0] in held_out)]


def distilled_in(path: Path) -> list[Prompt]:
    """Conversations a `distill` run wrote, as prompts whose answered turns are kept (for --extend)."""
    if not path.exists():
        raise UserError(f"--extend {path}: not found (pass a jsonl or a pack folder that `medusa-bench distill` wrote)")
    prompts = []
    for record in read_records(path):
        messages = messages_of(record)
        if "new_tokens" not in record or not messages:
            raise UserError(f"{path} is not a `medusa-bench distill` output (no new_tokens): --extend continues those")
        prompts.append(Prompt(str(record["id"]), [m["content"] for m in messages if m["role"] == "user"],
                              record.get("source", path.name),
                              answers=[m["content"] for m in messages if m["role"] == "assistant"],
                              finish=list(record["finish"]), new_tokens=list(record["new_tokens"]), model=record.get("model"),
                              dtype=record.get("dtype"), answer_ids=list(record.get("answer_ids") or []),
                              origin=record.get("origin")))
    return prompts


def refuse_benchmark_path(path: Path) -> None:
    parts = {p.lower() for p in path.resolve().parts}
    if parts & set(BENCH_DIRS) or path.name == "quick_question.jsonl":
        raise UserError(f"{path} is a benchmark question file: never train heads on the questions they are measured on; "
                        "use ../shared/data/self_instruct, gsm8k/train.jsonl or your own ShareGPT data")
    if not path.is_file():
        raise UserError(f"--prompts {path}: file not found")


def refuse_benchmark_text(prompts: list[Prompt]) -> None:
    """UserError when any prompt turn is a benchmark question (MT-Bench, Spec-Bench, quick) we can see locally."""
    bench = benchmark_turns()
    hits = [p for p in prompts if any(t is not None and _normal(t) in bench for t in p.turns)]
    if hits:
        raise UserError(f"{len(hits)} prompts are benchmark questions (e.g. {hits[0].id} from {hits[0].source}): "
                        "remove them; heads must never train on the questions they are measured on")


def benchmark_turns() -> set[str]:
    """Normalised turns of every benchmark question file found locally (no download)."""
    roots = [Path(os.environ["MEDUSA_BENCH_DATA"])] if os.environ.get("MEDUSA_BENCH_DATA") else []
    candidates = [root / bench / "question.jsonl" for root in roots + [cache_dir() / "data"] for bench in BENCH_DIRS]
    candidates.append(Path(str(resources.files("medusa_bench") / "data" / "quick_question.jsonl")))
    turns: set[str] = set()
    for path in candidates:
        if path.is_file():
            for record in read_records(path):
                turns.update(_normal(t) for t in record.get("turns", []) if isinstance(t, str))
    return turns


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def prompts_in(path: Path) -> list[Prompt]:
    prompts = []
    shared = data_reference(path)  # a file under the shared data folder: its records are referred to, never copied
    for number, record in enumerate(read_records(path)):
        if "question_id" in record and "turns" in record:
            raise UserError(f"{path} holds benchmark questions (question_id + turns): never train heads on them")
        rid = str(record.get("id", number))
        prompts.append(Prompt(f"{path.stem}:{rid}", record_turns(record), path.name,
                              origin=[shared, number] if shared else None))
    return prompts
