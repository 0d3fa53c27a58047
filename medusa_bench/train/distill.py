"""Self-distillation: the base model answers training prompts; its answers train the heads.

Heads learn to predict what *this* model will say, so the training answers come from the
model itself (its own chat template, greedy by default). Prompts are sorted by length and
generated in batches with left padding (~4x faster than one at a time on a CPU). Each
finished conversation is appended as one JSONL line in the ShareGPT/FastChat format, so a
killed run resumes where it stopped.

Two-turn data: `follow_up="model"` has the model write the question a user would ask next
(train/instructions.py) and answers it in context, as MT-Bench's second turns are answered;
`extend` continues conversations distilled earlier with that second turn instead of answering
their first turn again.

Benchmark questions (MT-Bench, Spec-Bench, the packaged quick bench) are refused, and prompts
close to one (instructions.BenchmarkOverlap) are dropped: heads trained on the questions they
are measured on would inflate every number.
"""

from __future__ import annotations

import copy
import os
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from medusa_bench.bench.prompts import build_prompt, conversation
from medusa_bench.errors import UserError
from medusa_bench.results import files
from medusa_bench.train.data import messages_of, read_records

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


@dataclass
class DistillResult:
    out: Path
    written: int = 0  # conversations appended by this call
    skipped: int = 0  # already in the file (resume)
    new_tokens: int = 0
    seconds: float = 0.0
    truncated: int = 0  # answers cut at max_new_tokens
    near_benchmark: int = 0  # prompts dropped as close to a benchmark question

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


# ------------------------------------------------------------------------------ reading prompts


def read_prompts(paths: list[Path], limit: Optional[int] = None, follow_up: str = "none",
                 extend: tuple[Path, ...] = ()) -> list[Prompt]:
    """Prompts from self_instruct, GSM8K and ShareGPT files (detected per record), benchmarks refused.

    `limit` keeps the first N prompts of each file. `follow_up` gives one-turn prompts a second
    turn: "generic" (FOLLOW_UPS) or "model" (written by the model after its first answer).
    `extend`: conversations distilled earlier, continued with their answers kept.
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
    return prompts


def distilled_in(path: Path) -> list[Prompt]:
    """Conversations a `distill` run wrote, as prompts whose answered turns are kept (for --extend)."""
    if not path.is_file():
        raise UserError(f"--extend {path}: file not found (pass a jsonl that `medusa-bench distill` wrote)")
    prompts = []
    for record in read_records(path):
        messages = messages_of(record)
        if "new_tokens" not in record or not messages:
            raise UserError(f"{path} is not a `medusa-bench distill` output (no new_tokens): --extend continues those")
        prompts.append(Prompt(str(record["id"]), [m["content"] for m in messages if m["role"] == "user"],
                              record.get("source", path.name),
                              answers=[m["content"] for m in messages if m["role"] == "assistant"],
                              finish=list(record["finish"]), new_tokens=list(record["new_tokens"]), model=record.get("model"),
                              dtype=record.get("dtype")))
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
    from medusa_bench.models import cache_dir

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
    for number, record in enumerate(read_records(path)):
        if "question_id" in record and "turns" in record:
            raise UserError(f"{path} holds benchmark questions (question_id + turns): never train heads on them")
        rid = str(record.get("id", number))
        prompts.append(Prompt(f"{path.stem}:{rid}", record_turns(record), path.name))
    return prompts


def record_turns(record: dict) -> list[str]:
    """The user turns of one record: self_instruct, GSM8K, ShareGPT or OpenAI-style messages."""
    if "instruction" in record:  # self_instruct: instruction + the first instance's input, if any
        instances = record.get("instances") or [{}]
        extra = (instances[0].get("input") or "").strip() if isinstance(instances[0], dict) else ""
        return [f"{record['instruction'].strip()}\n\n{extra}" if extra else record["instruction"].strip()]
    if "question" in record:  # GSM8K
        return [str(record["question"]).strip()]
    return [m["content"].strip() for m in messages_of(record) if m["role"] == "user" and m["content"].strip()]


# ------------------------------------------------------------------------------ generating


def distill(
    loaded,
    prompt_files: list[Path],
    out: Path,
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.0,
    top_p: float = 1.0,
    samples_per_prompt: int = 1,
    follow_up: str = "none",
    extend: tuple[Path, ...] = (),
    batch_size: int = 16,
    limit: Optional[int] = None,
    seed: int = 0,
    console: Optional[Console] = None,
) -> DistillResult:
    """Generate (or resume) self-distilled conversations into `out` (ShareGPT jsonl)."""
    if max_new_tokens < 1 or batch_size < 1 or samples_per_prompt < 1:
        raise UserError("--max-new-tokens, --batch-size and --samples-per-prompt must be >= 1")
    if samples_per_prompt > 1 and temperature <= 0:
        raise UserError("--samples-per-prompt > 1 needs sampling: pass --temperature > 0 (greedy gives identical samples)")
    from medusa_bench.train.instructions import BenchmarkOverlap

    prompts = read_prompts(prompt_files, limit, follow_up, extend)
    others = {p.model for p in prompts} - {None, loaded.name}
    if others:
        raise UserError(f"--extend holds answers of another model ({sorted(others)[0]}); extend only {loaded.name}'s")
    overlap = BenchmarkOverlap()
    near = {p.id for p in prompts if any(t is not None and overlap(t) for t in p.turns)}
    prompts = [p for p in prompts if p.id not in near]
    out = Path(out)
    files.ensure_writable_dir(out.parent)
    done = resume_ids(out, loaded.name)
    items = [(p, k) for p in prompts for k in range(samples_per_prompt) if sample_id(p, k, samples_per_prompt) not in done]
    result = DistillResult(out=out, skipped=len(prompts) * samples_per_prompt - len(items), near_benchmark=len(near))
    if not items:
        return result
    if samples_per_prompt > 1:  # each sample answers on its own copy of the prompt
        items = [(copy.deepcopy(p), k) for p, k in items]
    torch.manual_seed(seed)
    # Sorted by prompt length: batches hold similar lengths, so left padding stays short.
    lengths = {p.id: len(build_prompt(loaded, conversation(p.turns[:1], []))) for p, _ in items}
    items.sort(key=lambda item: lengths[item[0].id])
    start = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console or Console(stderr=True)) as progress:
        task = progress.add_task("distilling", total=len(items))
        for begin in range(0, len(items), batch_size):
            batch = items[begin: begin + batch_size]
            earlier = [len(p.answers) for p, _ in batch]
            records = answer_batch(loaded, [p for p, _ in batch], max_new_tokens, temperature, top_p, overlap)
            for row, record in enumerate(records):
                prompt, k = batch[row]
                files.append_jsonl(out, {"id": sample_id(prompt, k, samples_per_prompt), **record})
                result.written += 1
                result.new_tokens += sum(record["new_tokens"][earlier[row]:])
                result.truncated += record["finish"][earlier[row]:].count("length")
            result.seconds = time.perf_counter() - start
            progress.update(task, advance=len(batch), description=f"distilling · {result.tokens_per_second:5.1f} tok/s")
    return result


def sample_id(prompt: Prompt, k: int, samples: int) -> str:
    return prompt.id if samples == 1 else f"{prompt.id}#{k}"


def resume_ids(out: Path, model_name: str) -> set[str]:
    """Ids already in `out` (a cut-off last line is repaired first); refuse another model's file."""
    files.repair_jsonl(out)
    records = files.read_jsonl(out)
    others = {r.get("model") for r in records} - {model_name, None}
    if others:
        raise UserError(f"{out} holds answers of another model ({sorted(others)[0]}); pass a new --out for {model_name}")
    return {str(r.get("id")) for r in records}


def answer_batch(loaded, prompts: list[Prompt], max_new_tokens: int, temperature: float, top_p: float,
                 overlap=None) -> list[dict]:
    """Answer every open turn of a batch of prompts (writing model follow-ups first); one ShareGPT record each."""
    from medusa_bench.train.instructions import write_follow_ups

    for turn in range(max(len(p.turns) for p in prompts)):
        rows = [i for i, p in enumerate(prompts) if turn < len(p.turns) and len(p.answers) == turn]
        if not rows:
            continue
        ask = [i for i in rows if prompts[i].turns[turn] is None]
        if ask:  # the model writes the user's next question; a generic one where it wrote nothing usable
            exchanges = [(prompts[i].turns[turn - 1], prompts[i].answers[turn - 1]) for i in ask]
            for i, question in zip(ask, write_follow_ups(loaded, exchanges, overlap)):
                prompts[i].turns[turn] = question or FOLLOW_UPS[i % len(FOLLOW_UPS)]
                prompts[i].follow_up = "model" if question else "generic"
        ids = [build_prompt(loaded, conversation(prompts[i].turns[: turn + 1], prompts[i].answers)) for i in rows]
        room = min(max_new_tokens, loaded.context_length - max(len(x) for x in ids))
        outputs = generate_batch(loaded, ids, max(room, 1), temperature, top_p)
        for i, (tokens, reason) in zip(rows, outputs):
            prompts[i].answers.append(loaded.tokenizer.decode(tokens, skip_special_tokens=True).strip())
            prompts[i].finish.append(reason)
            prompts[i].new_tokens.append(len(tokens))
    dtype = str(loaded.dtype).removeprefix("torch.")
    records = []
    for prompt in prompts:
        pairs = zip(prompt.turns, prompt.answers)
        messages = [m for q, a in pairs for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        made_in = dtype if prompt.dtype in (None, dtype) else f"{prompt.dtype}, then {dtype}"
        record = {"source": prompt.source, "model": loaded.name, "dtype": made_in,
                  "conversations": messages, "finish": prompt.finish, "new_tokens": prompt.new_tokens}
        records.append({**record, "follow_up": prompt.follow_up} if prompt.follow_up else record)
    return records


@torch.inference_mode()
def generate_batch(loaded, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float) -> list[tuple[list[int], str]]:
    """Left-padded batched `generate`; per row the new tokens cut at EOS and 'stop' or 'length'."""
    from transformers import GenerationConfig

    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else loaded.eos_token_ids[0]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # [B, W]
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [B, W]
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    sampled = temperature > 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampled, temperature=temperature if sampled else None,
                              top_p=top_p if sampled else None, top_k=None, pad_token_id=pad, eos_token_id=loaded.eos_token_ids)
    output = loaded.model.generate(input_ids=input_ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                                   generation_config=config)  # [B, W + new]
    results = []
    eos = set(loaded.eos_token_ids)
    for row in output[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        results.append((row[:cut], "stop") if cut is not None else (row, "length"))
    return results


# ------------------------------------------------------------------------------ describing a data set


def describe_data(path: Path) -> dict:
    """The recipe a training data file shows: sources, turns, answer tokens, who wrote the follow-ups,
    the generating dtype, and a fresh benchmark-overlap check of every user turn (training.json)."""
    from collections import Counter

    from medusa_bench.train.instructions import BenchmarkOverlap

    records = read_records(Path(path))
    overlap = BenchmarkOverlap()
    sources: dict[str, dict] = {}
    turns, follow_ups, dtypes = Counter(), Counter(), Counter()
    near = 0
    for record in records:
        user = [m["content"] for m in messages_of(record) if m["role"] == "user"]
        source = sources.setdefault(record.get("source", "unknown"), {"conversations": 0, "answer_tokens": 0})
        source["conversations"] += 1
        source["answer_tokens"] += sum(record.get("new_tokens", []))
        turns[len(user)] += 1
        follow_ups[record.get("follow_up", "none")] += 1
        dtypes[record.get("dtype", "unrecorded")] += 1
        near += any(overlap(text) for text in user)
    return {"conversations": len(records), "answer_tokens": sum(s["answer_tokens"] for s in sources.values()),
            "sources": sources, "user_turns": {str(k): v for k, v in sorted(turns.items())},
            "follow_ups": dict(follow_ups), "generated_in": dict(dtypes),
            "truncated_answers": sum(r.get("finish", []).count("length") for r in records),
            "benchmark_overlap": {"conversations": near, "benchmark_turns_checked": overlap.turns}}
