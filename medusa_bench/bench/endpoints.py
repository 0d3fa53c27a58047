"""Serving engines as decoders: `medusa-bench run --endpoint NAME=URL`.

An endpoint is an OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, `medusa-bench serve`).
Each turn is one streamed chat completion; from the stream we take the time to first token,
the wall time, the gaps between content chunks (inter-token latency), `usage` (asked for with
`stream_options.include_usage`; else the text is counted with the model's tokenizer and the
answer says so; a server that streams logprobs but no usage, as llama-cpp-python, is counted by
its logprobs entries, one per token), the finish reason, and token ids where the server returns
them (vLLM's and our `token_ids` with `return_token_ids`, or `token_id:N` logprob tokens).

Acceptance comes only from the server's own counters: vLLM's Prometheus
`vllm:spec_decode_num_{drafts,draft_tokens,accepted_tokens}_total` read before and after each
request (τ = 1 + accepted / drafts; names from vllm/v1/spec_decode/metrics.py), our serve's
`usage.decoding_steps`, or `meta_info.spec_verify_ct` (τ = completion tokens / verify steps) where
a response carries it, which SGLang's streamed chat does not. A server with none of these gets
τ = n/a (SGLang, llama-cpp-python); for SGLang the sweep notes its own lifetime average accept
length. A stream that ends without a finish reason was cut and counts as failed. Requests that
fail are retried with backoff; one that still fails is written to `failed.jsonl` (never a silent
zero) and the run goes on; a re-run retries it.

`--concurrency 1,4,16` then runs every question's turns at each level with that many requests in
flight, endpoint by endpoint, and appends one line per endpoint × level to `sweep.jsonl`.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import httpx
from rich.console import Console

from medusa_bench import __version__
from medusa_bench.bench.loop import check_same_settings
from medusa_bench.bench.prompts import conversation
from medusa_bench.bench.questions import Question, load_questions
from medusa_bench.errors import UserError
from medusa_bench.judge.client import RetryPolicy, resolve_api_key
from medusa_bench.results import files

SWEEP_FILE = "sweep.jsonl"
FAILED_FILE = "failed.jsonl"
VLLM_COUNTERS = {"drafts": "vllm:spec_decode_num_drafts_total",
                 "draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
                 "accepted": "vllm:spec_decode_num_accepted_tokens_total"}
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos_total"
# Engine-specific body fields that make servers return token ids; dropped if a server refuses them.
TOKEN_ID_FIELDS = {"return_token_ids": True, "return_tokens_as_token_ids": True, "logprobs": True, "top_logprobs": 0}
ENDPOINT_SETTING_KEYS = ("bench", "question_file", "max_new_tokens", "temperature", "top_p", "seed", "endpoints", "reference")


class RequestFailed(Exception):
    """A request that failed in a way a retry may fix (connection, timeout, 5xx, 429, cut stream)."""

    def __init__(self, message: str, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


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


def server_root(base_url: str) -> str:
    """http://h:8000/v1 → http://h:8000 (where /metrics, /version and /health live)."""
    parsed = urlparse(base_url)
    return f"{parsed.scheme}://{parsed.netloc}"


# ------------------------------------------------------------------------------ Prometheus counters
def parse_prometheus(text: str) -> dict[str, float]:
    """Sum every sample of each metric over its labels, and keep per-position samples apart:
    {'vllm:spec_decode_num_drafts_total': 12.0, 'vllm:..._per_pos_total{position="0"}': 5.0}."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r'^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)', line)
        if not match:
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        values[name] = values.get(name, 0.0) + number
        position = re.search(r'position="(\d+)"', labels or "")
        if name == PER_POS and position:
            key = f'{name}{{position="{position.group(1)}"}}'
            values[key] = values.get(key, 0.0) + number
    return values


def counter_delta(before: Optional[dict], after: Optional[dict]) -> Optional[dict]:
    """Speculative counters between two scrapes: {drafts, draft_tokens, accepted, per_pos, tau}; None without counters."""
    if before is None or after is None or VLLM_COUNTERS["drafts"] not in after:
        return None
    delta = {key: after.get(name, 0.0) - before.get(name, 0.0) for key, name in VLLM_COUNTERS.items()}
    positions = sorted(int(m.group(1)) for k in after if (m := re.search(r'position="(\d+)"', k)) and k.startswith(PER_POS))
    delta["per_pos"] = [after.get(f'{PER_POS}{{position="{i}"}}', 0.0) - before.get(f'{PER_POS}{{position="{i}"}}', 0.0) for i in positions]
    delta = {k: (int(v) if isinstance(v, float) and v.is_integer() else v) for k, v in delta.items()}
    delta["tau"] = round(1 + delta["accepted"] / delta["drafts"], 6) if delta["drafts"] else None
    return delta


# ------------------------------------------------------------------------------ one endpoint
@dataclass
class Turn:
    """One streamed completion, as measured on the client."""

    text: str
    completion_tokens: int
    tokens_from: str  # "usage" | "tokenizer"
    ttft: float
    wall_time: float
    itl: list[float]  # seconds between content chunks
    finish_reason: Optional[str]
    token_ids: Optional[list[int]]
    verify_steps: Optional[int]  # the server's own count: our usage.decoding_steps, SGLang's spec_verify_ct
    counters: Optional[dict] = None  # counter_delta around this request (concurrency 1 only)


@dataclass
class Endpoint:
    """One OpenAI-compatible server; safe to share between threads. The key stays in here."""

    name: str
    base_url: str
    api_key: str = field(repr=False)
    key_env: str = "OPENAI_API_KEY"
    model: Optional[str] = None
    metrics_url: Optional[str] = None
    timeout: float = 300.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Body fields asking for token ids: all of them until the server shows which works (or refuses them).
    token_id_fields: dict = field(default_factory=lambda: dict(TOKEN_ID_FIELDS))
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.metrics_url = self.metrics_url or server_root(self.base_url) + "/metrics"
        self._http = httpx.Client(timeout=httpx.Timeout(self.timeout, connect=10.0),
                                  limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
                                  headers={"Authorization": f"Bearer {self.api_key}"})

    def _scrub(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text

    # ---------------------------------------------------------------- startup checks
    def connect(self, wanted_model: Optional[str]) -> str:
        """Check the server answers, the key works and it serves the model; returns the model id."""
        url = self.base_url + "/models"
        try:
            response = self._http.get(url, timeout=15)
        except httpx.HTTPError as error:
            raise UserError(f"endpoint {self.name}: cannot reach {url} ({type(error).__name__}); is the server running?") from None
        if response.status_code in (401, 403):
            raise UserError(f"endpoint {self.name} refused the API key ({response.status_code}): put the right key in ${self.key_env} or name another variable with --api-key-env")
        if response.status_code != 200:
            raise UserError(f"endpoint {self.name}: GET {url} answered {response.status_code}; is {self.base_url} an OpenAI-compatible /v1 base?")
        try:
            models = [m["id"] for m in response.json().get("data", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"endpoint {self.name}: {url} did not answer OpenAI's model list") from None
        if wanted_model:
            if models and wanted_model not in models:
                raise UserError(f"endpoint {self.name} has no model {wanted_model!r} (it serves {', '.join(models)}); fix --endpoint-model")
            self.model = wanted_model
        elif len(models) == 1:
            self.model = models[0]
        else:
            raise UserError(f"endpoint {self.name} serves {len(models)} models ({', '.join(models) or 'none'}); pick one with --endpoint-model")
        self.info = self._server_info()
        return self.model

    def _server_info(self) -> dict:
        """What the engine says about itself: version, speculative configuration (best effort)."""
        root, info = server_root(self.base_url), {"model": self.model}
        for path in ("/version", "/server_info", "/get_server_info", "/health", "/info"):
            body = self._get_json(root + path)
            if body is None:
                continue
            if path == "/version" and "version" in body:  # vLLM, our serve
                info["version"] = body["version"]
                info.setdefault("engine", body.get("engine", "vllm"))
                info.update({k: body[k] for k in ("decoder", "speculative_config") if k in body})
            elif path.endswith("server_info") and is_sglang_info(body) and info.get("engine") != "sglang":
                # SGLang: /server_info (older versions: /get_server_info) holds its server args and version
                # (python/sglang/srt/entrypoints/http_server.py)
                info["engine"] = "sglang"
                info["version"] = body.get("version")
                spec = {k: v for k, v in body.items() if k.startswith("speculative_") and v is not None}
                if spec:
                    info["speculative_config"] = spec
            elif path == "/info" and "version" in body:  # TGI
                info.setdefault("engine", "tgi")
                info.setdefault("version", body.get("version"))
                if body.get("speculate"):
                    info["speculative_config"] = {"speculate": body["speculate"]}
            elif path == "/health" and "decoder" in body:  # our serve
                info.setdefault("decoder", body["decoder"])
        if "engine" not in info:  # FastAPI servers with none of the above name themselves here (llama-cpp-python)
            described = (self._get_json(root + "/openapi.json") or {}).get("info") or {}
            if described.get("title"):
                info["engine"] = "llama-cpp-python" if "llama.cpp" in str(described["title"]) else str(described["title"])
                info["version"] = described.get("version")
        info["counters"] = VLLM_COUNTERS["drafts"] in (self.scrape() or {})
        return info

    def _get_json(self, url: str) -> Optional[dict]:
        """GET a JSON object, or None when the path is missing or answers something else."""
        try:
            response = self._http.get(url, timeout=5)
            body = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    def server_accept_length(self) -> Optional[float]:
        """SGLang's own mean accept length (`internal_states[].avg_spec_accept_length`): an average over
        everything the server decoded since it started, so informative, not this run's τ. SGLang's
        OpenAI-compatible stream carries no per-request counts and its /metrics has only gauges."""
        if self.info.get("engine") != "sglang":
            return None
        root = server_root(self.base_url)
        for path in ("/server_info", "/get_server_info"):
            body = self._get_json(root + path)
            if body and is_sglang_info(body):
                values = [s.get("avg_spec_accept_length") for s in body.get("internal_states") or [] if isinstance(s, dict)]
                values = [float(v) for v in values if isinstance(v, (int, float))]
                return round(sum(values) / len(values), 6) if values else None
        return None

    def scrape(self) -> Optional[dict]:
        """The server's Prometheus counters, or None when it has no /metrics."""
        try:
            response = self._http.get(self.metrics_url, timeout=10)
        except httpx.HTTPError:
            return None
        return parse_prometheus(response.text) if response.status_code == 200 else None

    # ---------------------------------------------------------------- requests
    def chat(self, messages: list[dict], max_tokens: int, temperature: float, top_p: float, seed: Optional[int],
             count_tokens=None, measure_counters: bool = False) -> Turn:
        """One streamed completion with retries; RequestFailed once they run out, UserError for a fatal 4xx."""
        attempt = 0
        while True:
            try:
                before = self.scrape() if measure_counters else None
                turn = self._stream(messages, max_tokens, temperature, top_p, seed, count_tokens)
                if measure_counters:
                    turn.counters = counter_delta(before, self.scrape())
                return turn
            except RequestFailed as error:
                if attempt >= self.retry.max_retries:
                    raise RequestFailed(f"{error} (after {attempt + 1} tries)") from None
                time.sleep(self.retry.delay(attempt, error.retry_after))
                attempt += 1

    def _body(self, messages, max_tokens, temperature, top_p, seed) -> dict:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                "top_p": top_p, "stream": True, "stream_options": {"include_usage": True}}
        if seed is not None:
            body["seed"] = seed
        body.update(self.token_id_fields)
        return body

    def _stream(self, messages, max_tokens, temperature, top_p, seed, count_tokens) -> Turn:
        body = self._body(messages, max_tokens, temperature, top_p, seed)
        start = time.perf_counter()
        text, chunk_times, token_ids, logprob_ids = [], [], [], []  # logprob_ids: one entry per generated token
        usage, finish, verify, done, saw_ids = None, None, None, False, False
        try:
            with self._http.stream("POST", self.base_url + "/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    self._refuse(response, body)
                    return self._stream(messages, max_tokens, temperature, top_p, seed, count_tokens)  # without token-id fields
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise RequestFailed(f"endpoint {self.name}: the server failed mid-stream: {self._scrub(str(chunk['error'].get('message', chunk['error'])))[:200]}")
                    now = time.perf_counter()
                    usage = chunk.get("usage") or usage
                    verify = _verify_steps(chunk) or verify
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        if delta.get("content"):
                            text.append(delta["content"])
                            chunk_times.append(now)
                        if choice.get("token_ids") is not None:
                            saw_ids = True
                            token_ids.extend(choice["token_ids"])
                        for entry in ((choice.get("logprobs") or {}).get("content") or []):
                            match = re.fullmatch(r"token_id:(\d+)", str(entry.get("token", "")))
                            logprob_ids.append(int(match.group(1)) if match else None)
                        finish = choice.get("finish_reason") or finish
        except httpx.TimeoutException:
            raise RequestFailed(f"endpoint {self.name}: timed out after {self.timeout:.0f} s") from None
        except httpx.HTTPError as error:
            raise RequestFailed(f"endpoint {self.name}: connection lost ({type(error).__name__}: {self._scrub(str(error))[:150]})") from None
        except json.JSONDecodeError:
            raise RequestFailed(f"endpoint {self.name}: the stream held a line that is not JSON") from None
        wall = time.perf_counter() - start
        if not done and finish is None:
            raise RequestFailed(f"endpoint {self.name}: the server closed the stream before the answer ended")
        if finish is None:
            # [DONE] without a finish reason: the answer was cut, e.g. llama-cpp-python's server
            # (interrupt_requests, on by default) ends a stream this way when another request arrives.
            raise RequestFailed(f"endpoint {self.name}: the stream ended without a finish reason (the server cut the answer; "
                                "for llama-cpp-python start it with --interrupt_requests False)")
        if saw_ids and "logprobs" in self.token_id_fields:
            self.token_id_fields = {"return_token_ids": True}  # ids come without logprobs: stop asking for those
        answer = "".join(text)
        ids = token_ids if saw_ids else (logprob_ids if logprob_ids and None not in logprob_ids else None)
        if usage and usage.get("completion_tokens") is not None:
            tokens, source = int(usage["completion_tokens"]), "usage"
            verify = verify or usage.get("decoding_steps")
        elif ids is not None:
            tokens, source = len(ids), "token_ids"
        elif logprob_ids:  # one logprobs entry per generated token, even where its token is text (llama-cpp-python)
            tokens, source = len(logprob_ids), "logprobs"
        else:
            tokens, source = count_tokens(answer) if count_tokens else len(answer.split()), "tokenizer"
        ttft = (chunk_times[0] - start) if chunk_times else wall
        itl = [round(b - a, 6) for a, b in zip(chunk_times, chunk_times[1:])]
        return Turn(answer.strip(), tokens, source, round(ttft, 6), round(wall, 6), itl, finish, ids,
                    int(verify) if verify else None)

    def _refuse(self, response: httpx.Response, body: dict) -> None:
        """A non-200 answer: retryable → RequestFailed; token-id fields refused → drop them (the
        caller asks again); anything else → one-line UserError."""
        status = response.status_code
        message = self._scrub(_error_message(response))
        if status in (408, 429) or status >= 500:
            retry_after = response.headers.get("retry-after")
            raise RequestFailed(f"endpoint {self.name} answered {status}: {message[:200]}",
                                float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None)
        if status in (401, 403):
            raise UserError(f"endpoint {self.name} refused the API key ({status}): put the right key in ${self.key_env}")
        if status == 404 and "model" in message.lower():
            raise UserError(f"endpoint {self.name} has no model {self.model!r} ({message[:150]}); fix --endpoint-model")
        if status in (400, 422) and self.token_id_fields:
            self.token_id_fields = {}  # e.g. TGI rejects unknown fields: ask plainly, compare text
            return
        raise UserError(f"endpoint {self.name} refused the request ({status}): {message[:200]}")

    def close(self) -> None:
        self._http.close()


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        error = body.get("error", body) if isinstance(body, dict) else body
        return str(error.get("message", error) if isinstance(error, dict) else error)
    except ValueError:
        return response.text[:300]


def is_sglang_info(body: dict) -> bool:
    """SGLang's server-info answer (its server args plus internal_states), not vLLM's dev-mode /server_info."""
    return "internal_states" in body or "speculative_algorithm" in body


def _verify_steps(chunk: dict) -> Optional[int]:
    """SGLang's per-request verify count, `meta_info.spec_verify_ct`, wherever a response carries it.
    SGLang itself sets it in /generate answers and, asked with `return_meta_info`, in non-streamed chat
    choices; its streamed chat chunks carry no meta_info (entrypoints/openai/serving_chat.py), so a
    streamed SGLang answer has no per-request τ unless something in between adds it."""
    for holder in (chunk, *(chunk.get("choices") or [])):
        meta = holder.get("meta_info") if isinstance(holder, dict) else None
        if isinstance(meta, dict) and meta.get("spec_verify_ct"):
            return int(meta["spec_verify_ct"])
    return None


# ------------------------------------------------------------------------------ the run
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
    steps = [t.verify_steps if t.verify_steps is not None else (c["drafts"] if c and c["drafts"] else None)
             for t, c in zip(turns, counters)]
    return {
        "index": 0, "turns": [t.text for t in turns], "new_tokens": [t.completion_tokens for t in turns],
        "wall_time": [t.wall_time for t in turns], "decoding_steps": steps, "accept_lengths": None,
        "token_ids": [t.token_ids for t in turns], "temperature": sampling.temperature,
        "ttft": [t.ttft for t in turns], "itl": [t.itl for t in turns], "finish_reason": [t.finish_reason for t in turns],
        "new_tokens_from": [t.tokens_from for t in turns], "spec_counters": counters,
        "tau_counters": [c["tau"] if c else None for c in counters],
    }


def exact_match(choice: dict, reference: Optional[dict]) -> tuple[Optional[list[bool]], Optional[str]]:
    """Per turn, token ids where both answers have them, else text; None when sampled or no reference."""
    if reference is None or choice["temperature"] != 0:
        return None, None
    ref = reference["choices"][0]
    both_ids = all(ids is not None for ids in choice["token_ids"] + (ref.get("token_ids") or [None]))
    if both_ids:
        return [i < len(ref["token_ids"]) and ids == ref["token_ids"][i] for i, ids in enumerate(choice["token_ids"])], "token_ids"
    return [i < len(ref["turns"]) and text == ref["turns"][i] for i, text in enumerate(choice["turns"])], "text"


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


class EndpointDecoder:
    """One endpoint as a decoder of a run: it answers each question over HTTP (`answer_with_endpoint`).

    Beside in-process decoders (`run --endpoint … --decoders …`, loop.run_benchmark) it has what
    the run loop asks of a decoder (`name`, `baseline_name`, `lossless`) plus `answer` and
    `exact_match`. Its reference is the `--reference` endpoint, never an in-process decoder:
    a server's speed and a local model's are timed on different machines, so its answers carry
    the device "endpoint" and the report pairs them only with the reference endpoint's.
    """

    lossless = True  # exact match against the reference endpoint is measured (greedy turns)
    DEVICE = "endpoint"

    def __init__(self, endpoint: Endpoint, reference: Optional[str], count_tokens, run_dir: Path, console: Console):
        self.endpoint, self.name = endpoint, endpoint.name
        self.baseline_name = reference or endpoint.name  # no --reference: no speedup, no exact match
        self.file_id = answer_file_id(endpoint)
        self.count_tokens, self.run_dir, self.console = count_tokens, Path(run_dir), console
        self.failed = 0  # answers that failed after their retries, this call

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
            self.console.print(f"question {question.question_id} on {self.name} failed: {error}; recorded in {FAILED_FILE}, going on",
                               highlight=False, soft_wrap=True)
            files.append_jsonl(self.run_dir / FAILED_FILE, {"question_id": question.question_id, "decoder": self.name,
                                                             "error": str(error), "tstamp": time.time()})
            return None
        return {"question_id": question.question_id, "answer_id": files.answer_id(), "model_id": self.file_id,
                "decoder": self.name, "baseline": self.baseline_name, "category": question.category,
                "tstamp": time.time(), "endpoint": self.endpoint.base_url, "device": self.DEVICE, "choices": [choice]}

    def exact_match(self, choice: dict, reference: Optional[dict]) -> Optional[list[bool]]:
        """Per turn against the reference endpoint's answer (token ids, else text); sets `exact_match_by`."""
        if self.baseline_name == self.name:
            reference = None
        matches, choice["exact_match_by"] = exact_match(choice, reference)
        return matches


def endpoint_decoders(endpoints: dict[str, Endpoint], reference: Optional[str], model: str, run_dir: Path,
                      console: Console) -> dict[str, EndpointDecoder]:
    """name → EndpointDecoder, the reference endpoint first (it answers first within a question);
    text is counted with `model`'s tokenizer where a server gives no usage."""
    count_tokens = TokenCounter(model)
    return {name: EndpointDecoder(endpoints[name], reference, count_tokens, run_dir, console)
            for name in sorted(endpoints, key=lambda n: n != reference)}


def run_endpoint_benchmark(config, run: EndpointRun, console: Optional[Console] = None) -> Path:
    """Run (or resume) a benchmark against serving endpoints alone (no local model); returns the
    run folder. Endpoints beside in-process decoders run in `loop.run_benchmark` (`EndpointDecoder`)."""
    from medusa_bench.bench.loop import run_progress

    console = console or Console(stderr=True)
    question_file, questions = load_questions(config.bench, config.questions, config.limit, config.question_ids, config.categories)
    endpoints = open_endpoints(run)
    names = sorted(endpoints, key=lambda n: n != run.reference)  # the reference answers first within a question
    settings = {"bench": config.bench, "question_file": str(question_file), "max_new_tokens": config.max_new_tokens,
                "temperature": config.temperature, "top_p": config.top_p, "seed": config.seed,
                "endpoints": dict(run.endpoints), "reference": run.reference, "model": endpoints[names[0]].model,
                "device": "endpoint"}
    run_dir = files.ensure_writable_dir(config.out or Path("results") / f"endpoints-{config.bench}")
    lock = files.lock_run_dir(run_dir)  # noqa: F841 — one writer per run folder
    previous = check_same_settings(run_dir, settings, ENDPOINT_SETTING_KEYS)
    files.ensure_writable_dir(run_dir / files.ANSWER_DIR)
    ids = {name: answer_file_id(endpoint) for name, endpoint in endpoints.items()}
    files.write_json(run_dir / files.RUN_FILE, {
        "tool": "medusa-bench", "version": __version__, "created": (previous or {}).get("created", files.now_iso()),
        "updated": files.now_iso(), "git_hash": files.git_hash(), "settings": settings, "decoders": names,
        "models": ids, "versions": files.package_versions(),
        "device": {"type": "endpoint", "name": ", ".join(f"{n}={u}" for n, u in run.endpoints.items())},
        "endpoints": {name: {"url": e.base_url, "metrics_url": e.metrics_url, **e.info} for name, e in endpoints.items()},
        "reference": run.reference, "concurrency": run.concurrency,
    })
    paths = {name: files.answer_path(run_dir, ids[name]) for name in names}
    for path in paths.values():
        files.repair_jsonl(path)
    done = {name: {str(r["question_id"]): r for r in files.read_jsonl(path)} for name, path in paths.items()}
    served = endpoint_decoders(endpoints, run.reference, config.model, run_dir, console)
    todo = [(q, n) for q in questions for n in names if str(q.question_id) not in done[n]]
    if todo:
        for name in dict.fromkeys(n for _, n in todo):
            for _ in range(config.warmup):
                served[name].warm_up(questions[0], config)
        with run_progress(console) as progress:
            task = progress.add_task("starting", total=len(todo))
            for question in questions:
                qid = str(question.question_id)
                for name in names:
                    if qid in done[name]:
                        continue
                    progress.update(task, description=f"q {qid} · {name}")
                    record = served[name].answer(question, config)
                    if record is None:
                        progress.advance(task)
                        continue
                    reference = done.get(run.reference, {}).get(qid)
                    record["choices"][0]["exact_match"] = served[name].exact_match(record["choices"][0], reference)
                    files.append_jsonl(paths[name], record)
                    done[name][qid] = record
                    progress.advance(task)
    else:
        console.print(f"nothing to do: all {len(questions)} questions × {len(names)} endpoints are in {run_dir}", soft_wrap=True)
    finish_endpoints(run_dir, served, questions, done, config, run.concurrency, console)
    return run_dir


def finish_endpoints(run_dir: Path, served: dict, questions: list[Question], done: dict, config, levels: list[int],
                     console: Console) -> None:
    """After the answers: say what failed, run the concurrency sweep (`levels`), close the connections.

    `served`: name → EndpointDecoder, the reference first; `done`: name → {question id: record}."""
    failed = sum(decoder.failed for decoder in served.values())
    if failed:
        console.print(f"{failed} answers failed (see {run_dir / FAILED_FILE}); re-run the same command to retry them", soft_wrap=True)
    endpoints = {name: decoder.endpoint for name, decoder in served.items()}
    if levels:
        count_tokens = next(iter(served.values())).count_tokens
        sweep(run_dir, endpoints, list(served), questions, done, config, levels, count_tokens, console)
    for endpoint in endpoints.values():
        endpoint.close()


# ------------------------------------------------------------------------------ concurrency sweep
def percentiles(values: list[float]) -> dict:
    import numpy as np

    if not values:
        return {"p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(np.asarray(values, dtype=float), [50, 90, 99])
    return {"p50": round(float(p50), 6), "p90": round(float(p90), 6), "p99": round(float(p99), 6)}


def sweep_requests(questions: list[Question], answers: dict, config) -> list[tuple[list[dict], object]]:
    """Every turn of every question as (messages, sampling); turn 2 carries the endpoint's own turn-1 answer."""
    requests = []
    for question in questions:
        record = answers.get(str(question.question_id))
        given = record["choices"][0]["turns"] if record else []
        for turn in range(len(question.turns)):
            if turn > len(given):
                break
            requests.append((conversation(question.turns[: turn + 1], given[:turn]), config.sampling_for(question)))
    return requests


def sweep_level(endpoint: Endpoint, requests: list, level: int, config, count_tokens) -> dict:
    """All requests with `level` in flight (a bounded pool); server-side throughput and latency percentiles."""
    before = endpoint.scrape()
    start = time.perf_counter()
    turns, errors = [], []

    def one(item):
        messages, sampling = item
        return endpoint.chat(messages, config.max_new_tokens, sampling.temperature, sampling.top_p, sampling.seed, count_tokens)

    with cf.ThreadPoolExecutor(max_workers=level, thread_name_prefix=f"sweep-{endpoint.name}") as pool:
        for future in cf.as_completed([pool.submit(one, item) for item in requests]):
            try:
                turns.append(future.result())
            except RequestFailed as error:
                errors.append(str(error))
    elapsed = time.perf_counter() - start
    counters = counter_delta(before, endpoint.scrape())
    tokens = sum(t.completion_tokens for t in turns)
    verify = [t.verify_steps for t in turns]
    if counters and counters["tau"] is not None:
        tau, tau_from = counters["tau"], "metrics"
    elif turns and all(v for v in verify):
        tau, tau_from = round(tokens / sum(verify), 6), "per-request"
    else:
        tau, tau_from = None, None
    return {
        "endpoint": endpoint.name, "model": endpoint.model, "concurrency": level, "requests": len(requests),
        "completed": len(turns), "failed": len(errors), "errors": errors[:3], "duration_s": round(elapsed, 6),
        "output_tokens": tokens, "output_tokens_per_s": round(tokens / elapsed, 4) if elapsed > 0 else None,
        "request_tokens_per_s": percentiles([t.completion_tokens / t.wall_time for t in turns if t.wall_time > 0]),
        "ttft_s": percentiles([t.ttft for t in turns]), "itl_s": percentiles([gap for t in turns for gap in t.itl]),
        "tau": tau, "tau_from": tau_from, "spec_counters": counters,
        "server_avg_accept_length": endpoint.server_accept_length(), "tstamp": time.time(),
    }


def sweep(run_dir: Path, endpoints: dict, names: list[str], questions: list[Question], answers: dict, config,
          levels: list[int], count_tokens, console: Console) -> list[dict]:
    """Each level, each endpoint in turn; appends to sweep.jsonl and skips endpoint × level pairs already there."""
    path = run_dir / SWEEP_FILE
    files.repair_jsonl(path)
    rows = files.read_jsonl(path)
    have = {(r["endpoint"], r["concurrency"]) for r in rows if not r.get("failed")}
    for level in levels:
        for name in names:
            if (name, level) in have:
                continue
            requests = sweep_requests(questions, answers[name], config)
            console.print(f"sweep: {name} at concurrency {level} ({len(requests)} requests)", highlight=False, soft_wrap=True)
            row = sweep_level(endpoints[name], requests, level, config, count_tokens)
            files.append_jsonl(path, row)
            rows.append(row)
            if row["failed"]:
                console.print(f"sweep: {row['failed']} of {row['requests']} requests to {name} failed at concurrency {level}: {row['errors'][0]}", highlight=False, soft_wrap=True)
    return rows

