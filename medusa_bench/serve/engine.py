"""The serving engine: one worker on the model (batches for plain decoding), a bounded waiting line, counters.

HTTP-free so it can be used and tested on its own: `Engine.submit(Job)` returns a
`concurrent.futures.Future[Completion]` or raises `QueueFull`; text arrives incrementally
through `Job.on_text` (stop strings and half-decoded characters are held back), and
`Metrics.render()` gives Prometheus text with vLLM-style speculative-decoding counters.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from medusa_bench.decoders.base import Generation, Sampling


class QueueFull(Exception):
    """The running generation plus the waiting line are full: answer 503."""


class Cancelled(Exception):
    """The client went away before its generation started."""


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    logprobs: Optional[int] = None  # None: no logprobs; k >= 0: k alternatives per token
    on_text: Optional[Callable[[str], None]] = None  # called from the worker thread
    heads: str = "default"  # which of the server's heads drafts it (`serve --heads`)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # emitted tokens, cut after a stop string
    finish_reason: str  # "stop" | "length"
    logprobs: Optional[list]  # per kept token: (logprob, [(token_id, logprob)])
    generation: Generation

    @property
    def acceptance_length(self) -> float:
        steps = self.generation.steps
        return sum(self.generation.accept_lengths) / steps if steps else 0.0


class TextStream:
    """Incremental detokenisation with stop strings.

    `feed(ids)` returns the text that is safe to send: a suffix that could be the start of a
    stop string, or an incomplete UTF-8 character (decoded as U+FFFD), is held back until the
    next tokens decide it. On a stop string the text is cut before it and `stopped` is set.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False
        self.kept_tokens: Optional[int] = None  # tokens up to the one completing the stop string

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def feed(self, new_ids: list[int]) -> str:
        if self.stopped:
            return ""
        before = len(self.ids)
        self.ids.extend(new_ids)
        text = self._decode(self.ids)
        hits = [(text.find(s, self.sent), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            cut, stop = min(hits)
            self.stopped = True
            self.text = text[:cut]
            self.kept_tokens = next(
                (k for k in range(before + 1, len(self.ids) + 1) if stop in self._decode(self.ids[:k])[cut:]),
                len(self.ids),
            )
            return self._take(len(self.text))
        self.text = text
        safe = len(text.rstrip("\ufffd"))
        for s in self.stop:
            for length in range(min(len(s) - 1, safe), 0, -1):
                if text.endswith(s[:length], 0, safe):
                    safe -= length
                    break
        return self._take(safe)

    def finish(self) -> str:
        """The held-back rest of the text once generation is over."""
        return "" if self.stopped else self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta = self.text[self.sent:upto]
        self.sent = upto
        return delta


class Metrics:
    """Counters for /metrics; speculative-decoding ones named after vLLM's spec_decode_* metrics."""

    PREFIX = "medusa_bench:"

    def __init__(self, model_name: str, decoder: str, draft_size: int, heads: Optional[str] = None) -> None:
        # `heads` only on a server with several heads (`serve --heads`): its counters per heads
        heads_label = f',heads="{_escape(heads)}"' if heads else ""
        self.labels = f'model_name="{_escape(model_name)}",decoder="{_escape(decoder)}"{heads_label}'
        self.vllm_labels = f'model_name="{_escape(model_name)}"{heads_label}'
        self.draft_size = draft_size
        self.lock = threading.Lock()
        self.success: dict[str, int] = {"stop": 0, "length": 0}
        self.failed = 0
        self.rejected = 0
        self.cancelled = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps = 0
        self.drafts = 0
        self.draft_tokens = 0
        self.accepted_tokens = 0
        self.accepted_per_pos: list[int] = []
        self.running = 0
        self.waiting = 0
        self.batches = 0  # generations that ran more than one request at once
        self.batched_requests = 0

    def record(self, completion: Completion, prompt_tokens: int) -> None:
        generation = completion.generation
        with self.lock:
            self.success[completion.finish_reason] = self.success.get(completion.finish_reason, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += sum(generation.accept_lengths)
            self.steps += generation.steps
            if self.draft_size:
                self.drafts += generation.drafts
                self.draft_tokens += generation.draft_tokens
            for length in generation.accept_lengths:
                accepted = max(0, length - 1)  # the root (the base model's own token) is not a draft
                self.accepted_tokens += accepted
                while len(self.accepted_per_pos) < accepted:
                    self.accepted_per_pos.append(0)
                for position in range(accepted):
                    self.accepted_per_pos[position] += 1

    def count_batch(self, size: int) -> None:
        with self.lock:
            self.batches += 1
            self.batched_requests += size

    def count(self, what: str) -> None:
        with self.lock:
            setattr(self, what, getattr(self, what) + 1)

    def families(self, gauges: bool = True) -> list[tuple[str, str, str, list[tuple[str, float]]]]:
        """(full name, type, help, [(labels, value)]) of every metric; `gauges=False` leaves out
        the server-wide queue gauges (another heads' Metrics carries them)."""
        p, labels = self.PREFIX, self.labels
        out = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]], prefix: str = p, own: str = labels) -> None:
            out.append((f"{prefix}{name}", kind, help_text, [(f"{own}{extra}", value) for extra, value in samples]))

        with self.lock:
            mean = self.generation_tokens / self.steps if self.steps else 0.0
            per_pos = list(self.accepted_per_pos) or ([0] if self.draft_size else [])
            if gauges:
                metric("num_requests_running", "gauge", "Requests generating now.", [("", self.running)])
                metric("num_requests_waiting", "gauge", "Requests waiting for the model.", [("", self.waiting)])
            metric("request_success_total", "counter", "Finished requests by finish reason.",
                   [(f',finished_reason="{reason}"', n) for reason, n in sorted(self.success.items())])
            metric("request_failure_total", "counter", "Requests whose generation raised an error.", [("", self.failed)])
            metric("request_rejected_total", "counter", "Requests refused with 503 because the queue was full.", [("", self.rejected)])
            metric("request_cancelled_total", "counter", "Requests whose client went away.", [("", self.cancelled)])
            metric("batches_total", "counter", "Generations that decoded several requests at once.", [("", self.batches)])
            metric("batched_requests_total", "counter", "Requests decoded in such a batch.", [("", self.batched_requests)])
            metric("prompt_tokens_total", "counter", "Prompt tokens processed.", [("", self.prompt_tokens)])
            metric("generation_tokens_total", "counter", "Tokens generated.", [("", self.generation_tokens)])
            metric("decode_steps_total", "counter", "Base-model forward passes after prefill.", [("", self.steps)])
            metric("spec_decode_num_drafts_total", "counter", "Steps that verified a draft.", [("", self.drafts)])
            metric("spec_decode_num_draft_tokens_total", "counter", "Draft tokens proposed.", [("", self.draft_tokens)])
            metric("spec_decode_num_accepted_tokens_total", "counter", "Draft tokens accepted.", [("", self.accepted_tokens)])
            metric("spec_decode_num_accepted_tokens_per_pos_total", "counter", "Accepted draft tokens by depth (0 = first draft).",
                   [(f',position="{i}"', n) for i, n in enumerate(per_pos)])
            metric("spec_decode_mean_acceptance_length", "gauge",
                   "Tokens per step (generation_tokens / decode_steps; 1.0 without drafts).", [("", round(mean, 6))])
            if self.draft_size:
                # The three totals (and per position) under vLLM's names, so tools that read vLLM read us.
                # vLLM counts one draft per verify pass of a request, so 1 + accepted / drafts is its
                # tokens per step; here every decoding step of a drafting decoder counts as one (a step
                # whose draft was empty, a last step or a prompt-lookup miss, as a draft of zero tokens),
                # which keeps that identity: 1 + accepted / drafts = generation_tokens / decode_steps.
                vllm = self.vllm_labels
                metric("spec_decode_num_drafts_total", "counter", "Verify passes (every decoding step of a drafting decoder).",
                       [("", self.steps)], "vllm:", vllm)
                metric("spec_decode_num_draft_tokens_total", "counter", "Draft tokens proposed.", [("", self.draft_tokens)], "vllm:", vllm)
                metric("spec_decode_num_accepted_tokens_total", "counter", "Draft tokens accepted.", [("", self.accepted_tokens)], "vllm:", vllm)
                metric("spec_decode_num_accepted_tokens_per_pos_total", "counter", "Accepted draft tokens by position.",
                       [(f',position="{i}"', n) for i, n in enumerate(per_pos)], "vllm:", vllm)
        return out

    def render(self) -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        return render_all([self])


def render_all(metrics: list[Metrics]) -> str:
    """Several Metrics (one per heads) as one exposition: each family's HELP and TYPE once."""
    families: dict[str, tuple[str, str, list]] = {}
    for index, one in enumerate(metrics):
        for name, kind, help_text, samples in one.families(gauges=index == 0):
            families.setdefault(name, (kind, help_text, []))[2].extend(samples)
    lines = []
    for name, (kind, help_text, samples) in families.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{{{labels}}} {value}" for labels, value in samples]
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Engine:
    """Runs jobs on one worker thread: up to `max_batch` waiting jobs at once, `max_waiting` more may wait.

    A non-drafting decoder batches any jobs (serve/batch.py: sampling, logprobs). A drafting one
    batches greedy jobs without logprobs on the same heads through decoders/batched.py, given
    `make_row(heads)` (another decoder like that heads' one, for each further row); other jobs it
    decodes one at a time on its own path."""

    DEFAULT = "default"

    def __init__(self, loaded, decoder, decoder_name: str, model_id: str, max_waiting: int = 16, max_batch: int = 8,
                 heads: Optional[dict] = None, make_row: Optional[Callable[[str], object]] = None) -> None:
        self.loaded = loaded
        self.decoder = decoder
        self.decoder_name = decoder_name
        self.model_id = model_id
        self.max_waiting = max(0, int(max_waiting))
        # Several heads on one base model (LoRAX-style): a request names one; counters per heads.
        self.decoders = {self.DEFAULT: decoder, **(heads or {})}
        self.metrics_by_heads = {name: Metrics(model_id, decoder_name, int(getattr(d, "draft_size", 0) or 0), name if heads else None)
                                 for name, d in self.decoders.items()}
        self.metrics = self.metrics_by_heads[self.DEFAULT]  # also the server-wide gauges and rejections
        # A drafting decoder batches through decoders/batched.py when it can; else one request at a time.
        from medusa_bench.decoders.batched import batch_refusal

        self.make_row = make_row if make_row is not None and batch_refusal(decoder) is None else None
        self.rows: dict[str, list] = {name: [d] for name, d in self.decoders.items()}  # per heads: one decoder per row
        self.max_batch = max(1, int(max_batch)) if not self.metrics.draft_size or self.make_row else 1
        self.started = int(time.time())
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._queue: list[tuple[Job, cf.Future]] = []
        self._admitted = 0
        self._running = 0
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="generate", daemon=True)
        self._worker.start()

    def speculative_config(self) -> Optional[dict]:
        """What this server drafts with, as /version reports it (None for the baseline)."""
        if not self.metrics.draft_size:
            return None
        from medusa_bench.bench.autotree import tree_records

        tree = tree_records({self.decoder_name: self.decoder}).get(self.decoder_name)
        proposer = getattr(self.decoder, "proposer", None)
        return {"method": self.decoder_name, "proposer": type(proposer).__name__ if proposer else None,
                "num_speculative_tokens": self.metrics.draft_size, "tree": tree,
                "acceptance": getattr(getattr(self.decoder, "acceptance", None), "rule", None),
                "heads": list(self.decoders)}

    def submit(self, job: Job) -> cf.Future:
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if self._admitted >= self.max_batch + self.max_waiting:
                self.metrics.count("rejected")
                raise QueueFull(f"server busy: {self._running} requests generating and {self.max_waiting} waiting; retry later")
            self._admitted += 1
            future: cf.Future = cf.Future()
            self._queue.append((job, future))
            self._update_gauges()
            self._ready.notify()
        return future

    def _update_gauges(self) -> None:  # with the lock held
        self.metrics.running = self._running
        self.metrics.waiting = max(0, self._admitted - self._running)

    def _loop(self) -> None:
        """Take what is waiting (up to max_batch), generate, answer the futures; forever."""
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if self._closed:
                    for _, future in self._queue:
                        future.cancel()
                    return
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
                self._running = len(batch)
                self._update_gauges()
            try:
                live = []
                for job, future in batch:
                    if not future.set_running_or_notify_cancel():
                        continue
                    if job.cancelled.is_set():
                        self.metrics_by_heads[job.heads].count("cancelled")
                        future.set_exception(Cancelled())
                        continue
                    live.append((job, future))
                if len(live) > 1 and self.metrics.draft_size and not self._batches_drafting([job for job, _ in live]):
                    for one in live:  # sampled, logprobs or mixed heads: each on the decoder's own path
                        self._answer([one], lambda one=one: [self.generate(one[0])])
                elif len(live) == 1:
                    self._answer(live, lambda: [self.generate(live[0][0])])
                elif live:
                    self._answer(live, lambda: self.generate_batch([job for job, _ in live]))
            finally:
                with self._lock:
                    self._admitted -= len(batch)
                    self._running = 0
                    self._update_gauges()

    def _answer(self, live: list, run) -> None:
        try:
            completions = run()
        except Exception as error:  # the generation failed: these requests only
            for job, future in live:
                self.metrics_by_heads[job.heads].count("failed")
                future.set_exception(error)
            return
        if len(live) > 1:
            self.metrics.count_batch(len(live))
        for (job, future), completion in zip(live, completions):
            metrics = self.metrics_by_heads[job.heads]
            if job.cancelled.is_set():
                metrics.count("cancelled")
            else:
                metrics.record(completion, len(job.prompt_ids))
            future.set_result(completion)

    def _stream(self, job: Job):
        """The job's text stream and the on_step callback that feeds it (True: stop this job)."""
        stream = TextStream(self.loaded.tokenizer, job.stop)

        def on_step(new_ids: list[int]) -> bool:
            delta = stream.feed(new_ids)
            if delta and job.on_text:
                job.on_text(delta)
            return stream.stopped or job.cancelled.is_set()

        return stream, on_step

    def _complete(self, job: Job, stream: TextStream, generation: Generation) -> Completion:
        rest = stream.finish()
        if rest and job.on_text:
            job.on_text(rest)
        kept = stream.kept_tokens if stream.stopped else len(generation.token_ids)
        finish = "stop" if stream.stopped or generation.finish_reason == "stop" else "length"
        logprobs = generation.logprobs[:kept] if generation.logprobs is not None else None
        return Completion(stream.text, list(generation.token_ids[:kept]), finish, logprobs, generation)

    def generate(self, job: Job) -> Completion:
        """Run one job on the calling thread (the worker), on the decoder's own path."""
        stream, on_step = self._stream(job)
        generation = self.decoders[job.heads].generate(
            job.prompt_ids, job.max_tokens, sampling=job.sampling, on_step=on_step, logprobs=job.logprobs
        )
        return self._complete(job, stream, generation)

    def _batches_drafting(self, jobs: list[Job]) -> bool:
        """Can these jobs decode together on the drafting decoder (greedy, no logprobs, one heads)?"""
        return (self.make_row is not None and len({job.heads for job in jobs}) == 1
                and all(job.sampling.greedy and job.logprobs is None for job in jobs))

    def generate_batch(self, jobs: list[Job]) -> list[Completion]:
        """Several jobs in one batch: a drafting decoder's rows through decoders/batched.py, else serve/batch.py."""
        from medusa_bench.serve.batch import generate_batch

        streams = [self._stream(job) for job in jobs]
        if self.metrics.draft_size:
            from medusa_bench.decoders.batched import BatchedDecoder

            rows = self.rows[jobs[0].heads]
            while len(rows) < len(jobs):
                rows.append(self.make_row(jobs[0].heads))
            generations = BatchedDecoder(rows[: len(jobs)]).generate(
                [j.prompt_ids for j in jobs], [j.max_tokens for j in jobs], [on_step for _, on_step in streams])
            return [self._complete(job, stream, generation) for job, (stream, _), generation in zip(jobs, streams, generations)]
        generations = generate_batch(self.loaded, [j.prompt_ids for j in jobs], [j.max_tokens for j in jobs],
                                     [j.sampling for j in jobs], [on_step for _, on_step in streams], [j.logprobs for j in jobs])
        return [self._complete(job, stream, generation) for job, (stream, _), generation in zip(jobs, streams, generations)]

    def render_metrics(self) -> str:
        return render_all(list(self.metrics_by_heads.values()))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._ready.notify_all()
