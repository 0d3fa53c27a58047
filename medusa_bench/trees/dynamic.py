"""EAGLE-2's dynamic trees as the optimiser sees them: their three knobs, and the drafts a step accepts.

A dynamic tree is drafted anew every step (decoders/eagle.py `EagleProposer.dynamic_tree`): at each
depth the `top_k` best nodes by cumulative draft log-probability get `top_k` children each, down to
`depth`; the best `nodes - 1` of all drafted nodes (root excluded) become the tree. These are the EAGLE
papers' top-k, depth and total tokens. A spec names them: `dynamic-n16-d5-k4` (`eagle2:dynamic-n60-d5-k10`).

The optimiser (bench/dynamic_search.py) predicts τ for every (nodes, depth, top_k) from one
*expansion* per top_k: the draft run at every answer position of the calibration text as decoding
would run it there (the true context, `EagleProposer.expansion`), keeping every node's score and where
the true continuation lies among the nodes. Selection is by score, so the tree of any size and any
depth up to the expansion's is read off it (`accepted`), and replayed in decode order (trees/replay.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from medusa_bench.errors import UserError
from medusa_bench.trees.tree import Tree

_SPEC = re.compile(r"dynamic-n(\d+)-d(\d+)-k(\d+)")


@dataclass(frozen=True)
class DynamicKnobs:
    nodes: int  # tree size, root included (the papers' total tokens + 1)
    depth: int  # deepest draft
    top_k: int  # nodes expanded per depth, children per expanded node

    def __post_init__(self):
        if self.nodes < 2 or self.depth < 1 or self.top_k < 1:
            raise UserError(f"{self.name}: a dynamic tree needs nodes >= 2, depth >= 1 and top-k >= 1")
        if self.depth > self.nodes - 1:
            raise UserError(f"{self.name}: {self.nodes - 1} drafted nodes cannot reach depth {self.depth}; "
                            f"use a depth of at most {self.nodes - 1}")

    @property
    def name(self) -> str:
        return f"dynamic-n{self.nodes}-d{self.depth}-k{self.top_k}"

    @classmethod
    def parse(cls, spec) -> Optional["DynamicKnobs"]:
        """The knobs a spec names (`dynamic-n16-d5-k4`), None for any other tree spec."""
        match = _SPEC.fullmatch(spec.strip()) if isinstance(spec, str) else None
        if isinstance(spec, Tree):
            match = _SPEC.fullmatch(spec.name or "")
        return cls(*map(int, match.groups())) if match else None

    def tree(self) -> Tree:
        """A stand-in of the drafted size and depth, named by the knobs (the proposer drafts its own
        tree each step; run.json records this one's name, nodes and depth): a chain `depth` deep plus
        siblings of its first node."""
        chain = [(0,) * d for d in range(1, self.depth + 1)]
        siblings = [(rank,) for rank in range(1, self.nodes - self.depth)]
        return Tree(chain + siblings, name=self.name)


@dataclass
class Expansion:
    """Every node an EAGLE-2 draft of depth `depth` and top-k `top_k` expands, at T positions.

    Columns are nodes in drafting order (depth 1's top_k, then top_k × top_k per depth below, each
    depth's children in the order of their parents' scores), the order `dynamic_tree` numbers them in,
    so ties break alike.
    """

    scores: Tensor  # [T, N] cumulative draft log-probability of each node
    depths: Tensor  # [N] depth of each column
    truth: Tensor  # [T, depth] the column of the true token's node at each depth, -1 where it was not drafted
    top_k: int

    @property
    def depth(self) -> int:
        return self.truth.shape[1]


def accepted(expansion: Expansion, nodes: int, depth: int) -> Tensor:
    """Drafts greedy decoding accepts at each position [T] from the tree of `nodes` (root included) and
    `depth` drafted there: the true path's nodes down from depth 1 while each is among the best nodes - 1."""
    if depth > expansion.depth:
        raise ValueError(f"the expansion reaches depth {expansion.depth}, not {depth}")
    T, N = expansion.scores.shape
    keep = expansion.depths <= depth  # [N]
    scores = expansion.scores.masked_fill(~keep, float("-inf"))
    order = torch.sort(-scores, dim=1, stable=True).indices  # [T, N]: best first, ties by column
    place = torch.empty_like(order)
    place.scatter_(1, order, torch.arange(N).expand(T, N))  # place[t, c]: c's position in the order
    truth = expansion.truth[:, :depth]  # [T, depth]
    chosen = (truth >= 0) & (place.gather(1, truth.clamp(min=0)) < nodes - 1)  # [T, depth]
    return chosen.long().cumprod(dim=1).sum(dim=1)  # leading run of chosen true nodes
