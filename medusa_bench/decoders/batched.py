"""Batch > 1: B prompts decoded together, each step one base forward over every row's tree.

The verify step of decoders/spec.py, batched. Each row is one sequence with its own proposer (the
decoders are built alike, one per row: a proposer's state — EAGLE's draft cache, prompt lookup's
context, Token Recycling's matrix — belongs to one sequence). A step:

1. each row's root is the argmax of its last logits; a row whose root ends it (EOS, its limit)
   leaves the batch, cache rows included, before the forward;
2. each row's proposer drafts under its root; the trees are padded to the largest (a pad node
   sees only itself and is never accepted) and verified in one forward [B, n] with a per-row
   tree mask over that row's cache columns (runtime/batch.Columns) at positions length_b + depth;
3. each row accepts its own longest path (decoders/acceptance.accept, the same rule as batch 1)
   and keeps it in the cache (`SlotCache.keep_rows`): per-row acceptance, one tree shape per step.

The baseline is the same loop with no drafts (one token per row a step), so a speedup at batch B
compares like with like. Greedy only: a batched row must equal the same row of the same-B
baseline, which is what the batch > 1 check measures (tests/test_batched.py).

Batched rows see other matmul shapes than one sequence alone, so their logits can differ from
batch 1 in the last bits: a near-tie may then flip (the losslessness verdict compares margins).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from medusa_bench.decoders.acceptance import accept
from medusa_bench.decoders.base import Generation, Sampling, StepCallback
from medusa_bench.decoders.spec import SpeculativeDecoder
from medusa_bench.errors import UserError
from medusa_bench.runtime.batch import Columns, forward_rows
from medusa_bench.runtime.cache import SlotCache
from medusa_bench.runtime.forward import sync

GREEDY = Sampling()


@dataclass
class Row:
    """One sequence of the batch between steps."""

    index: int  # its prompt's index in the call
    decoder: SpeculativeDecoder  # whose proposer drafts for this row only
    prompt_ids: list[int]
    limit: int  # max new tokens
    on_step: Optional[StepCallback] = None  # True: stop this row here (decoders/base.StepCallback)
    logits: torch.Tensor = None  # [V] the next root's
    hidden: Optional[torch.Tensor] = None  # [k * H] the state that predicted it
    tokens: list[int] = field(default_factory=list)
    accept_lengths: list[int] = field(default_factory=list)
    drafts: int = 0
    draft_tokens: int = 0
    finish: str = "length"


@dataclass
class BatchState:
    """A batch between steps: every row in prompt order, the active ones in cache-row order."""

    rows: list[Row]
    active: list[Row]
    cache: SlotCache  # [B_active] rows, common columns
    columns: Columns  # which columns each active row sees


@dataclass(frozen=True)
class BatchCheckpoint:
    length: int  # cache columns
    width: int
    lengths: torch.Tensor  # [B] context tokens per row
    rows: list  # per active row: (tokens, steps, logits, hidden)


def batch_refusal(decoder) -> Optional[str]:
    """Why `decoder` cannot decode rows together (None: it can)."""
    if type(decoder) is not SpeculativeDecoder:  # its own step (sps: a draft model's cache), not the shared one
        return f"{decoder.name} drafts in its own loop ({type(decoder).__name__}), not the shared verify step"
    if decoder.engine.cache == "dynamic" or decoder.layout is not None:
        return f"{decoder.name}: batched decoding needs the static cache and full attention layers"
    if decoder.acceptance.rule != "greedy":
        return f"{decoder.name}: batched decoding verifies greedily only, not --acceptance {decoder.acceptance.rule}"
    return None


class BatchedDecoder:
    """`decoders`: one per row, built alike (same name, tree and options) on one loaded model."""

    def __init__(self, decoders: list[SpeculativeDecoder]):
        first = decoders[0]
        if any(d.name != first.name or d.loaded is not first.loaded for d in decoders):
            raise ValueError("a batch's decoders must be one decoder built once per row on one model")
        if any(proposer is first.proposer for proposer in (d.proposer for d in decoders[1:])):
            raise ValueError("each row needs its own proposer: build the decoder once per row")
        refusal = batch_refusal(first)
        if refusal is not None:
            raise UserError(refusal + "; decode it at batch 1")
        self.decoders, self.name = decoders, first.name
        self.loaded, self.model, self.device = first.loaded, first.model, first.device
        self.hidden_layers, self.eos = first.hidden_layers, first.eos
        self.drafting = first.draft_size > 0
        self.wants_logits = self.drafting and first.proposer.wants_logits
        self.lossless = first.lossless

    @property
    def batch_size(self) -> int:
        return len(self.decoders)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: Union[int, list[int]],
                 on_steps: Optional[list[Optional[StepCallback]]] = None) -> list[Generation]:
        """One Generation per prompt; a row's wall time runs from the call's start to the step it
        finished at, so its latency includes waiting for the other rows (and, beyond `batch_size`
        prompts, for a free slot). `max_new_tokens`: one limit for all or one per prompt;
        `on_steps[i](tokens)` True: prompt i stops there (`serve`'s stop strings and cancellations).

        More prompts than `batch_size` decode as a stream (continuous batching): whenever enough
        rows have finished, the next prompts are prefilled and join the running batch."""
        sync(self.device)
        start = time.perf_counter()
        limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        on_steps = on_steps or [None] * len(prompts)
        rows = [Row(i, None, prompt, limit, on_step) for i, (prompt, limit, on_step) in enumerate(zip(prompts, limits, on_steps))]
        waiting = rows[self.batch_size:]
        state = self.start(rows[: self.batch_size])
        walls = [0.0] * len(rows)
        while state.active:
            ended = self.step(state)
            if ended:
                sync(self.device)
                for row in ended:
                    walls[row.index] = time.perf_counter() - start
            free = self.batch_size - len(state.active)
            if waiting and free >= min(self.refill_at, len(waiting)):
                joining, waiting = waiting[:free], waiting[free:]
                self.admit(state, joining)
        return [Generation(row.tokens, len(row.accept_lengths), row.accept_lengths, walls[row.index], row.finish, None,
                           row.drafts, row.draft_tokens) for row in rows]

    @property
    def refill_at(self) -> int:
        """Free slots that make newcomers join: each join prefills them and copies the whole cache once."""
        return max(1, self.batch_size // 4)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], max_new_tokens: Union[int, list[int]],
                on_steps: Optional[list[Optional[StepCallback]]] = None) -> BatchState:
        """Left-padded prompts in one forward; each row's proposer reset and shown its own rows."""
        if not 0 < len(prompts) <= self.batch_size:
            raise ValueError(f"{len(prompts)} prompts for a batch of {self.batch_size}")
        limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        on_steps = on_steps or [None] * len(prompts)
        return self.start([Row(i, None, prompt, limit, on_step)
                           for i, (prompt, limit, on_step) in enumerate(zip(prompts, limits, on_steps))])

    def start(self, rows: list[Row]) -> BatchState:
        """A new batch of these rows (each given a decoder of its own), prefilled."""
        for row, decoder in zip(rows, self.decoders):
            row.decoder = decoder
        cache, columns = self._prefill(rows)
        return BatchState(list(rows), list(rows), cache, columns)

    @torch.inference_mode()
    def admit(self, state: BatchState, rows: list[Row]) -> None:
        """Rows join a running batch (at most the free slots): prefilled on their own, then their cache
        rows and columns appended, both batches right-aligned at one width; the leading columns that
        no active row sees any more are dropped, so the width stays near the longest live context."""
        busy = [row.decoder for row in state.active]
        free = [d for d in self.decoders if all(d is not b for b in busy)]
        if len(rows) > len(free):
            raise ValueError(f"{len(rows)} rows join a batch with {len(free)} free slots")
        for row, decoder in zip(rows, free):
            row.decoder = decoder
        cache, columns = self._prefill(rows)
        state.rows += rows
        if not state.active:
            state.active, state.cache, state.columns = list(rows), cache, columns
            return
        first = state.columns.first_used()
        width = max(state.columns.width - first, columns.width)
        capacity = width + self._room(state.active + rows)
        state.cache.join(cache, first, width, capacity)
        state.columns.join(columns, first, width, capacity)
        state.active += rows

    def _room(self, rows: list[Row]) -> int:
        """Cache columns past the context that the rows' remaining tokens and one tree may need."""
        draft = max(d.draft_size for d in self.decoders) + 1
        return max(row.limit - len(row.tokens) for row in rows) * (2 if self.drafting else 1) + draft

    def _prefill(self, rows: list[Row]) -> tuple[SlotCache, Columns]:
        lengths = [len(row.prompt_ids) for row in rows]
        width = max(lengths)
        capacity = width + self._room(rows)  # holes: the cache grows if short
        cache = SlotCache(self.decoders[0].engine.num_layers, capacity)
        columns = Columns(lengths, capacity, self.device)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids)
            row.decoder.proposer.reset(row.prompt_ids)
        ids = ids.to(self.device)  # [B, P]
        mask = columns.prefill_mask(self.model.dtype)
        logits, hidden = forward_rows(self.model, ids, cache, columns.prefill_positions(), mask, self.hidden_layers,
                                      last_only=not self.wants_logits)
        for b, row in enumerate(rows):
            own = slice(width - len(row.prompt_ids), width)
            row.logits = logits[b, -1]
            if hidden is not None:
                row.decoder.proposer.observe(hidden[b, own])  # [P_b, H]
                row.hidden = hidden[b, -1]
            if self.wants_logits:
                row.decoder.proposer.observe_logits(ids[b, own], logits[b, own])
        return cache, columns

    @torch.inference_mode()
    def step(self, state: BatchState) -> list[Row]:
        """One step of every active row: the rows whose root ends them emit it and leave; the others
        are verified in one forward. Returns the rows that ended in this step (they left `active`)."""
        going, ended = [], []
        for row in state.active:
            root = int(row.logits.argmax())
            if root in self.eos or len(row.tokens) + 1 >= row.limit:  # the root ends it: no forward for this row
                self._emit(row, [root])
                ended.append(row)
            else:
                going.append((row, root))
        if ended:
            self._leave(state, ended)
        if going:
            finished = self.verify(state, [root for _, root in going])
            if finished:
                self._leave(state, finished)
                ended += finished
        return ended

    def checkpoint(self, state: BatchState) -> BatchCheckpoint:
        """Where the active rows stand (no row may leave before `rewind`: the step profile uses it)."""
        return BatchCheckpoint(state.cache.length, state.columns.width, state.columns.lengths.clone(),
                               [(len(row.tokens), len(row.accept_lengths), row.logits, row.hidden) for row in state.active])

    def rewind(self, state: BatchState, mark: BatchCheckpoint) -> None:
        """Back to `mark`: cache and columns cut, tokens cut, each proposer told."""
        state.cache.crop(mark.length)
        state.columns.width, state.columns.lengths = mark.width, mark.lengths.clone()
        for row, (tokens, steps, logits, hidden) in zip(state.active, mark.rows):
            del row.tokens[tokens:], row.accept_lengths[steps:]
            row.logits, row.hidden = logits, hidden
            row.decoder.proposer.rewind(len(row.prompt_ids) + tokens)

    def _leave(self, state: BatchState, ended: list[Row]) -> None:
        """The ended rows leave the batch, their cache rows and columns with them."""
        still = [i for i, row in enumerate(state.active) if all(row is not done for done in ended)]
        if still and len(still) < len(state.active):
            keep = torch.tensor(still, device=self.device)
            state.cache.select_rows(keep)
            state.columns.select(keep)
        state.active = [state.active[i] for i in still]

    # -------------------------------------------------------------------------- the verify step
    def verify(self, state: BatchState, roots: list[int]) -> list[Row]:
        """Every active row's root and draft in one forward, each row's own path kept; returns the
        rows that finished (EOS or their limit) but leaves them in `active` (`step` removes them)."""
        going, cache, columns = list(zip(state.active, roots)), state.cache, state.columns
        drafts = [row.decoder.proposer.propose(root, row.hidden, row.prompt_ids + row.tokens) if self.drafting else None
                  for row, root in going]
        sizes = [d.buffers.num_nodes if d is not None else 1 for d in drafts]
        n = max(sizes)
        tokens = torch.zeros(len(going), n, dtype=torch.long, device=self.device)  # [B, n]
        depths = torch.zeros(len(going), n, dtype=torch.long, device=self.device)  # [B, n]
        tree = torch.eye(n, dtype=torch.bool, device=self.device).repeat(len(going), 1, 1)  # [B, n, n]: pads see themselves
        for b, ((row, root), draft) in enumerate(zip(going, drafts)):
            tokens[b, 0] = root
            if draft is not None:
                size = sizes[b]
                tokens[b, 1:size] = draft.tokens[1:].to(self.device)
                depths[b, :size] = draft.buffers.depths
                tree[b, :size, :size] = draft.buffers.attn_mask
        assert cache.length == columns.width, "every row's columns end where the cache does"
        positions = columns.lengths[:, None] + depths  # [B, n]
        mask = columns.step_mask(tree, self.model.dtype)  # [B, 1, n, W + n]
        logits, hidden = forward_rows(self.model, tokens, cache, positions, mask, self.hidden_layers)

        paths = []
        for b, ((row, root), draft) in enumerate(zip(going, drafts)):
            proposer, size = row.decoder.proposer, sizes[b]
            if draft is None:
                path = [0]
            else:
                path, _ = accept(row.decoder.acceptance, tokens[b, :size], logits[b, :size], draft.buffers, GREEDY, None)
                row.drafts, row.draft_tokens = row.drafts + 1, row.draft_tokens + size - 1
            if self.drafting:
                proposer.update(len(path) - 1)
                if proposer.wants_logits:
                    proposer.observe_logits(tokens[b, :size], logits[b, :size])
                if hidden is not None:
                    proposer.observe(hidden[b, path])  # [a + 1, H]
            paths.append(path)
        longest = max(len(path) for path in paths)
        keep = torch.tensor([path + [path[-1]] * (longest - len(path)) for path in paths], device=self.device)  # [B, m]
        cache.keep_rows(columns.width, keep, contiguous=all(path == list(range(len(path))) for path in paths))
        columns.keep([len(path) for path in paths])

        finished = []
        for b, ((row, _), path) in enumerate(zip(going, paths)):
            row.logits, row.hidden = logits[b, path[-1]], (hidden[b, path[-1]] if hidden is not None else None)
            if self._emit(row, tokens[b, path].tolist()):
                finished.append(row)
        return finished

    def _emit(self, row: Row, emitted: list[int]) -> bool:
        """Append a step's tokens cut at EOS and the row's limit (SpeculativeDecoder._cut); True: the row is done."""
        emitted, finish = row.decoder._cut(emitted, row.limit - len(row.tokens))
        row.tokens.extend(emitted)
        row.accept_lengths.append(len(emitted))
        if row.on_step is not None and row.on_step(emitted):
            finish = "stop"
        row.finish = finish
        return finish == "stop" or len(row.tokens) >= row.limit
