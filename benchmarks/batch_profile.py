"""Where the time goes as the batch grows: one verify forward of n nodes per row at B rows, and the
batched path's own cost at B = 1 against the decoders' batch-1 loop.

`run --batch-size` gives the curve itself (throughput, speedup, τ per decoder and B); this prints
what explains its shape: t(B, n) in ms for chained drafts of n nodes at 300 cached tokens, with
t(B, n) / t(B, 1), the cost of a tree against the baseline's one-token step at the same B (a tree
pays where τ exceeds it), and t(B, 1) / B, the baseline's time per token. Then the baseline decoded
both ways at B = 1 on the same prompts, interleaved: a batched baseline slower than the batch-1
loop would make every batched speedup look better than it is.

    .venv/bin/python benchmarks/batch_profile.py --batch-sizes 1,2,4,8,16 --nodes 1,2,4,8,16 --questions 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from medusa_bench.decoders.batched import BatchedDecoder
from medusa_bench.decoders.registry import build_decoder
from medusa_bench.inputs.chat import build_prompt
from medusa_bench.inputs.questions import load_questions
from medusa_bench.models import load_model
from medusa_bench.runtime.batch import Columns, forward_rows
from medusa_bench.runtime.cache import SlotCache
from medusa_bench.runtime.engine import engine_of
from medusa_bench.runtime.forward import sync


@torch.inference_mode()
def step_ms(loaded, rows: int, nodes: int, context: int = 300, repeats: int = 7) -> float:
    """One forward of `nodes` chained tokens per row over `context` cached tokens per row, in ms (median)."""
    cache = SlotCache(engine_of(loaded).num_layers, context + nodes + 1)
    columns = Columns([context] * rows, context + nodes + 1, loaded.device)
    ids = torch.randint(100, 1000, (rows, context), device=loaded.device)
    forward_rows(loaded.model, ids, cache, columns.prefill_positions(), columns.prefill_mask(loaded.model.dtype), False, True)
    chain = torch.ones(nodes, nodes, dtype=torch.bool, device=loaded.device).tril().repeat(rows, 1, 1)
    mask = columns.step_mask(chain, loaded.model.dtype)
    positions = columns.lengths[:, None] + torch.arange(nodes, device=loaded.device)[None]
    step = torch.randint(100, 1000, (rows, nodes), device=loaded.device)
    times = []
    for _ in range(repeats):
        cache.length = cache.start = context
        sync(loaded.device)
        start = time.perf_counter()
        forward_rows(loaded.model, step, cache, positions, mask, False)
        sync(loaded.device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16")
    parser.add_argument("--nodes", default="1,2,4,8,16")
    parser.add_argument("--questions", type=int, default=8, help="MT-Bench first turns for the B = 1 baseline check (0 skips it)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    loaded = load_model(args.model, args.device, args.dtype)
    sizes, nodes = [int(b) for b in args.batch_sizes.split(",")], [int(n) for n in args.nodes.split(",")]
    print(f"{args.model} on {loaded.device.type}/{str(loaded.dtype).replace('torch.', '')}, torch threads {torch.get_num_threads()}")
    print("t(B, n): one forward of n chained nodes per row at 300 cached tokens, ms (median of 7)")
    print(f"{'B':>3} " + " ".join(f"{'n=' + str(n):>8}" for n in nodes) + "   t(B, n) / t(B, 1)" + " " * 8 + "ms per token at n=1")
    for size in sizes:
        step_ms(loaded, size, nodes[0], repeats=2)  # warm-up at this shape
        ms = [step_ms(loaded, size, n) for n in nodes]
        print(f"{size:>3} " + " ".join(f"{m:8.1f}" for m in ms) + "   " + " ".join(f"{m / ms[0]:5.2f}" for m in ms)
              + f"   {ms[0] / size:6.1f}")

    if args.questions:
        _, questions = load_questions("mt_bench", limit=args.questions)
        prompts = [build_prompt(loaded, [{"role": "user", "content": q.turns[0]}]) for q in questions]
        loop, batched = build_decoder("baseline", loaded), BatchedDecoder([build_decoder("baseline", loaded)])
        loop.generate(prompts[0], 8), batched.generate(prompts[:1], 8)  # warm-up
        tokens = {"loop": 0, "batched": 0}
        seconds = {"loop": 0.0, "batched": 0.0}
        same = 0
        for i, ids in enumerate(prompts):
            order = ("loop", "batched") if i % 2 == 0 else ("batched", "loop")
            out = {}
            for name in order:
                out[name] = loop.generate(ids, args.max_new_tokens) if name == "loop" else batched.generate([ids], args.max_new_tokens)[0]
                tokens[name] += len(out[name].token_ids)
                seconds[name] += out[name].wall_time
            same += out["loop"].token_ids == out["batched"].token_ids
        rate = {name: tokens[name] / seconds[name] for name in tokens}
        print(f"\nbaseline at B=1, {len(prompts)} MT-Bench first turns, {args.max_new_tokens} tokens: batch-1 loop {rate['loop']:.1f} tok/s, "
              f"batched path {rate['batched']:.1f} tok/s (ratio {rate['batched'] / rate['loop']:.3f}); identical tokens {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
