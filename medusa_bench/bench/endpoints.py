"""Serving engines as decoders: `medusa-bench run --endpoint NAME=URL`.

An endpoint is an OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, `medusa-bench serve`);
bench/endpoint_client.py measures one streamed completion. Here each endpoint becomes a
`RemoteDecoder` of the run (`EndpointDecoder`): it answers both turns of a question, its
reference is the `--reference` endpoint, and an answer that still fails after its retries goes
to failed.jsonl (bench/failed.py: never a silent zero) while the run goes on; a re-run retries
it and marks it resolved. Endpoint-only runs (`run_endpoint_benchmark`) load no model; beside
in-process decoders the endpoints answer in the same question loop (bench/loop.py). After the
answers, `--concurrency 1,4,16` runs the sweep (bench/sweep.py).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from rich.console import Console

from medusa_bench import __version__
from medusa_bench.bench.answer import exact_match
from medusa_bench.bench.config import check_same_settings
from medusa_bench.bench.endpoint_client import Endpoint, RequestFailed, Turn, steps_from_counters
from medusa_bench.bench.failed import FAILED_FILE, FailedLog
from medusa_bench.bench.progress import run_progress
from medusa_bench.inputs.chat import conversation
from medusa_bench.inputs.questions import Question, load_questions
from medusa_bench.bench.remote import RemoteDecoder
from medusa_bench.bench.run_folder import claimed_run_dir, keep_questions, open_answers
from medusa_bench.bench.sweep import sweep
from medusa_bench.errors import UserError
from medusa_bench.judge.client import RetryPolicy, resolve_api_key
from medusa_bench.results import files

ENDPOINT_SETTING_KEYS = ("bench", "question_file", "max_new_tokens", "temperature", "top_p", "seed", "endpoints", "reference")


# ------------------------------------------------------------------------------ options
def parse_endpoints(specs: list[str]) -> dict[str, str]:
    """['ref=http://h:8000/v1', ...] → {name: base url}; one-line errors for bad specs."""
    endpoints: dict[str, str] = {}
    for spec in specs:
        name, sep, url = spec.partition("=")
        name, url = name.strip(), url.strip().rstrip("/")
        if not sep or not name or not url:
            raise UserError(f"--endpoint {spec!r}: write it as NAME=URL, e.g. ref=http://127.0.0.1:8000/v1")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise UserError(f"--endpoint {spec!r}: NAME may use letters, digits, '.', '_' and '-' only (it names the answer file)")
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise UserError(f"--endpoint {spec!r}: URL must be http(s)://host[:port]/v1")
        if name in endpoints:
            raise UserError(f"--endpoint names {name!r} twice; give each endpoint its own NAME")
        endpoints[name] = url
    return endpoints


def parse_concurrency(text: Optional[str]) -> list[int]:
    if not text:
        return []
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--concurrency must be comma-separated whole numbers, e.g. 1,4,16; got {text!r}") from None
    if not levels or min(levels) < 1:
        raise UserError(f"--concurrency levels must be >= 1, got {text!r}")
    return list(dict.fromkeys(levels))



# ------------------------------------------------------------------------------ answering
@dataclass
class EndpointRun:
    endpoints: dict[str, str]  # name → base url
    reference: Optional[str] = None
    model: Optional[str] = None  # --endpoint-model
    api_key_env: str = "OPENAI_API_KEY"
    metrics_url: Optional[str] = None
    concurrency: list[int] = field(default_factory=list)
    timeout: float = 300.0
    max_retries: int = 4


def answer_file_id(endpoint: Endpoint) -> str:
    """'HuggingFaceTB/SmolLM2-135M-Instruct' + 'spec' → 'SmolLM2-135M-Instruct-spec'."""
    from medusa_bench.models import model_name

    return f"{model_name(endpoint.model or 'model')}-{endpoint.name}"


class TokenCounter:
    """Counts text with the model's tokenizer, loaded only when a server gives no usage."""

    def __init__(self, model: str) -> None:
        self.model, self.tokenizer = model, None

    def __call__(self, text: str) -> int:
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            from medusa_bench.models import resolve_source

            self.tokenizer = AutoTokenizer.from_pretrained(resolve_source(self.model)[0])
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_with_endpoint(endpoint: Endpoint, question: Question, config, count_tokens) -> dict:
    """Both turns of one question against one endpoint; turn 2 carries its own turn-1 answer."""
    sampling = config.sampling_for(question)
    turns: list[Turn] = []
    for turn in range(len(question.turns)):
        messages = conversation(question.turns[: turn + 1], [t.text for t in turns])
        turns.append(endpoint.chat(messages, config.max_new_tokens, sampling.temperature, sampling.top_p, sampling.seed,
                                   count_tokens, measure_counters=True))
    counters = [t.counters for t in turns]
    steps = [t.verify_steps if t.verify_steps is not None else steps_from_counters(c, t.completion_tokens)
             for t, c in zip(turns, counters)]
    return {
        "index": 0, "turns": [t.text for t in turns], "new_tokens": [t.completion_tokens for t in turns],
        "wall_time": [t.wall_time for t in turns], "decoding_steps": steps, "accept_lengths": None,
        "token_ids": [t.token_ids for t in turns], "temperature": sampling.temperature,
        "ttft": [t.ttft for t in turns], "itl": [t.itl for t in turns], "finish_reason": [t.finish_reason for t in turns],
        "new_tokens_from": [t.tokens_from for t in turns], "spec_counters": counters,
        "tau_counters": [c["tau"] if c else None for c in counters],
    }


def open_endpoints(run: EndpointRun) -> dict[str, Endpoint]:
    """The run's endpoints, connected (model id resolved, engine info read); one line for a bad one."""
    if run.reference and run.reference not in run.endpoints:
        raise UserError(f"--reference {run.reference!r} is not an --endpoint name ({', '.join(run.endpoints)})")
    endpoints = {}
    for name, url in run.endpoints.items():
        key = resolve_api_key(url, run.api_key_env)
        endpoints[name] = Endpoint(name, url, key, run.api_key_env, metrics_url=run.metrics_url, timeout=run.timeout,
                                   retry=RetryPolicy(max_retries=run.max_retries, base=0.5, cap=10.0))
    for endpoint in endpoints.values():
        endpoint.connect(run.model)
    return endpoints




# ------------------------------------------------------------------------------ an endpoint as a decoder
class EndpointDecoder(RemoteDecoder):
    """One endpoint as a decoder of a run: it answers each question over HTTP (`answer_with_endpoint`).

    Its reference is the `--reference` endpoint, never an in-process decoder: a server's speed
    and a local model's are timed on different machines, so its answers carry the device
    "endpoint" and the report pairs them only with the reference endpoint's.
    """

    def __init__(self, endpoint: Endpoint, reference: Optional[str], count_tokens, run_dir: Path, console: Console):
        self.endpoint, self.name = endpoint, endpoint.name
        self.baseline_name = reference or endpoint.name  # no --reference: no speedup, no exact match
        self.file_id = answer_file_id(endpoint)
        self.count_tokens, self.console = count_tokens, console
        self.failed_log = FailedLog(run_dir)
        self.answered = 0  # answers this call
        self.failed = 0  # answers that failed after their retries, this call
        self.failing = 0  # of them, the ones since its last answer: all of them means the server went away

    def describe(self) -> dict:
        """run.json's record of this endpoint (the key is never in it)."""
        return {"url": self.endpoint.base_url, "metrics_url": self.endpoint.metrics_url, "file_id": self.file_id, **self.endpoint.info}

    def warm_up(self, question: Question, config) -> None:
        """Untimed: the server's lazy start-up (CUDA graphs, caches) off the clock; one try."""
        try:
            self.endpoint._stream(conversation(question.turns[:1], []), min(config.max_new_tokens, 32), 0.0, 1.0, None, None)
        except RequestFailed as error:  # a failing server shows up in the timed requests, with retries
            self.console.print(f"warm-up of {self.name} failed ({error}); going on", highlight=False, soft_wrap=True)

    def answer(self, question: Question, config) -> Optional[dict]:
        """The answer record of both turns, or None when the request failed after its retries
        (then it is in failed.jsonl, never a silent zero, and the same command retries it)."""
        try:
            choice = answer_with_endpoint(self.endpoint, question, config, self.count_tokens)
        except RequestFailed as error:
            self.failed += 1
            self.failing += 1
            self.console.print(f"question {question.question_id} on {self.name} failed: {error}; recorded in {FAILED_FILE}, going on",
                               highlight=False, soft_wrap=True)
            self.failed_log.add(question.question_id, self.name, str(error))
            return None
        self.answered += 1
        self.failing = 0
        return {"question_id": question.question_id, "answer_id": files.answer_id(), "model_id": self.file_id,
                "decoder": self.name, "baseline": self.baseline_name, "category": question.category,
                "tstamp": time.time(), "endpoint": self.endpoint.base_url, "device": self.DEVICE, "choices": [choice]}

    def stopped_answering(self) -> Optional[str]:
        """One line when every request after its answers failed (the server went away mid-run), else None."""
        if not (self.answered and self.failing == self.failed > 0):
            return None
        return (f"endpoint {self.name} stopped answering: after {self.answered} answered, all {self.failed} questions since "
                "failed (is the server still up?)")


def endpoint_decoders(endpoints: dict[str, Endpoint], reference: Optional[str], model: str, run_dir: Path,
                      console: Console) -> dict[str, EndpointDecoder]:
    """name → EndpointDecoder, the reference endpoint first (it answers first within a question);
    text is counted with `model`'s tokenizer where a server gives no usage."""
    count_tokens = TokenCounter(model)
    return {name: EndpointDecoder(endpoints[name], reference, count_tokens, run_dir, console)
            for name in sorted(endpoints, key=lambda n: n != reference)}


# ------------------------------------------------------------------------------ the run
def run_endpoint_benchmark(config, run: EndpointRun, console: Optional[Console] = None) -> Path:
    """Run (or resume) a benchmark against serving endpoints alone (no local model); returns the
    run folder. Endpoints beside in-process decoders run in `loop.run_benchmark`."""
    console = console or Console(stderr=True)
    question_file, questions = load_questions(config.bench, config.questions, config.limit, config.question_ids, config.categories, config.per_task)
    endpoints = open_endpoints(run)
    names = sorted(endpoints, key=lambda n: n != run.reference)  # the reference answers first within a question
    settings = {"bench": config.bench, "question_file": str(question_file), "max_new_tokens": config.max_new_tokens,
                "temperature": config.temperature, "top_p": config.top_p, "seed": config.seed,
                "endpoints": dict(run.endpoints), "reference": run.reference, "model": endpoints[names[0]].model,
                "device": "endpoint"}
    with claimed_run_dir(config.out or Path("results") / f"endpoints-{config.bench}") as run_dir:
        previous = check_same_settings(run_dir, settings, ENDPOINT_SETTING_KEYS)
        files.ensure_writable_dir(run_dir / files.ANSWER_DIR)
        served = endpoint_decoders(endpoints, run.reference, config.model, run_dir, console)
        files.write_json(run_dir / files.RUN_FILE, {
            "tool": "medusa-bench", "version": __version__, "created": (previous or {}).get("created", files.now_iso()),
            "updated": files.now_iso(), "git_hash": files.git_hash(), "settings": settings, "decoders": names,
            "models": {name: decoder.file_id for name, decoder in served.items()}, "versions": files.package_versions(),
            "device": {"type": "endpoint", "name": ", ".join(f"{n}={u}" for n, u in run.endpoints.items())},
            "endpoints": {name: {k: v for k, v in d.describe().items() if k != "file_id"} for name, d in served.items()},
            "reference": run.reference, "concurrency": run.concurrency,
        })
        keep_questions(run_dir, questions)
        paths, done = open_answers(run_dir, None, names, {name: decoder.file_id for name, decoder in served.items()})
        todo = [(q, n) for q in questions for n in names if str(q.question_id) not in done[n]]
        if todo:
            answer_all(questions, names, served, done, paths, config, console)
        else:
            console.print(f"nothing to do: all {len(questions)} questions × {len(names)} endpoints are in {run_dir}", soft_wrap=True)
        finish_endpoints(run_dir, served, questions, done, config, run.concurrency, console)
    return run_dir


def answer_all(questions: list[Question], names: list[str], served: dict, done: dict, paths: dict, config, console: Console) -> None:
    """Every missing (question, endpoint) answer, question by question, the reference first; `done` kept current."""
    todo = sum(str(q.question_id) not in done[n] for q in questions for n in names)
    for name in dict.fromkeys(n for q in questions for n in names if str(q.question_id) not in done[n]):
        for _ in range(config.warmup):
            served[name].warm_up(questions[0], config)
    with run_progress(console) as progress:
        task = progress.add_task("starting", total=todo)
        for question in questions:
            qid = str(question.question_id)
            for name in names:
                if qid in done[name]:
                    continue
                progress.update(task, description=f"q {qid} · {name}")
                record = served[name].answer(question, config)
                progress.advance(task)
                if record is None:
                    continue
                reference = done.get(served[name].baseline_name, {}).get(qid)
                record["choices"][0]["exact_match"] = exact_match(record["choices"][0], served[name], reference, name)
                files.append_jsonl(paths[name], record)
                done[name][qid] = record


def finish_endpoints(run_dir: Path, served: dict, questions: list[Question], done: dict, config, levels: list[int],
                     console: Console) -> None:
    """After the answers: mark the failures this run filled as resolved, say which answers are still
    missing (an endpoint that went away in one line), run the concurrency sweep (`levels`), close
    the connections.

    `served`: name → EndpointDecoder, the reference first; `done`: name → {question id: record}."""
    log = FailedLog(run_dir)
    log.resolve(done)
    for decoder in served.values():
        line = decoder.stopped_answering()
        if line:
            console.print(line, highlight=False, soft_wrap=True)
    missing = log.unresolved()
    if missing:  # this run's failures and any an earlier run left that this one did not retry
        console.print(f"answers missing: {len(missing)} failed after their retries (see {log.path}); "
                      "re-run the same command to retry them", highlight=False, soft_wrap=True)
    endpoints = {name: decoder.endpoint for name, decoder in served.items()}
    if levels:
        count_tokens = next(iter(served.values())).count_tokens
        sweep(run_dir, endpoints, list(served), questions, done, config, levels, count_tokens, console)
    for endpoint in endpoints.values():
        endpoint.close()
