"""How often does the report's 95% speedup interval hold the true speedup? A simulation over the
question counts a run may have, the plain percentile bootstrap beside the expanded one the report
uses (results/stats.py).

    python benchmarks/interval_coverage.py [--runs 1500]

Each simulated run: n questions, 30–300 tokens each, a per-question speedup log-normal around 1.4×
(σ 0.25, what MT-Bench's questions spread by), 5% timing noise on each answer; the true speedup is
the ratio of sums over 2,000,000 such questions. Both intervals come from the same 1,000 resamples
(stats._resampled_sums, questions drawn in pairs). No model, no timing: seconds on any CPU.
"""

from __future__ import annotations

import argparse

import numpy as np

from medusa_bench.results.stats import _resampled_sums, expanded_tail

SIGMA, SPEEDUP, BASE_RATE, TIMING_NOISE = 0.25, 1.4, 30.0, 0.05


def questions(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, decoder seconds, baseline seconds) of n simulated questions, [n] each."""
    tokens = rng.integers(30, 301, n).astype(float)
    speedup = SPEEDUP * np.exp(rng.normal(0, SIGMA, n))
    base = tokens / BASE_RATE * np.exp(rng.normal(0, TIMING_NOISE, n))
    return tokens, tokens / (BASE_RATE * speedup) * np.exp(rng.normal(0, TIMING_NOISE, n)), base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1500)
    parser.add_argument("--sizes", default="3,4,5,8,16,20,40")
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    tokens, dec, base = questions(rng, 2_000_000)
    true = base.sum() / dec.sum()  # the same tokens: the ratio of sums is the ratio of seconds
    print(f"true speedup (ratio of sums) {true:.4f}; {args.runs} runs per size, 1,000 resamples\n")
    print(f"{'questions':>9}  {'plain 2.5–97.5%':>16}  {'expanded':>9}  {'its tails':>9}  {'half-width plain / expanded':>28}")
    for n in map(int, args.sizes.split(",")):
        held, widths = {"plain": 0, "expanded": 0}, {"plain": [], "expanded": []}
        tail = expanded_tail(n) if n > 1 else 0.025
        for seed in range(args.runs):
            sums = _resampled_sums(questions(rng, n), 1000, seed) if n >= 5 else _small_sums(questions(rng, n), seed)
            values = sums[2] / sums[1]  # baseline seconds / decoder seconds, tokens cancel
            for name, share in (("plain", 0.025), ("expanded", tail)):
                low, high = np.quantile(values, [share, 1 - share])
                held[name] += low <= true <= high
                widths[name].append((high - low) / 2 / true)
        print(f"{n:9d}  {held['plain'] / args.runs:16.1%}  {held['expanded'] / args.runs:9.1%}  {tail:9.4f}  "
              f"{np.mean(widths['plain']):13.1%} / {np.mean(widths['expanded']):.1%}")


def _small_sums(columns, seed: int) -> list[np.ndarray]:
    """_resampled_sums without its MIN_QUESTIONS_FOR_CI floor: what an interval would be below it."""
    arrays = [np.asarray(a, dtype=float) for a in columns]
    index = np.random.default_rng(seed).integers(0, len(arrays[0]), size=(1000, len(arrays[0])))
    return [a[index].sum(axis=1) for a in arrays]


if __name__ == "__main__":
    main()
