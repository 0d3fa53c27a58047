"""Hydra decoder: the tree is drafted level by level, each head seeing the tokens chosen above it.

Depth d + 1 of the tree comes from one batched call of head d over every node of depth d that
has children: row i is [h, E(root), E(t_1), …, E(t_d)] along that node's path; the top-k of
each row, picked by the children's ranks, become the tokens of depth d + 1 and extend their
parents' rows by one embedding. Then the shared verify loop (`spec.py`) checks the tree.

Hydra++ (`prefix-mlp`) heads read h through a prefix layer that attends over the hidden states
of every accepted token: the loop hands the proposer those rows (`Proposer.observe`: the prompt's
after prefill, the accepted path's after each step) and the layer takes them in incrementally.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from transformers import DynamicCache

from medusa_bench.decoders.drafting import ContextRows, HeadsProposer, find_heads, heads_decoder
from medusa_bench.decoders.options import DecoderOptions, Option, declare
from medusa_bench.decoders.registry import register
from medusa_bench.decoders.spec import Draft
from medusa_bench.runtime.cache import crop_cache
from medusa_bench.trees.levels import Level, level_plan
from medusa_bench.trees.tree import Tree


@torch.no_grad()
def draft_tree(heads, plan: list[Level], state: Tensor, root: int, num_nodes: int) -> Tensor:
    """The tree's tokens [n] (tokens[0] = root): one batched head call per depth.

    `state` [H] is the heads' input state at the accepted node (the base hidden state, or the
    prefix layer's output for Hydra++).
    """
    tokens = torch.empty(num_nodes, dtype=torch.long, device=state.device)  # [n]
    tokens[0] = root
    x = heads.root_inputs(state[None], tokens[:1])  # [1, W]: the root's path
    for level in plan:
        top = heads.draft_topk(x[level.expand], level.top_k, head=level.head)  # [m, k]
        children = top[level.parent_row, level.rank]  # [c]
        tokens[level.nodes] = children
        x = heads.extend(x[level.parent], children)  # [c, W + H]: each child's path
    return tokens


class HydraProposer(HeadsProposer):
    """Hydra heads → the tree's tokens, drafted level by level."""

    def __init__(self, heads, tree: Tree, device: torch.device):
        super().__init__(heads, tree, device)
        self.plan = level_plan(self.buffers)
        self.prefix = PrefixTracker(heads) if heads.prefix is not None else None

    def reset(self, prompt_ids: list[int]) -> None:
        if self.prefix is not None:
            self.prefix.reset()

    def propose(self, root: int, hidden: Optional[Tensor], context: list[int]) -> Optional[Draft]:
        state = hidden if self.prefix is None else self.prefix.advance(context, hidden)
        tokens = draft_tree(self.heads, self.plan, state.to(self.heads.dtype), root, self.tree.num_nodes)
        return Draft(tokens, self.buffers)

    def observe(self, rows: Tensor) -> None:
        if self.prefix is not None:
            self.prefix.observe(rows)

    def rewind(self, length: int) -> None:
        if self.prefix is not None:
            self.prefix.rewind(length)

    def true_ranks(self, hidden: Tensor, tokens: Tensor, positions: Tensor, depth: int, top_k: int = 0) -> Tensor:
        """Calibration (bench/calibrate.py): rank of each true token given that the path above was accepted.

        hidden [S, H]: the base model's last hidden states over one sequence; tokens [S]: its
        tokens, taken as the truth; positions [T]. Returns LongTensor [T, depth]: [i, d - 1] is
        the rank of tokens[t + 1 + d] among head d - 1's candidates at t = positions[i], drafted
        under the root tokens[t + 1] and the true tokens between; 0 = top-1; -1 past the end.
        """
        return self.heads.true_ranks(hidden, tokens, positions, depth)


class PrefixTracker:
    """Runs the Hydra++ prefix layer over the hidden states of every accepted token, incrementally."""

    def __init__(self, heads):
        self.heads = heads
        self.rows = ContextRows()
        self.reset()

    def reset(self) -> None:
        self.cache = DynamicCache()
        self.rows.reset()

    def observe(self, rows: Tensor) -> None:
        self.rows.observe(rows)

    def rewind(self, length: int) -> None:
        self.rows.rewind(length, lambda keep: crop_cache(self.cache, keep))

    def advance(self, context: list[int], hidden: Tensor) -> Tensor:
        """Feed the rows observed since the last call; the layer's output at the newest one [H]."""
        start = self.rows.fed
        new = self.rows.take(len(context), hidden, "Hydra++ prefix layer")  # [q, H]
        positions = torch.arange(start, start + new.shape[0], device=new.device)[None]  # [1, q]
        states = self.heads.prefix_states(new[None].to(self.heads.dtype), self.cache, positions)  # [1, q, H]
        return states[0, -1]


declare(Option("hydra_heads", None, "Hydra heads folder (default: the heads shipped for the model)."))


@register("hydra", heads=("hydra_heads", "hydra"), tree=True)
def build_hydra(loaded, options: DecoderOptions):
    from medusa_bench.heads.hydra import load_hydra_heads

    path = find_heads(options.hydra_heads, loaded, "hydra", "--hydra-heads")
    return heads_decoder("hydra", loaded, load_hydra_heads(path, base_model=loaded.model), path, HydraProposer, options,
                         draft_vocab=options.draft_vocab)
