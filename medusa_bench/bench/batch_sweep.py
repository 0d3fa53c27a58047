"""`run --batch-size 1,4,16`: after the answers, every decoder again at each batch size, in process.

Every turn of every question is one request: turn 2 carries the baseline's own turn-1 answer, so
every decoder decodes the same prompts. At batch size B the requests go in chunks of B, and each
chunk is decoded by every decoder in turn (rotating who goes first), B rows at once through
decoders/batched.py; the baseline is batched the same way, so each speedup compares like with like.

One line per decoder × batch size in `batch.jsonl` (a level already there is skipped: the same
command resumes): throughput over all rows (Σ tokens / Σ batch wall time), per-request latency
percentiles, τ, each row's tokens, whether the rows equal the same-B baseline's, and the verdict
against the batch-1 baseline with the margins and the rounding noise (bench/verdict.py).

A decoder on `--tree auto` gets the tree the optimiser picks at each B (bench/batch_trees.py);
where that differs from its batch-1 tree, the batch-1 tree runs beside it as `<decoder>@B1`, the
check that the per-B choice is at least as fast.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from rich.console import Console

from medusa_bench.bench.batch_trees import tree_for_batch
from medusa_bench.bench.build import build_decoder, build_like
from medusa_bench.bench.sweep import percentiles
from medusa_bench.bench.verdict import divergences, rounding_noise, verdict
from medusa_bench.decoders.batched import BatchedDecoder, batch_refusal
from medusa_bench.decoders.registry import split_spec
from medusa_bench.errors import UserError
from medusa_bench.inputs.chat import build_prompt, conversation
from medusa_bench.inputs.questions import Question
from medusa_bench.results import files
from medusa_bench.trees.tree import Tree

BATCH_FILE = "batch.jsonl"
FIXED_TREE = "@B1"  # suffix of an auto decoder run on its batch-1 tree at a larger B
BASELINE = "baseline"


def parse_batch_sizes(text: Optional[str]) -> list[int]:
    """'1,4,16' -> [1, 4, 16] (1 always first: the batch-1 baseline is every verdict's reference)."""
    if not text:
        return []
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--batch-size must be comma-separated whole numbers, e.g. 1,4,16; got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise UserError(f"--batch-size sizes must be >= 1, got {text!r}")
    return sorted(set(sizes) | {1})


def check_batch_run(config) -> None:
    """What a batch sweep needs of a run, one line each."""
    if not config.batch_sizes:
        return
    if config.temperature != 0:
        raise UserError("--batch-size decodes greedily (rows are checked against the baseline's): use --temperature 0")
    if BASELINE not in config.decoders:
        raise UserError("--batch-size compares every decoder with the baseline at the same batch size: add baseline to --decoders")
    if config.on_cluster:
        raise UserError("--batch-size runs in one process: drop --workers/--ray-address")


def batch_requests(questions: list[Question], baseline_answers: dict, loaded) -> list[tuple[str, list[int]]]:
    """(request id, prompt ids) for every turn the baseline answered; turn 2 carries its turn-1 answer."""
    requests = []
    for question in questions:
        record = baseline_answers.get(str(question.question_id))
        given = record["choices"][0]["turns"] if record else []
        for turn in range(min(len(question.turns), len(given))):
            ids = build_prompt(loaded, conversation(question.turns[: turn + 1], given[:turn]))
            requests.append((f"{question.question_id}/{turn + 1}", ids))
    return requests


class Rows:
    """Each decoder built once per row, kept across batch sizes: {(spec, tree paths): [decoder, ...]}."""

    def __init__(self, loaded, options):
        self.loaded, self.options, self.built = loaded, options, {}

    def batch(self, spec: str, decoder, tree: Optional[Tree], size: int) -> BatchedDecoder:
        """`size` decoders like the run's `decoder`: on its tree, or on `tree` where given (the optimiser's at this B)."""
        key = (spec, tuple(tree.paths) if tree is not None else None)
        built = self.built.setdefault(key, [])
        while len(built) < size:
            if tree is None:
                built.append(build_like(spec, decoder, self.loaded, self.options))
            else:
                options = self.options.replace(tree=tree)
                if decoder.step_profile is not None:
                    options = options.replace(extra={**options.extra, "step_profile": decoder.step_profile})
                built.append(build_decoder(split_spec(spec)[0], self.loaded, options))
        return BatchedDecoder(built[:size])


def batchable(decoders: dict, loaded, log) -> dict:
    """The run's decoders that can decode rows together (control: the A/A at each B); one line for each left out."""
    kept = {}
    for spec, decoder in decoders.items():
        refusal = batch_refusal(decoder) or (None if decoder.loaded is loaded else f"{spec} decodes on its own model")
        if refusal is not None:
            log(f"batch sweep: {refusal}: left out")
        else:
            kept[spec] = decoder
    return kept


def variants(decoders: dict, size: int, loaded, options, log) -> dict:
    """{label: (spec, run decoder, tree or None, note)} at batch `size`: each decoder; an auto one on the
    optimiser's tree for this B, and on its batch-1 tree too (`<spec>@B1`) where they differ."""
    out = {}
    for spec, decoder in decoders.items():
        if getattr(decoder, "autotree", None) is None or size == 1:
            tree = getattr(decoder.proposer, "tree", None)
            out[spec] = (spec, decoder, None, {"tree_nodes": tree.num_nodes} if tree is not None else {})
            continue
        sized = tree_for_batch(split_spec(spec)[0], loaded, size, options)
        choice = sized.result.choice
        note = {"tree_nodes": sized.tree.num_nodes, "predicted_speedup": round(choice.speedup, 4),
                "step_time_ms": {str(n): round(1000 * t, 3) for n, t in sorted(sized.latency.step_time.items())}}
        log(f"batch sweep: {spec} at B={size}: the optimiser picks n={sized.tree.num_nodes} "
            f"(predicted {choice.speedup:.2f}x; batch-1 tree n={decoder.proposer.tree.num_nodes})")
        out[spec] = (spec, decoder, sized.tree, note)
        if tuple(sized.tree.paths) != tuple(decoder.proposer.tree.paths):
            out[spec + FIXED_TREE] = (spec, decoder, decoder.proposer.tree, {"tree_nodes": decoder.proposer.tree.num_nodes})
    return out


def run_level(batches: dict, requests: list, size: int, max_new_tokens: int) -> dict:
    """Every request at batch `size`, chunk by chunk, every decoder in turn: {label: (rows, Σ wall)}."""
    done = {label: ([], 0.0) for label in batches}
    labels = list(batches)
    for start in range(0, len(requests), size):
        chunk = requests[start:start + size]
        turn = (start // size) % len(labels)
        for label in labels[turn:] + labels[:turn]:
            out = batches[label].generate([ids for _, ids in chunk], max_new_tokens)
            rows, wall = done[label]
            rows += [{"request": rid, "token_ids": g.token_ids, "steps": g.steps, "wall_time": round(g.wall_time, 6)}
                     for (rid, _), g in zip(chunk, out)]
            done[label] = (rows, wall + max(g.wall_time for g in out))
    return done


def level_record(label: str, size: int, rows: list[dict], wall: float, same_b: list[dict], note: dict) -> dict:
    tokens = sum(len(r["token_ids"]) for r in rows)
    return {
        "decoder": label, "batch_size": size, "requests": len(rows), "output_tokens": tokens, "duration_s": round(wall, 6),
        "output_tokens_per_s": round(tokens / wall, 4) if wall > 0 else None,
        "tau": round(tokens / sum(r["steps"] for r in rows), 6), "latency_s": percentiles([r["wall_time"] for r in rows]),
        "same_as_batched_baseline": sum(a["token_ids"] == b["token_ids"] for a, b in zip(rows, same_b)),
        **note, "rows": rows, "tstamp": time.time(),
    }


def batch_sweep(run_dir: Path, decoders: dict, questions: list[Question], baseline_answers: dict, loaded, config,
                console: Console) -> list[dict]:
    """Each batch size in turn, every decoder; appends to batch.jsonl, skipping levels already there."""
    path = run_dir / BATCH_FILE
    files.repair_jsonl(path)
    records = files.read_jsonl(path)
    have = {(r["decoder"], r["batch_size"]) for r in records}
    requests = batch_requests(questions, baseline_answers, loaded)
    log = lambda line: console.print(line, highlight=False, soft_wrap=True)  # noqa: E731
    rows = Rows(loaded, config.options)
    decoders = batchable(decoders, loaded, log)
    for size in sorted(set(config.batch_sizes) | {1}):  # batch 1 first: its baseline is every verdict's reference
        if all((spec, size) in have for spec in decoders):
            continue
        level = variants(decoders, size, loaded, config.options, log)
        log(f"batch sweep: B={size}, {len(requests)} requests × {len(level)} decoders")
        batches = {label: rows.batch(spec, decoder, tree, size) for label, (spec, decoder, tree, _) in level.items()}
        for batch in batches.values():  # untimed: lazy initialisation and allocator growth at this shape
            batch.generate([ids for _, ids in requests[:size]], min(config.max_new_tokens, 8))
        done = run_level(batches, requests, size, config.max_new_tokens)
        reference = next((r["rows"] for r in reversed(records) if r["decoder"] == BASELINE and r["batch_size"] == 1), None)
        reference = {row["request"]: row["token_ids"] for row in (reference or done[BASELINE][0])}
        noise = rounding_noise(loaded, [ids for _, ids in requests[: 2 * size]], size)
        for label, (spec, decoder, tree, note) in level.items():
            record = level_record(label, size, *done[label], done[BASELINE][0], note)
            compared = [(row, ids) for row, (rid, ids) in zip(record["rows"], requests) if rid in reference]
            found = divergences(loaded, [ids for _, ids in compared], [row["token_ids"] for row, _ in compared],
                                [reference[row["request"]] for row, _ in compared])
            record.update(rounding_noise=noise, verdict=verdict(found, noise, len(compared)),
                          divergences=[{"request": compared[d.index][0]["request"], "position": d.position, "margin": d.margin}
                                       for d in found])
            files.append_jsonl(path, record)
            records.append(record)
            log(f"batch sweep: {label} B={size}: {record['output_tokens_per_s']:.1f} tok/s, τ {record['tau']:.2f}; {record['verdict']}")
    return records
