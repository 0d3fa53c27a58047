"""Token Recycling (`recycling`): draft from an adjacency matrix of each token's recent top-k successors.

Luo et al., 2024, "Turning Trash into Treasure: Accelerating Inference of Large Language Models
with Token Recycling" (arXiv 2408.08696). An adjacency matrix [V, k] (k = 8, the paper's) holds
for each token the top-k next tokens the base model gave it last time it was in a verify
forward: after every forward, each verified node's row (accepted or not: the candidates the
paper "recycles") replaces its token's row (`Proposer.observe_logits`, the loop's one extension
for this decoder). The draft is a static tree template filled breadth-first from the root: a
node at rank r under a parent carrying token t drafts M[t, r]; a parent whose token has no row
yet drafts nothing under it. The matrix is kept across generations (the paper's hot start).

What differs from the paper:
- the template is not the paper's hand-tuned 80-node tree but the `recycling_nodes` (80) most
  probable rank paths under a per-rank prior of our own (rank 0 about 0.45, falling to 0.01
  at rank 7), breadth of up to k per node, built best-first (parents before children);
- on a CPU an 80-node verify costs about 4 one-token steps, so by default each step drafts only
  the template's nodes that pay: acceptance per (depth, rank) is learned from outcomes (shrunk
  toward the prior, kept across generations; every filled template node is scored against the
  tokens the base model chose, drafted or not, so plain steps teach it too) and weighed against prompt lookup's step-time
  profile (decoders/pld.py `choose_nodes`; `register(step_profile=...)`), possibly none;
  `DecoderOptions(extra={"recycling_adaptive": False})` drafts the whole template, as the paper;
- the matrix starts empty (the paper starts from zeros, i.e. token 0): unknown rows draft nothing.
"""

from __future__ import annotations

import heapq
from typing import Optional

import torch

from medusa_bench.decoders.options import DecoderOptions, Option, declare, within
from medusa_bench.decoders.pld import AcceptanceStats, Candidates, StepCosts, choose_nodes
from medusa_bench.decoders.registry import DraftsWhatPays, register
from medusa_bench.decoders.spec import Draft, Proposer, SpeculativeDecoder
from medusa_bench.trees.tree import TreeBuffers

# P(the rank-r successor is the right one | the parent was): our prior for the template and the policy
RANK_PRIOR = (0.45, 0.12, 0.06, 0.04, 0.03, 0.02, 0.015, 0.01)
DEPTH_CAP = 6  # depths beyond this share one acceptance statistic


# ------------------------------------------------------------------------------ the matrix
class Adjacency:
    """M [V, k]: each token's top-k next tokens from the last forward it was verified in (-1: unknown)."""

    def __init__(self, top_k: int = 8):
        self.top_k = top_k
        self.matrix: Optional[torch.Tensor] = None  # [V, k] long, made at the first update

    def update(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """tokens [n], logits [n, V]: each token's row becomes its logits' top-k (later rows win on repeats)."""
        if self.matrix is None:
            self.matrix = torch.full((logits.shape[-1], self.top_k), -1, dtype=torch.long)
        top = torch.topk(logits.float(), self.top_k, dim=-1).indices.cpu()  # [n, k]
        self.matrix[tokens.cpu()] = top

    def successors(self, tokens: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        """M[tokens, ranks] elementwise; -1 where a token is unknown (or is -1 itself)."""
        if self.matrix is None:
            return torch.full_like(tokens, -1)
        known = tokens >= 0
        out = torch.full_like(tokens, -1)
        out[known] = self.matrix[tokens[known], ranks[known]]
        return out


def template(nodes: int, top_k: int = 8, prior=RANK_PRIOR) -> tuple[list[int], list[int]]:
    """The `nodes` most probable rank paths (probability: the product of the prior of each rank),
    best first: (parents [n + 1] with -1 for the root, ranks [n + 1] with 0 for the root)."""
    parents, ranks = [-1], [0]
    heap = [(-prior[r], r, 0, r) for r in range(top_k)]  # (-probability, order, parent, rank)
    heapq.heapify(heap)
    order = top_k
    while heap and len(parents) <= nodes:
        negative, _, parent, rank = heapq.heappop(heap)
        parents.append(parent)
        ranks.append(rank)
        node = len(parents) - 1
        for r in range(top_k):
            heapq.heappush(heap, (negative * prior[r], order, node, r))
            order += 1
    return parents, ranks


def fill(adjacency: Adjacency, root: int, parents: list[int], ranks: list[int], depths: list[int]) -> torch.Tensor:
    """The template's tokens [n + 1], breadth-first from the root: level by level, one gather each."""
    tokens = torch.full((len(parents),), -1, dtype=torch.long)
    tokens[0] = root
    parent_t, rank_t, depth_t = torch.tensor(parents), torch.tensor(ranks), torch.tensor(depths)
    for depth in range(1, max(depths) + 1):
        level = (depth_t == depth).nonzero().squeeze(1)
        tokens[level] = adjacency.successors(tokens[parent_t[level]], rank_t[level])
    return tokens


class RankStats(AcceptanceStats):
    """P(node accepted | parent accepted) per (depth, rank), shrunk toward the rank prior."""

    @classmethod
    def prior(cls, key: tuple) -> float:
        return RANK_PRIOR[key[1]]


# ------------------------------------------------------------------------------ the proposer
class RecyclingProposer(Proposer):
    """Fills the template from the adjacency matrix; updates the matrix from every verify forward."""

    wants_logits = True

    def __init__(self, nodes: int = 80, top_k: int = 8, adaptive: bool = True,
                 device: torch.device = torch.device("cpu"), profile: Optional[dict] = None):
        self.adjacency = Adjacency(top_k)  # kept across generations (hot start)
        self.parents, self.ranks = template(nodes, top_k)
        self.depths = [0]
        for parent in self.parents[1:]:
            self.depths.append(self.depths[parent] + 1)
        self.children: list[list[int]] = [[] for _ in self.parents]
        for node, parent in enumerate(self.parents[1:], start=1):
            self.children[parent].append(node)
        self.keys = [None] + [(min(d, DEPTH_CAP), r) for d, r in zip(self.depths[1:], self.ranks[1:])]
        self.draft_size = len(self.parents) - 1
        self.adaptive, self.device = adaptive, device
        self.stats = RankStats()  # kept across generations
        self.costs = StepCosts(profile)
        self.pending = None  # (root position, filled template tokens) of the last step, scored when its outcome is known
        self.accepted = 0

    def reset(self, prompt_ids: list[int]) -> None:
        self.pending, self.accepted = None, 0

    def rewind(self, length: int) -> None:
        self.pending, self.accepted = None, 0

    def observe_logits(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        self.adjacency.update(tokens, logits)

    def update(self, accepted: int) -> None:
        self.accepted = accepted

    def propose(self, root: int, hidden: Optional[torch.Tensor], context: list[int]) -> Optional[Draft]:
        self._learn(context + [root])
        tokens = fill(self.adjacency, root, self.parents, self.ranks, self.depths).tolist()
        self.pending = (len(context), tokens)  # the whole filled template is scored, drafted or not
        known = [0] + [i for i in range(1, len(tokens)) if tokens[i] >= 0]  # parents precede children: prefix-closed
        if len(known) == 1:
            return None
        if self.adaptive:
            renumbered = {node: i for i, node in enumerate(known)}
            candidates = Candidates([tokens[n] for n in known], [-1] + [renumbered[self.parents[n]] for n in known[1:]],
                                    [self.keys[n] for n in known])
            chosen = [known[i] for i in choose_nodes(candidates, self.stats, self.costs)]
        else:
            chosen = known[1:]
        if not chosen:
            return None
        renumber = {0: 0, **{node: i for i, node in enumerate(chosen, start=1)}}
        draft_tokens = [root] + [tokens[n] for n in chosen]
        parents = [-1] + [renumber[self.parents[n]] for n in chosen]
        return Draft(torch.tensor(draft_tokens, device=self.device), TreeBuffers.from_parents(parents, device=self.device))

    def _learn(self, truth: list[int]) -> None:
        """Score the last step's filled template against what the base model chose: the accepted tokens
        and the next root (`truth` = context + root). Nodes that were not drafted count too (whether
        they would have been accepted is known as far as the truth goes), so the policy keeps learning
        through plain steps."""
        if self.pending is None:
            return
        root_at, tokens = self.pending
        self.pending = None
        node = 0
        for right in truth[root_at + 1: root_at + 2 + self.accepted]:
            next_node = None
            for child in self.children[node]:
                if tokens[child] >= 0:
                    ok = tokens[child] == right
                    self.stats.record(self.keys[child], ok)
                    next_node = child if ok else next_node
            if next_node is None:
                return
            node = next_node


# ------------------------------------------------------------------------------ the decoder
declare(
    Option("recycling_nodes", 80, "Token Recycling: nodes of the static draft tree template (the paper's about 80).",
           check=within(1, 256, integer=True)),
    Option("recycling_top_k", 8, "Token Recycling: successors kept per token in the adjacency matrix (the paper's k).",
           check=within(1, len(RANK_PRIOR), integer=True)),
)


uses_step_profile = DraftsWhatPays("recycling")


@register("recycling", step_profile=uses_step_profile)
def build_recycling(loaded, options: DecoderOptions):
    """Token Recycling; drafts only the template nodes that pay by `options.extra["step_profile"]`."""
    adaptive = uses_step_profile(options)
    profile = options.extra.get("step_profile") if adaptive else None
    proposer = RecyclingProposer(options.recycling_nodes, options.recycling_top_k, adaptive=adaptive,
                                 device=loaded.device, profile=profile)
    decoder = SpeculativeDecoder("recycling", loaded, proposer)
    decoder.step_profile = profile
    return decoder
