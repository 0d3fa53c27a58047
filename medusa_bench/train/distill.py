"""Self-distillation: the base model answers training prompts; its answers train the heads.

Heads learn to predict what *this* model will say, so the training answers come from the
model itself (its own chat template, greedy by default). Prompts are sorted by length and
generated in batches with left padding (~4x faster than one at a time on a CPU). Each
finished conversation is appended as one JSONL line in the ShareGPT/FastChat format, so a
killed run resumes where it stopped. Each record also keeps the answers' generated token ids
and, for prompts from the shared data folder, where they came from (`origin`): with `--pack`,
every full group of conversations is sealed into a distillation pack (train/pack.py), which
outlives the machine, and a later run skips what the pack holds.

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from medusa_bench.errors import UserError
from medusa_bench.inputs.calibration import held_out_texts
from medusa_bench.inputs.chat import build_prompt, conversation
from medusa_bench.results import files
from medusa_bench.train.data import messages_of, read_records, user_turns_in
from medusa_bench.train.generate import generate_batch
from medusa_bench.train.instructions import BenchmarkOverlap, write_follow_ups
from medusa_bench.train.pack import PART_SIZE, decode_answer, seal, sealed_ids
from medusa_bench.train.prompts import FOLLOW_UPS, Prompt, read_prompts

@dataclass
class DistillResult:
    out: Path
    written: int = 0  # conversations appended by this call
    skipped: int = 0  # already in the file (resume)
    new_tokens: int = 0
    seconds: float = 0.0
    truncated: int = 0  # answers cut at max_new_tokens
    near_benchmark: int = 0  # prompts dropped as close to a benchmark question
    sealed: list[Path] = field(default_factory=list)  # pack parts sealed by this call (--pack)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


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
    pack: Optional[Path] = None,
    console: Optional[Console] = None,
) -> DistillResult:
    """Generate (or resume) self-distilled conversations into `out` (ShareGPT jsonl).

    `pack`: a distillation pack folder; conversations sealed there are not generated again, and
    every full PART_SIZE group of `out`'s conversations not yet there is sealed after each batch.
    """
    if max_new_tokens < 1 or batch_size < 1 or samples_per_prompt < 1:
        raise UserError("--max-new-tokens, --batch-size and --samples-per-prompt must be >= 1")
    if samples_per_prompt > 1 and temperature <= 0:
        raise UserError("--samples-per-prompt > 1 needs sampling: pass --temperature > 0 (greedy gives identical samples)")
    prompts = read_prompts(prompt_files, limit, follow_up, extend)
    others = {p.model for p in prompts} - {None, loaded.name}
    if others:
        raise UserError(f"--extend holds answers of another model ({sorted(others)[0]}); extend only {loaded.name}'s")
    overlap = BenchmarkOverlap()
    near = {p.id for p in prompts if any(t is not None and overlap(t) for t in p.turns)}
    prompts = [p for p in prompts if p.id not in near]
    out = Path(out)
    files.ensure_writable_dir(out.parent)
    in_out = resume_ids(out, loaded.name)
    in_pack = sealed_ids(Path(pack), loaded.name) if pack else set()
    done = in_out | in_pack
    unsealed = len(in_out - in_pack)
    items = [(p, k) for p in prompts for k in range(samples_per_prompt) if sample_id(p, k, samples_per_prompt) not in done]
    result = DistillResult(out=out, skipped=len(prompts) * samples_per_prompt - len(items), near_benchmark=len(near))
    if pack and unsealed >= PART_SIZE:  # full groups an earlier run left unsealed
        result.sealed += seal_pack(loaded.tokenizer, out, pack, loaded.name, loaded.spec)
        unsealed -= len(result.sealed) * PART_SIZE
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
            unsealed += len(batch)
            if pack and unsealed >= PART_SIZE:  # sealed now, a lost machine cannot lose them
                new = seal_pack(loaded.tokenizer, out, pack, loaded.name, loaded.spec)
                result.sealed += new
                unsealed -= len(new) * PART_SIZE
            result.seconds = time.perf_counter() - start
            progress.update(task, advance=len(batch), description=f"distilling · {result.tokens_per_second:5.1f} tok/s")
    return result


def seal_pack(tokenizer, out: Path, pack: Path, model: str, spec: str, final: bool = False) -> list[Path]:
    """Seal `out`'s conversations that the pack lacks into new parts (full ones; `final`: the rest too)."""
    if not Path(out).is_file():
        raise UserError(f"--out {out}: file not found (the jsonl `medusa-bench distill --out` writes)")
    records = files.read_jsonl(out)
    return seal(records, Path(pack), tokenizer, model, spec, user_turns_in, final=final)


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
    for prompt in prompts:  # answers from --extend without their ids: the tokenizer's ids for them
        prompt.answer_ids = prompt.answer_ids[: len(prompt.answers)]
        prompt.answer_ids += [loaded.tokenizer.encode(a, add_special_tokens=False) for a in prompt.answers[len(prompt.answer_ids):]]
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
            prompts[i].answers.append(decode_answer(loaded.tokenizer, tokens))
            prompts[i].answer_ids.append(list(tokens))
            prompts[i].finish.append(reason)
            prompts[i].new_tokens.append(len(tokens))
    dtype = str(loaded.dtype).removeprefix("torch.")
    records = []
    for prompt in prompts:
        pairs = zip(prompt.turns, prompt.answers)
        messages = [m for q, a in pairs for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        made_in = dtype if prompt.dtype in (None, dtype) else f"{prompt.dtype}, then {dtype}"
        record = {"source": prompt.source, "model": loaded.name, "dtype": made_in,
                  "conversations": messages, "finish": prompt.finish, "new_tokens": prompt.new_tokens,
                  "answer_ids": prompt.answer_ids}
        if prompt.follow_up:
            record["follow_up"] = prompt.follow_up
        if prompt.origin:
            record["origin"] = prompt.origin
        records.append(record)
    return records


# ------------------------------------------------------------------------------ describing a data set


def describe_data(path: Path) -> dict:
    """The recipe a training data file shows: sources, turns, answer tokens, who wrote the follow-ups,
    the generating dtype, and a fresh benchmark-overlap check of every user turn (training.json)."""
    from collections import Counter

    records = read_records(Path(path))
    overlap = BenchmarkOverlap()
    held_out = held_out_texts()  # the optimiser's calibration split: new data leaves it out (train/prompts.py)
    sources: dict[str, dict] = {}
    turns, follow_ups, dtypes = Counter(), Counter(), Counter()
    near = calibration = 0
    for record in records:
        user = [m["content"] for m in messages_of(record) if m["role"] == "user"]
        source = sources.setdefault(record.get("source", "unknown"), {"conversations": 0, "answer_tokens": 0})
        source["conversations"] += 1
        source["answer_tokens"] += sum(record.get("new_tokens", []))
        turns[len(user)] += 1
        follow_ups[record.get("follow_up", "none")] += 1
        dtypes[record.get("dtype", "unrecorded")] += 1
        near += any(overlap(text) for text in user)
        calibration += bool(user) and user[0].strip() in held_out
    return {"conversations": len(records), "answer_tokens": sum(s["answer_tokens"] for s in sources.values()),
            "sources": sources, "user_turns": {str(k): v for k, v in sorted(turns.items())},
            "follow_ups": dict(follow_ups), "generated_in": dict(dtypes),
            "truncated_answers": sum(r.get("finish", []).count("length") for r in records),
            "benchmark_overlap": {"conversations": near, "benchmark_turns_checked": overlap.turns},
            "calibration_overlap": {"conversations": calibration, "held_out_prompts": len(held_out)} if held_out else None}
