"""An OpenAI-compatible server around OpenVINO GenAI's ContinuousBatchingPipeline (issue #35).

OpenVINO GenAI is a library; its own server (OpenVINO Model Server) is a separate binary that is
not on the package registry. This file is the thin HTTP layer benchmarks/engine_openvino.py starts
in the engine's venv (fastapi + uvicorn there, nothing of medusa-bench imported):

    python openvino_server.py --model FOLDER [--draft FOLDER | --prompt-lookup] --port N

Everything that decodes is OpenVINO GenAI's: one `ContinuousBatchingPipeline` (what OVMS serves
with) owned by one engine thread that adds requests and calls `step()` while any is unfinished, so
concurrent requests share its batches. Each request streams the tokens its `GenerationHandle` gives
after each step.

τ comes from the engine's own per-request record: `handle.get_perf_metrics().raw_metrics.m_batch_sizes`
holds one entry per step that gave the request tokens (its prefill step included), so
`usage.decoding_steps` = len(m_batch_sizes) and τ = completion tokens / steps, the project's
convention (README); medusa-bench's endpoint client reads `usage.decoding_steps` as it does from
its own `serve`. Where the pipeline has extended speculative metrics (`get_num_accepted_tokens`)
they go into `usage.accepted_tokens` beside it.

Routes: GET /health, /v1/models, /version; POST /v1/chat/completions (streamed or not; greedy at
temperature 0; `return_token_ids` gives the ids in each chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import queue
import threading
import time

import openvino_genai as ov_genai
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


# OpenVINO's CPU plugin computes in bf16 where the CPU has it (INFERENCE_PRECISION_HINT is bf16 on a
# Zen 4 EPYC with avx512_bf16) and keeps the continuous-batching KV cache in u8, whatever the IR's
# precision. Measured here (MT-Bench 81, 64 tokens): with those defaults the plain server parts
# from our fp32 greedy answer at token 0, and prompt lookup and the draft model part from the plain
# server; with "f32" all three are token-identical to ours.
PRECISIONS = {"f32": {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}, "default": {}}


class Engine:
    """One pipeline, one thread calling it; requests come in through a queue, tokens go out per request."""

    def __init__(self, model: str, draft: str | None, prompt_lookup: bool, assistant_tokens: int, max_ngram: int,
                 precision: str) -> None:
        properties = dict(PRECISIONS[precision])
        if draft:
            properties["draft_model"] = ov_genai.draft_model(draft, "CPU", **PRECISIONS[precision])
        if prompt_lookup:
            properties["prompt_lookup"] = True
        self.precision = precision
        self.speculative = {"draft_model": draft, "num_assistant_tokens": assistant_tokens} if draft else (
            {"prompt_lookup": True, "num_assistant_tokens": assistant_tokens, "max_ngram_size": max_ngram} if prompt_lookup else None)
        self.pipeline = ov_genai.ContinuousBatchingPipeline(model, ov_genai.SchedulerConfig(), "CPU", properties)
        self.tokenizer = self.pipeline.get_tokenizer()
        self.assistant_tokens, self.max_ngram = assistant_tokens, max_ngram
        self.incoming: queue.Queue = queue.Queue()
        self.ids = itertools.count()
        threading.Thread(target=self._loop, daemon=True).start()

    def config(self, body: dict) -> ov_genai.GenerationConfig:
        config = self.pipeline.get_config()  # the model's generation_config.json: its EOS ids
        config.max_new_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)
        temperature = float(body.get("temperature", 1.0) or 0.0)
        config.do_sample = temperature > 0
        if config.do_sample:
            config.temperature, config.top_p = temperature, float(body.get("top_p", 1.0))
            if body.get("seed") is not None:
                config.rng_seed = int(body["seed"])
        if self.speculative:
            config.num_assistant_tokens = self.assistant_tokens
            if self.speculative.get("prompt_lookup"):
                config.max_ngram_size = self.max_ngram
        return config

    def submit(self, messages: list[dict], body: dict, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        prompt = self.tokenizer.apply_chat_template(ov_genai.ChatHistory(messages), add_generation_prompt=True)
        input_ids = self.tokenizer.encode(prompt, add_special_tokens=False).input_ids
        out: asyncio.Queue = asyncio.Queue()
        self.incoming.put((next(self.ids), input_ids, self.config(body), out, loop))
        return out

    def _loop(self) -> None:
        active = {}  # request id -> (handle, its asyncio queue, that queue's event loop, prompt tokens)
        finish = {}  # request id -> the engine's finish reason so far ("length" | "stop")
        while True:
            # wait for work when idle; otherwise take whatever arrived since the last step
            block = not active
            while True:
                try:
                    request_id, input_ids, config, out, loop = self.incoming.get(block=block)
                except queue.Empty:
                    break
                handle = self.pipeline.add_request(request_id, input_ids, config)
                active[request_id] = (handle, out, loop, input_ids.get_shape()[-1])
                block = False
            try:
                self.pipeline.step()
            except Exception as error:  # the engine failed: fail every request in flight, keep serving
                for _, out, loop, _ in active.values():
                    loop.call_soon_threadsafe(out.put_nowait, ("error", f"{type(error).__name__}: {error}"))
                active.clear()
                finish.clear()
                continue
            for request_id, (handle, out, loop, prompt_tokens) in list(active.items()):
                if handle.can_read():
                    for output in handle.read().values():
                        loop.call_soon_threadsafe(out.put_nowait, ("tokens", list(output.generated_ids)))
                        if output.finish_reason == ov_genai.GenerationFinishReason.LENGTH:
                            finish[request_id] = "length"
                status = handle.get_status()
                if status != ov_genai.GenerationStatus.RUNNING:
                    usage = self._usage(handle, status, prompt_tokens)
                    loop.call_soon_threadsafe(out.put_nowait, ("done", (finish.pop(request_id, "stop"), usage)))
                    del active[request_id]

    @staticmethod
    def _usage(handle, status, prompt_tokens: int) -> dict:
        metrics = handle.get_perf_metrics()
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": int(metrics.get_num_generated_tokens()),
                 "decoding_steps": len(metrics.raw_metrics.m_batch_sizes), "status": str(status)}
        if hasattr(metrics, "get_num_accepted_tokens"):
            usage["accepted_tokens"] = int(metrics.get_num_accepted_tokens())
        return usage


def make_app(engine: Engine, name: str) -> FastAPI:
    app = FastAPI(title="openvino-genai (medusa-bench benchmarks/openvino_server.py)", version=ov_genai.get_version())

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "openvino-genai"}]}

    @app.get("/version")
    def version():
        return {"engine": "openvino-genai", "version": ov_genai.get_version(), "speculative_config": engine.speculative,
                "precision": engine.precision}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if body.get("model") not in (None, name):
            return JSONResponse({"error": {"message": f"no model {body.get('model')!r}; this server has {name!r}"}}, 404)
        out = engine.submit(body["messages"], body, asyncio.get_running_loop())
        created, answer_id, with_ids = int(time.time()), f"chatcmpl-{time.time_ns()}", bool(body.get("return_token_ids"))
        decoder = TextDelta(engine.tokenizer)

        def chunk(delta: dict, finish=None, usage=None, ids=None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            if ids is not None:
                choice["token_ids"] = ids
            data = {"id": answer_id, "object": "chat.completion.chunk", "created": created, "model": name, "choices": [choice]}
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            while True:
                kind, value = await out.get()
                if kind == "error":
                    yield f"data: {json.dumps({'error': {'message': value}})}\n\n"
                    return
                if kind == "tokens":
                    text = decoder.add(value)
                    if text or with_ids:
                        yield chunk({"content": text}, ids=value if with_ids else None)
                    continue
                finish, usage = value
                rest = decoder.flush()
                yield chunk({"content": rest} if rest else {}, finish, usage)
                yield "data: [DONE]\n\n"
                return

        if body.get("stream"):
            return StreamingResponse(events(), media_type="text/event-stream")
        text, usage, finish, ids = [], None, None, []
        async for event in events():
            if event.startswith("data: {"):
                data = json.loads(event[6:])
                if "error" in data:
                    return JSONResponse(data, 500)
                choice = data["choices"][0]
                text.append(choice["delta"].get("content", ""))
                ids += choice.get("token_ids") or []
                finish, usage = choice["finish_reason"] or finish, data.get("usage") or usage
        message = {"role": "assistant", "content": "".join(text)}
        return {"id": answer_id, "object": "chat.completion", "created": created, "model": name, "usage": usage,
                "choices": [{"index": 0, "message": message, "finish_reason": finish, **({"token_ids": ids} if with_ids else {})}]}

    return app


class TextDelta:
    """New text as tokens arrive: decode all ids so far, hold back a trailing partial character."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def add(self, ids: list[int]) -> str:
        self.ids += ids
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new, self.sent = text[len(self.sent):], text
        return new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="OpenVINO IR folder (optimum-cli export openvino)")
    parser.add_argument("--draft", help="a draft model's IR folder: speculative decoding")
    parser.add_argument("--prompt-lookup", action="store_true", help="prompt lookup decoding")
    parser.add_argument("--num-assistant-tokens", type=int, default=4)
    parser.add_argument("--max-ngram-size", type=int, default=3)
    parser.add_argument("--precision", choices=list(PRECISIONS), default="f32", help="f32, or the plugin's default (bf16 and a u8 KV cache where the CPU has bf16)")
    parser.add_argument("--served-model-name", default="model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    engine = Engine(args.model, args.draft, args.prompt_lookup, args.num_assistant_tokens, args.max_ngram_size, args.precision)
    uvicorn.run(make_app(engine, args.served_model_name), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
