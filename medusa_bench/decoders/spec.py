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

Below the loop: the base forward, its tree mask and hidden states (runtime/forward.py), the
KV cache and its keep/crop (runtime/cache.py), the engine (runtime/engine.py); beside it the
acceptance rules (acceptance.py). Here: the proposer contract, the state and the step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Union

import torch
from transformers import DynamicCache

from medusa_bench.decoders.acceptance import Acceptance, accept, choose_token
from medusa_bench.decoders.base import Generation, Sampling, StepCallback
from medusa_bench.errors import UserError
from medusa_bench.runtime.cache import SlotCache, cache_length, crop_cache, keep_in_cache
from medusa_bench.runtime.engine import engine_of
from medusa_bench.runtime.forward import attention_layout, sync, tree_mask
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
    wants_logits = False  # is `observe_logits` called with each verify forward's logits (Token Recycling)?

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

    def observe_logits(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """Only if `wants_logits`: the tokens [n] of a base forward and their logits [n, V] (the
        distribution of the token after each): every node of a verified draft, root first, all of
        them whether accepted or not; a plain step's root; every prompt token after prefill (whose
        forward then computes all P rows of logits, not only the last)."""

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
        sync(self.device)
        prefill_time = time.perf_counter() - start
        out: list[int] = []
        accept_lengths: list[int] = []
        # per step, what a profile prices (the prediction check sets them side by side); on CUDA a plain step's
        # forward may finish inside the next step's root choice, so only their sum is exact there
        step_times: list[float] = []
        token_logprobs: list = [] if logprobs is not None else None
        finish = "length"
        while len(out) < max_new_tokens:
            began = time.perf_counter()
            root, rows = self.next_root(state), [state.logits]
            done = root in self.eos or len(out) + 1 >= max_new_tokens
            emitted = [root]
            if not done:  # the forward is needed only if the turn goes on after the root
                result = self.step(state, root, rows=token_logprobs is not None)  # its tokens are on the host: synchronised
                emitted = result.tokens
                if token_logprobs is not None:
                    rows.extend(result.rows)
            step_times.append(0.0 if done else time.perf_counter() - began)
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
                          self.drafts_verified - drafts_before, self.draft_tokens_verified - draft_tokens_before, prefill_time,
                          step_times)

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
        wants_logits = self.proposer.wants_logits and self.draft_size > 0
        logits, hidden = self.engine.forward(prompt, cache, positions, None, self.hidden_layers, last_only=not wants_logits)
        if hidden is not None:
            self.proposer.observe(hidden)  # [P, H]
            hidden = hidden[-1]  # [H]
        if wants_logits:
            self.proposer.observe_logits(prompt[0], logits)  # [P], [P, V]: every prompt token's row
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
            if self.proposer.wants_logits:
                self.proposer.observe_logits(tokens, logits)
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

        path, residual = accept(self.acceptance, tokens, logits, buffers, state.sampling, state.generator, draft.probs)
        keep = torch.tensor(path, device=self.device)
        keep_in_cache(state.cache, prefix, keep, contiguous=path == list(range(len(path))))
        self.proposer.update(len(path) - 1)
        if self.proposer.wants_logits:
            self.proposer.observe_logits(tokens, logits)  # every verified node's row, accepted or not
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
