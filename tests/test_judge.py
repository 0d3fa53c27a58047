"""`medusa-bench judge`: prompts, parsing, the retrying client and `judge_run`.

The judge endpoint here is a small real HTTP server on 127.0.0.1 (no model) that answers in
the OpenAI chat-completions format with scripted replies and failures (429, 5xx, 401, slow
answers). The end-to-end path against the real `medusa-bench serve` is in test_serve.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from json_handler import JsonHandler
from medusa_bench.errors import UserError
from medusa_bench.judge import mtbench
from medusa_bench.judge.client import (
    JudgeClient, JudgeUnavailable, RetryPolicy, TokenLogprob, is_local_url, resolve_api_key, run_bounded,
)
from medusa_bench.judge.run import judge_run, judgment_path
from medusa_bench.judge.summary import summary_table

DATA = Path("/work/shared/data")
if not (DATA / "mt_bench" / "judge_prompts.jsonl").is_file():
    DATA = Path(os.environ.get("MEDUSA_BENCH_DATA", DATA))
FAST = RetryPolicy(max_retries=3, base=0.01, cap=0.05)
SECRET = "sk-test-SECRET-do-not-write-0123456789"


@pytest.fixture(autouse=True)
def _data(monkeypatch):
    monkeypatch.setenv("MEDUSA_BENCH_DATA", str(DATA))
    monkeypatch.setenv("MEDUSA_BENCH_OFFLINE", "1")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


# ------------------------------------------------------------------------------ fake judge
class FakeJudge:
    """A real HTTP server speaking the chat-completions format, with scripted behaviour.

    `script` holds actions used one per request before falling back to `reply(body)`:
    an int (an HTTP error status) or (status, message), ("sleep", seconds) (answer late), or "close" (drop the
    connection). `reply(body)` returns the judgment text, or (text, logprobs content list).
    """

    def __init__(self, reply=None):
        self.reply = reply or (lambda body: "The answer is fine. Rating: [[7]]")
        self.script: list = []
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.fail_after: int | None = None  # every request after this many successes gets a 500
        self.successes = 0
        self._lock = threading.Lock()
        judge = self

        class Handler(JsonHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with judge._lock:
                    judge.requests.append(body)
                    judge.headers.append({k.lower(): v for k, v in self.headers.items()})
                    action = judge.script.pop(0) if judge.script else None
                    if action is None and judge.fail_after is not None and judge.successes >= judge.fail_after:
                        action = 500
                    judge.in_flight += 1
                    judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
                try:
                    if action == "close":
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    if isinstance(action, tuple) and action[0] == "sleep":
                        time.sleep(action[1])
                    if isinstance(action, tuple) and isinstance(action[0], int):
                        action, message = action
                    else:
                        message = f"scripted {action}"
                    if isinstance(action, int):
                        self.send_json(action, {"error": {"message": message, "type": "test", "param": None, "code": None}},
                                       {"Retry-After": "0"} if action == 429 else {})
                        return
                    time.sleep(0.02)
                    out = judge.reply(body)
                    text, logprobs = out if isinstance(out, tuple) else (out, None)
                    with judge._lock:
                        judge.successes += 1
                    self.send_json(200, {
                        "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                                     "logprobs": {"content": logprobs} if logprobs is not None else None}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    })
                finally:
                    with judge._lock:
                        judge.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeJudge()
    yield server
    server.close()


# ------------------------------------------------------------------------------ run folder
QUESTIONS = {q["question_id"]: q for q in map(json.loads, (DATA / "mt_bench" / "question.jsonl").read_text().splitlines())}
QIDS = [81, 101, 111]  # writing (no reference), reasoning and math (graded against references)


def make_run(root: Path, decoders=("baseline", "medusa", "hydra"), qids=QIDS, bench="mt_bench") -> Path:
    """A run folder in the documented format: medusa matches the baseline, hydra is sampled."""
    run = root / "run"
    (run / "model_answer").mkdir(parents=True)
    models = {d: f"smollm2-135m-{d}" for d in decoders}
    (run / "run.json").write_text(json.dumps({
        "tool": "medusa-bench", "version": "0.1.0", "created": "2025-01-01T00:00:00+00:00", "git_hash": None,
        "settings": {"model": "smollm2-135m", "bench": bench, "max_new_tokens": 16, "temperature": 0.0},
        "decoders": list(decoders), "models": models, "versions": {}, "device": {"type": "cpu"},
    }))
    for decoder in decoders:
        with open(run / "model_answer" / f"{models[decoder]}.jsonl", "w") as handle:
            for qid in qids:
                question = QUESTIONS[qid]
                turns = [f"Answer to {qid} turn {t + 1}." for t in range(len(question["turns"]))]
                exact = [True] * len(turns)
                if decoder == "medusa" and qid == 111:
                    turns[1] = "A different second answer."  # differs from the baseline on turn 2 only
                    exact = [True, False]
                if decoder == "hydra":
                    turns = [f"Sampled answer {t}." for t in range(len(turns))]
                    exact = None
                if decoder == "baseline":
                    exact = None
                handle.write(json.dumps({
                    "question_id": qid, "answer_id": f"a{qid}{decoder}", "model_id": models[decoder], "decoder": decoder,
                    "category": question["category"], "tstamp": 0.0,
                    "choices": [{"index": 0, "turns": turns, "new_tokens": [5] * len(turns), "wall_time": [0.1] * len(turns),
                                 "decoding_steps": [5] * len(turns), "accept_lengths": [[1] * 5] * len(turns),
                                 "token_ids": [[1, 2, 3, 4, 5]] * len(turns), "exact_match": exact}],
                }) + "\n")
    return run


# ------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("text, expected", [
    ("Rating: [[7]]", 7),
    ("Rating: [[7.5]]", 7.5),
    ('Format "Rating: [[5]]". My verdict: [[3]]', 3),  # the last rating wins over a quoted example
    ("[[ 10 ]]", 10),
    ("Rating: [8]", 8),  # single-bracket fallback, 1-10 only
    ("See reference [12]. Nothing else.", -1),  # not a rating
    ("[[0]]", -1),
    ("[[11]]", -1),
    ("[[11]] but also [6]", 6),  # out-of-range double brackets are ignored
    ("Rating: [[rating]]", -1),
    ("no verdict at all", -1),
    ("", -1),
])
def test_parse_rating(text, expected):
    assert mtbench.parse_rating(text) == expected


def test_parse_pair_verdict():
    assert mtbench.parse_pair_verdict("so [[A]]") == "A"
    assert mtbench.parse_pair_verdict("[[B]]") == "B"
    assert mtbench.parse_pair_verdict("[[C]]") == "tie"
    assert mtbench.parse_pair_verdict("A is better") == "error"


def test_expected_rating_from_logprobs():
    lp = math.log
    tokens = [TokenLogprob("Rating", lp(0.9)), TokenLogprob(": [[", lp(0.9)),
              TokenLogprob("8", lp(0.6), [("8", lp(0.6)), ("7", lp(0.3)), ("hello", lp(0.05)), ("9", lp(0.05))]),
              TokenLogprob("]]", lp(0.99))]
    # renormalised over the rating tokens: (8*.6 + 7*.3 + 9*.05) / .95
    assert mtbench.expected_rating(tokens) == pytest.approx((8 * 0.6 + 7 * 0.3 + 9 * 0.05) / 0.95)
    split = [TokenLogprob("[", 0.0), TokenLogprob("[", 0.0), TokenLogprob("3", lp(0.5), [("3", lp(0.5)), ("4", lp(0.5))])]
    assert mtbench.expected_rating(split) == pytest.approx(3.5)
    assert mtbench.expected_rating([TokenLogprob("no", 0.0, [("no", 0.0)])]) is None
    assert mtbench.expected_rating(None) is None


# ------------------------------------------------------------------------------ prompts
def test_prompts_match_fastchat():
    """Same choice of template and the same filled text as fastchat/llm_judge/common.py."""
    prompts = mtbench.load_judge_prompts(DATA / "mt_bench" / "judge_prompts.jsonl")
    refs = mtbench.load_reference_answers(DATA / "mt_bench" / "reference_answer" / "gpt-4.jsonl")
    writing, math_q = QUESTIONS[81], QUESTIONS[111]
    p = mtbench.single_prompt(prompts, writing, ["A1", "A2"], 1)
    assert p.name == "single-v1"
    assert p.user == prompts["single-v1"]["prompt_template"].format(question=writing["turns"][0], answer="A1")
    assert p.messages() == [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": p.user}]
    p2 = mtbench.single_prompt(prompts, writing, ["A1", "A2"], 2)
    assert p2.name == "single-v1-multi-turn"
    assert "### Assistant A:\nA1" in p2.user and "### Assistant A:\nA2" in p2.user and writing["turns"][1] in p2.user
    m1 = mtbench.single_prompt(prompts, math_q, ["A1", "A2"], 1, refs[111])
    assert m1.name == "single-math-v1" and refs[111][0] in m1.user
    m2 = mtbench.single_prompt(prompts, math_q, ["A1", "A2"], 2, refs[111])
    assert m2.name == "single-math-v1-multi-turn" and refs[111][1] in m2.user
    assert m2.system == prompts["single-math-v1-multi-turn"]["system_prompt"]
    # a reference category without a reference (another bench) falls back to the general prompt
    assert mtbench.single_prompt(prompts, math_q, ["A1"], 1, None).name == "single-v1"
    pa = mtbench.pair_prompt(prompts, math_q, ["X1", "X2"], ["Y1", "Y2"], 2, refs[111])
    assert pa.name == "pair-math-v1-multi-turn"
    assert pa.user.index("### Assistant A:\nX1") < pa.user.index("### Assistant B:\nY1")
    assert mtbench.pair_prompt(prompts, writing, ["X"], ["Y"], 1).name == "pair-v2"


# ------------------------------------------------------------------------------ client
def test_api_key_rules(monkeypatch):
    with pytest.raises(UserError, match="OPENAI_API_KEY"):
        resolve_api_key(None)
    with pytest.raises(UserError, match="MY_JUDGE_KEY"):
        resolve_api_key("https://judge.example.com/v1", "MY_JUDGE_KEY")
    assert is_local_url("http://127.0.0.1:8000/v1") and is_local_url("http://localhost:1/v1")
    assert not is_local_url("https://api.openai.com/v1")
    assert resolve_api_key("http://127.0.0.1:8000/v1")  # a placeholder is fine locally
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    assert resolve_api_key("https://judge.example.com/v1", "MY_JUDGE_KEY") == SECRET


def test_client_retries_rate_limits_and_5xx(fake, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    fake.script = [429, 500, 503]
    client = JudgeClient("judge", base_url=fake.url, retry=FAST)
    reply = client.chat([{"role": "user", "content": "hi"}], max_tokens=5)
    assert reply.text.endswith("[[7]]") and reply.attempts == 4
    assert len(fake.requests) == 4
    assert fake.headers[0]["authorization"] == f"Bearer {SECRET}"
    assert fake.requests[0]["temperature"] == 0.0 and fake.requests[0]["max_tokens"] == 5
    assert SECRET not in repr(client)


def test_client_retries_timeouts_and_dropped_connections(fake):
    fake.script = [("sleep", 1.5), "close"]
    client = JudgeClient("judge", base_url=fake.url, timeout=0.5, retry=FAST)
    assert client.chat([{"role": "user", "content": "hi"}]).attempts == 3


@pytest.mark.parametrize("status, words", [(401, "API key was rejected"), (403, "access denied"),
                                           (404, "not found"), (400, "refused"), (422, "refused")])
def test_client_4xx_stops_at_once(fake, monkeypatch, status, words):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    fake.script = [status]
    client = JudgeClient("judge", base_url=fake.url, retry=FAST)
    with pytest.raises(UserError, match=words) as info:
        client.chat([{"role": "user", "content": "hi"}])
    assert not isinstance(info.value, JudgeUnavailable)
    assert len(fake.requests) == 1  # no retry
    assert SECRET not in str(info.value)


def test_client_switches_to_max_completion_tokens(fake):
    """Newer OpenAI models refuse max_tokens; the client retries once with max_completion_tokens."""
    fake.script = [(400, "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.")]
    client = JudgeClient("judge", base_url=fake.url, retry=FAST)
    client.chat([{"role": "user", "content": "hi"}], max_tokens=9)
    assert "max_tokens" in fake.requests[0] and fake.requests[1]["max_completion_tokens"] == 9
    assert "max_tokens" not in fake.requests[1]


def test_client_gives_up_after_retries(fake):
    fake.script = [500] * 10
    client = JudgeClient("judge", base_url=fake.url, retry=FAST)
    with pytest.raises(JudgeUnavailable, match="after 4 attempts: HTTP 500"):
        client.chat([{"role": "user", "content": "hi"}])
    assert len(fake.requests) == 4


def test_client_connection_refused():
    import socket

    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = JudgeClient("judge", base_url=f"http://127.0.0.1:{port}/v1", retry=FAST)
    with pytest.raises(JudgeUnavailable, match="connection error"):
        client.chat([{"role": "user", "content": "hi"}])


def test_backoff_grows_with_jitter():
    policy = RetryPolicy(base=1.0, cap=8.0)
    for attempt, top in [(0, 1), (1, 2), (2, 4), (3, 8), (6, 8)]:
        delays = [policy.delay(attempt) for _ in range(50)]
        assert all(top / 2 <= d <= top for d in delays) and len(set(delays)) > 1
    assert 4 <= policy.delay(3, retry_after=0.5) <= 8  # Retry-After is a floor, not a cap
    assert policy.delay(0, retry_after=5) == 5


def test_run_bounded_limits_concurrency_and_stops_on_error():
    active, peak, lock = [0], [0], threading.Lock()

    def work(i):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02)
        with lock:
            active[0] -= 1
        if i == 5:
            raise UserError("boom")
        return i * 2

    seen = []
    with pytest.raises(UserError, match="boom"):
        for item, result in run_bounded(range(100), work, parallel=3):
            seen.append(result)
    assert peak[0] <= 3 and len(seen) < 20  # stopped early, items not started were dropped
    assert sorted(r for _, r in run_bounded(range(10), lambda i: i, 4)) == list(range(10))


# ------------------------------------------------------------------------------ judge_run
def _read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_judge_run_single_format_reuse_resume(tmp_path, fake):
    run = make_run(tmp_path)
    result = judge_run(run, judge_model="gpt-4", base_url=fake.url, parallel=3, retry=FAST)
    path = run / "model_judgment" / "gpt-4_single.jsonl"
    assert result.path == path
    records = _read(path)
    # 3 decoders x 3 questions x 2 turns; medusa reuses the baseline on 5 of its 6 turns
    assert len(records) == 18 and result.judged == 13 and result.reused == 5 and result.unparsed == 0
    assert len(fake.requests) == 13 and fake.max_in_flight <= 3
    fields = {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}
    for r in records:
        assert fields <= set(r) and set(r) - fields <= {"score_method", "reused_from"}
        assert r["judge"][0] == "gpt-4" and r["score"] == 7 and r["turn"] in (1, 2)
    by = {(r["question_id"], r["model"], r["turn"]): r for r in records}
    assert by[(81, "smollm2-135m-baseline", 1)]["judge"][1] == "single-v1"
    assert by[(101, "smollm2-135m-baseline", 2)]["judge"][1] == "single-math-v1-multi-turn"
    assert by[(111, "smollm2-135m-hydra", 1)]["judge"][1] == "single-math-v1"
    reused = by[(81, "smollm2-135m-medusa", 2)]
    assert reused["reused_from"] == "smollm2-135m-baseline"
    assert reused["judgment"] == by[(81, "smollm2-135m-baseline", 2)]["judgment"]
    assert "reused_from" not in by[(111, "smollm2-135m-medusa", 2)]  # turn 2 differs: judged
    assert by[(111, "smollm2-135m-medusa", 1)]["reused_from"] == "smollm2-135m-baseline"
    # the summary: every cell complete
    frame = result.summary
    overall = frame[(frame.category == "all") & (frame.turn == 0)].set_index("decoder")
    assert overall.loc["medusa", "coverage"] == 1.0 and overall.loc["medusa", "score"] == 7.0
    assert overall.loc["medusa", "reused"] == 5 and overall.loc["baseline", "expected"] == 6
    assert "writing" in set(frame.category) and summary_table(result).row_count == 9
    # resume: nothing left to do, no call made
    again = judge_run(run, judge_model="gpt-4", base_url=fake.url, retry=FAST)
    assert (again.judged, again.reused, again.skipped) == (0, 0, 18) and len(fake.requests) == 13
    assert len(_read(path)) == 18


def test_judge_run_no_reuse_and_decoder_selection(tmp_path, fake):
    run = make_run(tmp_path)
    result = judge_run(run, base_url=fake.url, decoders=["medusa"], reuse=False, retry=FAST)
    assert result.judged == 6 and result.reused == 0
    assert {r["model"] for r in _read(result.path)} == {"smollm2-135m-medusa"}
    with pytest.raises(UserError, match="no answers for decoder 'nope'.*baseline"):
        judge_run(run, base_url=fake.url, decoders=["nope"], retry=FAST)


def test_reuse_without_baseline_judgment_judges_itself(tmp_path, fake):
    run = make_run(tmp_path)
    result = judge_run(run, base_url=fake.url, decoders=["medusa"], retry=FAST)
    assert result.judged == 6 and result.reused == 0  # no baseline judgment to copy


def test_unparseable_judgments_are_kept_and_counted(tmp_path):
    fake = FakeJudge(reply=lambda body: "I cannot decide." if "Answer to 81" in body["messages"][1]["content"] else "[[4]]")
    try:
        run = make_run(tmp_path, decoders=("baseline",))
        result = judge_run(run, base_url=fake.url, retry=FAST)
    finally:
        fake.close()
    records = _read(result.path)
    bad = [r for r in records if r["question_id"] == 81]
    assert len(bad) == 2 and all(r["score"] == -1 and r["judgment"] == "I cannot decide." for r in bad)
    assert result.unparsed == 2
    row = result.summary.query("turn == 0 and category == 'all'").iloc[0]
    assert (row.valid, row.expected, row.unparsed, row.score) == (4, 6, 2, 4.0)
    assert row.coverage == pytest.approx(4 / 6)


def test_logprob_scoring(tmp_path):
    def reply(body):
        assert body["logprobs"] is True and body["top_logprobs"] == 20
        lp = math.log
        content = [{"token": "Rating: [[", "logprob": 0.0, "bytes": None, "top_logprobs": []},
                   {"token": "6", "logprob": lp(0.5), "bytes": None,
                    "top_logprobs": [{"token": "6", "logprob": lp(0.5), "bytes": None}, {"token": "8", "logprob": lp(0.5), "bytes": None}]},
                   {"token": "]]", "logprob": 0.0, "bytes": None, "top_logprobs": []}]
        return "Rating: [[6]]", content

    fake = FakeJudge(reply=reply)
    try:
        run = make_run(tmp_path, decoders=("baseline",), qids=[81])
        result = judge_run(run, base_url=fake.url, score="logprobs", retry=FAST)
        records = _read(result.path)
        assert all(r["score"] == 7.0 and r["parsed_score"] == 6 and r["score_method"] == "logprobs" for r in records)
        with pytest.raises(UserError, match="scored by logprobs"):
            judge_run(run, base_url=fake.url, score="text", retry=FAST)
    finally:
        fake.close()


def test_pairwise_both_orders(tmp_path):
    def reply(body):  # always prefers assistant A: a position-biased judge → inconsistent → tie
        return "[[A]]"

    fake = FakeJudge(reply=reply)
    try:
        run = make_run(tmp_path)
        result = judge_run(run, base_url=fake.url, mode="pairwise", retry=FAST)
    finally:
        fake.close()
    assert result.path == run / "model_judgment" / "gpt-4_pair.jsonl"
    records = _read(result.path)
    fields = {"question_id", "model_1", "model_2", "g1_winner", "g2_winner", "judge", "g1_user_prompt", "g1_judgment",
              "g2_user_prompt", "g2_judgment", "turn", "tstamp"}
    assert all(fields <= set(r) for r in records) and len(records) == 12
    hydra = [r for r in records if r["model_1"] == "smollm2-135m-hydra"]
    assert all(r["g1_winner"] == "model_1" and r["g2_winner"] == "model_2" for r in hydra)
    assert "Sampled answer 0" in hydra[0]["g1_user_prompt"].split("Assistant B")[0]
    identical = [r for r in records if r.get("reused_from")]
    assert len(identical) == 5 and all(r["g1_winner"] == r["g2_winner"] == "tie" for r in identical)
    assert len(fake.requests) == 2 * (6 + 1)  # hydra 6 games + medusa's one differing turn, both orders
    frame = result.summary.set_index(["decoder", "turn", "category"])
    assert frame.loc[("hydra", 0, "all"), "tie"] == 6 and frame.loc[("hydra", 0, "all"), "coverage"] == 1.0


def test_server_failure_mid_run_loses_nothing(tmp_path, fake):
    run = make_run(tmp_path)
    fake.fail_after = 4  # the endpoint goes down after 4 judgments
    with pytest.raises(JudgeUnavailable, match="still failing after 4 attempts"):
        judge_run(run, base_url=fake.url, parallel=2, retry=FAST)
    path = judgment_path(run, "gpt-4", "single")
    first = _read(path)  # only whole lines, every finished judgment kept
    assert 4 <= len(first) <= 5 and all(r["score"] == 7 for r in first)
    fake.fail_after = None  # the endpoint is back: resume finishes the rest
    result = judge_run(run, base_url=fake.url, parallel=2, retry=FAST)
    records = _read(path)
    assert len(records) == 18 and result.skipped == len(first)
    assert len({(r["question_id"], r["model"], r["turn"]) for r in records}) == 18


def test_bad_key_stops_before_writing(tmp_path, fake, monkeypatch):
    run = make_run(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    fake.script = [401] * 50
    with pytest.raises(UserError, match="API key was rejected: check OPENAI_API_KEY"):
        judge_run(run, base_url=fake.url, parallel=1, retry=FAST)
    assert len(fake.requests) == 1
    assert _read(judgment_path(run, "gpt-4", "single")) == [] if judgment_path(run, "gpt-4", "single").exists() else True


def test_missing_key_for_remote_endpoint_fails_before_work(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(UserError, match="set the environment variable OPENAI_API_KEY"):
        judge_run(run, base_url="https://judge.example.com/v1")
    with pytest.raises(UserError, match="JUDGE_KEY"):
        judge_run(run, api_key_env="JUDGE_KEY")
    assert not (run / "model_judgment").exists()


def test_key_never_written(tmp_path, fake, monkeypatch):
    run = make_run(tmp_path)
    monkeypatch.setenv("JUDGE_KEY", SECRET)
    judge_run(run, base_url=fake.url, api_key_env="JUDGE_KEY", retry=FAST)
    assert fake.headers[0]["authorization"] == f"Bearer {SECRET}"
    for file in run.rglob("*"):
        if file.is_file():
            assert SECRET not in file.read_text(errors="replace"), file


def test_fastchat_show_result_reads_the_file(tmp_path, fake):
    """FastChat's own reader (show_result.py's pandas code) accepts the judgment file."""
    import pandas as pd

    run = make_run(tmp_path)
    path = judge_run(run, base_url=fake.url, retry=FAST).path
    df = pd.read_json(path, lines=True)[["model", "score", "turn"]]
    df = df[df["score"] != -1]
    means = df[df["turn"] == 1].groupby(["model", "turn"]).mean()
    assert set(means.index.get_level_values(0)) == {f"smollm2-135m-{d}" for d in ("baseline", "medusa", "hydra")}


def test_cli_judge(tmp_path, fake):
    """The console command: summary on stdout, the key in no output, a clear one-line error."""
    run = make_run(tmp_path, decoders=("baseline", "medusa"), qids=[81])
    env = dict(os.environ, MEDUSA_BENCH_DATA=str(DATA), JUDGE_KEY=SECRET)
    env.pop("OPENAI_API_KEY", None)
    cmd = [sys.executable, "-m", "medusa_bench.cli", "judge", str(run), "--judge-base-url", fake.url,
           "--api-key-env", "JUDGE_KEY", "--max-tokens", "32"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "gpt-4_single.jsonl" in done.stdout and "writing" in done.stdout
    assert "2 judged, 2 reused" in done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert fake.requests[0]["max_tokens"] == 32
    env.pop("JUDGE_KEY")
    bad = subprocess.run([*cmd[:-4], "--judge-base-url", "https://judge.example.com/v1"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "no API key" in bad.stderr and "Traceback" not in bad.stderr
