"""τ of a tree by replaying greedy decoding over real answers, from the true tokens' ranks.

A calibration table averages acceptance over every answer position. Decoding does not visit
every position: a step that accepts k drafts skips the next k positions, so steps gather where
acceptance is low and the realised τ (Σ tokens / Σ steps) is below the per-position mean
whenever easy and hard stretches alternate. Measured on the Zen 2 EPYC with the shipped Hydra
heads on a 6-node tree: per-position 1.61 against replayed 1.574 (measured 1.578) on 8 MT-Bench
answers; 1.80 against 1.72 on 8 self-instruct answers; 1.665 against 1.565 on Spec-Bench's 52.

A rank row [depth] (trees/ranks.py) says where each true future token ranked among the
proposer's candidates at that depth (-1: past the end, >= top_k: not drafted). Rows of one
answer are its positions in order: row i drafts under the root that is answer token i.
"""

from __future__ import annotations

import math
from typing import Sequence

from medusa_bench.trees.tree import Tree

RankedAnswer = tuple[Sequence[Sequence[int]], int]  # (rank rows of its positions, answer tokens)


def accepted_drafts(ranks: Sequence[Sequence[int]], tree: Tree, top_k: int) -> list[int]:
    """Per position, the drafts `tree` accepts (greedy): its longest path equal to the true ranks' prefix there."""
    paths = {tuple(path) for path in tree.to_list()}
    out = []
    for row in ranks:
        accepted = 0
        while accepted < len(row) and 0 <= row[accepted] < top_k and tuple(row[: accepted + 1]) in paths:
            accepted += 1
        out.append(accepted)
    return out


def replay_steps(accepted: Sequence[int], answer_len: int) -> int:
    """Steps greedy decoding takes over an answer of `answer_len` tokens: at position i a step emits
    the root plus accepted[i] drafts; the last root is emitted alone (no forward, still a step),
    as `SpeculativeDecoder.generate` counts them."""
    i = steps = 0
    while i < answer_len:
        steps += 1
        i += 1 + (accepted[i] if i < len(accepted) else 0)
    return steps


def replayed_tau(answers: Sequence[RankedAnswer], tree: Tree, top_k: int) -> tuple[float, float]:
    """(τ replayed in decode order: Σ tokens / Σ steps, the per-position mean τ) of `tree` over `answers`."""
    tokens = steps = positions = accepted_sum = 0
    for rows, answer_len in answers:
        accepted = accepted_drafts(rows, tree, top_k)
        tokens += answer_len
        steps += replay_steps(accepted, answer_len)
        positions += len(accepted)
        accepted_sum += sum(accepted)
    replayed = tokens / steps if steps else math.nan
    mean = 1 + accepted_sum / positions if positions else math.nan
    return replayed, mean
