"""Suffix decoding (`suffix`): a frequency-scored draft tree from suffix trees of this and earlier outputs.

Oliaro et al., 2024, "SuffixDecoding: Extreme Speculative Decoding for Emerging AI Applications"
(arXiv 2411.04975); defaults as vLLM / ArcticInference ship them. Two suffix trees, each a trie of
every suffix cut to `suffix_max_depth` (24) tokens with occurrence counts: a per-request one over
the prompt and the answer so far (extended as tokens are emitted, O(depth) per token), and a
global one over the earlier answers this decoder produced (kept across generations; an answer
enters it when the next generation starts). Each step, for every pattern length p (the last p
tokens of the context, root included) found in a tree, a draft tree grows greedily from the
pattern's node: the candidate with the highest score, the product of the empirical probabilities
count(child) / count(parent) along its path, is added next, while its score is at least
`suffix_min_prob` (0.1) and the tree holds fewer than min(`suffix_max_nodes`, `suffix_spec_factor`
(1.0) · p) nodes; of all these trees the one with the highest total score (expected accepted
tokens) is drafted (`TreeBuffers.from_parents`) and verified by the shared loop.

What differs from the paper / ArcticInference:
- `suffix_max_nodes` (24, vLLM's default of num_speculative_tokens = max tree depth) caps the tree;
- on a CPU a larger verify step costs more, so by default the drafted nodes are the best-scoring
  prefix (scores fall along a path, so any prefix is a tree) that maximises expected tokens per
  second against prompt lookup's step-time profile (decoders/pld.py `StepCosts`; the bench layer
  measures it, `register(step_profile=...)`), possibly none (a plain step); the scores are the
  raw frequency estimates, not learned acceptance rates. `DecoderOptions(extra={"suffix_adaptive":
  False})` drafts the whole tree as the paper does;
- the global tree keeps every earlier answer of this decoder (no eviction of old requests, the
  paper's `max_cached_requests`), and holds answers only (their prompts are in the per-request tree).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Optional

import torch

from medusa_bench.decoders.options import DecoderOptions, Option, declare, within
from medusa_bench.decoders.pld import StepCosts
from medusa_bench.decoders.registry import DraftsWhatPays, register
from medusa_bench.decoders.spec import Draft, Proposer, SpeculativeDecoder
from medusa_bench.trees.tree import TreeBuffers


# ------------------------------------------------------------------------------ the suffix tree
class SuffixTrie:
    """A trie of every suffix of the texts added, each cut to `max_depth` tokens, with counts.

    `count[node]`: how often the node's path occurs in the texts (the root: how many tokens).
    `append(token)` extends the current text; `add_text(tokens)` adds a separate text.
    """

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self.children: list[dict[int, int]] = [{}]
        self.count: list[int] = [0]
        self.active: list[int] = []  # nodes of the current text's last suffixes, depth 1, 2, … (< max_depth)

    def append(self, token: int) -> None:
        extended = []
        for node in [0] + self.active:  # every suffix of the current text grows by `token`
            child = self.children[node].get(token)
            if child is None:
                child = len(self.children)
                self.children.append({})
                self.count.append(0)
                self.children[node][token] = child
            self.count[child] += 1
            extended.append(child)
        self.count[0] += 1
        self.active = extended[:self.max_depth - 1]

    def extend(self, tokens) -> None:
        for token in tokens:
            self.append(token)

    def add_text(self, tokens) -> None:
        """A text of its own: no suffix runs from the text before into it."""
        self.active = []
        self.extend(tokens)
        self.active = []

    def find(self, pattern) -> Optional[int]:
        """The node whose path is `pattern`, or None."""
        node = 0
        for token in pattern:
            node = self.children[node].get(token)
            if node is None:
                return None
        return node


@dataclass
class SpecTree:
    """A draft tree grown from one pattern: nodes in the order added (parents first, scores falling)."""

    tokens: list[int]  # [m] drafted tokens (root excluded)
    parents: list[int]  # [m] parent index into the draft, -1 for the root
    scores: list[float]  # [m] product of the empirical probabilities along the path

    @property
    def score(self) -> float:
        return sum(self.scores)


def grow(trie: SuffixTrie, start: int, budget: int, min_prob: float) -> SpecTree:
    """Best-first from `start`: add the highest-scoring child of the tree so far while it scores ≥ min_prob."""
    tree = SpecTree([], [], [])
    heap: list[tuple[float, int, int, int, int]] = []  # (-score, order, trie node, token, parent in the draft)
    order = itertools.count()  # ties: the earlier offered first

    def offer(node: int, parent: int, score: float) -> None:
        total = trie.count[node]
        for token, child in trie.children[node].items():
            p = score * trie.count[child] / total
            if p >= min_prob:
                heapq.heappush(heap, (-p, next(order), child, token, parent))

    offer(start, -1, 1.0)
    while heap and len(tree.tokens) < budget:
        negative, _, node, token, parent = heapq.heappop(heap)
        tree.tokens.append(token)
        tree.parents.append(parent)
        tree.scores.append(-negative)
        offer(node, len(tree.tokens) - 1, -negative)
    return tree


def best_tree(tries: list[SuffixTrie], context: list[int], max_nodes: int, factor: float, min_prob: float) -> SpecTree:
    """Over both tries and every pattern length p found: the tree with the highest total score."""
    best = SpecTree([], [], [])
    for trie in tries:
        for p in range(1, min(trie.max_depth - 1, len(context)) + 1):
            node = trie.find(context[-p:])
            if node is None:  # a longer suffix is no substring either
                break
            budget = min(max_nodes, int(factor * p))
            if budget < 1 or not trie.children[node]:
                continue
            tree = grow(trie, node, budget, min_prob)
            if tree.score > best.score:
                best = tree
    return best


def choose_prefix(tree: SpecTree, costs: StepCosts, margin: float = 1.02) -> int:
    """How many of the tree's nodes (in the order added) maximise expected tokens per unit of time (0: none)."""
    best, best_rate, expected, depths, deepest = 0, margin, 1.0, [], 0
    for m, (parent, score) in enumerate(zip(tree.parents, tree.scores), start=1):
        depths.append(1 if parent == -1 else depths[parent] + 1)
        deepest = max(deepest, depths[-1])
        expected += score
        rate = expected / costs.relative(m + 1, chain=deepest == m)
        if rate > best_rate:
            best, best_rate = m, rate
    return best


def draft_under(root: int, tree: SpecTree, costs: Optional[StepCosts], device) -> Optional[Draft]:
    """The Draft of `tree`'s first nodes under `root`: as many as pay by `costs` (all with None); None if none."""
    m = choose_prefix(tree, costs) if costs is not None else len(tree.tokens)
    if m == 0:
        return None
    tokens = [root] + tree.tokens[:m]
    parents = [-1] + [parent + 1 for parent in tree.parents[:m]]
    return Draft(torch.tensor(tokens, device=device), TreeBuffers.from_parents(parents, device=device))


# ------------------------------------------------------------------------------ the proposer
class SuffixProposer(Proposer):
    """Drafts the best frequency-scored tree from the per-request and the global suffix trees."""

    def __init__(self, max_depth: int = 24, max_nodes: int = 24, factor: float = 1.0, min_prob: float = 0.1,
                 adaptive: bool = True, device: torch.device = torch.device("cpu"), profile: Optional[dict] = None):
        self.max_depth, self.max_nodes, self.factor, self.min_prob = max_depth, max_nodes, factor, min_prob
        self.adaptive, self.device = adaptive, device
        self.draft_size = max_nodes
        self.costs = StepCosts(profile)
        self.global_trie = SuffixTrie(max_depth)  # earlier answers: kept across generations
        self.prompt_length = 0
        self.tokens: list[int] = []
        self.local = SuffixTrie(max_depth)

    def reset(self, prompt_ids: list[int]) -> None:
        answer = self.tokens[self.prompt_length:]
        if answer:  # the last generation's answer joins the global tree
            self.global_trie.add_text(answer)
        self.prompt_length = len(prompt_ids)
        self._index(list(prompt_ids))

    def _index(self, tokens: list[int]) -> None:
        self.tokens = []
        self.local = SuffixTrie(self.max_depth)
        self._extend(tokens)

    def _extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)
        self.local.extend(tokens)

    def rewind(self, length: int) -> None:
        self._index(self.tokens[:length])

    def propose(self, root: int, hidden: Optional[torch.Tensor], context: list[int]) -> Optional[Draft]:
        if len(context) < len(self.tokens) or context[:len(self.tokens)] != self.tokens:
            self._index(list(context))  # a context we did not see grow: start over
        self._extend(context[len(self.tokens):] + [root])
        tree = best_tree([self.local, self.global_trie], self.tokens, self.max_nodes, self.factor, self.min_prob)
        return draft_under(root, tree, self.costs if self.adaptive else None, self.device)


# ------------------------------------------------------------------------------ the decoder
declare(
    Option("suffix_max_depth", 24, "Suffix decoding: depth of the suffix trees (pattern + draft tokens).",
           check=within(2, 256, integer=True)),
    Option("suffix_max_nodes", 24, "Suffix decoding: most nodes in a draft tree.", check=within(1, 256, integer=True)),
    Option("suffix_spec_factor", 1.0, "Suffix decoding: draft nodes per matched pattern token (max spec factor).",
           check=within(0.01, 64)),
    Option("suffix_min_prob", 0.1, "Suffix decoding: least frequency-estimated probability of a drafted node.",
           check=within(0.0, 1.0)),
)


uses_step_profile = DraftsWhatPays("suffix")


@register("suffix", step_profile=uses_step_profile)
def build_suffix(loaded, options: DecoderOptions):
    """Suffix decoding; drafts only what pays by `options.extra["step_profile"]` (as prompt lookup)."""
    adaptive = uses_step_profile(options)
    profile = options.extra.get("step_profile") if adaptive else None
    proposer = SuffixProposer(options.suffix_max_depth, options.suffix_max_nodes, options.suffix_spec_factor,
                              options.suffix_min_prob, adaptive=adaptive, device=loaded.device, profile=profile)
    decoder = SpeculativeDecoder("suffix", loaded, proposer)
    decoder.step_profile = profile
    return decoder
