"""`run --endpoint` against a third, real engine: two llama-cpp-python servers (`python -m
llama_cpp.server`) on 127.0.0.1 serving the embedded GGUF model, one plain (the reference) and one
drafting with llama.cpp's prompt lookup (`--draft_model prompt-lookup-decoding`).

What this server gives the harness: a streamed chat with one logprobs entry per token but no
`usage` (so tokens are counted from the logprobs), no token ids (so exact match compares text),
no /metrics and no /version (so τ is n/a, and the engine and version come from /openapi.json).

Its prompt lookup is not token-exact against plain decoding on a CPU: llama.cpp computes
different logits for a token evaluated alone than for the same token inside a multi-token batch
(measured up to 1.4 logits apart on this model; batches of 2, 4, 11 or 64 agree among
themselves), and drafting verifies in batches, so greedy answers part ways after a few tokens.
What holds, and is asserted: each server is deterministic, and both agree on the first token
of a turn (it comes from the same batched prompt evaluation on both).

llama-cpp-python builds from source (scripts/setup.sh --test tries); without it that test skips.
Two small fakes below run always: a stream cut the way llama-cpp-python cuts one, and the
server-info answers of SGLang, which no test here can start for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import threading
from http.server import ThreadingHTTPServer

import httpx
import pytest

import processes
from json_handler import JsonHandler
from medusa_bench.bench.failed import ANSWERS_MISSING_EXIT
from test_endpoints import lines, medusa_bench
from test_serve import free_port, stop_server

MAX_NEW = 16


def start_llamacpp(port: int, *extra: str, log: Path) -> subprocess.Popen:
    from medusa_bench.models import embedded_gguf

    # One thread each (CI has two cores); --interrupt_requests False: by default a waiting request
    # cuts the streaming one short, which the harness would (rightly) count as failed.
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf("smollm2-135m")), "--host", "127.0.0.1",
           "--port", str(port), "--n_threads", "1", "--n_threads_batch", "1", "--n_ctx", "2048",
           "--interrupt_requests", "False", "--verbose", "False", *extra]
    return processes.start(f"llama.cpp server on port {port}", cmd, log=log, ready_url=f"http://127.0.0.1:{port}/v1/models",
                           env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/setup.sh --test builds it; see its warning)")
    check = Path(__file__).resolve().parents[1] / ".venv" / "llama-cpp-check.txt"  # scripts/check_llamacpp.sh
    if check.is_file() and check.read_text().strip() != "ok":
        pytest.skip(f"the llama-cpp-python build does not run here: {check.read_text().strip()}")
    logs = tmp_path_factory.mktemp("llamacpp")
    ports = free_port(), free_port()
    ref = start_llamacpp(ports[0], log=logs / "ref.log")
    try:
        pld = start_llamacpp(ports[1], "--draft_model", "prompt-lookup-decoding", "--draft_model_num_pred_tokens", "10",
                             log=logs / "pld.log")
    except BaseException:
        stop_server(ref)
        raise
    yield {"ref": f"http://127.0.0.1:{ports[0]}/v1", "pld": f"http://127.0.0.1:{ports[1]}/v1"}
    stop_server(pld)
    stop_server(ref)


def ask(base: str, content: str, max_tokens: int) -> list[str]:
    """The answer's tokens, as text (one logprobs entry per token)."""
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0, "logprobs": True, "top_logprobs": 0}
    answer = httpx.post(base + "/chat/completions", json=body, timeout=300).json()["choices"][0]
    return [entry["token"] for entry in answer["logprobs"]["content"]]


def test_llamacpp_plain_and_prompt_lookup(servers, tmp_path):
    out = tmp_path / "run"
    done = medusa_bench("run", "--endpoint", f"ref={servers['ref']}", "--endpoint", f"pld={servers['pld']}", "--reference", "ref",
                        "--concurrency", "1,2", "--bench", "quick", "--limit", "2", "--max-new-tokens", str(MAX_NEW),
                        "--out", str(out), OMP_NUM_THREADS="1")
    assert done.returncode == 0, done.stderr[-3000:]
    answers = {name: lines(out / "model_answer" / f"SmolLM2-135M-Instruct.Q4_1-{name}.jsonl") for name in ("ref", "pld")}
    assert [r["question_id"] for r in answers["ref"]] == [r["question_id"] for r in answers["pld"]] == [1001, 1002]
    for name, records in answers.items():
        for record in records:
            choice = record["choices"][0]
            assert len(choice["turns"]) == 2 and all(choice["turns"]), (name, choice["turns"])
            # no usage in llama-cpp-python's stream: counted from its logprobs, exactly max_tokens when cut there
            assert choice["new_tokens_from"] == ["logprobs", "logprobs"]
            for tokens, finish in zip(choice["new_tokens"], choice["finish_reason"]):
                assert finish in ("stop", "length") and (tokens == MAX_NEW if finish == "length" else 0 < tokens <= MAX_NEW)
            # no counters of any kind: τ is n/a, never a guess
            assert choice["decoding_steps"] == [None, None] and choice["tau_counters"] == [None, None]
            assert choice["token_ids"] == [None, None]
            assert all(0 < ttft <= wall for ttft, wall in zip(choice["ttft"], choice["wall_time"]))
            assert all(len(gaps) >= 1 for gaps in choice["itl"])
    for ref, pld in zip(answers["ref"], answers["pld"]):
        choice = pld["choices"][0]
        # exact match is recorded, by text (this server returns no token ids), turn by turn
        assert choice["exact_match_by"] == "text" and len(choice["exact_match"]) == 2
        assert all(isinstance(match, bool) for match in choice["exact_match"])
        assert choice["exact_match"][0] == (choice["turns"][0] == ref["choices"][0]["turns"][0])

    sweep = lines(out / "sweep.jsonl")
    assert {(r["endpoint"], r["concurrency"]) for r in sweep} == {("ref", 1), ("pld", 1), ("ref", 2), ("pld", 2)}
    for row in sweep:
        assert row["failed"] == 0 and row["completed"] == row["requests"] == 4 and row["output_tokens_per_s"] > 0
        assert row["tau"] is None and row["tau_from"] is None and row["spec_counters"] is None
        assert row["ttft_s"]["p50"] <= row["ttft_s"]["p99"] and row["itl_s"]["p50"] is not None

    run = json.loads((out / "run.json").read_text())
    for name in ("ref", "pld"):
        endpoint = run["endpoints"][name]
        assert endpoint["engine"] == "llama-cpp-python" and endpoint["version"] and endpoint["counters"] is False

    report = medusa_bench("report", str(out))
    assert report.returncode == 0, report.stderr[-2000:]
    assert 'id="sweep"' in (out / "report.html").read_text()
    table = medusa_bench("report", str(out), "--format", "table")
    assert table.returncode == 0 and "pld · 2" in table.stdout

    # What does hold for llama.cpp's prompt lookup here: from the same state each server answers
    # alike every time, and both start with the same token; past it they may part (module docstring).
    # The first ask leaves this prompt in each server's cache, so the next ones start from one state.
    question = "Write a short welcome speech for visitors to an old lighthouse."
    again = {}
    for name in ("ref", "pld"):
        ask(servers[name], question, 8)
        again[name] = [ask(servers[name], question, 8) for _ in range(2)]
        assert again[name][0] == again[name][1], (name, again[name])
    assert again["ref"][0][0] == again["pld"][0][0]


# ------------------------------------------------------------------------------ fakes
class Fake(JsonHandler):
    """An OpenAI-style server that streams one answer. "interrupted": a content chunk, then [DONE]
    with no finish reason, as llama-cpp-python does when another request arrives; "sglang": a whole
    answer, plus SGLang's /get_server_info (server args, internal_states, version)."""

    mode = "interrupted"

    def do_GET(self):
        if self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})
        elif self.path == "/get_server_info" and self.mode == "sglang":
            self.send_json(200, {"model_path": "tiny", "speculative_algorithm": "EAGLE", "speculative_num_steps": 3,
                                 "speculative_eagle_topk": 4, "speculative_num_draft_tokens": 16, "version": "0.0.test",
                                 "internal_states": [{"avg_spec_accept_length": 2.5}, {"avg_spec_accept_length": 3.5}]})
        else:
            self.send_json(404, {"error": {"message": "no route"}})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chunk = lambda delta, finish=None: ("data: " + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}],  # noqa: E731
                                                                   **({"usage": {"completion_tokens": 3}} if finish else {})}) + "\n\n").encode()
        self.wfile.write(chunk({"role": "assistant", "content": "Hello"}))
        if self.mode == "sglang":
            self.wfile.write(chunk({"content": " there."}))
            self.wfile.write(chunk({}, "stop"))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


@pytest.fixture
def fake():
    handler = type("Handler", (Fake,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_stream_without_finish_reason_is_a_failed_request(fake, tmp_path):
    handler, url = fake
    out = tmp_path / "run"
    done = medusa_bench("run", "--endpoint", f"cut={url}", "--bench", "quick", "--limit", "1", "--max-new-tokens", "8",
                        "--max-retries", "0", "--out", str(out), timeout=120)
    assert done.returncode == ANSWERS_MISSING_EXIT, done.stderr  # finished, but an answer is missing: said in the exit code
    assert "the stream ended without a finish reason" in done.stderr and "--interrupt_requests False" in done.stderr
    assert [f["question_id"] for f in lines(out / "failed.jsonl")] == [1001]  # failed, not a one-word answer
    answers = out / "model_answer" / "tiny-cut.jsonl"
    assert not answers.exists() or not lines(answers)


def test_sglang_server_info(fake, tmp_path):
    handler, url = fake
    handler.mode = "sglang"
    out = tmp_path / "run"
    done = medusa_bench("run", "--endpoint", f"sgl={url}", "--bench", "quick", "--limit", "1", "--max-new-tokens", "8",
                        "--concurrency", "1", "--out", str(out), timeout=120)
    assert done.returncode == 0, done.stderr
    info = json.loads((out / "run.json").read_text())["endpoints"]["sgl"]
    assert info["engine"] == "sglang" and info["version"] == "0.0.test" and info["counters"] is False
    assert info["speculative_config"] == {"speculative_algorithm": "EAGLE", "speculative_num_steps": 3,
                                          "speculative_eagle_topk": 4, "speculative_num_draft_tokens": 16}
    choice = lines(out / "model_answer" / "tiny-sgl.jsonl")[0]["choices"][0]
    assert choice["tau_counters"] == [None, None] and choice["decoding_steps"] == [None, None]  # no per-request counts
    row = lines(out / "sweep.jsonl")[0]
    assert row["tau"] is None and row["server_avg_accept_length"] == 3.0  # the server's own average, beside τ
