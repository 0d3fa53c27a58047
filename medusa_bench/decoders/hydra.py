"""Hydra decoder: the tree is drafted level by level, each head seeing the tokens chosen above it.

Depth d + 1 of the tree comes from one batched call of head d over every node of depth d that
has children: row i is [h, E(root), E(t_1), …, E(t_d)] along that node's path; the top-k of
each row, picked by the children's ranks, become the tokens of depth d + 1 and extend their
parents' rows by one embedding. Then the shared verify loop (`spec.py`) checks the tree.

Hydra++ (`prefix-mlp`) heads read h through a prefix layer that attends over the hidden states
of every accepted token. The loop hands a proposer only the last accepted node's state, so the
proposer keeps the rows of the last base forward from a forward hook on the base model's final
norm (the same tensor as `hidden_states[-1]`) and feeds the accepted path's rows to its layer.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from transformers import DynamicCache

from medusa_bench.decoders.base import DecoderOptions, register
from medusa_bench.decoders.medusa import acceptance_of, apply_draft_vocab, default_heads, resolve_tree
from medusa_bench.decoders.spec import Draft, Proposer, SpeculativeDecoder
from medusa_bench.errors import UserError
from medusa_bench.trees.tree import Tree, TreeBuffers


# Hydra reads the vocab projection once per depth, so its size costs it more than Medusa (one
# read per step). On smollm2-135m (1 CPU thread) a 3-row projection onto 16384 tokens took 31 ms,
# onto 4096 7 ms; the 4096 most frequent training tokens still held 96% of the drafts accepted
# on 10 MT-Bench questions (tree-16). `--draft-vocab N` overrides it, 0 drafts among all tokens.
DEFAULT_DRAFT_VOCAB = 4096


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
        top = heads.draft_topk(level.head, x[level.expand], level.top_k)  # [m, k]
        children = top[level.parent_row, level.rank]  # [c]
        tokens[level.nodes] = children
        x = heads.extend(x[level.parent], children)  # [c, W + H]: each child's path
    return tokens


class HydraProposer(Proposer):
    """Hydra heads → the tree's tokens, drafted level by level."""

    needs_hidden = True

    def __init__(self, heads, tree: Tree, device: torch.device, base_model=None):
        tree.check_fits(num_heads=heads.num_heads)
        self.heads = heads
        self.tree = tree
        self.buffers = tree.buffers(device)
        self.plan = level_plan(self.buffers)
        self.draft_size = tree.num_nodes - 1
        self.prefix = PrefixTracker(heads, base_model, self.buffers) if heads.prefix is not None else None

    def reset(self, prompt_ids: list[int]) -> None:
        if self.prefix is not None:
            self.prefix.reset()

    def propose(self, root: int, hidden: Optional[Tensor], context: list[int]) -> Optional[Draft]:
        state = hidden if self.prefix is None else self.prefix.advance(context, hidden)
        tokens = draft_tree(self.heads, self.plan, state.to(self.heads.dtype), root, self.tree.num_nodes)
        if self.prefix is not None:
            self.prefix.drafted(tokens)
        return Draft(tokens, self.buffers)

    def update(self, accepted: int) -> None:
        if self.prefix is not None:
            self.prefix.accepted = accepted

    def true_ranks(self, hidden: Tensor, tokens: Tensor, positions: Tensor, depth: int) -> Tensor:
        """Calibration (bench/calibrate.py): rank of each true token given that the path above was accepted.

        hidden [S, H]: the base model's last hidden states over one sequence; tokens [S]: its
        tokens, taken as the truth; positions [T]. Returns LongTensor [T, depth]: [i, d - 1] is
        the rank of tokens[t + 1 + d] among head d - 1's candidates at t = positions[i], drafted
        under the root tokens[t + 1] and the true tokens between; 0 = top-1; -1 past the end.
        """
        return self.heads.true_ranks(hidden, tokens, positions, depth)


class PrefixTracker:
    """Runs the Hydra++ prefix layer over the hidden states of every accepted token, incrementally."""

    def __init__(self, heads, base_model, buffers: TreeBuffers):
        if base_model is None:
            raise UserError("prefix-mlp Hydra heads need the base model (pass base_model to HydraProposer)")
        self.heads = heads
        self.tap = norm_tap(base_model)
        self.children = _children(buffers.parents.tolist())
        self.reset()

    def reset(self) -> None:
        self.cache = DynamicCache()
        self.length = 0  # rows fed so far = tokens whose base hidden state the layer has seen
        self.last_tokens: Optional[Tensor] = None  # the last draft's tokens (read when the next step starts)
        self.accepted = 0

    def drafted(self, tokens: Tensor) -> None:
        self.last_tokens = tokens

    def advance(self, context: list[int], hidden: Tensor) -> Tensor:
        """Feed the rows accepted since the last call; the layer's output at the newest one [H].

        `hidden` [H] is the newest row itself. When the last forward was not this proposer's
        prefill or verify step (the profiler repeats one step on a fixed context), the cache is
        cut back to the context and only that row is fed: the cost of a step, not its states.
        """
        rows = self.tap.rows  # [q, H] of the last base forward
        if self.last_tokens is None and rows is not None and rows.shape[0] == len(context):
            new = rows  # the prefill: every prompt row
        elif self.last_tokens is not None and len(context) == self.length + self.accepted + 1:
            new = rows[self._path(context[self.length:])]  # the accepted path's rows [a + 1, H]
        else:
            self.cache.crop(len(context) - 1)
            self.length = len(context) - 1
            new = hidden[None]
        positions = torch.arange(self.length, self.length + new.shape[0], device=new.device)[None]  # [1, q]
        states = self.heads.prefix_states(new[None].to(self.heads.dtype), self.cache, positions)  # [1, q, H]
        self.length += new.shape[0]
        return states[0, -1]

    def _path(self, emitted: list[int]) -> Tensor:
        """Node indices of the accepted path, found by walking the drafted tree along the emitted tokens."""
        drafted = self.last_tokens.tolist()

        def walk(node: int, rest: list[int]) -> Optional[list[int]]:
            if not rest:
                return [node]
            for child in self.children.get(node, []):
                tail = walk(child, rest[1:]) if drafted[child] == rest[0] else None
                if tail is not None:
                    return [node] + tail
            return None

        path = walk(0, emitted[1:])
        if path is None:
            raise RuntimeError(f"the emitted tokens {emitted} are not a path of the last draft")
        return torch.tensor(path, device=self.tap.rows.device)


class NormTap:
    """Keeps the last output of the base model's final norm: the hidden states of the last forward's rows."""

    def __init__(self, model):
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        norm = getattr(decoder, "norm", None)
        if norm is None:
            raise UserError("prefix-mlp Hydra heads need a base model whose decoder ends in a `norm` layer "
                            "(llama-style); use mlp heads with this model")
        self.rows: Optional[Tensor] = None
        norm.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.rows = output[0]  # [q, H], batch row 0


_TAPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def norm_tap(model) -> NormTap:
    """One tap per base model, shared by every Hydra++ decoder on it."""
    if model not in _TAPS:
        _TAPS[model] = NormTap(model)
    return _TAPS[model]


def _children(parents: list[int]) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(parents):
        if parent >= 0:
            children.setdefault(parent, []).append(node)
    return children


@register("hydra")
def build_hydra(loaded, options: DecoderOptions):
    from medusa_bench.heads.hydra import load_hydra_heads
    from medusa_bench.heads.medusa import read_draft_vocab

    path = options.hydra_heads or default_heads(loaded, "hydra")
    if path is None:
        raise UserError(f"the hydra decoder needs heads: pass --hydra-heads PATH (no default heads ship for {loaded.name}); "
                        "train some with `medusa-bench train hydra`")
    heads = load_hydra_heads(path, base_model=loaded.model)
    size = options.draft_vocab
    if size < 0 and read_draft_vocab(path) is not None:
        size = DEFAULT_DRAFT_VOCAB
    apply_draft_vocab(heads, path, size)

    def make_proposer(tree: Tree) -> HydraProposer:
        return HydraProposer(heads, tree, loaded.device, base_model=loaded.model)

    tree, auto = resolve_tree(options, heads.num_heads, loaded, make_proposer, path, kind="hydra")
    decoder = SpeculativeDecoder("hydra", loaded, make_proposer(tree), acceptance_of(options))
    decoder.autotree = auto  # the run folder keeps the optimiser's tables
    return decoder
