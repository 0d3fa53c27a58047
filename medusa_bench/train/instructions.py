"""The user's side of training data, written by the base model itself.

Two things, both for self-distillation (`distill`):
- **New instructions** (self-instruct bootstrapping): the model sees three seed tasks drawn at
  random and continues the list with a new one (sampled, so the tasks vary). A task is kept when
  it is a usable length, not a near-copy of a seed or of a kept task, and not close to any
  benchmark question. Kept tasks go to a self_instruct-style jsonl (`instruction`), appended as
  they come, so a killed run resumes.
- **Follow-up questions**: after a first answer, the model writes the question the user would ask
  next; `distill --follow-up model` answers it in context, so turn-2 contexts (a question, an
  answer, a new question) are in the training data as they are in MT-Bench.

"Close to a benchmark question" (`BenchmarkOverlap`): shares any 8-word run, or half of its word
trigrams, with a turn of MT-Bench, Spec-Bench or the quick bench found locally. Heads trained on
the questions they are measured on would inflate every number.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medusa_bench.errors import UserError
from medusa_bench.results import files
from medusa_bench.train.generate import generate_batch
from medusa_bench.train.prompts import benchmark_turns, read_prompts

SEEDS_PER_PROMPT = 3
NEAR_COPY = 0.5  # word-trigram Jaccard at or above which a new task is a near-copy of another
BENCH_RUN = 8  # words in a row shared with a benchmark turn that make a text overlap it
MIN_WORDS, MAX_WORDS = 4, 60
TRIES_PER_TASK = 20  # give up (and say so) when a model keeps under 1 task in 20: it is not following the list


# ------------------------------------------------------------------------------ overlap


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.casefold())


def grams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


class BenchmarkOverlap:
    """Is a text close to any benchmark question turn seen locally (MT-Bench, Spec-Bench, quick)?"""

    def __init__(self, turns: Optional[set[str]] = None):
        turns = benchmark_turns() if turns is None else turns
        self.turns = len(turns)
        self.runs: set[tuple[str, ...]] = set()
        self.trigrams: list[set] = []
        for turn in turns:
            tokens = words(turn)
            self.runs |= grams(tokens, BENCH_RUN)
            self.trigrams.append(grams(tokens, 3))

    def __call__(self, text: str) -> bool:
        tokens = words(text)
        if grams(tokens, BENCH_RUN) & self.runs:
            return True
        mine = grams(tokens, 3)
        # Half the trigrams of the shorter text, and at least 3: short tasks share phrases like "can you explain".
        return any(len(mine & other) >= max(3, NEAR_COPY * min(len(mine), len(other))) for other in self.trigrams)


# ------------------------------------------------------------------------------ new instructions


def bootstrap_instructions(loaded, seed_files: list[Path], count: int, out: Path, *, batch_size: int = 32,
                           temperature: float = 0.9, top_p: float = 0.95, seed: int = 0,
                           console: Optional[Console] = None) -> dict:
    """Append model-written tasks to `out` until it holds `count` (or TRIES_PER_TASK * count were
    written); returns the tallies of this call."""
    seeds = [p.turns[0].split("\n\n")[0] for p in read_prompts(seed_files)]
    out = Path(out)
    files.ensure_writable_dir(out.parent)
    files.repair_jsonl(out)
    kept = [r["instruction"] for r in files.read_jsonl(out)]
    overlap = BenchmarkOverlap()
    known = [grams(words(t), 3) for t in seeds + kept]
    rng = random.Random(seed + len(kept))
    tally = {"kept": 0, "generated": 0, "benchmark_overlap": 0, "near_copy": 0, "bad_length": 0}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console or Console(stderr=True)) as progress:
        task = progress.add_task("writing instructions", total=count, completed=min(len(kept), count))
        while len(kept) < count and tally["generated"] < TRIES_PER_TASK * count:
            shown = [rng.sample(seeds, SEEDS_PER_PROMPT) for _ in range(batch_size)]
            ids = [task_list_prompt(loaded, examples) for examples in shown]
            for tokens, _ in generate_batch(loaded, ids, 64, temperature, top_p):
                if len(kept) >= count:  # the last batch overshot: the rest are not needed (nor counted)
                    break
                tally["generated"] += 1
                text = first_line(loaded.tokenizer.decode(tokens, skip_special_tokens=True))
                verdict = judge_task(text, known, overlap)
                tally[verdict] += 1
                if verdict == "kept":
                    kept.append(text)
                    known.append(grams(words(text), 3))
                    files.append_jsonl(out, {"id": f"bootstrap_{len(kept)}", "instruction": text, "instances": [],
                                             "source": "bootstrap", "model": loaded.name})
            progress.update(task, completed=min(len(kept), count),
                            description=f"writing instructions · kept {tally['kept']}/{tally['generated']}")
    tally["total"] = len(kept)
    return tally


def task_list_prompt(loaded, examples: list[str]) -> list[int]:
    """A numbered task list for the model to continue: plain text, which small models follow best."""
    lines = [f"Task {i + 1}: {' '.join(text.split())}" for i, text in enumerate(examples)]
    text = "Here is a list of diverse tasks for an AI assistant.\n\n" + "\n".join(lines) + f"\nTask {len(examples) + 1}:"
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip().strip('"').strip()


def judge_task(text: str, known: list[set], overlap: BenchmarkOverlap) -> str:
    """'kept', or why not: 'bad_length', 'near_copy' (of a seed or kept task), 'benchmark_overlap'."""
    count = len(words(text))
    if not MIN_WORDS <= count <= MAX_WORDS or text.lower().startswith("task"):
        return "bad_length"
    if overlap(text):
        return "benchmark_overlap"
    mine = grams(words(text), 3)
    if any(jaccard(mine, other) >= NEAR_COPY for other in known):
        return "near_copy"
    return "kept"


# ------------------------------------------------------------------------------ follow-up questions


# Plain-text few-shot: a 135M chat model asked in its chat template restated its answer instead of
# asking (3 of 3 tried); continuing this transcript it asked a real follow-up in 6 of 8.
FOLLOW_UP_SHOTS = (
    "Below are conversations in which the user asks a follow-up question about the assistant's answer.\n\n"
    "User: What is the capital of France?\nAssistant: The capital of France is Paris, known for the Eiffel Tower "
    "and the Louvre.\nFollow-up question: Which museums in Paris should I visit first?\n\n"
    "User: Write a haiku about rain.\nAssistant: Soft rain on the roof / the garden drinks in silence / puddles "
    "hold the sky\nFollow-up question: Can you write another one about snow?\n\n"
    "User: {question}\nAssistant: {answer}\nFollow-up question:")


def write_follow_ups(loaded, exchanges: list[tuple[str, str]], overlap: BenchmarkOverlap) -> list[Optional[str]]:
    """The model's follow-up question to each (question, answer); None where it wrote nothing usable.

    Unusable: too short or long, a near-copy of the first question, or close to a benchmark question.
    """
    texts = [FOLLOW_UP_SHOTS.format(question=clip(q, 600), answer=clip(a, 800)) for q, a in exchanges]
    ids = [loaded.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    questions = []
    for (first, _), (tokens, _) in zip(exchanges, generate_batch(loaded, ids, 40, 0.0, 1.0)):
        text = first_line(loaded.tokenizer.decode(tokens, skip_special_tokens=True))
        usable = (MIN_WORDS <= len(words(text)) <= MAX_WORDS and not overlap(text)
                  and jaccard(grams(words(text), 3), grams(words(first), 3)) < NEAR_COPY)
        questions.append(text if usable else None)
    return questions


def clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[:chars].rsplit(" ", 1)[0] + " ..."


def check_count(count: int) -> None:
    if count < 1:
        raise UserError("--count must be >= 1 (how many instructions the file should hold)")
