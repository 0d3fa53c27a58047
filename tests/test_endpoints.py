"""`medusa-bench run --endpoint`: two real `medusa-bench serve` processes on 127.0.0.1 (the
baseline as reference, Medusa as candidate), driven through the CLI; then `report` and `judge`
on the run. The error tests use an unused port, a wrong key and model, and a small HTTP server
that misbehaves the way real ones do (cuts the stream, sends no usage).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from json_handler import JsonHandler
from medusa_bench.bench.endpoint_client import parse_prometheus
from medusa_bench.bench.failed import ANSWERS_MISSING_EXIT
from test_judge import DATA
from test_serve import KEY, free_port, start_server, stop_server

# Shipped Medusa heads with a small tree: real acceptance, quick on a CPU.
TREE = "[[0],[1],[0,0],[0,0,0]]"
MAX_NEW = 12


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    logs = tmp_path_factory.mktemp("servers")
    ports = free_port(), free_port()
    ref = start_server(ports[0], "--api-key", KEY, "--max-waiting", "16", "--max-batch", "4", log=logs / "ref.log")
    try:
        spec = start_server(ports[1], "--decoder", "medusa", "--tree", TREE, "--api-key", KEY, "--max-waiting", "16",
                            "--max-batch", "4", log=logs / "spec.log")  # the last --max-batch wins: drafting rows batched
    except BaseException:
        stop_server(ref)
        raise
    yield {"ref": f"http://127.0.0.1:{ports[0]}/v1", "spec": f"http://127.0.0.1:{ports[1]}/v1", "logs": logs}
    stop_server(spec)
    stop_server(ref)


def env(**extra) -> dict:
    import os

    return dict(os.environ, MEDUSA_BENCH_DATA=str(DATA), EP_KEY=KEY, **extra)


def medusa_bench(*args: str, timeout: int = 600, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medusa_bench.cli", *args], capture_output=True, text=True,
                          env=env(**extra_env), timeout=timeout)


def run_args(servers, out: Path, *extra: str) -> list[str]:
    return ["run", "--endpoint", f"ref={servers['ref']}", "--endpoint", f"spec={servers['spec']}", "--reference", "ref",
            "--bench", "mt_bench", "--limit", "2", "--max-new-tokens", str(MAX_NEW), "--api-key-env", "EP_KEY",
            "--out", str(out), *extra]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_serves_answers_tau_sweep_report_judge(servers, tmp_path):
    out = tmp_path / "run"
    done = medusa_bench(*run_args(servers, out, "--concurrency", "1,4"))
    assert done.returncode == 0, done.stderr[-3000:]
    ref = lines(out / "model_answer" / "smollm2-135m-baseline-ref.jsonl")
    spec = lines(out / "model_answer" / "smollm2-135m-medusa-spec.jsonl")
    assert [r["question_id"] for r in ref] == [r["question_id"] for r in spec] == [81, 82]

    for record in spec:
        choice = record["choices"][0]
        assert record["baseline"] == "ref" and len(choice["turns"]) == 2 and all(choice["turns"])
        # lossless at temperature 0: the same token ids as the reference, turn by turn
        assert choice["exact_match"] == [True, True] and choice["exact_match_by"] == "token_ids"
        assert all(len(ids) == n for ids, n in zip(choice["token_ids"], choice["new_tokens"]))
        assert choice["new_tokens_from"] == ["usage", "usage"]
        assert all(0 < t <= w for t, w in zip(choice["ttft"], choice["wall_time"]))
        # τ from the server's Prometheus counters = τ of the answer's own accounting (usage.decoding_steps)
        for tokens, steps, tau in zip(choice["new_tokens"], choice["decoding_steps"], choice["tau_counters"]):
            assert steps < tokens and tau == pytest.approx(tokens / steps, abs=1e-5)
    for record in ref:
        choice = record["choices"][0]
        assert choice["decoding_steps"] == choice["new_tokens"] and choice["tau_counters"] == [None, None]  # no drafts, no counters
    answers_tau = sum(sum(r["choices"][0]["new_tokens"]) for r in spec) / sum(sum(r["choices"][0]["decoding_steps"]) for r in spec)

    sweep = lines(out / "sweep.jsonl")
    assert {(r["endpoint"], r["concurrency"]) for r in sweep} == {("ref", 1), ("spec", 1), ("ref", 4), ("spec", 4)}
    for row in sweep:
        assert row["failed"] == 0 and row["completed"] == row["requests"] == 4 and row["output_tokens_per_s"] > 0
        assert row["ttft_s"]["p50"] <= row["ttft_s"]["p99"] and row["itl_s"]["p50"] is not None
        if row["endpoint"] == "spec":  # the same greedy requests again: the counters give the answers' τ
            # (at concurrency 4 the waiting requests decode as one batch: rounding may move a draft's near-tie)
            assert row["tau_from"] == "metrics" and row["tau"] == pytest.approx(answers_tau, abs=1e-5 if row["concurrency"] == 1 else 0.1)
        else:
            assert row["tau"] == 1.0 and row["tau_from"] == "per-request"

    # both serves batched the requests that waited together at concurrency 4 (medusa: decoders/batched.py)
    for name in ("ref", "spec"):
        served = parse_prometheus(httpx.get(servers[name].removesuffix("/v1") + "/metrics").text)
        assert served["medusa_bench:batched_requests_total"] >= 2 and served["medusa_bench:request_failure_total"] == 0, name

    run = json.loads((out / "run.json").read_text())
    assert run["endpoints"]["spec"]["speculative_config"]["tree"]["num_nodes"] == 5  # root + 4 drafts
    assert run["endpoints"]["spec"]["counters"] is True and run["endpoints"]["ref"]["counters"] is False
    for path in [p for p in out.rglob("*") if p.is_file()]:
        assert KEY not in path.read_text(errors="ignore"), f"the API key was written to {path}"
    assert KEY not in done.stdout + done.stderr

    again = medusa_bench(*run_args(servers, out, "--concurrency", "1,4"))  # resume: nothing left to do
    assert again.returncode == 0 and "nothing to do" in again.stderr and "sweep:" not in again.stderr
    assert len(lines(out / "sweep.jsonl")) == 4

    report = medusa_bench("report", str(out))
    assert report.returncode == 0, report.stderr[-2000:]
    html = (out / "report.html").read_text()
    assert 'id="sweep"' in html and "Speedup against concurrency" in html
    table = medusa_bench("report", str(out), "--format", "table")
    assert "spec · 4" in table.stdout and "100.0%" in table.stdout  # the sweep's columns; exact match

    judge = medusa_bench("judge", str(out), "--judge-base-url", servers["ref"], "--judge-model", "smollm2-135m-baseline",
                         "--api-key-env", "EP_KEY", "--max-tokens", "8", "--parallel", "2")
    assert judge.returncode == 0, judge.stderr[-2000:]
    assert len(lines(out / "model_judgment" / "smollm2-135m-baseline_single.jsonl")) >= 4


def test_endpoints_beside_in_process_decoders(servers, tmp_path):
    """One run: two endpoints and two in-process decoders take turns question by question; each is
    compared with its own reference (medusa with the local baseline, spec with the ref endpoint),
    never across the HTTP boundary, and the report keeps the two apart."""
    from medusa_bench.results.report import collect

    out = tmp_path / "mixed"
    args = run_args(servers, out, "--decoders", "baseline,medusa", "--tree", TREE, "--dtype", "float32", "--concurrency", "1")
    done = medusa_bench(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = {name: lines(out / "model_answer" / f"smollm2-135m-{name}.jsonl")
               for name in ("baseline", "medusa", "baseline-ref", "medusa-spec")}
    assert all([r["question_id"] for r in rows] == [81, 82] for rows in answers.values())
    for local, served in zip(answers["medusa"], answers["medusa-spec"]):
        assert local["baseline"] == "baseline" and local["choices"][0]["exact_match"] == [True, True]
        assert served["baseline"] == "ref" and served["choices"][0]["exact_match"] == [True, True]
        assert served["device"] == "endpoint" and local["device"] not in ("endpoint", None)
    # the same model, greedy, fp32 on both sides: the local baseline's tokens are the ref server's
    for local, served in zip(answers["baseline"], answers["baseline-ref"]):
        assert local["choices"][0]["token_ids"] == served["choices"][0]["token_ids"]
    # interleaved: every answer to question 81 is stored before any answer to question 82
    first = [r["tstamp"] for rows in answers.values() for r in rows if r["question_id"] == 81]
    second = [r["tstamp"] for rows in answers.values() for r in rows if r["question_id"] == 82]
    assert max(first) < min(second)

    run = json.loads((out / "run.json").read_text())
    assert set(run["decoders"]) == {"baseline", "medusa", "ref", "spec"} and run["reference"] == "ref"
    assert run["models"]["spec"] == "smollm2-135m-medusa-spec" and set(run["endpoints"]) == {"ref", "spec"}
    assert run["settings"]["endpoints"] == {"ref": servers["ref"], "spec": servers["spec"]}
    assert {(r["endpoint"], r["concurrency"]) for r in lines(out / "sweep.jsonl")} == {("ref", 1), ("spec", 1)}

    speed = collect([out]).tables["speed"].set_index("decoder")
    assert speed.loc["medusa", "reference"] == "baseline" and speed.loc["spec", "reference"] == "ref"
    assert speed.loc["spec", "device"] == "endpoint" and speed.loc["medusa", "device"] != "endpoint"
    assert speed.loc["medusa", "speedup"] > 0 and speed.loc["spec", "speedup"] > 0

    again = medusa_bench(*args)  # resume: nothing left, and the run refuses an endpoint that moved
    assert again.returncode == 0 and "nothing to do" in again.stderr
    moved = medusa_bench(*[a.replace(servers["spec"], servers["ref"]) for a in args])
    assert moved.returncode != 0 and "other settings" in moved.stderr and len(moved.stderr.strip().splitlines()) == 1
    clash = medusa_bench("run", "--endpoint", f"medusa={servers['spec']}", "--decoders", "baseline,medusa", "--api-key-env", "EP_KEY",
                         "--bench", "mt_bench", "--limit", "1", "--out", str(tmp_path / "clash"))
    assert clash.returncode != 0 and "also a decoder" in clash.stderr and len(clash.stderr.strip().splitlines()) == 1


def test_endpoint_errors_are_one_line(servers, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    cases = [
        (["run", "--endpoint", f"gone={dead}"], f"endpoint gone: cannot reach {dead}/models"),
        (["run", "--endpoint", f"spec={servers['spec']}", "--api-key-env", "WRONG_KEY"], "endpoint spec refused the API key (401)"),
        (["run", "--endpoint", f"spec={servers['spec']}", "--api-key-env", "EP_KEY", "--endpoint-model", "llama-70b"],
         "endpoint spec has no model 'llama-70b' (it serves smollm2-135m-medusa)"),
        (["run", "--endpoint", f"spec={servers['spec']}", "--api-key-env", "EP_KEY", "--reference", "ref"], "--reference 'ref' is not an --endpoint name"),
        (["run", "--endpoint", "spec"], "write it as NAME=URL"),
        (["run", "--endpoint", f"spec={servers['spec']}", "--concurrency", "0,4"], "--concurrency levels must be >= 1"),
    ]
    for args, message in cases:
        done = medusa_bench(*args, "--bench", "quick", "--limit", "1", "--out", str(tmp_path / "x"), timeout=120, WRONG_KEY="sk-wrong")
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# ------------------------------------------------------------------------------ servers that misbehave
class Misbehaving(JsonHandler):
    """An OpenAI-style server that cuts its stream after one chunk ("cut") or streams a whole
    answer without usage or token ids ("no-usage"), as some engines do; with `answers_left` set,
    it cuts every stream once it has answered that many (a server that went away mid-run)."""

    mode = "cut"
    answers_left = None
    requests: list = []

    def do_GET(self):
        if self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})
        else:
            self.send_json(404, {"error": {"message": "no route"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chunk = lambda delta, finish=None: ("data: " + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n").encode()  # noqa: E731
        self.wfile.write(chunk({"role": "assistant", "content": "Hello"}))
        self.wfile.flush()
        gone = self.answers_left is not None and self.answers_left <= 0
        if self.answers_left is not None:
            type(self).answers_left -= 1
        if self.mode == "cut" or gone:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # the server goes away mid-answer
            return
        self.wfile.write(chunk({"content": " there, neighbour."}))
        self.wfile.write(chunk({}, "stop"))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


@pytest.fixture
def misbehaving():
    handler = type("Handler", (Misbehaving,), {"requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_stream_cut_is_retried_then_recorded_as_failed(misbehaving, tmp_path):
    handler, url = misbehaving
    out = tmp_path / "run"
    start = time.time()
    done = medusa_bench("run", "--endpoint", f"bad={url}", "--bench", "quick", "--limit", "2", "--max-new-tokens", "40",
                        "--max-retries", "1", "--out", str(out), timeout=120)
    assert done.returncode == ANSWERS_MISSING_EXIT, done.stderr  # finished, but answers are missing
    assert "closed the stream before the answer ended (after 2 tries)" in done.stderr
    assert "stopped answering" not in done.stderr  # it never answered: not a server that went away
    assert "answers missing: 2 failed after their retries" in " ".join(done.stderr.split())
    failed = lines(out / "failed.jsonl")
    assert [(f["question_id"], f["decoder"]) for f in failed] == [(1001, "bad"), (1002, "bad")]  # the run went past the first
    answers = out / "model_answer" / "tiny-bad.jsonl"
    assert not answers.exists() or not lines(answers)  # no answer written for a failed request: never a silent zero
    timed = [r for r in handler.requests if r["max_tokens"] == 40]
    assert len(timed) == 4 and time.time() - start < 110  # two questions × (one try + one retry)


def test_endpoint_gone_mid_run_exits_3_then_a_rerun_fills_and_resolves(misbehaving, tmp_path):
    """The server answers the first question, then cuts every stream: exit 3 and one line naming the
    endpoint; back up, the same command fills the answer and marks its failed.jsonl line resolved."""
    handler, url = misbehaving
    handler.mode, handler.answers_left = "no-usage", 2  # question 1001's two turns, then gone
    out = tmp_path / "run"
    args = ["run", "--endpoint", f"gone={url}", "--bench", "quick", "--limit", "2", "--max-new-tokens", "16",
            "--max-retries", "1", "--warmup", "0", "--out", str(out)]
    done = medusa_bench(*args, timeout=300)
    assert done.returncode == ANSWERS_MISSING_EXIT, done.stderr
    stderr = " ".join(done.stderr.split())
    assert "endpoint gone stopped answering: after 1 answered, all 1 questions since failed" in stderr
    assert f"answers missing: 1 failed after their retries (see {out / 'failed.jsonl'})" in stderr
    assert [(f["question_id"], f["decoder"], f.get("resolved")) for f in lines(out / "failed.jsonl")] == [(1002, "gone", None)]
    assert [r["question_id"] for r in lines(out / "model_answer" / "tiny-gone.jsonl")] == [1001]

    handler.answers_left = None  # the server is back
    again = medusa_bench(*args, timeout=300)
    assert again.returncode == 0, again.stderr
    assert [r["question_id"] for r in lines(out / "model_answer" / "tiny-gone.jsonl")] == [1001, 1002]
    failed = lines(out / "failed.jsonl")
    assert [(f["question_id"], f["decoder"], f["resolved"]) for f in failed] == [(1002, "gone", True)]
    assert failed[0]["resolved_tstamp"] >= failed[0]["tstamp"] and "failed" not in again.stderr


def test_missing_usage_is_counted_with_the_tokenizer(misbehaving, tmp_path):
    handler, url = misbehaving
    handler.mode = "no-usage"
    out = tmp_path / "run"
    done = medusa_bench("run", "--endpoint", f"plain={url}", "--bench", "quick", "--limit", "1", "--max-new-tokens", "16",
                        "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stderr
    choice = lines(out / "model_answer" / "tiny-plain.jsonl")[0]["choices"][0]
    assert choice["turns"] == ["Hello there, neighbour."] * 2 and choice["new_tokens_from"] == ["tokenizer"] * 2
    from transformers import AutoTokenizer

    from medusa_bench.models import resolve_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m")[0])
    assert choice["new_tokens"] == [len(tokenizer("Hello there, neighbour.", add_special_tokens=False)["input_ids"])] * 2
    assert choice["decoding_steps"] == [None, None] and choice["tau_counters"] == [None, None]  # no counters: τ n/a, not a guess
    assert choice["token_ids"] == [None, None] and handler.requests[0]["stream_options"] == {"include_usage": True}


# ------------------------------------------------------------------------------ heads per request
def test_heads_per_request(tmp_path):
    """`serve --heads NAME=PATH`: a request picks heads by `model` or LoRAX's `adapter_id`; counters per heads."""
    import torch

    from medusa_bench.heads.medusa import MedusaHeads, save_heads

    torch.manual_seed(0)
    heads = MedusaHeads(num_heads=3, hidden_size=576, vocab_size=None)
    with torch.no_grad():
        heads.res_weight.normal_(0, 0.05)
    save_heads(heads, tmp_path / "rand", format="v2", base_model_name_or_path="smollm2-135m")
    port = free_port()
    server = start_server(port, "--decoder", "medusa", "--tree", TREE, "--heads", f"rand={tmp_path / 'rand'}", log=tmp_path / "server.log")
    root = f"http://127.0.0.1:{port}"
    try:
        models = [m["id"] for m in httpx.get(root + "/v1/models").json()["data"]]
        assert models == ["smollm2-135m-medusa", "smollm2-135m-medusa:rand"]
        ask = {"messages": [{"role": "user", "content": "Count from one to ten in words."}], "max_tokens": 12, "temperature": 0}

        def counters() -> dict:
            return {heads: parse_prometheus("\n".join(line for line in httpx.get(root + "/metrics").text.splitlines()
                                                      if f'heads="{heads}"' in line))
                    for heads in ("default", "rand")}

        before = counters()
        by_model = httpx.post(root + "/v1/chat/completions", json={**ask, "model": "smollm2-135m-medusa:rand"}, timeout=300).json()
        by_adapter = httpx.post(root + "/v1/chat/completions", json={**ask, "adapter_id": "rand"}, timeout=300).json()
        after = counters()
        steps = by_model["usage"]["decoding_steps"] + by_adapter["usage"]["decoding_steps"]
        assert after["rand"]["vllm:spec_decode_num_drafts_total"] - before["rand"].get("vllm:spec_decode_num_drafts_total", 0) == steps
        assert after["default"] == before["default"]  # the default heads drafted nothing
        default = httpx.post(root + "/v1/chat/completions", json=ask, timeout=300).json()
        texts = {r["choices"][0]["message"]["content"] for r in (by_model, by_adapter, default)}
        assert len(texts) == 1  # greedy: every heads gives the base model's own answer
        assert counters()["default"]["medusa_bench:decode_steps_total"] == default["usage"]["decoding_steps"]
        missing = httpx.post(root + "/v1/chat/completions", json={**ask, "adapter_id": "nope"})
        assert missing.status_code == 404 and missing.json()["error"]["message"] == "no heads 'nope' on this server; it has default, rand"

        # the endpoint decoder against one heads: τ from the (per-heads) counters = its own accounting
        out = tmp_path / "run"
        done = medusa_bench("run", "--endpoint", f"rand={root}/v1", "--endpoint-model", "smollm2-135m-medusa:rand",
                            "--bench", "quick", "--limit", "1", "--max-new-tokens", "8", "--out", str(out), timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        choice = lines(out / "model_answer" / "smollm2-135m-medusa-rand-rand.jsonl")[0]["choices"][0]
        for tokens, steps, tau in zip(choice["new_tokens"], choice["decoding_steps"], choice["tau_counters"]):
            assert tau == pytest.approx(tokens / steps, abs=1e-5)
    finally:
        stop_server(server)


# ------------------------------------------------------------------------------ serve's batches
def test_concurrent_greedy_requests_to_a_drafting_serve_batch_losslessly(servers):
    """Four requests at once to `serve --decoder medusa --max-batch 4`: decoded as one batch of rows, each
    the reference's tokens; a sampled request among them falls back to one at a time, still answered."""
    import concurrent.futures as cf

    import openai

    ref, spec = (openai.OpenAI(base_url=servers[name], api_key=KEY, max_retries=0, timeout=300) for name in ("ref", "spec"))
    questions = ["Name three colours.", "Count to five.", "Write a haiku about the sea.", "What is the capital of France?"]

    def ask(client, model, question, temperature=0.0):
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], max_tokens=MAX_NEW,
                                               temperature=temperature, seed=1)
        return reply.choices[0].message.content

    before = parse_prometheus(httpx.get(servers["spec"].removesuffix("/v1") + "/metrics").text)
    with cf.ThreadPoolExecutor(4) as pool:
        batched = list(pool.map(lambda q: ask(spec, "smollm2-135m-medusa", q), questions))
    after = parse_prometheus(httpx.get(servers["spec"].removesuffix("/v1") + "/metrics").text)
    assert batched == [ask(ref, "smollm2-135m-baseline", q) for q in questions]
    assert after["medusa_bench:batched_requests_total"] > before.get("medusa_bench:batched_requests_total", 0)
    with cf.ThreadPoolExecutor(3) as pool:  # mixed: greedy and sampled together, each on the decoder's own path
        mixed = list(pool.map(lambda args: ask(spec, "smollm2-135m-medusa", *args), [(questions[0],), (questions[1], 0.8), (questions[2],)]))
    assert mixed[0] == batched[0] and mixed[2] == batched[2] and mixed[1]


def test_batched_plain_decoding_matches_one_at_a_time():
    """serve/batch.py: left-padded prompts of different lengths, each with its own limit, decode
    to the tokens the baseline gives each alone (fp32), and a stop request leaves the batch early."""
    from medusa_bench.inputs.chat import build_prompt
    from medusa_bench.decoders.base import Sampling
    from medusa_bench.decoders.options import DecoderOptions
    from medusa_bench.decoders.registry import build_decoder
    from medusa_bench.models import load_model
    from medusa_bench.serve.batch import generate_batch

    loaded = load_model("smollm2-135m", "cpu", "float32")
    baseline = build_decoder("baseline", loaded, DecoderOptions())
    questions = ["Name three colours.", "Write a haiku about the sea and the wind at night, please.", "What is 2+2?"]
    prompts = [build_prompt(loaded, [{"role": "user", "content": q}]) for q in questions]
    assert len({len(p) for p in prompts}) == 3  # padding is exercised
    limits = [10, 4, 16]
    alone = [baseline.generate(p, n, Sampling()) for p, n in zip(prompts, limits)]
    seen = []
    stop_after_three = lambda ids: seen.extend(ids) or len(seen) >= 3  # noqa: E731
    batch = generate_batch(loaded, prompts, limits, [Sampling()] * 3, [None, None, stop_after_three], [None, 2, None])
    assert batch[0].token_ids == alone[0].token_ids and batch[0].finish_reason == alone[0].finish_reason
    assert batch[1].token_ids == alone[1].token_ids and len(batch[1].token_ids) == 4 and batch[1].finish_reason == "length"
    assert batch[2].token_ids == alone[2].token_ids[:3] and batch[2].finish_reason == "stop"
    assert len(batch[1].logprobs) == 4 and len(batch[1].logprobs[0][1]) == 2
    assert all(g.steps == len(g.token_ids) == sum(g.accept_lengths) for g in batch)


def test_steps_from_vllm_counters_count_steps_that_drafted_nothing():
    """vLLM's ngram drafts only where it finds a match: steps = tokens - accepted, not the drafts."""
    from medusa_bench.bench.endpoint_client import steps_from_counters

    assert steps_from_counters({"drafts": 7, "accepted": 40}, 64) == 24  # τ 64 / 24 = 2.67, not 64 / 7
    assert steps_from_counters({"drafts": 47, "accepted": 18}, 64) == 47  # accepted past max_tokens: at least the drafts
    assert steps_from_counters({"drafts": 0, "accepted": 0}, 64) is None and steps_from_counters(None, 64) is None


# ------------------------------------------------------------------------------ llama.cpp's llama-server
class LlamaServerFake(JsonHandler):
    """llama-server b11312's answers as captured from the real one (benchmarks/engine_llamacpp.py):
    /props with build_info, /slots saying whether each slot speculates, and a stream whose last chunk
    (usage, empty choices) carries `timings`, with draft_n/draft_n_accepted once something was drafted."""

    speculative = True
    timings = {"cache_n": 0, "prompt_n": 38, "predicted_n": 12, "draft_n": 8, "draft_n_accepted": 8}

    def do_GET(self):
        if self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": "smollm2-135m", "object": "model", "owned_by": "llamacpp"}]})
        elif self.path == "/props":
            self.send_json(200, {"build_info": "b11312-0c1e57098", "total_slots": 2, "model_alias": "smollm2-135m"})
        elif self.path == "/slots":
            self.send_json(200, [{"id": i, "n_ctx": 2048, "speculative": self.speculative, "is_processing": False} for i in range(2)])
        else:
            self.send_response(404)
            self.end_headers()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        base = {"created": 1, "id": "chatcmpl-x", "model": "smollm2-135m", "system_fingerprint": "b11312-0c1e57098",
                "object": "chat.completion.chunk"}
        chunks = [{"choices": [{"finish_reason": None, "index": 0, "delta": {"role": "assistant", "content": None}}]}]
        chunks += [{"choices": [{"finish_reason": None, "index": 0, "delta": {"content": word}}]} for word in ["The", " sea"] * 6]
        chunks.append({"choices": [{"finish_reason": "length", "index": 0, "delta": {}}]})
        chunks.append({"choices": [], "usage": {"completion_tokens": 12, "prompt_tokens": 38, "total_tokens": 50},
                       "timings": self.timings})
        for chunk in chunks:
            self.wfile.write(("data: " + json.dumps({**chunk, **base}) + "\n\n").encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


@pytest.mark.parametrize("speculative, timings, steps", [
    (True, {"predicted_n": 12, "draft_n": 8, "draft_n_accepted": 8}, 4),  # 12 tokens in 4 steps: τ 3
    (True, {"predicted_n": 12, "draft_n": 6, "draft_n_accepted": 2}, 10),
    (True, {"predicted_n": 12}, 12),  # speculating, nothing drafted (no n-gram matched): a step a token
    (False, {"predicted_n": 12}, None),  # the plain server: no τ, as vLLM's plain server
])
def test_llama_server_timings_give_the_steps(speculative, timings, steps):
    from medusa_bench.bench.endpoint_client import Endpoint, steps_from_timings

    handler = type("Handler", (LlamaServerFake,), {"speculative": speculative, "timings": timings})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = Endpoint("llama", f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused")
        assert endpoint.connect(None) == "smollm2-135m"
        assert {k: endpoint.info.get(k) for k in ("engine", "version", "slots", "speculative")} == \
            {"engine": "llama.cpp", "version": "b11312-0c1e57098", "slots": 2, "speculative": speculative}
        turn = endpoint.chat([{"role": "user", "content": "hi"}], 12, 0.0, 1.0, None)
        assert (turn.completion_tokens, turn.tokens_from, turn.finish_reason) == (12, "usage", "length")
        assert turn.verify_steps == steps and turn.text == "The sea" * 6
        endpoint.close()
    finally:
        server.shutdown()
        server.server_close()
    assert steps_from_timings(None, 12, True) is None and steps_from_timings(timings, 0, True) is None
    assert steps_from_timings({"draft_n": 4, "draft_n_accepted": 4}, 3, True) == 1  # never below one step
