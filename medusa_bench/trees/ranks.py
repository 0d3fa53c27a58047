"""Acceptance statistics from true-token ranks: the table the tree search reads (`Calibration`).

A rank row [depth] says, at one position of real text, where each true future token ranked
among a proposer's candidates at that depth (0 = top-1, >= top_k = not drafted, -1 = past the
end). Calibration (bench/calibrate.py) measures rows on calibration prompts, training
(train/*.py) on held-out data; both turn them into the same table here.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import torch

from medusa_bench.errors import UserError
from medusa_bench.trees.tables import Calibration


def statistics_of(ranks: torch.Tensor, top_k: int, meta: Optional[dict] = None) -> Calibration:
    """Path-conditional acceptance table from rank rows [N, depth]; per-depth marginals in meta.

    paths[(r_1..r_d)] = #(rows starting r_1..r_d) / #(rows starting r_1..r_{d-1} with a depth-d
    target), so the product along a path is the joint frequency of that rank sequence.
    """
    hits: Counter = Counter()
    trials: Counter = Counter()
    for row in ranks.tolist():
        row = tuple(row)
        for d, rank in enumerate(row):
            if rank < 0:
                break
            trials[row[:d]] += 1
            if rank >= top_k:
                break
            hits[row[: d + 1]] += 1
    if not trials:
        raise UserError("calibration found no positions to score; use longer answers (--tokens)")
    paths = {path: hits[path] / trials[path[:-1]] for path in hits}
    if not paths:  # no draft was ever right: one zero entry keeps the file valid
        paths = {(0,): 0.0}
    per_depth = marginals(ranks, top_k)
    meta = dict(meta or {})
    meta.update({
        "statistics": "joint rank paths (path-conditional)",
        "per_depth": per_depth,
        "top1": [round(row[0], 4) for row in per_depth],
        f"top{top_k}": [round(sum(row), 4) for row in per_depth],
        "positions": [int((ranks[:, d] >= 0).sum()) for d in range(ranks.shape[1])],
    })
    return Calibration("conditional", top_k, paths=paths, samples=int(trials[()]), meta=meta)


def marginals(ranks: torch.Tensor, top_k: int) -> list[list[float]]:
    """acc[d][r] = P(true token at depth d + 1 is the rank-r candidate), over positions with a target."""
    table = []
    for d in range(ranks.shape[1]):
        column = ranks[:, d]
        column = column[column >= 0]
        total = max(column.numel(), 1)
        table.append([round(float((column == r).sum()) / total, 6) for r in range(top_k)])
    return table
