"""Acceptance: which drafted nodes a verify step keeps, given the base model's logits over the tree.

Kept apart from the proposers and the loop (as vLLM keeps rejection sampling): every rule takes
the tree's tokens [n], the verify forward's logits [n, V] and the tree's buffers, and returns the
longest accepted root→leaf path (node indices, root first).

- `greedy` at temperature 0: a node is right when it equals the argmax after its parent, so the
  output is the baseline's; at temperature > 0 lossless speculative sampling (`accept_sampled`).
- `typical` (Medusa): accept x if p(x) > min(epsilon, delta * exp(-H(p))); not lossless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from medusa_bench.decoders.base import Sampling
from medusa_bench.trees.tree import TreeBuffers


@dataclass(frozen=True)
class Acceptance:
    """The rule a decoder accepts drafts by, and typical acceptance's thresholds."""

    rule: str = "greedy"  # greedy | typical
    posterior_threshold: float = 0.09  # epsilon
    posterior_alpha: float = 0.3  # delta


def warp(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Probabilities the sampler draws from: temperature, then top-p (nucleus) truncation."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p  # keep the first token always
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def choose_token(logits: torch.Tensor, sampling: Sampling, generator: Optional[torch.Generator]) -> int:
    """The base model's own next token: argmax, or a sample from the warped distribution."""
    if sampling.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(warp(logits, sampling), 1, generator=generator))


def longest_path(ok: torch.Tensor, buffers: TreeBuffers) -> list[int]:
    """Node indices of the longest root→leaf path whose nodes are all accepted (first on ties)."""
    paths = buffers.retrieve  # [L, D+1], -1 padded
    ok_on_path = ok[paths.clamp(min=0)] & (paths >= 0)  # [L, D+1]
    lengths = ok_on_path.int().cumprod(dim=1).sum(dim=1)  # [L]
    best = int(lengths.argmax())
    return paths[best, : int(lengths[best])].tolist()


def accept_greedy(tokens: torch.Tensor, logits: torch.Tensor, buffers: TreeBuffers) -> list[int]:
    """A node is right when it equals the argmax after its parent: the output is the baseline's."""
    predicted = logits.argmax(dim=-1)  # [n]
    ok = torch.ones_like(tokens, dtype=torch.bool)  # [n]
    ok[1:] = tokens[1:] == predicted[buffers.parents[1:]]
    return longest_path(ok, buffers)


def accept_typical(tokens: torch.Tensor, logits: torch.Tensor, buffers: TreeBuffers, sampling: Sampling,
                   acceptance: Acceptance) -> list[int]:
    """Medusa's typical acceptance: accept x if p(x) > min(epsilon, delta * exp(-H(p)))."""
    if sampling.greedy:
        return accept_greedy(tokens, logits, buffers)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)  # [n, V]
    entropy = -(probs * torch.log(probs + 1e-5)).sum(dim=-1)  # [n]
    threshold = torch.minimum(torch.full_like(entropy, acceptance.posterior_threshold),
                              acceptance.posterior_alpha * torch.exp(-entropy))  # [n]
    parents = buffers.parents[1:]
    ok = torch.ones_like(tokens, dtype=torch.bool)
    ok[1:] = probs[parents, tokens[1:]] > threshold[parents]
    return longest_path(ok, buffers)


def accept_sampled(tokens: torch.Tensor, logits: torch.Tensor, buffers: TreeBuffers, sampling: Sampling,
                   generator: Optional[torch.Generator], probs: Optional[torch.Tensor] = None
                   ) -> tuple[list[int], Optional[torch.Tensor]]:
    """Lossless speculative sampling, one walk down the tree (SpecInfer's multi-draft rule).

    At each node the children are tried in order against the residual r (initially the warped
    p): child x, drawn from q, is accepted with probability min(1, r(x) / q(x)); on a rejection
    r becomes max(0, r - q), renormalised. Point-mass drafts (`probs` None) have q = one-hot x:
    accept with probability r(x), then remove x from r. Each emitted token is thus distributed
    as p, whatever q (for siblings drawn independently from their q). Returns the accepted path
    and, when the walk stopped on rejections, the residual to sample the next root from (None:
    sample from the last node's own p).
    """
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(buffers.parents.tolist()):
        if parent >= 0:
            children.setdefault(parent, []).append(node)
    path, node = [0], 0
    while node in children:
        residual = warp(logits[node], sampling)
        moved = False
        for child in children[node]:
            token = int(tokens[child])
            u = torch.rand((), generator=generator, device=residual.device)
            if probs is None:
                if u < residual[token]:
                    path.append(child)
                    node, moved = child, True
                    break
                residual[token] = 0.0
            else:
                q = probs[child].to(residual.device, torch.float32)  # [V]
                if u * q[token] < residual[token]:  # u < r/q without dividing (q(x) = 0: accept iff r(x) > 0)
                    path.append(child)
                    node, moved = child, True
                    break
                residual = (residual - q).clamp_(min=0.0)
            total = residual.sum()
            if total <= 0:
                break
            residual = residual / total
        if not moved:
            return path, residual
    return path, None


def accept(acceptance: Acceptance, tokens: torch.Tensor, logits: torch.Tensor, buffers: TreeBuffers, sampling: Sampling,
           generator: Optional[torch.Generator], probs: Optional[torch.Tensor] = None
           ) -> tuple[list[int], Optional[torch.Tensor]]:
    """The accepted path under `acceptance`, and (sampled) the residual to draw the next root from (None: its own p)."""
    if acceptance.rule == "typical":
        return accept_typical(tokens, logits, buffers, sampling, acceptance), None
    if sampling.greedy:
        return accept_greedy(tokens, logits, buffers), None
    return accept_sampled(tokens, logits, buffers, sampling, generator, probs)
