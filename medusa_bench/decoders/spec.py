"""The one decoding loop: draft a tree, verify it in one forward, keep the longest accepted path.

Every decoder is this loop with a different proposer (the baseline proposes nothing, so each
step is one plain forward of one token). A step:

1. the root — the base model's own next token, chosen from the previous step's logits — plus
   the proposer's draft tree go through one base forward with a tree attention mask
   (4-D additive mask, `position_ids = prefix_len + depth`),
2. the acceptance rule picks the longest accepted root→leaf path,
3. the KV cache keeps only that path (a gather within the tree's slots, then a crop),
4. the next root comes from the logits of the last accepted node: no extra forward.

The public API is `SpeculativeDecoder.prefill(prompt_ids) -> DecodeState`, `step(state) ->
StepResult` and `rewind(state, checkpoint)`; `generate` is the timed loop over them.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Optional, Union

import torch
from transformers import DynamicCache

from medusa_bench.decoders.base import Generation, Sampling, StepCallback
from medusa_bench.engine import SlotCache, engine_of
from medusa_bench.errors import UserError
from medusa_bench.models import cache_kwargs, text_config
from medusa_bench.trees.tree import TreeBuffers


@dataclass
class Draft:
    """A candidate tree: tokens[0] is the root, buffers describe the tree's shape.

    `probs` [n, V] (row 0 unused): the distribution each node's token was sampled from, for a
    drafter that samples (siblings drawn independently); sampled acceptance then uses the
    standard rule min(1, p/q) with residual max(0, p - q). None: point-mass drafts (heads' top-k,
    prompt lookup), accepted with probability p(x) and x removed from the residual on a rejection.
    """

    tokens: torch.Tensor  # [n] long
    buffers: TreeBuffers
    probs: Optional[torch.Tensor] = None  # [n, V] float, or None


class Proposer:
    """Drafts candidate trees. Override `propose`; `update` gets feedback after each step."""

    needs_hidden = False  # does `propose` need the base model's final (normed) hidden state?
    # Base hidden states it needs instead, indexed as transformers' `hidden_states` (0 the embeddings,
    # i the output of decoder layer i, -1 the final normed state): `propose` and `observe` then get
    # those rows concatenated, [k * H] per token. Empty: the final state when `needs_hidden`, else none.
    feature_layers: tuple[int, ...] = ()
    draft_size = 0  # most nodes drafted beyond the root
    tree = None  # its fixed Tree, if it drafts one (run.json "trees", the tree optimiser)
    heads = None  # its draft heads (heads/common.DraftHeads), if any: fingerprint, draft vocabulary, calibration

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

    def rewind(self, length: int) -> None:
        """The context is back to its first `length` tokens (`SpeculativeDecoder.rewind`): forget
        what was observed past them. The next `propose` gets the hidden state of token length - 1."""

    def fingerprint(self) -> str:
        """What the tree optimiser's cached tables depend on besides the model: its heads', else its class."""
        return self.heads.fingerprint() if self.heads is not None else f"{type(self).__module__}.{type(self).__qualname__}"

    @property
    def draft_vocab_size(self) -> Optional[int]:
        """Tokens it drafts among, when restricted (heads' draft vocabulary); None: all."""
        return self.heads.draft_vocab_size if self.heads is not None else None

    def true_ranks(self, hidden: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, depth: int,
                   top_k: int) -> torch.Tensor:
        """For `--tree auto` (bench/calibrate.py): hidden [S, H] and tokens [S] of one sequence,
        positions [T] -> [T, depth], the rank of each true future token among the proposer's
        candidates at that depth (0 = top-1, top_k = not drafted, -1 past the end)."""
        raise UserError(f"{type(self).__name__} cannot be calibrated: it needs a method "
                        "true_ranks(hidden, tokens, positions, depth, top_k); pass a fixed --tree instead of auto")


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
    text = text_config(config)
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
Hidden = Union[bool, tuple]  # False: none; True: the final normed state; or transformers' hidden_states indices


def forward(model, input_ids: torch.Tensor, cache, position_ids: torch.Tensor, mask: Optional[torch.Tensor],
            want_hidden: Hidden, last_only: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One base forward appending to `cache` (a DynamicCache or the engine's SlotCache). Returns
    logits [q, V] ([1, V] with last_only) and hidden states: [q, H] post-norm for
    `want_hidden=True`, [q, k * H] for k layer indices, else None.
    """
    if not isinstance(cache, SlotCache):
        return model_call(model, input_ids, cache, position_ids, mask, want_hidden, last_only)
    q = input_ids.shape[1]
    cache.reserve(cache.length + q)
    cache.start = cache.length
    out = model_call(model, input_ids, cache, position_ids, mask, want_hidden, last_only)
    cache.length = cache.start = cache.start + q
    return out


def model_call(model, input_ids: torch.Tensor, cache, position_ids: torch.Tensor, mask, want_hidden: Hidden,
               last_only: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The model's forward as `forward` describes it, with no cache bookkeeping (a captured step records this).

    Hidden states come from forward hooks on the layers asked for, never `output_hidden_states`,
    which keeps every layer's [q, H] output (SmolLM2: 31 of them) to hand back one.
    """
    layers = (-1,) if want_hidden is True else tuple(want_hidden or ())
    captured: list = [None] * len(layers)
    handles = [_hook(model, index, captured, slot) for slot, index in enumerate(layers)]
    try:
        out = model(
            input_ids=input_ids,  # [1, q]
            position_ids=position_ids,  # [1, q]
            attention_mask=mask,  # None (causal), [1, 1, q, past + q] additive, or {layer type: such a mask}
            **cache_kwargs(model, cache),
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
        )
    finally:
        for handle in handles:
            handle.remove()
    logits = out.logits[0]  # [q or 1, V]
    if not layers:
        return logits, None
    rows = [c[0] for c in captured]  # each [q, H] (every row, even with last_only)
    return logits, rows[0] if len(rows) == 1 else torch.cat(rows, dim=-1)


_BODIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def body_and_layers(model) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """The decoder body (whose output is the final normed hidden state) and its decoder layers.

    `get_decoder()`/`base_model` miss some (Llama4ForCausalLM answers itself), so: the module
    holding the ModuleList of `num_hidden_layers` layers (LlamaModel.layers, GPT2Model.h, …).
    """
    if model not in _BODIES:
        config = text_config(model.config)
        count = getattr(config, "num_hidden_layers", None)
        for module in model.modules():
            layers = next((c for c in module.children() if isinstance(c, torch.nn.ModuleList) and len(c) == count), None)
            if layers is not None:
                _BODIES[model] = (module, layers)
                break
        else:
            raise UserError(f"cannot find the decoder layers of {type(model).__name__} to read its hidden states")
    return _BODIES[model]


def _hook(model, index: int, captured: list, slot: int):
    """A forward hook storing hidden_states[index] ([1, q, H]) into captured[slot]."""
    body, layers = body_and_layers(model)
    index = index + len(layers) + 1 if index < 0 else index
    if not 0 <= index <= len(layers):
        raise UserError(f"hidden state {index} asked for, but the model has {len(layers)} layers (0 … {len(layers)})")

    def output(module, args, out):
        captured[slot] = out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out

    def embeddings(module, args, kwargs):
        captured[slot] = args[0] if args else kwargs["hidden_states"]

    if index == len(layers):  # the body's output: after the final norm, as transformers' hidden_states[-1]
        return body.register_forward_hook(output)
    if index == 0:  # the first layer's input: the (scaled) embeddings
        return layers[0].register_forward_pre_hook(embeddings, with_kwargs=True)
    return layers[index - 1].register_forward_hook(output)


def cache_length(cache) -> int:
    return cache.length if isinstance(cache, SlotCache) else cache.get_seq_length()


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
    if isinstance(cache, SlotCache):
        return cache.crop(length)
    full_layers(cache)
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]


def keep_in_cache(cache, start: int, keep: torch.Tensor, contiguous: bool) -> None:
    """Keep slots start+keep (sorted, keep[0] == 0) as start…start+m-1 and drop the rest."""
    if isinstance(cache, SlotCache):
        return cache.keep(start, keep, contiguous)
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


# ------------------------------------------------------------------------------ the loop
@dataclass
class DecodeState:
    """One generation between steps (`SpeculativeDecoder.prefill` makes it, `step` advances it)."""

    cache: Union[SlotCache, DynamicCache]  # prompt + tokens, full layers (the engine's kind)
    prompt_ids: list[int]
    tokens: list[int]  # emitted so far (every step's tokens, uncut)
    logits: torch.Tensor  # [V] raw logits for the next root
    hidden: Optional[torch.Tensor]  # [H] (or [k * H], see Proposer.feature_layers) the state that predicted it
    residual: Optional[torch.Tensor]  # [V] sampling: draw the next root from this (a rejection ended the walk)
    sampling: Sampling
    generator: Optional[torch.Generator]

    @property
    def length(self) -> int:
        """Tokens in the context (and the cache): prompt + emitted."""
        return len(self.prompt_ids) + len(self.tokens)

    def checkpoint(self) -> "Checkpoint":
        return Checkpoint(self.length, self.logits, self.hidden, self.residual)


@dataclass(frozen=True)
class Checkpoint:
    """Where a state stood; `SpeculativeDecoder.rewind(state, checkpoint)` puts it back there."""

    length: int
    logits: torch.Tensor  # [V]
    hidden: Optional[torch.Tensor]
    residual: Optional[torch.Tensor]


@dataclass
class StepResult:
    tokens: list[int]  # emitted, root first (not cut at EOS or a limit: the caller cuts)
    path: list[int]  # accepted node indices, root (0) first; [0] for a plain step
    rows: Optional[torch.Tensor] = None  # [a, V] the logits that chose each accepted draft (asked for: logprobs)
    drafted: int = 0  # draft nodes verified (the root not counted); 0 for a plain step


class SpeculativeDecoder:
    """Greedy, typical or sampled decoding with any proposer, sharing one verify step.

    The step API: `state = prefill(prompt_ids, sampling)`, then `step(state)` as often as wanted
    (each emits the root plus the accepted drafts), `rewind(state, checkpoint)` to go back.
    `generate` is the loop over them that `run` and `serve` time.
    """

    autotree = None  # the optimiser's search when the tree is `auto` (bench/autotree.AutoTree): the run folder keeps it
    step_profile = None  # a step-time profile the proposer decides by (decoders/pld.py): the run folder keeps it

    def __init__(self, name: str, loaded, proposer: Proposer, acceptance: Acceptance = Acceptance(), lossless: bool = True,
                 baseline_name: str = "baseline", autotree=None):
        self.name = name
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.engine = engine_of(loaded)  # cache kind and capture mode, shared by every decoder on `loaded`
        self.proposer = proposer
        self.acceptance = acceptance
        self.lossless = lossless and acceptance.rule == "greedy"
        self.draft_size = proposer.draft_size
        # an empty tree (the optimiser's answer where speculation does not pay) is the baseline's exact work
        drafting = proposer.draft_size > 0
        self.hidden_layers: tuple = (tuple(proposer.feature_layers) or ((-1,) if proposer.needs_hidden else ())) if drafting else ()
        self.want_hidden = bool(self.hidden_layers)
        self.baseline_name = baseline_name  # the decoder whose tokens a lossless run must reproduce
        self.autotree = autotree
        self.eos = set(loaded.eos_token_ids)
        # sliding-window / chunked layers: the tree mask must apply their limits (None: the plain mask path)
        self.layout = attention_layout(self.model.config) if self.draft_size > 0 else None
        self.drafts_verified = self.draft_tokens_verified = 0  # running counts over every step

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                 on_step: Optional[StepCallback] = None, logprobs: Optional[int] = None) -> Generation:
        """prefill + steps until EOS, the limit or `on_step` says stop; wall time device-synchronised."""
        drafts_before, draft_tokens_before = self.drafts_verified, self.draft_tokens_verified
        sync(self.device)
        start = time.perf_counter()
        state = self.prefill(prompt_ids, sampling, max_new_tokens)
        out: list[int] = []
        accept_lengths: list[int] = []
        token_logprobs: list = [] if logprobs is not None else None
        finish = "length"
        while len(out) < max_new_tokens:
            root, rows = self.next_root(state), [state.logits]
            done = root in self.eos or len(out) + 1 >= max_new_tokens
            emitted = [root]
            if not done:  # the forward is needed only if the turn goes on after the root
                result = self.step(state, root, rows=token_logprobs is not None)
                emitted = result.tokens
                if token_logprobs is not None:
                    rows.extend(result.rows)
            emitted, finish = self._cut(emitted, max_new_tokens - len(out))
            out.extend(emitted)
            accept_lengths.append(len(emitted))
            if token_logprobs is not None:
                token_logprobs.extend(_logprobs(rows, emitted, logprobs))
            if on_step is not None and on_step(emitted):
                finish = "stop"
            if finish == "stop" or done:
                break
        sync(self.device)
        wall = time.perf_counter() - start
        if len(out) >= max_new_tokens and finish != "stop":
            finish = "length"
        return Generation(out, len(accept_lengths), accept_lengths, wall, finish, token_logprobs,
                          self.drafts_verified - drafts_before, self.draft_tokens_verified - draft_tokens_before)

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int], sampling: Sampling = Sampling(), max_new_tokens: Optional[int] = None) -> DecodeState:
        """The prompt through the base model (the proposer reset and shown its hidden states).

        `max_new_tokens` sizes a static cache (it grows, copying, if a state outlives the guess).
        """
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
        self.proposer.reset(prompt_ids)
        cache = self.engine.new_cache(len(prompt_ids) + (max_new_tokens or 512), self.draft_size)
        prompt = torch.tensor([prompt_ids], device=self.device)  # [1, P]
        positions = torch.arange(len(prompt_ids), device=self.device)[None]  # [1, P]
        logits, hidden = self.engine.forward(prompt, cache, positions, None, self.hidden_layers, last_only=True)
        if hidden is not None:
            self.proposer.observe(hidden)  # [P, H]
            hidden = hidden[-1]  # [H]
        state = DecodeState(cache, prompt_ids, [], logits[-1], hidden, None, sampling, generator)
        self.engine.claim(cache, state)
        return state

    def next_root(self, state: DecodeState) -> int:
        """The base model's own next token (a draw from the residual after a rejection)."""
        if state.residual is not None:
            return int(torch.multinomial(state.residual, 1, generator=state.generator))
        return choose_token(state.logits, state.sampling, state.generator)

    @torch.inference_mode()
    def step(self, state: DecodeState, root: Optional[int] = None, rows: bool = False) -> StepResult:
        """One verify step: the root (`next_root` unless given) + the proposer's draft in one forward.

        Appends the emitted tokens to `state` and sets its next logits, hidden state and residual.
        `rows`: also return the logit rows that chose the accepted drafts (for logprobs).
        """
        if root is None:
            root = self.next_root(state)
        draft = self.proposer.propose(root, state.hidden, state.prompt_ids + state.tokens) if self.draft_size else None
        prefix = cache_length(state.cache)
        if draft is None:  # a plain one-token step: the baseline's whole cost
            tokens = torch.tensor([root], device=self.device)
            positions = torch.tensor([[prefix]], device=self.device)
            logits, hidden = self.engine.forward(tokens[None], state.cache, positions, None, self.hidden_layers)
            self.proposer.update(0)
            if hidden is not None:
                self.proposer.observe(hidden)  # [1, H]
            state.tokens.append(root)
            state.logits, state.hidden, state.residual = logits[0], (hidden[0] if hidden is not None else None), None
            return StepResult([root], [0], logits[:0] if rows else None)
        buffers = draft.buffers
        self.drafts_verified += 1
        self.draft_tokens_verified += buffers.num_nodes - 1
        tokens = draft.tokens.to(self.device)  # [n]
        tokens[0] = root
        positions = (prefix + buffers.depths)[None]  # [1, n]
        # a chain needs no mask: the model's own (windowed) causal mask is the tree's
        mask = None if buffers.max_depth == buffers.num_nodes - 1 else tree_mask(buffers, prefix, self.model.dtype, self.layout)
        logits, hidden = self.engine.forward(tokens[None], state.cache, positions, mask, self.hidden_layers)

        residual = None
        if self.acceptance.rule == "typical":
            path = accept_typical(tokens, logits, buffers, state.sampling, self.acceptance)
        elif state.sampling.greedy:
            path = accept_greedy(tokens, logits, buffers)
        else:
            path, residual = accept_sampled(tokens, logits, buffers, state.sampling, state.generator, draft.probs)
        keep = torch.tensor(path, device=self.device)
        keep_in_cache(state.cache, prefix, keep, contiguous=path == list(range(len(path))))
        self.proposer.update(len(path) - 1)
        if hidden is not None:
            self.proposer.observe(hidden[keep])  # [a + 1, H]: the accepted path's rows
        emitted = tokens[keep].tolist()
        last = path[-1]
        state.tokens.extend(emitted)
        state.logits, state.hidden, state.residual = logits[last], (hidden[last] if hidden is not None else None), residual
        chose = logits[buffers.parents[keep[1:]]] if rows else None  # [a, V]: each draft's parent's row
        return StepResult(emitted, path, chose, buffers.num_nodes - 1)

    def rewind(self, state: DecodeState, checkpoint: Checkpoint) -> None:
        """Put `state` back where `checkpoint` was taken: cache cropped, tokens cut, the proposer told.

        The random generator runs on (a rewound sampled state does not replay its draws).
        """
        crop_cache(state.cache, checkpoint.length)
        del state.tokens[checkpoint.length - len(state.prompt_ids):]
        state.logits, state.hidden, state.residual = checkpoint.logits, checkpoint.hidden, checkpoint.residual
        self.proposer.rewind(checkpoint.length)

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
