"""EAGLE decoders: a one-layer draft model over the base model's features, drafting the tree level by level.

Each step (see heads/eagle.py for the draft model):

1. *Catch up.* The draft's KV cache holds one row per context position t, (feature_t,
   token_{t+1}). The rows still missing (the accepted path's, whose base features the verify
   step just produced, `Proposer.observe`) plus the root's row go through the draft in one
   forward; the root row's output drafts depth 1.
2. *Levels.* A node's children come from the draft run on that node's row: (its parent's output,
   its token) at position prefix + depth - 1, attending to the context rows and its ancestors'
   rows (a tree mask over the draft's cache), one batched forward per depth.
   - static (`eagle`: EAGLE-1): the nodes of a fixed tree (`--tree`), like Hydra's levels;
   - dynamic (`eagle2`, and `eagle3` by default: EAGLE-2's trees): at each depth the
     `--eagle-top-k` best nodes by cumulative draft log-probability are expanded (top-k
     children each); after the last depth the best n - 1 nodes of all drafted become the tree.
     n and the depth are those of `--tree`, so with `--tree auto` they are the optimiser's
     choice for this machine (its measured step times): a dynamic tree sized for the hardware.
3. *Roll back.* The tree's rows leave the draft cache (crop to the context rows): the next step
   feeds the accepted tokens' true base features instead, as the reference does.

The verify step, acceptance and KV bookkeeping of the base are the shared loop's (`spec.py`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from transformers import DynamicCache

from medusa_bench.decoders.base import TreeSizing
from medusa_bench.decoders.drafting import ContextRows, HeadsProposer, find_heads, tree_decoder
from medusa_bench.decoders.options import DecoderOptions, Option, declare, within
from medusa_bench.decoders.registry import register
from medusa_bench.decoders.spec import Draft, SpeculativeDecoder
from medusa_bench.errors import UserError
from medusa_bench.heads.common import apply_draft_vocab
from medusa_bench.runtime.cache import crop_cache
from medusa_bench.trees.dynamic import DynamicKnobs, Expansion
from medusa_bench.trees.levels import level_plan
from medusa_bench.trees.tree import Tree, TreeBuffers


class EagleProposer(HeadsProposer):
    """EAGLE heads → the tokens of `tree`, or (`dynamic`) an EAGLE-2 tree as large and as deep as `tree`."""

    def __init__(self, heads, tree: Tree, device: torch.device, dynamic: bool = True, top_k: int = 8):
        super().__init__(heads, tree, device)
        self.feature_layers = heads.feature_layers  # (-1,): the final normed state; EAGLE-3: three layers
        self.plan = level_plan(self.buffers)
        # each node's ancestors and itself (the tree mask's rows), for the static tree's level masks
        self.ancestors = {v: set(row.nonzero().flatten().tolist()) for v, row in enumerate(self.buffers.attn_mask)}
        self.dynamic_trees = dynamic  # the mode asked for (bench/audit.py), whatever the tree
        self.dynamic = dynamic and tree.num_nodes > 1
        self.top_k = max(1, min(top_k, tree.num_nodes - 1))
        self.depth = tree.depth
        self.rows = ContextRows()
        self.reset([])

    # ------------------------------------------------------------------ the draft's context rows

    def reset(self, prompt_ids: list[int]) -> None:
        self.cache = DynamicCache()  # row t = (feature_t, token_{t+1}) for the context rows fed
        self.rows.reset()

    @property
    def fed(self) -> int:
        """Context rows in the draft cache."""
        return self.rows.fed

    def observe(self, rows: Tensor) -> None:
        self.rows.observe(rows)

    def rewind(self, length: int) -> None:
        """Back to `length` context tokens: rows 0 … length - 2 stay (row length - 1 paired the old root)."""
        self.rows.rewind(length, lambda keep: crop_cache(self.cache, keep))

    def catch_up(self, root: int, hidden: Tensor, context: list[int]) -> Tensor:
        """Feed the missing context rows and the root's row; the root row's output g [H] (drafts depth 1)."""
        start = self.rows.fed
        features = self.rows.take(len(context), hidden, "EAGLE draft cache")  # [q, W]
        q, device = features.shape[0], features.device
        tokens = torch.tensor(context[start + 1:] + [root], device=device)  # [q]: each row's next token
        positions = torch.arange(start, start + q, device=device)  # [q]
        allowed = None
        if q > 1:  # causal over the new rows, everything before them
            allowed = torch.ones(q, start + q, dtype=torch.bool, device=device)
            allowed[:, start:] = torch.ones(q, q, dtype=torch.bool, device=device).tril()
        return self.heads.step(features, tokens, positions, self.cache, allowed)[-1]

    # ------------------------------------------------------------------ drafting

    @torch.no_grad()
    def propose(self, root: int, hidden: Optional[Tensor], context: list[int]) -> Optional[Draft]:
        g_root = self.catch_up(root, hidden, context)
        try:
            if self.dynamic:
                return self.dynamic_tree(root, g_root)
            return Draft(self.static_tree(root, g_root), self.buffers)
        finally:
            crop_cache(self.cache, self.fed)  # the tree's rows go: the next step feeds true features

    def tree_rows(self, nodes: list[int], parents: list[int], tokens: Tensor, outputs: dict, cached: list[int],
                  ancestors: dict, depth: int) -> Tensor:
        """One draft forward over `nodes` (all at `depth`): rows (parent's output, own token), each
        attending to the context rows, its cached ancestors and itself. Returns their outputs [m, H]."""
        device = tokens.device
        m = len(nodes)
        features = torch.stack([outputs[parents[v]] for v in nodes])  # [m, H]
        keys = cached + nodes
        tree_part = torch.tensor([[k in ancestors[v] for k in keys] for v in nodes], dtype=torch.bool, device=device)
        allowed = torch.cat([torch.ones(m, self.fed, dtype=torch.bool, device=device), tree_part], dim=1)
        positions = torch.full((m,), self.fed - 1 + depth, device=device)
        g = self.heads.step(features, tokens[nodes], positions, self.cache, allowed)  # [m, H]
        cached.extend(nodes)
        for v, row in zip(nodes, g):
            outputs[v] = row
        return g

    def static_tree(self, root: int, g_root: Tensor) -> Tensor:
        """The fixed tree's tokens [n]: depth d's children from the draft run on depth d - 1's rows."""
        buffers = self.buffers
        tokens = torch.empty(buffers.num_nodes, dtype=torch.long, device=g_root.device)  # [n]
        tokens[0] = root
        parents = buffers.parents.tolist()
        outputs, cached = {0: g_root}, []
        for depth, level in enumerate(self.plan, start=1):
            expanding = buffers.levels[depth - 1][level.expand].tolist()  # parents with children
            if depth > 1:
                self.tree_rows(expanding, parents, tokens, outputs, cached, self.ancestors, depth - 1)
            g = torch.stack([outputs[v] for v in expanding])  # [m, H]
            top = self.heads.draft_topk(g, level.top_k)  # [m, k]
            tokens[level.nodes] = top[level.parent_row, level.rank]
        return tokens

    def dynamic_tree(self, root: int, g_root: Tensor) -> Draft:
        """EAGLE-2: expand the best `top_k` nodes per depth, keep the best n - 1 by cumulative log-probability."""
        device = g_root.device
        k, n = self.top_k, self.tree.num_nodes
        parents, scores, depths = [-1], [0.0], [0]
        token_list = [root]
        ancestors = {0: {0}}
        outputs, cached = {0: g_root}, []
        frontier = [0]
        for depth in range(1, self.depth + 1):
            if depth > 1:
                tokens = torch.tensor(token_list, device=device)
                self.tree_rows(frontier, parents, tokens, outputs, cached, ancestors, depth - 1)
            ids, logp = self.heads.draft_top(torch.stack([outputs[v] for v in frontier]), k)  # [m, k] each
            cumulative = (torch.tensor([scores[v] for v in frontier], device=device)[:, None] + logp.clamp(max=0)).tolist()
            children = []
            for row, parent in enumerate(frontier):
                for j, token in enumerate(ids[row].tolist()):
                    node = len(parents)
                    parents.append(parent)
                    scores.append(cumulative[row][j])
                    depths.append(depth)
                    token_list.append(token)
                    ancestors[node] = ancestors[parent] | {node}
                    children.append(node)
            frontier = sorted(children, key=lambda v: (-scores[v], v))[:k]
        # the best n - 1 drafted nodes; a child never outscores its parent and sorts after it, so the set is a tree
        chosen = sorted(sorted(range(1, len(parents)), key=lambda v: (-scores[v], v))[: n - 1])
        index = {0: 0, **{v: i + 1 for i, v in enumerate(chosen)}}
        order = [0] + chosen
        buffers = TreeBuffers.from_parents([-1] + [index[parents[v]] for v in chosen], device=device)
        return Draft(torch.tensor([token_list[v] for v in order], device=device), buffers)

    @torch.no_grad()
    def expansion(self, hidden: Tensor, tokens: Tensor, positions: Tensor, depth: int, top_k: int) -> Expansion:
        """Calibration of dynamic trees: `dynamic_tree`'s drafting at every position of one known sequence
        at once, each on its true context, every node kept (trees/dynamic.py reads any tree size off it).

        hidden [S, W] base features, tokens [S], positions [T] (position t drafts under the root
        tokens[t + 1], as `calibrate.rank_table` numbers them). Per depth one draft forward over all
        positions' frontiers (T × top_k rows): each row sees its context rows 0 … t, its frontier
        ancestors and itself, at position t + its depth, exactly the rows `tree_rows` gives it.
        """
        heads, K = self.heads, top_k
        S, T, device = tokens.shape[0], positions.shape[0], tokens.device
        cache = DynamicCache()
        rows = torch.arange(S - 1, device=device)
        context = heads.step(hidden[: S - 1].to(heads.dtype), tokens[1:], rows, cache, rows[:, None] >= rows[None, :])
        visible = rows[None, :] <= positions[:, None]  # [T, S - 1]: the context rows each position sees

        def truth(d: int) -> Tensor:  # [T] the true token at depth d (-1 past the end)
            at = positions + 1 + d
            return torch.where(at < S, tokens[at.clamp(max=S - 1)], -1)

        def true_column(ids: Tensor, parent_rank: Optional[Tensor], d: int) -> Tensor:
            """Column (within this depth's [T, m·K] block) of the true node, -1 if not drafted."""
            hit = ids == truth(d)[:, None, None]  # [T, m, K]
            if parent_rank is not None:  # only the children of the true parent, if it was expanded
                hit &= torch.arange(ids.shape[1], device=device)[None, :, None] == parent_rank[:, None, None]
            hit = hit.flatten(1)
            return torch.where(hit.any(1), hit.float().argmax(1), -1)

        ids, logp = heads.draft_top(context[positions], K)  # [T, K]: depth 1, under the root
        level_scores, level_ids = logp.clamp(max=0), ids
        all_scores, all_depths, truths = [level_scores], [1] * K, [true_column(ids[:, None], None, 1)]
        outputs = context[positions][:, None]  # [T, 1, H]: the root's output, parent of depth 1
        parent_of = torch.zeros(T, K, dtype=torch.long, device=device)  # each node's parent, a row of `outputs`
        ancestors = torch.empty(T, K, 0, dtype=torch.long, device=device)  # cache rows of frontier ancestors
        tree_start = S - 1
        for d in range(2, depth + 1):
            frontier = torch.sort(-level_scores, dim=1, stable=True).indices[:, :K]  # [T, K] columns of depth d - 1
            parents = parent_of.gather(1, frontier)  # [T, K]
            features = outputs.gather(1, parents[..., None].expand(-1, -1, outputs.shape[-1]))  # [T, K, H]
            own_rows = tree_start + (d - 2) * T * K + torch.arange(T * K, device=device).view(T, K)  # [T, K]
            if d > 2:
                ancestors = torch.cat([ancestors.gather(1, parents[..., None].expand(-1, -1, ancestors.shape[-1])),
                                       previous_rows.gather(1, parents)[..., None]], dim=2)
            past = tree_start + (d - 2) * T * K
            allowed = torch.zeros(T, K, past + T * K, dtype=torch.bool, device=device)
            allowed[..., : S - 1] = visible[:, None]
            allowed.scatter_(2, torch.cat([ancestors, own_rows[..., None]], dim=2), True)
            pos = (positions + d - 1)[:, None].expand(T, K).reshape(-1)
            out = heads.step(features.reshape(T * K, -1), level_ids.gather(1, frontier).reshape(-1), pos, cache,
                             allowed.view(T * K, -1)).view(T, K, -1)  # [T, K, H]
            expanded = frontier == truths[-1][:, None]  # [T, K]: the true node of depth d - 1, if in the frontier
            true_rank = torch.where(expanded.any(1), expanded.float().argmax(1), -1)
            ids, logp = heads.draft_top(out.reshape(T * K, -1), K)
            ids, logp = ids.view(T, K, K), logp.view(T, K, K)
            parent_scores = level_scores.gather(1, frontier)  # [T, K]
            level_scores = (parent_scores[..., None] + logp.clamp(max=0)).flatten(1)  # [T, K·K]
            level_ids = ids.flatten(1)
            truths.append(torch.where(true_rank >= 0, true_column(ids, true_rank, d), -1))
            outputs, previous_rows = out, own_rows
            parent_of = torch.arange(K, device=device).repeat_interleave(K)[None].expand(T, -1)  # [T, K·K]
            all_scores.append(level_scores)
            all_depths += [d] * (K * K)
        offsets, truth_columns = 0, []
        for block, column in zip(all_scores, truths):  # level columns → expansion columns
            truth_columns.append(torch.where(column >= 0, column + offsets, -1))
            offsets += block.shape[1]
        return Expansion(torch.cat(all_scores, dim=1).float().cpu(), torch.tensor(all_depths),
                         torch.stack(truth_columns, dim=1).cpu(), K)

    def true_ranks(self, hidden: Tensor, tokens: Tensor, positions: Tensor, depth: int, top_k: int = 10) -> Tensor:
        """Calibration: the draft chained along the true tokens (its own outputs as features below depth 1)."""
        return self.heads.true_ranks(hidden, tokens, positions, depth, top_k)


declare(
    Option("eagle_heads", None, "EAGLE-1/2 heads folder or Hub id, for eagle and eagle2 (default: the heads shipped for the model)."),
    Option("eagle3_heads", None, "EAGLE-3 heads folder or Hub id (default: the heads shipped for the model)."),
    Option("eagle3_tree", "dynamic", "eagle3's trees: dynamic (as eagle2) | static (--tree itself).",
           check=lambda v: None if v in ("dynamic", "static") else f"--eagle3-tree must be dynamic or static, got {v!r}"),
    Option("eagle_top_k", 8, "Dynamic EAGLE trees (eagle2, eagle3): nodes expanded per depth, children drafted per node.",
           check=within(1, 64, integer=True)),
    Option("eagle_depth", 5, "EAGLE: the deepest draft (the depth --tree auto calibrates and searches to).",
           check=within(1, 16, integer=True)),
)


def eagle_decoder(name: str, loaded, options: DecoderOptions, path, dynamic: bool) -> SpeculativeDecoder:
    """`name` drafting with the EAGLE heads at `path`: on `--tree` itself, or (`dynamic`) on EAGLE-2 trees
    of as many nodes and as deep as `--tree` (with `auto`: the optimiser's choice for this machine)."""
    from medusa_bench.heads.eagle import load_eagle_heads

    heads = load_eagle_heads(path, base_model=loaded.model)
    heads.depth = options.eagle_depth
    knobs = DynamicKnobs.parse(options.tree)  # `dynamic-n16-d5-k4`: the dynamic tree's own knobs (--tree auto's choice)
    if knobs is not None:
        if not dynamic:
            raise UserError(f"{name} drafts on the static tree --tree; {knobs.name} sizes a dynamic one: use eagle2, "
                            "or eagle3 with --eagle3-tree dynamic")
        options = options.replace(tree=knobs.tree(), eagle_top_k=knobs.top_k)
        heads.depth = max(heads.depth, knobs.depth)
    if heads.variant == "eagle":
        apply_draft_vocab(heads, path, options.draft_vocab)
    elif options.draft_vocab > 0:
        raise UserError("EAGLE-3 heads draft among their own vocabulary (d2t): leave --draft-vocab at its default")

    def make_proposer(tree: Tree) -> EagleProposer:  # the optimiser sizes static trees, eagle and eagle2 alike
        return EagleProposer(heads, tree, loaded.device, dynamic=False)

    def proposer(tree: Tree) -> EagleProposer:
        return EagleProposer(heads, tree, loaded.device, dynamic=dynamic, top_k=options.eagle_top_k)

    def dynamic_proposer(knobs: DynamicKnobs) -> EagleProposer:  # the optimiser sizes dynamic trees by their knobs
        heads.depth = max(heads.depth, knobs.depth)
        return EagleProposer(heads, knobs.tree(), loaded.device, dynamic=True, top_k=knobs.top_k)

    sizing = TreeSizing(make_proposer, heads.depth, heads.variant, path,  # eagle and eagle2 share static tables
                        dynamic=dynamic_proposer if dynamic else None)
    return tree_decoder(name, loaded, options, sizing, proposer)


@register("eagle", heads=("eagle_heads", "eagle"), tree=True)
def build_eagle(loaded, options: DecoderOptions):
    """EAGLE-1: EAGLE-1/2 heads on the static tree `--tree`, the same tree Medusa and Hydra draft."""
    return eagle_decoder("eagle", loaded, options, find_heads(options.eagle_heads, loaded, "eagle", "--eagle-heads"), False)


@register("eagle2", heads=("eagle_heads", "eagle"), tree=True)
def build_eagle2(loaded, options: DecoderOptions):
    """EAGLE-2: the same heads on dynamic trees."""
    return eagle_decoder("eagle2", loaded, options, find_heads(options.eagle_heads, loaded, "eagle", "--eagle-heads"), True)


@register("eagle3", heads=("eagle3_heads", "eagle3"), tree=True)
def build_eagle3(loaded, options: DecoderOptions):
    """EAGLE-3 heads, on dynamic trees (`--eagle3-tree static`: on `--tree` itself)."""
    path = find_heads(options.eagle3_heads, loaded, "eagle3", "--eagle3-heads")
    return eagle_decoder("eagle3", loaded, options, path, options.eagle3_tree == "dynamic")
