"""Lookahead decoding (`lookahead`): Jacobi iteration in a 2-D window makes n-grams; the n-grams that start with the root are verified.

Fu et al., 2024, "Break the Sequential Dependency of LLM Inference Using Lookahead Decoding"
(arXiv 2402.02057; reference code hao-ai-lab/LookaheadDecoding, `lade/decoding.py`). No training,
no heads: every step's draft is one tree (`TreeBuffers.from_parents`) under the root with two
branches, verified by the shared loop in `spec.py` like any other draft.

- The lookahead branch is the 2-D Jacobi window: N - 1 levels of W columns; column j of level l
  is a guess for position root + l + j. Column 0 of level 0 is the root itself, so level 0 adds
  W - 1 tokens, a chain under the root; level l's column j hangs under level l - 1's column j.
  A node's ancestors are then exactly the reference's mask (`j_make_causal_mask_multilevel`):
  level 0 causal, a higher level sees level 0 up to its own column and its own column in the
  levels between; and depth = l + j, so `position = prefix + depth` are the reference's
  positions. The one difference is the order of the nodes in the forward (the verification
  branch first here, last there), which the mask makes irrelevant. After the verify forward
  (`Proposer.observe_logits`, Token Recycling's hook) the argmax of the top level's rows is a
  new level; each column's trajectory (level 0 … N - 2, then the new token) is an n-gram for
  the pool; the window drops its oldest level and moves one column on (`JacobiWindow.advance`).
  As the reference (`ALWAYS_FWD_ONE`), it moves one column whatever the step accepted.
- The verification branch: the pool keeps per first token at most G n-grams (the most recent:
  a repeat becomes the newest, a new one evicts the oldest, as the reference's `token_map`);
  the ones keyed by the root are merged into a trie under it (the reference verifies each as a
  separate chain: shared prefixes here are verified once).

The window starts as one level of W + N - 3 tokens beside the root and gains a level per step,
one column narrower each time, until it has N - 1 levels of W (the reference's warm-up); n-grams
are collected once it is full. The reference fills that first level with random prompt tokens;
here it is the prompt's tokens at evenly spaced positions, so a run is deterministic. The pool
starts empty every generation (the reference's default, `POOL_FROM_PROMPT` off) and `rewind`
keeps window and pool (stale guesses cost acceptance, never correctness: the loop verifies).
Any node that matches may be accepted, lookahead ones included (the reference accepts from the
verification branch only); lossless either way.

Defaults W = 7, N = 5, G = 7 (`--lookahead-window/-ngram/-guess`): the reference README's setting
for 7B models and the one Spec-Bench's leaderboard runs (`--level 5 --window 7 --guess 7`).
At these a step drafts 27 lookahead nodes plus up to 28 n-gram nodes. The whole tree is drafted
every step, as the paper does: no step-time policy, since leaving lookahead nodes out stops the
window that feeds the pool. Lookahead trades FLOPs for steps, so on a CPU, where a 56-node
verify costs about 3-4 one-token steps (pld.StepCosts' prior), expect it to be slower than the
baseline even at τ > 1; it is meant for accelerators with compute to spare.
"""

from __future__ import annotations

from typing import Optional

import torch

from medusa_bench.decoders.options import DecoderOptions, Option, declare, within
from medusa_bench.decoders.registry import register
from medusa_bench.decoders.spec import Draft, Proposer, SpeculativeDecoder
from medusa_bench.trees.tree import TreeBuffers


# ------------------------------------------------------------------------------ the n-gram pool
class NgramPool:
    """N-grams by first token: per key at most `size` continuations (N - 1 tokens each), oldest first."""

    def __init__(self, size: int):
        self.size = size
        self.by_key: dict[int, list[tuple[int, ...]]] = {}

    def add(self, key: int, continuation: tuple[int, ...]) -> None:
        """A repeat becomes the newest; a new one evicts the oldest when the key holds `size`."""
        if self.size == 0:
            return
        entries = self.by_key.setdefault(key, [])
        if continuation in entries:
            entries.remove(continuation)
        elif len(entries) == self.size:
            del entries[0]
        entries.append(continuation)

    def guesses(self, key: int) -> list[tuple[int, ...]]:
        """The continuations of `key`, newest first."""
        return self.by_key.get(key, [])[::-1]


# ------------------------------------------------------------------------------ the Jacobi window
def spread(tokens: list[int], count: int) -> list[int]:
    """`count` tokens taken at evenly spaced positions of `tokens` (cycling when there are fewer)."""
    tokens = tokens or [0]
    return [tokens[i * len(tokens) // count] if count <= len(tokens) else tokens[i % len(tokens)] for i in range(count)]


class JacobiWindow:
    """The lookahead branch: `levels[l]` are the guesses of level l; column j of level l is at position root + l + j.

    `levels[0]` holds columns 1 … w - 1 (column 0 is each step's root), higher levels all w columns.
    """

    def __init__(self, window: int, ngram: int, prompt: list[int]):
        self.window, self.ngram = window, ngram
        # one level to start, N - 3 columns wider than it ends: each warm-up step moves it one column on
        self.levels: list[list[int]] = [spread(prompt, window + ngram - 3)]

    @property
    def full(self) -> bool:
        return len(self.levels) == self.ngram - 1

    @property
    def width(self) -> int:
        """Columns, the root's included."""
        return len(self.levels[0]) + 1

    def advance(self, root: int, new: list[int], pool: NgramPool) -> None:
        """`new` [w]: the argmax of the top level's rows (the root's row first when level 0 is the top).

        Warm-up: every level moves one column on (its first column is behind the next root) and
        `new` less its first column becomes the next level. Full: each column's trajectory plus its
        new token is an n-gram keyed by the column's level-0 token; the oldest level goes, `new` is
        the top one and the new level 0 (the old level 1) moves one column on.
        """
        if not self.full:
            self.levels = [level[1:] for level in self.levels] + [new[1:]]
            return
        level0 = [root] + self.levels[0]
        for j in range(self.width):
            pool.add(level0[j], tuple(level[j] for level in self.levels[1:]) + (new[j],))
        self.levels = self.levels[1:] + [new]
        self.levels[0] = self.levels[0][1:]


def lookahead_nodes(window: int, ngram: int) -> int:
    """The most lookahead nodes a step drafts: with k + 1 levels of W + N - 2 - k columns (warm-up), less the root."""
    return max((k + 1) * (window + ngram - 2 - k) - 1 for k in range(ngram - 1))


def draft_tree(root: int, guesses: list[tuple[int, ...]], levels: list[list[int]]) -> tuple[list[int], list[int], list[int]]:
    """One step's draft: (tokens [n], parents [n] with -1 for the root, the top level's nodes [w]).

    The guesses merged into a trie under the root (a shared prefix is one node), then the window:
    level 0 a chain under the root (its column 0), level l's column j under level l - 1's column j.
    Parents precede children.
    """
    tokens, parents = [root], [-1]

    def add(token: int, parent: int) -> int:
        tokens.append(token)
        parents.append(parent)
        return len(tokens) - 1

    children: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    for guess in guesses:
        node = 0
        for token in guess:
            if (node, token) not in children:
                children[(node, token)] = add(token, node)
            node = children[(node, token)]
    column = [0]  # level 0's nodes: the root is its column 0
    for token in levels[0]:
        column.append(add(token, column[-1]))
    for level in levels[1:]:
        column = [add(token, parent) for token, parent in zip(level, column)]
    return tokens, parents, column


# ------------------------------------------------------------------------------ the proposer
class LookaheadProposer(Proposer):
    """Drafts the window and the root's n-grams each step; the verify forward's rows advance the window."""

    wants_logits = True

    def __init__(self, window: int = 7, ngram: int = 5, guess: int = 7, device: torch.device = torch.device("cpu")):
        self.window_size, self.ngram, self.guess = window, ngram, guess
        self.device = device
        self.draft_size = lookahead_nodes(window, ngram) + guess * (ngram - 1)
        self.reset([])

    def reset(self, prompt_ids: list[int]) -> None:
        self.pool = NgramPool(self.guess)
        self.window = JacobiWindow(self.window_size, self.ngram, list(prompt_ids))
        self.pending: Optional[tuple[list[int], list[int]]] = None  # (drafted tokens, top level's nodes) awaiting rows

    def rewind(self, length: int) -> None:
        """Window and pool stay (they only guess); the draft whose rows were not seen is dropped."""
        self.pending = None

    def propose(self, root: int, hidden: Optional[torch.Tensor], context: list[int]) -> Optional[Draft]:
        tokens, parents, top = draft_tree(root, self.pool.guesses(root), self.window.levels)
        self.pending = (tokens, top)
        return Draft(torch.tensor(tokens, device=self.device), TreeBuffers.from_parents(parents, device=self.device))

    def observe_logits(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """tokens [n], logits [n, V] of the verified draft: the top level's rows make the next level."""
        if self.pending is None:  # the prompt's rows after prefill: nothing drafted yet
            return
        drafted, top = self.pending
        self.pending = None
        if tokens.shape[0] != len(drafted):  # not this draft's forward (never in the loop): leave the window
            return
        new = logits[top].argmax(dim=-1).tolist()  # [w]
        self.window.advance(drafted[0], new, self.pool)


# ------------------------------------------------------------------------------ the decoder
declare(
    Option("lookahead_window", 7, "Lookahead decoding: Jacobi window W, columns of the lookahead branch (the root's included).",
           check=within(1, 32, integer=True)),
    Option("lookahead_ngram", 5, "Lookahead decoding: n-gram size N (the window keeps N - 1 levels; n-grams of N - 1 "
           "tokens after the root are verified).", check=within(2, 10, integer=True)),
    Option("lookahead_guess", 7, "Lookahead decoding: guess-set size G, n-grams kept per first token and verified "
           "per step (0: none, the window alone drafts).", check=within(0, 32, integer=True)),
)


@register("lookahead")
def build_lookahead(loaded, options: DecoderOptions):
    """Lookahead decoding with W, N, G from the options; drafts its whole tree every step (the paper's)."""
    proposer = LookaheadProposer(options.lookahead_window, options.lookahead_ngram, options.lookahead_guess,
                                 device=loaded.device)
    return SpeculativeDecoder("lookahead", loaded, proposer)
