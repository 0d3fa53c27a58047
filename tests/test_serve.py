"""`medusa-bench serve` with the real SmolLM2, driven by the real `openai` client, and
`medusa-bench judge` end to end against it.

One server for the module (a subprocess on a free 127.0.0.1 port, with an API key and a
waiting line of one); the "server killed mid-run" test starts and kills its own.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

import processes
from test_judge import DATA, make_run

KEY = "sk-serve-test-KEY-0123456789abcdef"
MAX_WAITING = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, *extra: str, log: Path) -> subprocess.Popen:
    """`medusa-bench serve` on 127.0.0.1:port, watched: if it dies, the running test fails naming its exit code and signal."""
    cmd = [sys.executable, "-m", "medusa_bench.cli", "serve", "--model", "smollm2-135m", "--decoder", "baseline",
           "--port", str(port), "--max-waiting", str(MAX_WAITING), "--max-batch", "1", *extra]
    return processes.start(f"medusa-bench serve on port {port}", cmd, log=log, ready_url=f"http://127.0.0.1:{port}/health",
                           env=dict(os.environ, MEDUSA_BENCH_DATA=str(DATA)))


def stop_server(process: subprocess.Popen) -> None:
    processes.stop(process, first=signal.SIGINT)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    process = start_server(port, "--api-key", KEY, log=log)
    yield {"url": f"http://127.0.0.1:{port}", "base": f"http://127.0.0.1:{port}/v1", "process": process, "log": log}
    stop_server(process)
    assert KEY not in log.read_text(), "the API key must never be logged"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"], api_key=KEY, max_retries=0, timeout=120)


MODEL = "smollm2-135m-baseline"
HELLO = [{"role": "user", "content": "Name three colours."}]


def metrics(server) -> dict[str, float]:
    text = httpx.get(server["url"] + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[re.sub(r'model_name="[^"]*",decoder="[^"]*",?', "", name).replace("{}", "")] = float(value)
    return values


# ------------------------------------------------------------------------------ endpoints
def test_port_in_use_is_a_clear_error(server):
    port = server["url"].rsplit(":", 1)[1]
    done = subprocess.run([sys.executable, "-m", "medusa_bench.cli", "serve", "--port", port], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server["url"] + "/health").json()  # open without a key, as in vLLM
    assert health["status"] == "ok" and health["decoder"] == "baseline"


def test_chat_completion_greedy(client):
    first = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    choice = first.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason == "length"
    assert first.usage.completion_tokens == 8 and first.usage.prompt_tokens > 5
    assert first.usage.total_tokens == first.usage.prompt_tokens + 8
    usage = first.usage.model_extra
    assert usage["acceptance_length"] == 1.0 and usage["decoding_steps"] == 8  # the baseline: one token per step
    again = client.chat.completions.create(model="smollm2-135m", messages=HELLO, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == choice.message.content  # greedy is deterministic
    assert first.model == MODEL


def test_streaming_matches_non_streaming(client):
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 3  # really incremental
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_logprobs(client):
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3 and token.logprob <= 0
        assert token.top_logprobs[0].token == token.token  # greedy picks the most likely token
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=1e-5)
        assert sum(math.exp(t.logprob) for t in token.top_logprobs) <= 1 + 1e-4
    bare = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, temperature=0, logprobs=True)
    assert [t.top_logprobs for t in bare.choices[0].logprobs.content] == [[], [], []]
    none = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, temperature=0)
    assert none.choices[0].logprobs is None


def test_stop_strings(client):
    full = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0).choices[0].message.content
    words = full.split()
    stop = " " + words[2]  # a stop string in the middle of the greedy answer
    cut = full[: full.index(stop)]
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0, stop=[stop, "zzzz"])
    assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 16
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=16, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == cut


def test_seeded_sampling_is_reproducible(client):
    def sample(seed):
        return client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=1.0, top_p=0.9,
                                              seed=seed).choices[0].message.content

    assert sample(7) == sample(7)


def test_multi_turn_and_content_parts(client):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert reply.usage.prompt_tokens > 20


# ------------------------------------------------------------------------------ errors
def _error(excinfo) -> dict:
    body = excinfo.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_auth(server):
    for key in ("wrong-key", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = httpx.post(server["base"] + "/chat/completions", headers=headers, json={"messages": HELLO})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server["base"], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"n": 2}, "n"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"seed": 2**70}, "seed"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0.content"),
])
def test_invalid_requests_get_openai_400(client, kwargs, param):
    args = {"model": MODEL, "messages": HELLO, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**args)
    error = _error(info)
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_malformed_json_and_unknown_model_and_route(server, client):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = httpx.post(server["base"] + "/chat/completions", headers=headers, content=b"{not json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=HELLO, max_tokens=2)
    assert _error(info)["code"] == "model_not_found"
    assert httpx.get(server["base"] + "/nope", headers=headers).status_code == 404


def test_context_length(client):
    long_prompt = [{"role": "user", "content": "word " * 9000}]  # SmolLM2's context is 8192 tokens
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=long_prompt, max_tokens=4)
    error = _error(info)
    assert error["code"] == "context_length_exceeded" and "8192" in error["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=9000)
    assert _error(info)["code"] == "context_length_exceeded" and "max_tokens" in _error(info)["message"]


# ------------------------------------------------------------------------------ concurrency
def test_queue_full_gets_503_and_server_survives(server, client):
    before = metrics(server)
    results: list = []

    def ask():
        try:
            reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24, temperature=0)
            results.append(reply.usage.completion_tokens)
        except openai.APIStatusError as error:
            results.append(error.status_code)
            if error.status_code == 503:
                assert error.response.json()["error"]["code"] == "server_busy"
                assert error.response.headers["retry-after"] == "1"

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    # one generating + MAX_WAITING waiting are served, the rest are refused at once
    assert sorted(results) == [24] * (1 + MAX_WAITING) + [503] * (3 - MAX_WAITING)
    after = metrics(server)
    assert after["medusa_bench:request_rejected_total"] - before["medusa_bench:request_rejected_total"] == 3 - MAX_WAITING
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, temperature=0).choices


def test_client_leaving_mid_stream_cancels_generation(server):
    before = metrics(server)
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", server["base"] + "/chat/completions", json=body, headers=headers, timeout=60) as response:
        for line in response.iter_lines():
            if '"content"' in line and '"content": ""' not in line:
                break  # got some text: hang up
    deadline = time.time() + 20
    while time.time() < deadline:
        after = metrics(server)
        if after["medusa_bench:request_cancelled_total"] > before["medusa_bench:request_cancelled_total"]:
            break
        time.sleep(0.2)
    assert after["medusa_bench:request_cancelled_total"] == before["medusa_bench:request_cancelled_total"] + 1
    # it stopped early: far fewer than 400 tokens were generated
    assert after["medusa_bench:generation_tokens_total"] - before["medusa_bench:generation_tokens_total"] < 200
    assert httpx.get(server["url"] + "/health").json()["running"] == 0


def test_metrics_follow_usage(server, client):
    before = metrics(server)
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0)
    after = metrics(server)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["medusa_bench:generation_tokens_total"] == reply.usage.completion_tokens == 5
    assert delta["medusa_bench:decode_steps_total"] == reply.usage.model_extra["decoding_steps"]
    assert delta["medusa_bench:prompt_tokens_total"] == reply.usage.prompt_tokens
    assert after["medusa_bench:spec_decode_mean_acceptance_length"] == 1.0
    assert delta['medusa_bench:request_success_total{finished_reason="length"}'] == 1
    text = httpx.get(server["url"] + "/metrics").text
    for name in ("spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total",
                 "spec_decode_num_accepted_tokens_total", "spec_decode_num_accepted_tokens_per_pos_total"):
        assert f"# TYPE medusa_bench:{name} counter" in text


# ------------------------------------------------------------------------------ a speculative decoder
TREE = "[[0],[1],[0,0],[0,1],[1,0],[0,0,0]]"


@pytest.fixture(scope="module")
def medusa_server(tmp_path_factory):
    """`serve --decoder medusa` with heads of random quality (greedy must still be lossless)."""
    import torch

    from medusa_bench.heads.medusa import MedusaHeads, save_heads

    torch.manual_seed(0)
    heads = MedusaHeads(num_heads=3, hidden_size=576, vocab_size=None)
    with torch.no_grad():
        heads.res_weight.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("heads")
    save_heads(heads, folder, format="v2", base_model_name_or_path="smollm2-135m")
    port = free_port()
    process = start_server(port, "--decoder", "medusa", "--medusa-heads", str(folder), "--tree", TREE,
                           "--api-key", KEY, log=folder / "server.log")
    yield {"url": f"http://127.0.0.1:{port}", "base": f"http://127.0.0.1:{port}/v1", "process": process, "port": port}
    stop_server(process)


def test_medusa_serving_is_lossless_and_counts_drafts(server, client, medusa_server):
    spec = openai.OpenAI(base_url=medusa_server["base"], api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in spec.models.list().data] == ["smollm2-135m-medusa"]
    messages = [{"role": "user", "content": "Count from one to ten in words."}]
    before = metrics(medusa_server)
    reply = spec.chat.completions.create(model="smollm2-135m-medusa", messages=messages, max_tokens=16, temperature=0)
    reference = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == reference.choices[0].message.content  # greedy: token-identical
    after = metrics(medusa_server)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    usage = reply.usage.model_extra
    steps, tokens = usage["decoding_steps"], reply.usage.completion_tokens
    assert delta["medusa_bench:decode_steps_total"] == steps and delta["medusa_bench:generation_tokens_total"] == tokens
    assert usage["acceptance_length"] == pytest.approx(tokens / steps, abs=1e-4)
    drafts = delta["medusa_bench:spec_decode_num_drafts_total"]
    assert steps - 1 <= drafts <= steps  # a last step whose root ends the turn verifies no draft
    assert delta["medusa_bench:spec_decode_num_draft_tokens_total"] == drafts * 6  # 6 tree nodes besides the root
    accepted = delta["medusa_bench:spec_decode_num_accepted_tokens_total"]
    assert accepted == tokens - steps  # each step emits its root plus the accepted drafts
    per_pos = [delta.get(f'medusa_bench:spec_decode_num_accepted_tokens_per_pos_total{{position="{i}"}}', 0) for i in range(3)]
    assert sum(per_pos) == accepted and per_pos == sorted(per_pos, reverse=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in spec.chat.completions.create(
        model="smollm2-135m-medusa", messages=messages, max_tokens=16, temperature=0, stream=True) if c.choices)
    assert streamed == reference.choices[0].message.content


# ------------------------------------------------------------------------------ engine pieces
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from medusa_bench.models import resolve_source

    return AutoTokenizer.from_pretrained(resolve_source("smollm2-135m")[0])


def test_text_stream_holds_back_partial_stops_and_characters(tokenizer):
    from medusa_bench.serve.engine import TextStream

    ids = tokenizer.encode("Hello wor" + "ld, café 🙂 end", add_special_tokens=False)
    stream = TextStream(tokenizer, stop=["ld, ca"])
    pieces = [stream.feed([i]) for i in ids]
    assert "".join(pieces) + stream.finish() == "Hello wor" and stream.stopped
    assert all("ld" not in p for p in pieces)
    assert 0 < stream.kept_tokens < len(ids)
    assert tokenizer.decode(ids[: stream.kept_tokens]).startswith("Hello world, ca")
    plain = TextStream(tokenizer)
    out = [plain.feed([i]) for i in ids]
    assert "".join(out) + plain.finish() == "Hello world, café 🙂 end"
    assert not any("\ufffd" in piece for piece in out)  # half an emoji is never sent


def test_metrics_counts_speculative_steps():
    from medusa_bench.decoders.base import Generation
    from medusa_bench.serve.engine import Completion, Metrics

    m = Metrics("m", "medusa", draft_size=4)
    generation = Generation([1] * 6, 3, [3, 1, 2], 0.1, "length", drafts=2, draft_tokens=8)  # the last step: root only
    m.record(Completion("x", [1] * 6, "length", None, generation), prompt_tokens=10)
    assert (m.drafts, m.draft_tokens, m.accepted_tokens, m.accepted_per_pos) == (2, 8, 3, [2, 1])
    text = m.render()
    assert 'medusa_bench:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",decoder="medusa",position="1"} 1' in text
    assert 'medusa_bench:spec_decode_mean_acceptance_length{model_name="m",decoder="medusa"} 2.0' in text


def test_a_failing_generation_is_a_500_and_the_server_goes_on(tokenizer):
    """A decoder that raises on one request: that request gets a 500, the next one works."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from medusa_bench.decoders.base import Generation
    from medusa_bench.serve.app import create_app
    from medusa_bench.serve.engine import Engine

    class FlakyDecoder:
        draft_size = 0
        calls = 0

        def generate(self, prompt_ids, max_new_tokens, sampling=None, on_step=None, logprobs=None):
            FlakyDecoder.calls += 1
            if FlakyDecoder.calls == 1:
                raise RuntimeError("out of memory (simulated)")
            ids = tokenizer.encode(" fine", add_special_tokens=False)
            on_step(ids)
            return Generation(ids, 1, [len(ids)], 0.01, "stop")

    loaded = SimpleNamespace(tokenizer=tokenizer, name="tiny", spec="tiny", context_length=2048, eos_token_ids=[])
    engine = Engine(loaded, FlakyDecoder(), "baseline", "tiny-baseline")
    with TestClient(create_app(engine)) as http:
        first = http.post("/v1/chat/completions", json={"messages": HELLO})
        assert first.status_code == 500 and "out of memory" in first.json()["error"]["message"]
        second = http.post("/v1/chat/completions", json={"messages": HELLO})
        assert second.status_code == 200 and second.json()["choices"][0]["message"]["content"] == " fine"
        assert 'request_failure_total{model_name="tiny-baseline",decoder="baseline"} 1' in http.get("/metrics").text
    engine.close()


# ------------------------------------------------------------------------------ judge end to end
def _judge_cmd(run: Path, base: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medusa_bench.cli", "judge", str(run), "--judge-base-url", base,
            "--judge-model", MODEL, "--max-tokens", "8", *extra]


def _env(**extra) -> dict:
    env = dict(os.environ, MEDUSA_BENCH_DATA=str(DATA), OPENAI_API_KEY=KEY, **extra)
    return env


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_judge_end_to_end(server, tmp_path):
    run = make_run(tmp_path, decoders=("baseline", "medusa"), qids=[81, 111])  # writing; math (with a reference)
    before = metrics(server)
    done = subprocess.run(_judge_cmd(run, server["base"], "--parallel", "2"), capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    path = run / "model_judgment" / f"{MODEL}_single.jsonl"
    records = _lines(path)
    assert len(records) == 8  # 2 decoders x 2 questions x 2 turns
    judged = [r for r in records if not r.get("reused_from")]
    reused = [r for r in records if r.get("reused_from")]
    assert len(judged) == 5 and len(reused) == 3  # medusa's 4 turns: 3 identical to the baseline
    calls = metrics(server)["medusa_bench:request_success_total{finished_reason=\"length\"}"] + \
        metrics(server)["medusa_bench:request_success_total{finished_reason=\"stop\"}"]
    calls_before = before["medusa_bench:request_success_total{finished_reason=\"length\"}"] + \
        before["medusa_bench:request_success_total{finished_reason=\"stop\"}"]
    assert calls - calls_before == 5
    for r in records:
        assert {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"} <= set(r)
        assert r["judge"][0] == MODEL and isinstance(r["judgment"], str)
        assert r["score"] == -1 or 1 <= r["score"] <= 10  # 8 tokens of a tiny judge: usually no rating
    prompts = {(r["question_id"], r["turn"]): r["judge"][1] for r in records}
    assert prompts == {(81, 1): "single-v1", (81, 2): "single-v1-multi-turn",
                       (111, 1): "single-math-v1", (111, 2): "single-math-v1-multi-turn"}
    unparsed = sum(1 for r in records if r["score"] == -1)
    assert f"{unparsed} unparseable" in done.stderr  # kept, counted (reused copies included)
    assert "writing" in done.stdout and "math" in done.stdout
    # resume: nothing new, no call
    again = subprocess.run(_judge_cmd(run, server["base"]), capture_output=True, text=True, env=_env(), timeout=300)
    assert again.returncode == 0 and "0 judged, 0 reused, 8 already done" in again.stderr
    assert len(_lines(path)) == 8
    # the key is in no file of the run folder and in no output
    for file in run.rglob("*"):
        if file.is_file():
            assert KEY not in file.read_text(errors="replace")
    assert KEY not in done.stdout + done.stderr + again.stdout + again.stderr


def test_judge_logprob_scores_end_to_end(server, tmp_path, monkeypatch):
    from medusa_bench.judge.run import judge_run

    run = make_run(tmp_path, decoders=("baseline",), qids=[81])
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("MEDUSA_BENCH_DATA", str(DATA))
    result = judge_run(run, judge_model=MODEL, base_url=server["base"], score="logprobs", max_tokens=8, parallel=1)
    records = _lines(result.path)
    assert len(records) == 2 and all(r["score_method"] in ("logprobs", "logprobs-fallback-text") for r in records)


def test_judge_survives_a_killed_server(server, medusa_server, tmp_path):
    """The judge endpoint dies mid-run: retries, then a clear error; finished judgments are kept
    and a re-run against a live server completes the rest without duplicates."""
    run = make_run(tmp_path, decoders=("baseline", "hydra"), qids=[81])
    path = run / "model_judgment" / "smollm2-135m_single.jsonl"
    doomed = medusa_server["process"]  # any server of the same model works as this judge
    cmd = _judge_cmd(run, medusa_server["base"], "--parallel", "1", "--max-retries", "2", "--judge-model", "smollm2-135m")
    judge = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 120
    while time.time() < deadline and not (path.exists() and path.read_text().count("\n") >= 1):
        time.sleep(0.1)
    processes.stop(doomed, first=signal.SIGKILL)  # killed on purpose: no ServerDied
    out, err = judge.communicate(timeout=120)
    assert judge.returncode == 2, err[-2000:]
    assert "still failing after 3 attempts" in err and "Traceback" not in err
    kept = _lines(path)  # only whole lines
    assert 1 <= len(kept) < 4
    resumed = subprocess.run(_judge_cmd(run, server["base"], "--judge-model", "smollm2-135m"), capture_output=True,
                             text=True, env=_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{len(kept)} already done" in resumed.stderr
    records = _lines(path)
    assert len(records) == 4 and len({(r["question_id"], r["model"], r["turn"]) for r in records}) == 4
    assert records[: len(kept)] == kept  # nothing rewritten
