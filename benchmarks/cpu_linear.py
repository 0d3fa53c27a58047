"""fp32 on CPU: the base model's step with torch's own linears against oneDNN's packed ones, side by side.

One process, two copies of the model (one with `models.pack_linears`), each with its own KV cache
of `--context` tokens; round by round a step of q = 1, 2, 4, 8 query tokens on each copy in turn
(machine drift hits both), then the cache cropped back. Prints the median ms per step and the
ratio torch / oneDNN, and what `load_model` chose on this CPU (models.choose_linear_kernel).

    .venv/bin/python benchmarks/cpu_linear.py --context 300 --repeats 12

Zen 4 EPYC, 2 cores, torch 2.13 (session 20): q=1 60.6 against 43.6 ms (1.39x), q=2 100.7 against
52.6 (1.91x), q=4 92.4 against 46.7 (1.98x), q=8 100.6 against 53.4 (1.88x).
Xeon with AMX, 2 cores, torch 2.13 (session 22): q=1 24.7 against 33.4 ms (0.74x), q=2 28.6 against 37.8
(0.76x), q=4 37.5 against 41.5 (0.90x), q=8 43.5 against 46.6 (0.93x): torch's own there.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    os.environ["MEDUSA_BENCH_CPU_LINEAR"] = "torch"  # the first copy keeps torch's linears
    from transformers import DynamicCache

    from medusa_bench.models import choose_linear_kernel, load_model, pack_linears

    loaded = load_model(args.model, "cpu", "float32")
    packed = copy.deepcopy(loaded.model)
    pack_linears(packed)
    ids = torch.randint(100, 20000, (1, args.context))
    models, caches = {"torch": loaded.model, "onednn": packed}, {}
    with torch.no_grad():
        for name, model in models.items():
            caches[name] = DynamicCache()
            model(ids, past_key_values=caches[name], use_cache=True)
        times = {(name, q): [] for name in models for q in (1, 2, 4, 8)}
        for round_ in range(args.warmup + args.repeats):
            for q in (1, 2, 4, 8):
                step = torch.randint(100, 20000, (1, q))
                for name, model in models.items():
                    start = time.perf_counter()
                    model(step, past_key_values=caches[name], use_cache=True)
                    elapsed = time.perf_counter() - start
                    caches[name].crop(-q)
                    if round_ >= args.warmup:
                        times[(name, q)].append(1000 * elapsed)
    for q in (1, 2, 4, 8):
        mkl, onednn = statistics.median(times[("torch", q)]), statistics.median(times[("onednn", q)])
        print(f"q={q}: torch {mkl:.1f} ms, oneDNN packed {onednn:.1f} ms, torch / oneDNN {mkl / onednn:.2f}x")
    os.environ["MEDUSA_BENCH_CPU_LINEAR"] = "auto"
    print("load_model chooses:", choose_linear_kernel(copy.deepcopy(loaded.model)))


if __name__ == "__main__":
    main()
