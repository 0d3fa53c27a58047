"""Distillation throughput: the old recipe against the new one, on the same prompts, in one run.

Old: transformers' `generate` over length-sorted batches of 32 left-padded prompts (every row
computes until the batch's last one ends), in the dtype `scripts/train_default_heads.sh` used
(bf16). New: `train/generate.generate_batch`: the batched baseline on the static cache, SLOTS
rows streaming (a finished row's slot refilled at once), in the dtype `generation_dtype`
measures for this CPU. Also the old engine in the new dtype, so the engine's share shows apart
from the dtype's. Prints tok/s, the ratios, and whether every greedy answer is the same.

    .venv/bin/python benchmarks/distill_speed.py --prompts 96 --max-new-tokens 96
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch

from medusa_bench.inputs.chat import build_prompt, conversation
from medusa_bench.models import load_model
from medusa_bench.train import generate


def prompts_from(path: Path, count: int, skip: int) -> list[str]:
    """GSM8K-train questions from line `skip` on: no benchmark question, lengths vary."""
    lines = path.read_text().splitlines()[skip: skip + count]
    return [json.loads(line)["question"] for line in lines]


def timed(label: str, run) -> tuple[list, float]:
    start = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - start
    tokens = sum(len(t) for t, _ in out)
    print(f"{label:<44} {tokens:6d} tok {seconds:7.1f} s {tokens / seconds:7.1f} tok/s", flush=True)
    return out, tokens / seconds


def old_recipe(loaded, ids: list[list[int]], new: int, batch: int = 32) -> list:
    out = []
    for start in range(0, len(ids), batch):
        out += generate.transformers_generate(loaded, ids[start:start + batch], new, 0.0, 1.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--old-dtype", default="bfloat16", help="the dtype of the old recipe (train_default_heads.sh: bfloat16)")
    parser.add_argument("--data", default=os.environ.get("MEDUSA_BENCH_DATA", "../shared/data"))
    args = parser.parse_args()
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    loaded = load_model("smollm2-135m", dtype="float32")
    new_loaded, choice = generate.generation_dtype(loaded)
    print(f"generation dtype (auto): {choice}")
    texts = prompts_from(Path(args.data) / "gsm8k" / "train.jsonl", args.prompts, skip=5000)
    ids = sorted((build_prompt(loaded, conversation([t], [])) for t in texts), key=len)  # distill sorts by length too
    old_dtype = getattr(torch, args.old_dtype)
    old_loaded = loaded if old_dtype == torch.float32 else dataclasses.replace(
        loaded, model=generate._bf16_copy(loaded.model) if old_dtype == torch.bfloat16 else loaded.model.to(old_dtype), dtype=old_dtype)
    new_dtype = str(new_loaded.dtype).removeprefix("torch.")
    runs = {}
    runs["old"] = timed(f"old: generate() x32, {args.old_dtype}", lambda: old_recipe(old_loaded, ids, args.max_new_tokens))
    runs["old_engine"] = timed(f"old engine in the new dtype: generate() x32, {new_dtype}",
                               lambda: old_recipe(new_loaded, ids, args.max_new_tokens))
    runs["new"] = timed(f"new: batched baseline, {generate.SLOTS} slots streaming, {new_dtype}",
                        lambda: generate.generate_batch(new_loaded, ids, args.max_new_tokens, 0.0, 1.0))
    print(f"new / old:                 {runs['new'][1] / runs['old'][1]:.2f}x")
    print(f"new / old engine, {new_dtype}: {runs['new'][1] / runs['old_engine'][1]:.2f}x")
    same = sum(a == b for a, b in zip(runs["new"][0], runs["old_engine"][0]))
    print(f"answers identical to generate() in {new_dtype}: {same}/{len(ids)}")


if __name__ == "__main__":
    main()
