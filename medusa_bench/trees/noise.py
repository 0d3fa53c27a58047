"""How sure is a predicted speedup? The noise of the two tables it is read from.

The tree search predicts speedup = τ(tree) / (t(n) / t(1)). Both factors are measured on samples:
τ replayed over a few calibration answers (16 × 64 tokens by default), the step ratio over a few
profile rounds. A tree whose predicted speedup lies within that noise of 1 is not a speedup, so
the search (`best_tree` with `min_speedup=None`) makes 1 + this half-width the margin to beat,
instead of a fixed 3%.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

from medusa_bench.trees.replay import accepted_drafts, replay_steps
from medusa_bench.trees.tree import Tree

# τ of a table without answers (shipped per-position tables) or a profile without rounds: replaying
# decode order moved τ by 3-6% on the Zen 2 EPYC (trees/replay.py), so at least that much.
FALLBACK_NOISE = 0.03


def prediction_noise(calibration, latency, tree: Tree, n: int, resamples: int = 400,
                     seed: int = 0) -> dict:
    """Relative 95% half-widths of a tree's predicted speedup = τ / step ratio: τ's from a bootstrap
    over the calibration's answers (replayed), the step ratio's from the profile's paired rounds
    (latency.meta["ratio_ci"], the nearest profiled size); combined as independent errors. A
    factor without a measure of its noise counts FALLBACK_NOISE."""
    tau_noise = ratio_noise = None
    if calibration.answers:
        accepted = [(replay_steps(accepted_drafts(rows, tree, calibration.top_k), length), length)
                    for rows, length in calibration.answers]
        rng = random.Random(seed)
        taus = sorted(tau_of_answers(rng.choices(accepted, k=len(accepted))) for _ in range(resamples))
        tau = tau_of_answers(accepted)
        tau_noise = (taus[min(resamples - 1, int(0.975 * resamples))] - taus[int(0.025 * resamples)]) / 2 / tau
    intervals = {int(k): v for k, v in (latency.meta.get("ratio_ci") or {}).items()}
    if intervals and 1 in latency.step_time:
        near = min(intervals, key=lambda m: (abs(m - n), m))
        ratio = latency.step_time[near] / latency.step_time[1] if near in latency.step_time else None
        if ratio:
            lo, hi = intervals[near]
            ratio_noise = (hi - lo) / 2 / ratio
    measured = [name for name, value in (("calibration answers", tau_noise), ("profile rounds", ratio_noise)) if value is not None]
    tau_noise = FALLBACK_NOISE if tau_noise is None else tau_noise
    ratio_noise = FALLBACK_NOISE if ratio_noise is None else ratio_noise
    return {"speedup": round(math.hypot(tau_noise, ratio_noise), 4), "tau": round(tau_noise, 4),
            "step_ratio": round(ratio_noise, 4),
            "from": "bootstrap over " + " and ".join(measured) if measured else f"no measured noise: {FALLBACK_NOISE} each"}


def tau_of_answers(answers: Sequence[tuple[int, int]]) -> float:
    """τ over (steps, tokens) per answer: Σ tokens / Σ steps."""
    steps = sum(s for s, _ in answers)
    return sum(t for _, t in answers) / steps if steps else 1.0
