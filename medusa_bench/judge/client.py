"""A chat-completions client for LLM judges on any OpenAI-compatible endpoint (openai >= 1).

- Retries with exponential backoff and jitter on rate limits (429), timeouts, connection errors
  and 5xx only, honouring a short `Retry-After`; any other 4xx (bad key, unknown model, bad
  request) stops at once with a `UserError` that says what to fix.
- The API key never leaves this object: it is not logged, not repr'd, and scrubbed from any
  error message the endpoint echoes back.
- `run_bounded` runs work items on a thread pool with bounded concurrency and stops cleanly on
  the first fatal error (items not started are cancelled, items in flight finish).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar
from urllib.parse import urlparse

from medusa_bench.errors import UserError

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
LOCAL_PLACEHOLDER_KEY = "sk-local-no-key"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}

T = TypeVar("T")
R = TypeVar("R")


class JudgeUnavailable(UserError):
    """The endpoint kept failing with retryable errors until the retries ran out."""


def is_local_url(base_url: str | None) -> bool:
    """True for an endpoint on this machine (127.0.0.1, localhost, ::1)."""
    if not base_url:
        return False
    host = urlparse(base_url if "://" in base_url else f"http://{base_url}").hostname or ""
    return host in LOCAL_HOSTS


def resolve_api_key(base_url: str | None, key_env: str = DEFAULT_KEY_ENV) -> str:
    """The key from the environment variable `key_env`; a placeholder for a local endpoint.

    A missing key for a remote endpoint is a `UserError` raised before any work starts.
    """
    key = os.environ.get(key_env, "").strip()
    if key:
        return key
    if is_local_url(base_url):
        return LOCAL_PLACEHOLDER_KEY
    where = base_url or "the OpenAI API"
    raise UserError(
        f"no API key for {where}: set the environment variable {key_env}"
        + ("" if key_env != DEFAULT_KEY_ENV else " (or name another one with --api-key-env)")
    )


@dataclass
class TokenLogprob:
    """One generated token with its logprob and the endpoint's top alternatives."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class ChatResult:
    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    attempts: int = 1


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter: attempt n waits a random time in [d/2, d], d = min(cap, base * 2**n)."""

    max_retries: int = 6
    base: float = 1.0
    cap: float = 60.0
    max_retry_after: float = 120.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry `attempt` (0-based); never shorter than a `Retry-After`."""
        top = min(self.cap, self.base * (2 ** attempt))
        backoff = top / 2 + random.uniform(0, top / 2)
        if retry_after is not None and retry_after >= 0:
            return max(min(retry_after, self.max_retry_after), backoff)
        return backoff


class JudgeClient:
    """Chat completions against one judge model, with retries; safe to share between threads."""

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        key_env: str = DEFAULT_KEY_ENV,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        import openai

        self.model = model
        self.base_url = base_url
        self.key_env = key_env
        self._key = api_key if api_key is not None else resolve_api_key(base_url, key_env)
        self.retry = retry or RetryPolicy()
        self._use_completion_tokens = False
        # The SDK's own retries are off: this class owns the retry policy.
        self._client = openai.OpenAI(api_key=self._key, base_url=base_url or None, timeout=timeout, max_retries=0)

    def __repr__(self) -> str:  # never shows the key
        return f"JudgeClient(model={self.model!r}, base_url={self.base_url!r})"

    @property
    def endpoint(self) -> str:
        return self.base_url or "https://api.openai.com/v1"

    def chat(
        self,
        messages: list[dict],
        max_tokens: int = 2048,
        temperature: float = 0.0,
        top_logprobs: int | None = None,
    ) -> ChatResult:
        """One completion, retried on transient errors; `top_logprobs` asks for token logprobs."""
        import openai

        attempt = 0
        while True:
            try:
                response = self._create(messages, max_tokens, temperature, top_logprobs)
                return self._result(response, attempt + 1)
            except openai.APIStatusError as error:
                status = error.status_code
                if status == 400 and not self._use_completion_tokens and "max_completion_tokens" in str(error.message):
                    self._use_completion_tokens = True  # newer OpenAI models refuse max_tokens
                    continue
                if not _retryable_status(status):
                    raise self._fatal(error) from None
                retry_after = _retry_after(error.response)
                last = f"HTTP {status}: {self._scrub(_short(error.message))}"
            except openai.APITimeoutError:
                retry_after, last = None, "request timed out"
            except openai.APIConnectionError as error:
                retry_after, last = None, f"connection error ({self._scrub(_short(str(error.__cause__ or error)))})"
            if attempt >= self.retry.max_retries:
                raise JudgeUnavailable(
                    f"judge endpoint {self.endpoint} still failing after {attempt + 1} attempts: {last}"
                )
            time.sleep(self.retry.delay(attempt, retry_after))
            attempt += 1

    # ------------------------------------------------------------------------------ internals
    def _create(self, messages, max_tokens, temperature, top_logprobs):
        kwargs: dict = {"model": self.model, "messages": messages, "temperature": temperature, "n": 1}
        kwargs["max_completion_tokens" if self._use_completion_tokens else "max_tokens"] = max_tokens
        if top_logprobs is not None:
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = top_logprobs
        return self._client.chat.completions.create(**kwargs)

    def _result(self, response, attempts: int) -> ChatResult:
        if not getattr(response, "choices", None):
            raise UserError(f"judge endpoint {self.endpoint} returned no choices; is it an OpenAI-compatible chat endpoint?")
        choice = response.choices[0]
        logprobs = None
        content = getattr(getattr(choice, "logprobs", None), "content", None)
        if content is not None:
            logprobs = [
                TokenLogprob(t.token, t.logprob, [(a.token, a.logprob) for a in (t.top_logprobs or [])])
                for t in content
            ]
        return ChatResult(choice.message.content or "", choice.finish_reason, logprobs, attempts)

    def _fatal(self, error) -> UserError:
        status = error.status_code
        detail = self._scrub(_short(error.message))
        if status == 401:
            hint = f"the API key was rejected: check {self.key_env} (or pass --api-key-env NAME)"
        elif status == 403:
            hint = f"access denied for this key: check {self.key_env} and the account's permissions"
        elif status == 404:
            hint = f"model {self.model!r} or endpoint not found: check --judge-model and --judge-base-url"
        else:
            hint = "the request was refused"
        return UserError(f"judge endpoint {self.endpoint} answered HTTP {status}: {hint} ({detail})")

    def _scrub(self, text: str) -> str:
        if self._key and self._key in text:
            text = text.replace(self._key, "***")
        return text


def _retryable_status(status: int) -> bool:
    return status in (408, 429) or status >= 500


def _retry_after(response) -> float | None:
    try:
        value = response.headers.get("retry-after")
        return float(value) if value is not None else None
    except (AttributeError, ValueError, TypeError):
        return None


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_bounded(
    items: Iterable[T],
    work: Callable[[T], R],
    parallel: int,
) -> Iterator[tuple[T, R]]:
    """Run `work` over `items` on at most `parallel` threads; yield (item, result) as they finish.

    The first exception stops the run: items not yet started are dropped, the ones in flight are
    allowed to finish (and are still yielded, so their results are saved), then it is raised.
    """
    parallel = max(1, int(parallel))
    pending = iter(items)
    error: BaseException | None = None
    with cf.ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="judge") as pool:
        running: dict[cf.Future, T] = {}

        def fill() -> None:
            while error is None and len(running) < parallel:
                try:
                    item = next(pending)
                except StopIteration:
                    return
                running[pool.submit(work, item)] = item

        try:
            fill()
            while running:
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    item = running.pop(future)
                    try:
                        result = future.result()
                    except BaseException as exc:  # noqa: BLE001 - re-raised below
                        error = error or exc
                        continue
                    yield item, result
                fill()
        except BaseException:
            for future in running:
                future.cancel()
            raise
    if error is not None:
        raise error
