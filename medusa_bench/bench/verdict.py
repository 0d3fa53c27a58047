"""Lossless up to rounding: is each divergence from the reference a tie the rounding could flip?

A lossless decoder run in another shape (a tree forward, a batch of B rows, bf16) rounds its
logits differently from its reference. Where the reference's top two logits are closer than
that rounding moves them, the argmax may flip and the answers part from there on; nothing
else can make a greedy lossless decoder diverge. So, for each answer that differs:

- `divergence`: the first position where the tokens differ;
- `margin_at`: the reference's top-1 minus top-2 logit there (one forward over the prompt and
  the reference's tokens before it, in the reference's own shape: batch 1);
- `rounding_noise`: how far the same logits move when only the computation's shape changes (batch
  1 against a batch of B rows; a whole forward against a verify step's few tokens over a cache),
  measured on the same prompts (every position, max |Δ logit|); a flip needs the margin overturned
  by at most twice that (both logits moved, opposite ways);
- a divergence at a margin below 2 × noise is a tie flip; a decoder whose every divergence is one
  is "lossless up to rounding"; the others are listed with their margins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from medusa_bench.runtime.batch import Columns, forward_rows
from medusa_bench.runtime.cache import SlotCache
from medusa_bench.runtime.engine import engine_of


@dataclass(frozen=True)
class Divergence:
    index: int  # which answer
    position: int  # first differing token
    margin: float  # the reference's top-1 minus top-2 logit there


def divergence(tokens: list[int], reference: list[int]) -> Optional[int]:
    """The first position where `tokens` part from `reference` (a length difference counts); None: equal."""
    for position, (mine, theirs) in enumerate(zip(tokens, reference)):
        if mine != theirs:
            return position
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


@torch.inference_mode()
def logits_in_batch(loaded, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Each prompt's logits at every one of its positions [P_b, V] (float), the prompts run as one left-padded batch."""
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    cache = SlotCache(engine_of(loaded).num_layers, width)
    columns = Columns(lengths, width, loaded.device)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, width - len(prompt):] = torch.tensor(prompt)
    logits, _ = forward_rows(loaded.model, ids.to(loaded.device), cache, columns.prefill_positions(),
                             columns.prefill_mask(loaded.model.dtype), False)
    return [logits[b, width - n:].float() for b, n in enumerate(lengths)]


@torch.inference_mode()
def logits_split(loaded, prompt: list[int], tail: int = 8) -> torch.Tensor:
    """The prompt's last `tail` positions' logits [tail, V] (float), computed as a verify step computes
    them: one forward of `tail` tokens over a cache holding the rest (batch 1)."""
    head = len(prompt) - tail
    cache = SlotCache(engine_of(loaded).num_layers, len(prompt))
    columns = Columns([head], len(prompt), loaded.device)
    ids = torch.tensor([prompt], device=loaded.device)
    forward_rows(loaded.model, ids[:, :head], cache, columns.prefill_positions(), columns.prefill_mask(loaded.model.dtype), False)
    chain = torch.ones(tail, tail, dtype=torch.bool, device=loaded.device).tril()[None]
    positions = torch.arange(head, len(prompt), device=loaded.device)[None]
    logits, _ = forward_rows(loaded.model, ids[:, head:], cache, positions, columns.step_mask(chain, loaded.model.dtype), False)
    return logits[0].float()


def margin_at(loaded, prompt_ids: list[int], reference: list[int], position: int) -> float:
    """The reference's top-1 minus top-2 logit for its token at `position` (batch 1)."""
    (logits,) = logits_in_batch(loaded, [prompt_ids + reference[:position]])
    top = torch.topk(logits[-1], 2).values
    return float(top[0] - top[1])


def rounding_noise(loaded, prompts: list[list[int]], batch_size: int, tail: int = 8) -> float:
    """max |Δ logit| over every position between two shapes of the same computation: each prompt alone
    against the same prompt in a batch of `batch_size` (its neighbours the next prompts), and its last
    `tail` positions in one forward against them as a verify step over a cache (what a tree decoder
    does at batch 1): how far this precision's rounding moves a logit when only the shape changes."""
    worst = 0.0
    for start in range(0, len(prompts), max(batch_size, 1)):
        group = prompts[start:start + batch_size]
        together = logits_in_batch(loaded, group) if len(group) > 1 else [None] * len(group)
        for prompt, batched in zip(group, together):
            (alone,) = logits_in_batch(loaded, [prompt])
            if batched is not None:
                worst = max(worst, float((alone - batched).abs().max()))
            if len(prompt) > tail:
                worst = max(worst, float((alone[-tail:] - logits_split(loaded, prompt, tail)).abs().max()))
    return worst


def divergences(loaded, prompts: list[list[int]], answers: list[list[int]], references: list[list[int]]) -> list[Divergence]:
    """Each answer's first divergence from its reference, with the reference's margin there."""
    found = []
    for index, (prompt, mine, theirs) in enumerate(zip(prompts, answers, references)):
        position = divergence(mine, theirs)
        if position is not None and position < len(theirs):
            found.append(Divergence(index, position, margin_at(loaded, prompt, theirs, position)))
        elif position is not None:  # the reference ended first: it chose EOS or hit the limit there, no margin to read
            found.append(Divergence(index, position, float("nan")))
    return found


def verdict(found: list[Divergence], noise: float, answers: int) -> str:
    """One line: exact, lossless up to rounding (every divergence a tie flip), or the others with their margins."""
    if not found:
        return f"exact: {answers}/{answers} answers identical"
    flips = [d for d in found if d.margin < 2 * noise]
    others = [d for d in found if not d.margin < 2 * noise]
    if not others:
        return (f"lossless up to rounding: {len(flips)} of {answers} answers part at a tie "
                f"(margins {', '.join(f'{d.margin:.2g}' for d in flips)} < 2 x noise {2 * noise:.2g})")
    return (f"NOT explained by rounding: {len(others)} divergence(s) at margins "
            f"{', '.join(f'answer {d.index} token {d.position}: {d.margin:.3g}' for d in others)} "
            f">= 2 x noise {2 * noise:.2g}" + (f"; {len(flips)} tie flip(s)" if flips else ""))
