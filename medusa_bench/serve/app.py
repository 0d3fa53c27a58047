"""An OpenAI-compatible HTTP server over one decoder: `medusa-bench serve`.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (streaming by server-sent events,
logprobs, stop strings, seed), `GET /health`, `GET /metrics` (Prometheus text). With an API
key, `/v1/*` needs `Authorization: Bearer KEY` (401 otherwise); `/health` and `/metrics` stay
open, as in vLLM. Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`.
Plain decoding batches up to `--max-batch` requests; a drafting decoder runs one at a time; a
few more requests wait; more get 503 with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from medusa_bench.errors import UserError
from medusa_bench.serve.engine import Cancelled, Completion, Engine, Job, QueueFull

MAX_STOP = 4
MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class BearerAuth:
    """ASGI middleware: /v1/* needs `Authorization: Bearer <api_key>` (checked before the body is read)."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                response = APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                    code="invalid_api_key").response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ------------------------------------------------------------------------------ request body
class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat-completions body this server honours (other fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    n: int = 1
    return_token_ids: bool = False  # vLLM's extension: the generated token ids in the choice
    adapter_id: Optional[str] = None  # LoRAX's field: which heads draft (`serve --heads NAME=PATH`)


# ------------------------------------------------------------------------------ the app
def create_app(engine: Engine, api_key: Optional[str] = None) -> FastAPI:
    """The FastAPI app serving `engine`; `api_key` protects /v1/*."""
    app = FastAPI(title="medusa-bench serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    names = {engine.model_id, engine.loaded.name, engine.loaded.spec}

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        return _validation_error(error).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}", 405: f"method {request.method} not allowed"}.get(
            error.status_code, str(error.detail))
        return APIError(error.status_code, message, code="not_found" if error.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, error: Exception):
        return APIError(500, f"internal error: {type(error).__name__}: {error}", "server_error").response()

    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)

    @app.get("/health")
    async def health():
        metrics = engine.metrics
        return {"status": "ok", "model": engine.model_id, "decoder": engine.decoder_name,
                "running": metrics.running, "waiting": metrics.waiting}

    @app.get("/version")
    async def version():  # vLLM's route, plus what this server speculates with
        from medusa_bench import __version__

        return {"version": __version__, "engine": "medusa-bench", "decoder": engine.decoder_name,
                "speculative_config": engine.speculative_config()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.render_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        ids = [engine.model_id] + [f"{engine.model_id}:{name}" for name in engine.decoders if name != Engine.DEFAULT]
        return {"object": "list", "data": [
            {"id": model, "object": "model", "created": engine.started, "owned_by": "medusa-bench",
             "root": engine.loaded.spec, "parent": engine.model_id if model != engine.model_id else None,
             "max_model_len": engine.loaded.context_length} for model in ids]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        heads = _heads_of(engine, body, names)
        job = _make_job(engine, body)
        job.heads = heads
        if body.stream:
            return _stream(engine, body, job)
        loop = asyncio.get_running_loop()
        future = _submit(engine, job)
        waiting = asyncio.wrap_future(future, loop=loop)
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=0.5)
            if not waiting.done() and await request.is_disconnected():
                job.cancelled.set()  # stops the generation at its next step
                waiting.add_done_callback(lambda f: f.exception())
                return Response(status_code=499)
        try:
            completion = waiting.result()
        except Cancelled:
            return Response(status_code=499)
        except Exception as error:  # the generation failed: this request only
            raise APIError(500, f"generation failed: {type(error).__name__}: {error}", "server_error") from None
        return _completion_body(engine, body, job, completion)

    return app


def _heads_of(engine: Engine, body: ChatCompletionRequest, names: set) -> str:
    """The heads a request asks for: `model` = `<base>:<NAME>`, else LoRAX's `adapter_id`, else the default."""
    model, heads = body.model, None
    if model and model not in names:
        base, _, heads = model.rpartition(":")
        if not base or base not in names:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {engine.model_id!r}"
                           + (f" with heads {', '.join(engine.decoders)} (as {engine.model_id}:NAME)" if len(engine.decoders) > 1 else ""),
                           param="model", code="model_not_found")
    heads = heads or body.adapter_id or Engine.DEFAULT
    if heads not in engine.decoders:
        raise APIError(404, f"no heads {heads!r} on this server; it has {', '.join(engine.decoders)}",
                       param="adapter_id" if body.adapter_id else "model", code="model_not_found")
    return heads


def _validation_error(error: RequestValidationError) -> APIError:
    first = (error.errors() or [{}])[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    message = first.get("msg", "invalid request")
    return APIError(400, f"invalid value for {param}: {message}" if param else message, param=param, code="invalid_value")


def _message_text(message: ChatMessage, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"only text content is supported (got a {part.type!r} part)",
                           param=f"messages.{index}.content", code="invalid_value")
        parts.append(part.text)
    return "".join(parts)


def _make_job(engine: Engine, body: ChatCompletionRequest) -> Job:
    """Validate what pydantic cannot and build the job (tokenised prompt, limits, sampling)."""
    from medusa_bench.decoders.base import Sampling
    from medusa_bench.inputs.chat import build_prompt

    if body.n != 1:
        raise APIError(400, "only n=1 is supported", param="n", code="invalid_value")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs", code="invalid_value")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop sequences are allowed", param="stop", code="invalid_value")
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": _message_text(m, i)}
        for i, m in enumerate(body.messages)
    ]
    context = engine.loaded.context_length
    try:
        prompt_ids = build_prompt(engine.loaded, messages)
    except UserError as error:
        code = "context_length_exceeded" if "context" in str(error) else "invalid_value"
        raise APIError(400, f"{error}: shorten the messages", param="messages", code=code) from None
    except Exception as error:  # e.g. a chat template that refuses this order of roles
        raise APIError(400, f"cannot build a prompt from these messages: {error}", param="messages", code="invalid_value") from None
    requested = body.max_completion_tokens or body.max_tokens
    room = context - len(prompt_ids)
    if room < 1 or (requested is not None and requested > room):
        raise APIError(
            400,
            f"this model's maximum context length is {context} tokens; the messages use {len(prompt_ids)} "
            f"and {requested or 1} were requested for the completion: shorten the messages or lower max_tokens",
            param="messages", code="context_length_exceeded",
        )
    try:
        sampling = Sampling(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
    except UserError as error:
        raise APIError(400, str(error), param="temperature", code="invalid_value") from None
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return Job(prompt_ids, requested or room, sampling, stop, logprobs)


def _submit(engine: Engine, job: Job):
    try:
        return engine.submit(job)
    except QueueFull as error:
        raise APIError(503, str(error), "server_error", code="server_busy", headers={"Retry-After": "1"}) from None


def _token_entry(tokenizer, token_id: int, logprob) -> dict:
    text = tokenizer.decode([token_id])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _logprobs_body(engine: Engine, completion: Completion) -> Optional[dict]:
    if completion.logprobs is None:
        return None
    tokenizer = engine.loaded.tokenizer
    content = []
    for token_id, entry in zip(completion.token_ids, completion.logprobs):
        logprob, top = entry if entry is not None else (None, [])
        item = _token_entry(tokenizer, token_id, logprob)
        item["top_logprobs"] = [_token_entry(tokenizer, t, lp) for t, lp in top]
        content.append(item)
    return {"content": content, "refusal": None}


def _usage(job: Job, completion: Completion) -> dict:
    generated = len(completion.token_ids)
    return {
        "prompt_tokens": len(job.prompt_ids), "completion_tokens": generated,
        "total_tokens": len(job.prompt_ids) + generated,
        "acceptance_length": round(completion.acceptance_length, 4), "decoding_steps": completion.generation.steps,
    }


def _completion_body(engine: Engine, body: ChatCompletionRequest, job: Job, completion: Completion) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": engine.model_id, "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                     "logprobs": _logprobs_body(engine, completion), "finish_reason": completion.finish_reason,
                     **({"token_ids": completion.token_ids} if body.return_token_ids else {})}],
        "usage": _usage(job, completion),
    }


def _stream(engine: Engine, body: ChatCompletionRequest, job: Job) -> StreamingResponse:
    """Server-sent events: a role chunk, content chunks as text is decided, a finish chunk
    (carrying all logprobs, which the decoder reports at the end), optional usage, [DONE]."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    job.on_text = lambda delta: loop.call_soon_threadsafe(queue.put_nowait, ("text", delta))
    future = _submit(engine, job)  # 503 before any byte is sent
    future.add_done_callback(lambda f: loop.call_soon_threadsafe(queue.put_nowait, ("done", f)))
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict, finish=None, logprobs=None, usage=None, choices=True, token_ids=None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if token_ids is not None:  # vLLM's return_token_ids; all of them in the finish chunk
            choice["token_ids"] = token_ids
        data = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": engine.model_id,
                "system_fingerprint": None, "choices": [choice] if choices else []}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events():
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    yield chunk({"content": value})
                    continue
                error = value.exception()
                if error is not None:
                    if not isinstance(error, Cancelled):
                        failure = {"message": f"generation failed: {type(error).__name__}: {error}",
                                   "type": "server_error", "param": None, "code": None}
                        yield f"data: {json.dumps({'error': failure})}\n\n"
                    break
                completion = value.result()
                yield chunk({}, completion.finish_reason, _logprobs_body(engine, completion),
                            token_ids=completion.token_ids if body.return_token_ids else None)
                if body.stream_options and body.stream_options.include_usage:
                    yield chunk({}, usage=_usage(job, completion), choices=False)
                break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # the client left early (or we are done): stop generating

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ------------------------------------------------------------------------------ entry point
MEDUSA2_MODEL = "medusa2_model"  # a Medusa-2 model is a backbone too, not heads on this one: never swapped per request


def _heads_options(decoder: str, options, specs: Optional[list[str]]) -> list[tuple[str, object]]:
    """`--heads NAME=PATH` → [(NAME, options loading PATH)]; checked before the model loads."""
    if not specs:
        return []
    from medusa_bench.decoders.registry import heads_decoders, heads_option, split_spec

    option, _ = heads_option(split_spec(decoder)[0])
    if option is None or option == MEDUSA2_MODEL:
        swappable = [name for name in heads_decoders() if heads_option(name)[0] != MEDUSA2_MODEL]
        raise UserError(f"--heads needs a decoder with heads on this base model ({', '.join(swappable)}), not {decoder!r}")
    out, seen = [], {Engine.DEFAULT}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path or ":" in name:
            raise UserError(f"--heads {spec!r}: write it as NAME=PATH (NAME without ':')")
        if name in seen:
            raise UserError(f"--heads {spec!r}: the name {name!r} is taken; give each heads its own name")
        seen.add(name)
        out.append((name, options.replace(**{option: path})))
    return out


def _check_bindable(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise UserError(f"--host {host}: cannot resolve it ({error.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as error:
            raise UserError(f"cannot listen on {host}:{port} ({error.strerror}): pass another --port") from None


def serve(
    model: str = "smollm2-135m",
    decoder: str = "baseline",
    options=None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    max_waiting: int = 16,
    max_batch: int = 8,
    heads: Optional[list[str]] = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    cache: str = "auto",
    compile: str = "auto",
    served_model_name: Optional[str] = None,
    log=print,
) -> None:
    """Load the model and decoder, then serve until interrupted (blocks)."""
    import uvicorn

    from medusa_bench.bench.build import build_decoder, build_like
    from medusa_bench.decoders.options import DecoderOptions
    from medusa_bench.inputs.chat import build_prompt
    from medusa_bench.models import load_model
    from medusa_bench.runtime.engine import check_options, use_engine

    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port}")
    if max_waiting < 0:
        raise UserError(f"--max-waiting must be >= 0, got {max_waiting}")
    if max_batch < 1:
        raise UserError(f"--max-batch must be >= 1, got {max_batch}")
    check_options(cache, compile)
    _check_bindable(host, port)  # fail before spending time on the model
    _heads_options(decoder, options or DecoderOptions(), heads)
    loaded = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    use_engine(loaded, cache, compile)
    built = build_decoder(decoder, loaded, options or DecoderOptions())
    built.generate(build_prompt(loaded, [{"role": "user", "content": "Hi"}]), 2)  # warm-up
    heads_options = dict(_heads_options(decoder, options or DecoderOptions(), heads))
    extra = {name: build_decoder(decoder, loaded, options) for name, options in heads_options.items()}
    own = {Engine.DEFAULT: (built, options or DecoderOptions()), **{name: (extra[name], o) for name, o in heads_options.items()}}

    def make_row(name: str):  # one more decoder like this heads' one, for a row of a batch of drafting requests
        like, its_options = own[name]
        return build_like(decoder, like, loaded, its_options)

    engine = Engine(loaded, built, decoder, served_model_name or f"{loaded.name}-{decoder}", max_waiting, max_batch, extra or None,
                    make_row=make_row)
    app = create_app(engine, api_key)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log(f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model")
    log(f"serving {engine.model_id} ({decoder}) at http://{host}:{port}/v1"
        + (" (API key required)" if api_key else ""))
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=True)
    finally:
        engine.close()
