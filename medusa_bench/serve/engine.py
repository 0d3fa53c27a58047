"""The serving engine: one generation at a time on the model, a bounded waiting line, counters.

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

    def __init__(self, model_name: str, decoder: str, draft_size: int) -> None:
        self.labels = f'model_name="{_escape(model_name)}",decoder="{_escape(decoder)}"'
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

    def count(self, what: str) -> None:
        with self.lock:
            setattr(self, what, getattr(self, what) + 1)

    def render(self) -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        p, labels = self.PREFIX, self.labels

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {p}{name} {help_text}")
            lines.append(f"# TYPE {p}{name} {kind}")
            for extra, value in samples:
                lines.append(f"{p}{name}{{{labels}{extra}}} {value}")

        with self.lock:
            mean = self.generation_tokens / self.steps if self.steps else 0.0
            per_pos = list(self.accepted_per_pos) or ([0] if self.draft_size else [])
            metric("num_requests_running", "gauge", "Requests generating now.", [("", self.running)])
            metric("num_requests_waiting", "gauge", "Requests waiting for the model.", [("", self.waiting)])
            metric("request_success_total", "counter", "Finished requests by finish reason.",
                   [(f',finished_reason="{reason}"', n) for reason, n in sorted(self.success.items())])
            metric("request_failure_total", "counter", "Requests whose generation raised an error.", [("", self.failed)])
            metric("request_rejected_total", "counter", "Requests refused with 503 because the queue was full.", [("", self.rejected)])
            metric("request_cancelled_total", "counter", "Requests whose client went away.", [("", self.cancelled)])
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
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Engine:
    """Runs jobs on one worker thread; at most `max_waiting` jobs wait behind the running one."""

    def __init__(self, loaded, decoder, decoder_name: str, model_id: str, max_waiting: int = 16) -> None:
        self.loaded = loaded
        self.decoder = decoder
        self.decoder_name = decoder_name
        self.model_id = model_id
        self.max_waiting = max(0, int(max_waiting))
        self.metrics = Metrics(model_id, decoder_name, int(getattr(decoder, "draft_size", 0) or 0))
        self.started = int(time.time())
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._lock = threading.Lock()
        self._admitted = 0

    def submit(self, job: Job) -> cf.Future:
        with self._lock:
            if self._admitted >= 1 + self.max_waiting:
                self.metrics.count("rejected")
                raise QueueFull(f"server busy: 1 request generating and {self.max_waiting} waiting; retry later")
            self._admitted += 1
            self._update_gauges()
        try:
            return self._pool.submit(self._run, job)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1
            self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.running = 1 if self._admitted else 0
        self.metrics.waiting = max(0, self._admitted - 1)

    def _run(self, job: Job) -> Completion:
        try:
            if job.cancelled.is_set():
                self.metrics.count("cancelled")
                raise Cancelled()
            completion = self.generate(job)
            if job.cancelled.is_set():
                self.metrics.count("cancelled")
            else:
                self.metrics.record(completion, len(job.prompt_ids))
            return completion
        except Cancelled:
            raise
        except Exception:
            self.metrics.count("failed")
            raise
        finally:
            self._release()

    def generate(self, job: Job) -> Completion:
        """Run one job on the calling thread (the worker)."""
        stream = TextStream(self.loaded.tokenizer, job.stop)

        def on_step(new_ids: list[int]) -> bool:
            delta = stream.feed(new_ids)
            if delta and job.on_text:
                job.on_text(delta)
            return stream.stopped or job.cancelled.is_set()

        generation = self.decoder.generate(
            job.prompt_ids, job.max_tokens, sampling=job.sampling, on_step=on_step, logprobs=job.logprobs
        )
        rest = stream.finish()
        if rest and job.on_text:
            job.on_text(rest)
        kept = stream.kept_tokens if stream.stopped else len(generation.token_ids)
        if stream.stopped or generation.finish_reason == "stop":
            finish = "stop"
        else:
            finish = "length"
        logprobs = generation.logprobs[:kept] if generation.logprobs is not None else None
        return Completion(stream.text, list(generation.token_ids[:kept]), finish, logprobs, generation)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
