"""One OpenAI-compatible server, measured from the client: `Endpoint.chat` streams a completion.

From each stream we take the time to first token, the wall time, the gaps between content
chunks (inter-token latency), `usage` (asked for with `stream_options.include_usage`; else the
text is counted with the model's tokenizer and the answer says so; a server that streams
logprobs but no usage, as llama-cpp-python, is counted by its logprobs entries, one per token),
the finish reason, and token ids where the server returns them (vLLM's and our `token_ids` with
`return_token_ids`, or `token_id:N` logprob tokens; llama-server returns neither, and asked for
logprobs while drafting it gives them only for the tokens it decoded without a draft).

Acceptance comes only from the server's own counters: vLLM's Prometheus
`vllm:spec_decode_num_{drafts,draft_tokens,accepted_tokens}_total` read before and after each
request (names from vllm/v1/spec_decode/metrics.py; τ = tokens / (tokens - accepted), every step
counted, `steps_from_counters`; the counters' own 1 + accepted / drafts is vLLM's accept length over
the steps that drafted, kept as `tau_counters`), our serve's
`usage.decoding_steps`, `meta_info.spec_verify_ct` (τ = completion tokens / verify steps) where
a response carries it, which SGLang's streamed chat does not, or llama.cpp's `llama-server`
`timings.draft_n_accepted` in its last streamed chunk (steps = completion tokens - accepted,
`steps_from_timings`; a server whose /slots say it speculates but whose timings carry no draft
counts drafted nothing: one step a token). A server with none of these gets τ = n/a (SGLang,
llama-cpp-python, a plain llama-server). A stream that ends without a finish reason was cut and
counts as failed; requests that fail are retried with backoff (`RequestFailed` once they run out).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlparse

import httpx

from medusa_bench.errors import UserError
from medusa_bench.judge.client import RetryPolicy

VLLM_COUNTERS = {"drafts": "vllm:spec_decode_num_drafts_total",
                 "draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
                 "accepted": "vllm:spec_decode_num_accepted_tokens_total"}
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos_total"
# Engine-specific body fields that make servers return token ids; dropped if a server refuses them.
TOKEN_ID_FIELDS = {"return_token_ids": True, "return_tokens_as_token_ids": True, "logprobs": True, "top_logprobs": 0}


class RequestFailed(Exception):
    """A request that failed in a way a retry may fix (connection, timeout, 5xx, 429, cut stream)."""

    def __init__(self, message: str, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


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


def steps_from_counters(counters: Optional[dict], completion_tokens: Optional[int]) -> Optional[int]:
    """Forwards a turn took, from vLLM-style counters: every step emits its root plus what it accepted,
    so steps = tokens - accepted (the prefill's token counts as a step, as ours do). Not the drafts: a
    step that found nothing to draft (ngram without a match) drafts nothing, and counting drafts only
    put vLLM ngram's τ at 8.98 where its own counters say 2.91. At least the drafts (vLLM counts
    drafts accepted past max_tokens)."""
    if not counters or not counters.get("drafts"):
        return None
    if not completion_tokens:
        return int(counters["drafts"])
    return max(int(counters["drafts"]), int(completion_tokens - counters.get("accepted", 0)), 1)


def steps_from_timings(timings: Optional[dict], completion_tokens: Optional[int], speculative: bool) -> Optional[int]:
    """Forwards a turn took, from llama.cpp's llama-server: its last streamed chunk carries `timings`
    with `draft_n` and `draft_n_accepted` (tools/server/server-common.cpp, server_slot_stats::to_json),
    set only once the slot drafted something. Every step emits one token plus what it accepted, so
    steps = tokens - accepted (the prefill's token a step, as above). A speculating server (its
    /slots say so) whose timings have no draft counts drafted nothing: one step a token. None for
    a plain server, or without timings."""
    if not isinstance(timings, dict) or not completion_tokens:
        return None
    if timings.get("draft_n_accepted") is not None:
        return max(int(completion_tokens - timings["draft_n_accepted"]), 1)
    return int(completion_tokens) if speculative else None


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
        for path in ("/version", "/server_info", "/get_server_info", "/health", "/info", "/props"):
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
            elif path == "/props" and "build_info" in body and "total_slots" in body and "engine" not in info:
                # llama.cpp's llama-server (tools/server/server-context.cpp, get_res_props): build_info is
                # "b<number>-<commit>"; whether it speculates is per slot, in /slots (on by default)
                info["engine"] = "llama.cpp"
                info["version"] = body["build_info"]
                info["slots"] = body["total_slots"]
                slots = self._get_json(root + "/slots", list)
                if slots is not None:
                    info["speculative"] = any(isinstance(s, dict) and s.get("speculative") for s in slots)
        if "engine" not in info:  # FastAPI servers with none of the above name themselves here (llama-cpp-python)
            described = (self._get_json(root + "/openapi.json") or {}).get("info") or {}
            if described.get("title"):
                info["engine"] = "llama-cpp-python" if "llama.cpp" in str(described["title"]) else str(described["title"])
                info["version"] = described.get("version")
        info["counters"] = VLLM_COUNTERS["drafts"] in (self.scrape() or {})
        return info

    def _get_json(self, url: str, kind: type = dict):
        """GET a JSON object (or `kind`), or None when the path is missing or answers something else."""
        try:
            response = self._http.get(url, timeout=5)
            body = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        return body if isinstance(body, kind) else None

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
        usage, finish, verify, done, saw_ids, timings = None, None, None, False, False, None
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
                    timings = chunk.get("timings") or timings  # llama-server: in its last chunk
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
            verify = verify or usage.get("decoding_steps") or steps_from_timings(timings, tokens, bool(self.info.get("speculative")))
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
