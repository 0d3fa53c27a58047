"""Prompt lookup decoding (`pld`): draft the tokens that followed an earlier copy of the context's tail.

No training, no heads, no hidden states: the context (prompt + answer so far + this step's
root) is indexed by its n-grams; the longest n-gram (`pld_max_ngram` down to 1) ending the
context that occurred before gives the draft, the tokens that followed it (`pld_tokens`).
Where earlier matches continue differently, up to `pld_branches` distinct continuations become
branches of one tree, verified in the same forward by the shared loop in `spec.py`.

On a CPU a longer forward is not free (design.md: 1 token 33 ms, 4 tokens 52 ms, 16 71 ms),
so drafting blindly is slower than plain decoding. Each step therefore drafts only the nodes
that pay for themselves: a node's chance of acceptance comes from the acceptance measured on
earlier drafts of similar strength (how long the match is), the cost of a step of k tokens from
a step-time profile the bench layer measures once per model and hands to the factory
(`options.extra["step_profile"]`, `bench/tree_cache.cached_step_profile`; the registry's `step_profile`
declares it), kept in the run folder as pld-profile.json, so a run's choices depend on tokens and that file
only, never on how busy the machine was mid-answer), and the draft is the set of nodes that
maximises expected tokens per second, possibly none (a plain one-token step, the baseline's
cost). The acceptance statistics are kept across generations. `DecoderOptions(extra={"pld_adaptive": False})`
drafts every candidate instead, as transformers' prompt lookup does.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Optional

import torch

from medusa_bench.decoders.options import DecoderOptions, Option, declare, within
from medusa_bench.decoders.registry import DraftsWhatPays, Knobs, register
from medusa_bench.decoders.spec import Draft, Proposer, SpeculativeDecoder
from medusa_bench.trees.tree import TreeBuffers

LIMITS = {"pld_max_ngram": (1, 16), "pld_tokens": (1, 64), "pld_branches": (1, 16)}
SCAN_LIMIT = 64  # earlier occurrences looked at per n-gram length (most recent first)
STRENGTH_CAP = 12  # match lengths beyond this are all "very strong"


# ------------------------------------------------------------------------------ match search
@dataclass
class Match:
    """One earlier occurrence of the tail: what followed it, and how well it matched."""

    tokens: list[int]  # the continuation, pld_tokens long
    ngram: int  # n of the n-gram that found it
    length: int  # how far the match really extends back (≥ ngram, ≤ STRENGTH_CAP)


class NgramIndex:
    """A growing token list with, for every n-gram (n ≤ max_ngram), the positions right after it.

    Appending is O(max_ngram) per token, a lookup is one dict access: no rescan per step.
    """

    def __init__(self, max_ngram: int, tokens: list[int] = ()):
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self.after: dict[tuple, list[int]] = {}  # n-gram -> positions that follow its occurrences
        self.extend(tokens)

    def extend(self, tokens) -> None:
        seq = self.tokens
        for token in tokens:
            seq.append(token)
            end = len(seq)
            for n in range(1, min(self.max_ngram, end) + 1):
                self.after.setdefault(tuple(seq[end - n:]), []).append(end)

    def matches(self, max_tokens: int, branches: int) -> list[Match]:
        """Up to `branches` distinct continuations: longest n-gram first, then the most recent.

        A continuation equal to one already found adds nothing and is skipped.
        """
        seq, end = self.tokens, len(self.tokens)
        found: list[Match] = []
        for n in range(min(self.max_ngram, end - 1), 0, -1):
            positions = self.after.get(tuple(seq[end - n:]), ())
            for start in reversed(positions[-SCAN_LIMIT - 1:]):
                if start >= end:  # the tail itself
                    continue
                continuation = self._continuation(start, max_tokens)
                if any(m.tokens == continuation for m in found):
                    continue
                found.append(Match(continuation, n, self._match_length(start, n)))
                if len(found) == branches:
                    return found
        return found

    def _continuation(self, start: int, max_tokens: int) -> list[int]:
        """The tokens after `start`; a match that runs into the tail repeats with its period."""
        seq, period = self.tokens, len(self.tokens) - start
        tokens = seq[start:start + max_tokens]
        while len(tokens) < max_tokens:  # "a b c a b c" → after the last "b c": "a b c a …"
            tokens.append(tokens[len(tokens) - period])
        return tokens

    def _match_length(self, start: int, n: int) -> int:
        """How many tokens before `start` equal the tokens before the end (at least n)."""
        seq, end, length = self.tokens, len(self.tokens), n
        while length < STRENGTH_CAP and start - length - 1 >= 0 and seq[start - length - 1] == seq[end - length - 1]:
            length += 1
        return length


def find_matches(context: list[int], max_ngram: int = 3, max_tokens: int = 10, branches: int = 1) -> list[Match]:
    """The match search on a plain token list (the proposer keeps an index instead)."""
    return NgramIndex(max_ngram, context).matches(max_tokens, branches)


@dataclass
class Candidates:
    """The matches merged into one trie: node 0 is the root, parents precede children."""

    tokens: list[int]  # [n], tokens[0] unused (the root)
    parents: list[int]  # [n], -1 for the root
    keys: list[tuple]  # [n], the acceptance statistic each node belongs to (root: None)


def merge(matches: list[Match]) -> Candidates:
    """Continuations sharing a prefix share nodes; a node's key is (is an alternative, strength)."""
    tokens, parents, keys = [0], [-1], [None]
    children: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    has_child: set[int] = set()
    for match in matches:
        node = 0
        for depth, token in enumerate(match.tokens, start=1):
            child = children.get((node, token))
            if child is None:
                child = len(tokens)
                alternative = node in has_child  # a sibling came first
                has_child.add(node)
                strength = min(match.length + depth - 1, STRENGTH_CAP)
                children[(node, token)] = child
                tokens.append(token)
                parents.append(node)
                keys.append((alternative, strength))
            node = child
    return Candidates(tokens, parents, keys)


# ------------------------------------------------------------------------------ the draft policy
class AcceptanceStats:
    """P(node accepted | parent accepted) per key, from recent outcomes, shrunk toward a prior.

    The prior says longer matches are more reliable; data decay so that the estimate follows
    the text at hand (copying a document vs. free writing).
    """

    def __init__(self, prior_weight: float = 4.0, decay: float = 0.98):
        self.prior_weight, self.decay = prior_weight, decay
        self.data: dict[tuple, list[float]] = {}  # key -> [accepted, tried], decayed

    # P(accepted) by match strength, measured with full drafting on SmolLM2 answers to prompts
    # outside the benchmark (self-instruct; the last Spec-Bench questions of each category).
    PRIOR = (0.2, 0.4, 0.55, 0.65, 0.72, 0.78, 0.82, 0.85)

    @classmethod
    def prior(cls, key: tuple) -> float:
        alternative, strength = key
        p = cls.PRIOR[min(strength, len(cls.PRIOR)) - 1]
        return p / 2 if alternative else p  # an alternative is tried after the most recent match

    def p(self, key: tuple) -> float:
        accepted, tried = self.data.get(key, (0.0, 0.0))
        return (accepted + self.prior_weight * self.prior(key)) / (tried + self.prior_weight)

    def record(self, key: tuple, ok: bool) -> None:
        entry = self.data.setdefault(key, [0.0, 0.0])
        entry[0] = entry[0] * self.decay + ok
        entry[1] = entry[1] * self.decay + 1


class StepCosts:
    """Cost of a verify step of k tokens relative to a one-token step, from a profile measured once.

    The profile (`bench/calibrate.shape_profile`, pld-profile.json in the run folder) holds the
    median step time per size for chains and for two-branch trees at a fixed context, so the
    draft policy, and with it τ, does not depend on how busy the machine was while decoding.
    Sizes between the profiled ones interpolate; beyond them, or with no profile, a prior curve
    (design.md's CPU timings) scaled to the profiled sizes.
    """

    PRIOR = [(1, 1.0), (2, 1.4), (3, 1.5), (4, 1.58), (8, 1.94), (16, 2.15), (32, 2.64), (64, 3.97), (128, 7.0)]

    def __init__(self, profile: Optional[dict] = None):
        self.profile = profile
        self.seconds: dict[bool, list[tuple[int, float]]] = {True: [], False: []}  # chain? -> [(k, seconds)] sorted
        for kind, chain in (("chain", True), ("tree", False)):
            self.seconds[chain] = sorted((int(k), float(t)) for k, t in ((profile or {}).get(kind) or {}).items())
        self.one = dict(self.seconds[True]).get(1)
        self._relative: dict[tuple[int, bool], float] = {}  # the policy asks the same few sizes every step

    @classmethod
    def prior(cls, k: int, chain: bool = True) -> float:
        return _interpolate(cls.PRIOR, k) if chain or k == 1 else _interpolate(cls.PRIOR, k) * 1.05  # a tree mask costs a little more

    def relative(self, k: int, chain: bool = True) -> float:
        chain = chain or k == 1
        key = (k, chain)
        if key not in self._relative:
            self._relative[key] = self._compute(k, chain)
        return self._relative[key]

    def _compute(self, k: int, chain: bool) -> float:
        if k == 1:
            return 1.0
        kind = chain if self.seconds[chain] else True  # no trees profiled: chains, plus the mask's share
        measured, factor = self.seconds[kind], (1.0 if kind == chain else 1.05)
        if self.one is None or not measured:
            return self.prior(k, chain)
        if measured[0][0] <= k <= measured[-1][0]:
            return _interpolate(measured, k) / self.one * factor
        ratios = [t / self.one / self.prior(n, kind) for n, t in measured if n > 1]
        scale = sorted(ratios)[len(ratios) // 2] if ratios else 1.0
        return self.prior(k, chain) * min(max(scale, 0.5), 3.0)


def _interpolate(points: list[tuple[int, float]], k: int) -> float:
    """Piecewise-linear through sorted (size, value) points; the end segments extend beyond them."""
    if len(points) == 1:
        return points[0][1]
    sizes = [n for n, _ in points]
    i = min(max(bisect_left(sizes, k), 1), len(sizes) - 1)
    (k0, c0), (k1, c1) = points[i - 1], points[i]
    return c0 + (c1 - c0) * (k - k0) / (k1 - k0)


def choose_nodes(candidates: Candidates, stats: AcceptanceStats, costs: StepCosts,
                 margin: float = 1.02) -> list[int]:
    """The drafted nodes (sorted, parents first) that maximise expected tokens per unit of time.

    Under greedy acceptance at most one child per node is right, so the expected number of
    accepted drafts is the sum over drafted nodes of P(node and its ancestors accepted). The
    best set of m nodes is the m most probable (probability only falls along a path, so it is
    prefix-closed); m = 0, a plain step, wins unless a draft beats it by `margin`.
    """
    reach, depth = [1.0], [0]  # P(node and its ancestors accepted), root certain; depth of each node
    for node in range(1, len(candidates.tokens)):
        parent = candidates.parents[node]
        reach.append(reach[parent] * stats.p(candidates.keys[node]))
        depth.append(depth[parent] + 1)
    order = sorted(range(1, len(reach)), key=lambda node: (-reach[node], node))
    best, best_rate, expected, deepest = 0, margin, 1.0, 0
    for m, node in enumerate(order, start=1):
        expected += reach[node]
        deepest = max(deepest, depth[node])
        rate = expected / costs.relative(m + 1, chain=deepest == m)  # prefix-closed: a chain iff m deep
        if rate > best_rate:
            best, best_rate = m, rate
    return sorted(order[:best])


# ------------------------------------------------------------------------------ the proposer
class PromptLookupProposer(Proposer):
    """Drafts continuations of earlier copies of the context's tail, as a chain or a small tree.

    `adaptive=False` drafts every candidate node every step (transformers' behaviour): useful to
    test the verify step and to show what the adaptive policy saves.
    """

    def __init__(self, max_ngram: int = 3, max_tokens: int = 10, branches: int = 1, adaptive: bool = True,
                 device: torch.device = torch.device("cpu"), profile: Optional[dict] = None):
        self.max_ngram, self.max_tokens, self.branches = max_ngram, max_tokens, branches
        self.adaptive, self.device = adaptive, device
        self.draft_size = max_tokens * branches
        self.stats = AcceptanceStats()  # kept across generations: outcomes depend on tokens only
        self.costs = StepCosts(profile)  # a measured step-time profile (pld-profile.json), else the prior
        self._chains: dict[int, TreeBuffers] = {}
        self.reset([])

    def reset(self, prompt_ids: list[int]) -> None:
        self.index = self.new_index(prompt_ids)
        self.pending = None  # (root position, drafted tokens, parents, keys) awaiting its outcome
        self.accepted = 0

    def new_index(self, tokens: list[int]):
        """The match index over `tokens`: `tokens`, `extend(tokens)`, `matches(max_tokens, branches)`
        (SAM decoding, decoders/samd.py, keeps suffix automata instead)."""
        return NgramIndex(self.max_ngram, tokens)

    def update(self, accepted: int) -> None:
        self.accepted = accepted

    def rewind(self, length: int) -> None:
        """Back to the context's first `length` tokens: re-index them, drop the unscored draft."""
        self.index = self.new_index(self.index.tokens[:length])
        self.pending, self.accepted = None, 0

    def propose(self, root: int, hidden: Optional[torch.Tensor], context: list[int]) -> Optional[Draft]:
        if len(context) + 1 < len(self.index.tokens):  # a context we did not see grow: start over
            self.index = self.new_index(context)
        self.index.extend(context[len(self.index.tokens):] + [root])
        self._learn()

        candidates = merge(self.index.matches(self.max_tokens, self.branches))
        everything = list(range(1, len(candidates.tokens)))
        chosen = choose_nodes(candidates, self.stats, self.costs) if self.adaptive else everything
        if not chosen:
            return None
        return self._draft(root, candidates, chosen)

    def _draft(self, root: int, candidates: Candidates, chosen: list[int]) -> Draft:
        renumber = {0: 0, **{node: i for i, node in enumerate(chosen, start=1)}}
        tokens = [root] + [candidates.tokens[c] for c in chosen]
        parents = [-1] + [renumber[candidates.parents[c]] for c in chosen]
        keys = [None] + [candidates.keys[c] for c in chosen]
        self.pending = (len(self.index.tokens) - 1, tokens, parents, keys)
        return Draft(torch.tensor(tokens, device=self.device), self._buffers(parents))

    def _buffers(self, parents: list[int]) -> TreeBuffers:
        n = len(parents)
        if parents != list(range(-1, n - 1)):
            return TreeBuffers.from_parents(parents, device=self.device)
        if n not in self._chains:  # chains repeat: build each length once
            self._chains[n] = TreeBuffers.from_parents(parents, device=self.device)
        return self._chains[n]

    def _learn(self) -> None:
        """Score the last draft's nodes now that the emitted tokens are in the context."""
        if self.pending is None:
            return
        root_at, tokens, parents, keys = self.pending
        self.pending = None
        emitted = self.index.tokens[root_at + 1: root_at + 1 + self.accepted]
        node = 0
        for depth in range(len(emitted) + 1):
            right = emitted[depth] if depth < len(emitted) else None
            next_node = None
            for child in range(1, len(tokens)):
                if parents[child] == node:
                    ok = tokens[child] == right
                    self.stats.record(keys[child], ok)
                    next_node = child if ok else next_node
            if next_node is None:
                return
            node = next_node


# ------------------------------------------------------------------------------ the decoder
declare(
    Option("pld_max_ngram", 3, "Prompt lookup: longest n-gram to match.", check=within(*LIMITS["pld_max_ngram"], integer=True)),
    Option("pld_tokens", 10, "Prompt lookup: most tokens drafted per branch.", check=within(*LIMITS["pld_tokens"], integer=True)),
    Option("pld_branches", 1, "Prompt lookup: distinct continuations drafted as a tree.",
           check=within(*LIMITS["pld_branches"], integer=True)),
)


uses_step_profile = DraftsWhatPays("pld")
# `pld:ngram3-tokens10-branches1` (any of them) sets these knobs for that decoder only; `pld:auto` has the
# bench layer choose them for this model and machine (bench/pld_search.py); `pld:sweep` runs auto beside the
# defaults and one step out along each knob (shorter and longer drafts, shorter and longer n-grams, a tree).
KNOBS = Knobs((("ngram", "pld_max_ngram"), ("tokens", "pld_tokens"), ("branches", "pld_branches")),
              sweep=("auto", "", "tokens5", "tokens20", "ngram1", "ngram5", "branches2"))


@register("pld", step_profile=uses_step_profile, knobs=KNOBS)
def build_pld(loaded, options: DecoderOptions):
    """Prompt lookup; its step costs from `options.extra["step_profile"]` (the bench layer measures it
    once per model and machine: bench/tree_cache.cached_step_profile), the prior curve without one."""
    profile = options.extra.get("step_profile") if uses_step_profile(options) else None
    proposer = PromptLookupProposer(options.pld_max_ngram, options.pld_tokens, options.pld_branches,
                                    adaptive=uses_step_profile(options), device=loaded.device, profile=profile)
    decoder = SpeculativeDecoder("pld", loaded, proposer)
    decoder.step_profile = profile  # the run folder keeps it (bench/autotree.store_in_run: pld-profile.json)
    return decoder
