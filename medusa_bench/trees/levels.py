"""A tree drafted level by level: which head drafts each depth from which rows of the depth above.

Hydra's heads and EAGLE's static trees draft depth d + 1 from the nodes of depth d that have
children, one batched call per depth; `level_plan` precomputes, once per tree, the indices
that call needs (its inputs, and where each child's token sits in its parent's top-k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from medusa_bench.trees.tree import TreeBuffers


@dataclass
class Level:
    """How to draft one depth of the tree from the depth above (all indices precomputed per tree)."""

    head: int  # the head that drafts this depth (= the parents' depth)
    expand: Tensor  # [m] rows of the parents' level that have children: the head runs on these only
    parent: Tensor  # [c] row of each child's parent within the parents' level
    parent_row: Tensor  # [c] row of each child's parent within `expand`
    rank: Tensor  # [c] the child's rank among its parent's candidates
    nodes: Tensor  # [c] the children's node indices (this level, in node order)
    top_k: int  # candidates needed per parent


def level_plan(buffers: TreeBuffers) -> list[Level]:
    """One Level per depth 1..max_depth, from the tree's levels, parents and ranks."""
    plan = []
    for depth in range(1, buffers.max_depth + 1):
        above = buffers.levels[depth - 1].tolist()
        nodes = buffers.levels[depth]
        parents = buffers.parents[nodes].tolist()
        expanding = sorted(set(parents), key=above.index)
        row_in_above = {node: i for i, node in enumerate(above)}
        row_in_expand = {node: i for i, node in enumerate(expanding)}
        long = dict(dtype=torch.long, device=nodes.device)
        plan.append(Level(
            head=depth - 1,
            expand=torch.tensor([row_in_above[p] for p in expanding], **long),
            parent=torch.tensor([row_in_above[p] for p in parents], **long),
            parent_row=torch.tensor([row_in_expand[p] for p in parents], **long),
            rank=buffers.ranks[nodes],
            nodes=nodes,
            top_k=int(buffers.ranks[nodes].max()) + 1,
        ))
    return plan
