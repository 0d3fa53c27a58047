"""The one decoding loop: draft a tree, verify it in one forward, keep the longest accepted path.

Every decoder is this loop with a different proposer (the baseline proposes nothing, so each
step is one plain forward of one token). A step:

1. the root — the base model's own next token, chosen from the previous step's logits — plus
   the proposer's draft tree go through one base forward with a tree attention mask
   (4-D additive mask, `position_ids = prefix_len + depth`),
2. the acceptance rule picks the longest accepted root→leaf path,
3. the KV cache keeps only that path (a gather within the tree's slots, then a crop),
4. the next root comes from the logits of the last accepted node: no extra forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import DynamicCache

from medusa_bench.decoders.base import Generation, Sampling, StepCallback
from medusa_bench.errors import UserError
from medusa_bench.trees.tree import TreeBuffers


@dataclass
class Draft:
    """A candidate tree: tokens[0] is the root, buffers describe the tree's shape."""

    tokens: torch.Tensor  # [n] long
    buffers: TreeBuffers


class Proposer:
    """Drafts candidate trees. Override `propose`; `update` gets feedback after each step."""

    needs_hidden = False  # does `propose` need the base model's last hidden state?
    draft_size = 0  # most nodes drafted beyond the root

    def reset(self, prompt_ids: list[int]) -> None:
        """Called once per generation, before the first step."""

    def propose(self, root: int, hidden: Optional[torch.Tensor], context: list[int]) -> Optional[Draft]:
        """Draft a tree under `root`; `hidden` [H] is the state that predicted it; None: no draft."""
        return None

    def update(self, accepted: int) -> None:
        """How many drafted tokens the last step accepted (0 … depth)."""

    def observe(self, rows: torch.Tensor) -> None:
        """The base hidden states [q, H] of the tokens just kept in the cache, in context order:
        the prompt's after prefill, the accepted path's after a step (only if `needs_hidden`)."""


@dataclass(frozen=True)
class Acceptance:
    rule: str = "greedy"  # greedy | typical
    posterior_threshold: float = 0.09  # epsilon
    posterior_alpha: float = 0.3  # delta


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ attention layout
FULL, SLIDING, CHUNKED = "full_attention", "sliding_attention", "chunked_attention"


@dataclass(frozen=True)
class AttentionLayout:
    """What the model's attention layers see beyond causality, so that the tree mask can copy it.

    A user-supplied 4-D mask replaces the model's own, sliding window included: the tree mask must
    restrict each layer type the way transformers' mask functions would for a plain forward.
    """

    limits: dict  # layer type -> (window, chunk), None where that layer type has no such limit
    per_type: bool  # mixed layer types: pass {layer type: mask} (transformers 5 models read such a dict)

    def bites(self, last_position: int) -> bool:
        """Does any limit hide a key from a query at `last_position` (the deepest tree node)?"""
        return any(chunk is not None or (window is not None and last_position >= window)
                   for window, chunk in self.limits.values())


def attention_layout(config) -> Optional[AttentionLayout]:
    """The model's local-attention limits, or None when every layer sees the whole prefix (the plain path)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None) or None
    chunk = getattr(text, "attention_chunk_size", None) or None
    types = getattr(text, "layer_types", None)
    if not isinstance(types, (list, tuple)):  # one kind of layer (Mistral, Phi3: windowed when sliding_window is set)
        return AttentionLayout({FULL: (window, None)}, per_type=False) if window else None
    unknown = sorted(set(types) - {FULL, SLIDING, CHUNKED})
    if unknown:  # recurrent state cannot be cut back to the accepted path like a KV cache
        raise UserError(f"tree verification needs attention layers but this model has {', '.join(unknown)} layers; use the baseline decoder")
    limits = {kind: (window if kind == SLIDING else None, chunk if kind == CHUNKED else None) for kind in dict.fromkeys(types)}
    if all(limit == (None, None) for limit in limits.values()):
        return None
    return AttentionLayout(limits, per_type=len(limits) > 1)


def tree_mask(buffers: TreeBuffers, prefix: int, dtype: torch.dtype, layout: Optional[AttentionLayout]):
    """The verify forward's mask: one [1, 1, n, prefix + n] additive mask, or {layer type: mask}."""
    if layout is None or not layout.bites(prefix + buffers.max_depth):
        return buffers.additive_mask(prefix, dtype)  # no limit reaches into the tree's view: every layer alike
    masks = {kind: buffers.additive_mask(prefix, dtype) if limit == (None, None)
             else buffers.local_mask(prefix, dtype, *limit) for kind, limit in layout.limits.items()}
    return masks if layout.per_type else next(iter(masks.values()))


# ------------------------------------------------------------------------------ model calls
def forward(model, input_ids: torch.Tensor, cache, position_ids: torch.Tensor, mask: Optional[torch.Tensor],
            want_hidden: bool, last_only: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One base forward appending to `cache`. Returns logits [q, V] ([1, V] with last_only) and hidden [q, H] (post-norm)."""
    out = model(
        input_ids=input_ids,  # [1, q]
        position_ids=position_ids,  # [1, q]
        attention_mask=mask,  # None (causal), [1, 1, q, past + q] additive, or {layer type: such a mask}
        past_key_values=cache,
        use_cache=True,
        output_hidden_states=want_hidden,
        logits_to_keep=1 if last_only else 0,
    )
    logits = out.logits[0]  # [q or 1, V]
    hidden = None
    if want_hidden:
        hidden = out.hidden_states[-1][0]  # [q, H] (every row, even with last_only): already after the final norm
    return logits, hidden


def cache_length(cache) -> int:
    return cache.get_seq_length()


def full_layers(cache) -> None:
    """Slot arithmetic below needs every layer to keep every key (DynamicCache without a config).

    A sliding-window cache layer (DynamicSlidingWindowLayer) drops its oldest keys when a tree is
    appended, so rejected nodes would push out prefix keys later queries still see, and its slots
    no longer start at position 0: the loop keeps full layers and windows through the mask instead.
    """
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        raise ValueError("speculative decoding needs a cache that keeps every key: use DynamicCache() without a config")


def crop_cache(cache, length: int) -> None:
    """Drop every slot past `length` (transformers' own `crop` changed meaning across versions)."""
    full_layers(cache)
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]


def keep_in_cache(cache, start: int, keep: torch.Tensor, contiguous: bool) -> None:
    """Keep slots start+keep (sorted, keep[0] == 0) as start…start+m-1 and drop the rest."""
    new_length = start + keep.numel()
    full_layers(cache)
    for layer in cache.layers:
        if not contiguous:
            index = keep + start  # [m]
            layer.keys[:, :, start:new_length] = layer.keys.index_select(2, index)
            layer.values[:, :, start:new_length] = layer.values.index_select(2, index)
        layer.keys = layer.keys[:, :, :new_length]
        layer.values = layer.values[:, :, :new_length]


# ------------------------------------------------------------------------------ acceptance
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
                   generator: Optional[torch.Generator]) -> tuple[list[int], Optional[torch.Tensor]]:
    """Lossless speculative sampling for point-mass drafts (SpecInfer-style, one walk down the tree).

    At each node the children are tried in rank order: child x is accepted with probability r(x)
    under the residual distribution r (initially the warped p); a rejected x is removed from r
    and r renormalised. Returns the accepted path and, when the walk stopped on rejections, the
    residual to sample the next root from (None: sample from the last node's own p).
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
            if torch.rand((), generator=generator, device=residual.device) < residual[token]:
                path.append(child)
                node, moved = child, True
                break
            residual[token] = 0.0
            total = residual.sum()
            if total <= 0:
                break
            residual = residual / total
        if not moved:
            return path, residual
    return path, None


# ------------------------------------------------------------------------------ the loop
class SpeculativeDecoder:
    """Greedy, typical or sampled decoding with any proposer, sharing one verify step."""

    def __init__(self, name: str, loaded, proposer: Proposer, acceptance: Acceptance = Acceptance(), lossless: bool = True):
        self.name = name
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.proposer = proposer
        self.acceptance = acceptance
        self.lossless = lossless and acceptance.rule == "greedy"
        self.draft_size = proposer.draft_size
        # an empty tree (the optimiser's answer where speculation does not pay) is the baseline's exact work
        self.want_hidden = proposer.needs_hidden and proposer.draft_size > 0
        self.baseline_name = "baseline"  # the decoder whose tokens a lossless run must reproduce
        self.eos = set(loaded.eos_token_ids)
        # sliding-window / chunked layers: the tree mask must apply their limits (None: the plain mask path)
        self.layout = attention_layout(self.model.config) if self.draft_size > 0 else None
        self.drafts_verified = self.draft_tokens_verified = 0  # running counts over every generate() call

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                 on_step: Optional[StepCallback] = None, logprobs: Optional[int] = None) -> Generation:
        device, model = self.device, self.model
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device=device)
            generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
        want_hidden = self.want_hidden
        self.proposer.reset(prompt_ids)
        drafts_before, draft_tokens_before = self.drafts_verified, self.draft_tokens_verified

        sync(device)
        start = time.perf_counter()
        cache = DynamicCache()  # no config: full layers for every layer type (see full_layers)
        prompt = torch.tensor([prompt_ids], device=device)  # [1, P]
        positions = torch.arange(len(prompt_ids), device=device)[None]  # [1, P]
        logits, hidden = forward(model, prompt, cache, positions, None, want_hidden, last_only=True)
        next_logits = logits[-1]  # [V]
        next_hidden = None
        if want_hidden:
            self.proposer.observe(hidden)  # [P, H]
            next_hidden = hidden[-1]  # [H]
        residual = None

        out: list[int] = []
        accept_lengths: list[int] = []
        token_logprobs: list = [] if logprobs is not None else None
        finish = "length"
        while len(out) < max_new_tokens:
            root = (int(torch.multinomial(residual, 1, generator=generator)) if residual is not None
                    else choose_token(next_logits, sampling, generator))
            emitted, rows = [root], [next_logits]
            done = root in self.eos or len(out) + 1 >= max_new_tokens
            if not done:  # the forward is needed only if the turn goes on after the root
                emitted, draft_rows, next_logits, next_hidden, residual = self._step(
                    root, next_hidden, prompt_ids, out, cache, sampling, generator)
                rows = rows + draft_rows() if token_logprobs is not None else rows
            emitted, finish = self._cut(emitted, max_new_tokens - len(out))
            out.extend(emitted)
            accept_lengths.append(len(emitted))
            if token_logprobs is not None:
                token_logprobs.extend(_logprobs(rows, emitted, logprobs))
            if on_step is not None and on_step(emitted):
                finish = "stop"
            if finish == "stop" or done:
                break
        sync(device)
        wall = time.perf_counter() - start
        if len(out) >= max_new_tokens and finish != "stop":
            finish = "length"
        return Generation(out, len(accept_lengths), accept_lengths, wall, finish, token_logprobs,
                          self.drafts_verified - drafts_before, self.draft_tokens_verified - draft_tokens_before)

    def _step(self, root, hidden, prompt_ids, out, cache, sampling, generator):
        """One verify step. Returns emitted tokens (root first), a callable giving the logit rows
        that chose the drafts (needed only for logprobs), and the next state."""
        draft = self.proposer.propose(root, hidden, prompt_ids + out) if self.proposer.draft_size else None
        prefix = cache_length(cache)
        if draft is None:  # a plain one-token step: the baseline's whole cost
            tokens = torch.tensor([root], device=self.device)
            positions = torch.tensor([[prefix]], device=self.device)
            logits, hidden = forward(self.model, tokens[None], cache, positions, None, self.want_hidden)
            self.proposer.update(0)
            if hidden is not None:
                self.proposer.observe(hidden)  # [1, H]
            return [root], lambda: [], logits[0], (hidden[0] if hidden is not None else None), None
        buffers = draft.buffers
        self.drafts_verified += 1
        self.draft_tokens_verified += buffers.num_nodes - 1
        tokens = draft.tokens.to(self.device)  # [n]
        tokens[0] = root
        positions = (prefix + buffers.depths)[None]  # [1, n]
        # a chain needs no mask: the model's own (windowed) causal mask is the tree's
        mask = None if buffers.max_depth == buffers.num_nodes - 1 else tree_mask(buffers, prefix, self.model.dtype, self.layout)
        logits, hidden = forward(self.model, tokens[None], cache, positions, mask, self.want_hidden)

        residual = None
        if self.acceptance.rule == "typical":
            path = accept_typical(tokens, logits, buffers, sampling, self.acceptance)
        elif sampling.greedy:
            path = accept_greedy(tokens, logits, buffers)
        else:
            path, residual = accept_sampled(tokens, logits, buffers, sampling, generator)
        keep = torch.tensor(path, device=self.device)
        keep_in_cache(cache, prefix, keep, contiguous=path == list(range(len(path))))
        self.proposer.update(len(path) - 1)
        if hidden is not None:
            self.proposer.observe(hidden[keep])  # [a + 1, H]: the accepted path's rows
        emitted = tokens[keep].tolist()
        last = path[-1]
        parents = buffers.parents.tolist()
        draft_rows = lambda: [logits[parents[node]] for node in path[1:]]  # noqa: E731  (what chose each draft; only for logprobs)
        return emitted, draft_rows, logits[last], (hidden[last] if hidden is not None else None), residual

    def _cut(self, emitted: list[int], room: int) -> tuple[list[int], str]:
        """Cut a step's tokens at EOS (inclusive) and at the token limit: never count past them."""
        for i, token in enumerate(emitted[:room]):
            if token in self.eos:
                return emitted[: i + 1], "stop"
        return emitted[:room], "length"


def _logprobs(rows: list, tokens: list[int], k: int) -> list:
    """(logprob, top-k alternatives) of each emitted token under the base model's raw distribution."""
    result = []
    for row, token in zip(rows, tokens):
        logp = torch.log_softmax(row.float(), dim=-1)
        top = torch.topk(logp, k) if k > 0 else None
        alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        result.append((float(logp[token]), alternatives))
    return result
