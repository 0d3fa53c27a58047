"""Issue #13, reliability: torn judgment files, re-asking unparseable judgments, resume that
checks contents, one writer per run folder, inert markdown, and honest checkpoint errors.

Each case goes through the real CLI: `medusa-bench judge` as a real process against the real
HTTP judge server of test_judge.py (killed with SIGKILL mid-run), two real processes for the
lock, and `medusa-bench run` on the embedded model for the resume checks.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from medusa_bench.errors import UserError
from medusa_bench.heads.medusa import MedusaHeads, save_heads
from medusa_bench.results import files
from test_judge import DATA, FakeJudge, make_run

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "medusa_bench" / "data" / "quick_question.jsonl"
JUDGE = [sys.executable, "-m", "medusa_bench.cli", "judge"]


def env() -> dict:
    out = dict(os.environ, MEDUSA_BENCH_DATA=str(DATA), MEDUSA_BENCH_OFFLINE="1")
    out.pop("OPENAI_API_KEY", None)
    return out


def judge_cmd(run: Path, judge: FakeJudge, *extra) -> list[str]:
    return [*JUDGE, str(run), "--judge-base-url", judge.url, "--parallel", "1", *extra]


def cli(capsys, monkeypatch, *args) -> tuple[int, str]:
    """The real CLI entry point in-process (as in test_run.py); returns (exit code, stderr)."""
    code, _, err = run_cli(capsys, monkeypatch, *args)
    return code, " ".join(err.split())


def wait_for(condition, seconds=60.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # every line whole JSON


def judge_taking(seconds: float) -> FakeJudge:
    return FakeJudge(reply=lambda body: (time.sleep(seconds), "Fine. Rating: [[7]]")[1])


@pytest.fixture
def slow_judge():
    server = judge_taking(0.3)
    yield server
    server.close()


@pytest.fixture
def slower_judge():
    """Slow enough that the first judge is still at work while other processes start."""
    server = judge_taking(5.0)
    yield server
    server.close()


# ------------------------------------------------------------------------------ 1. one writer
@pytest.mark.parametrize("content, expected", [
    (b'{"a": 1}\n{"b": 2}\n{"c": 3, "d', b'{"a": 1}\n{"b": 2}\n'),  # torn by a kill: dropped
    (b'{"a": 1}\n{"b": 2}', b'{"a": 1}\n{"b": 2}\n'),  # complete, saved without a newline: kept, terminated
    (b'{"a": 1}\n{"b": "\xc3', b'{"a": 1}\n'),  # cut inside a UTF-8 character
    (b'{"c": 3, "d', b""),
    (b"", b""),
])
def test_append_repairs_the_last_line_first(tmp_path, content, expected):
    path = tmp_path / "f.jsonl"
    path.write_bytes(content)
    assert files.read_jsonl(path) == [json.loads(x) for x in expected.splitlines()]  # readers skip a torn line
    files.append_jsonl(path, {"new": True})
    assert path.read_bytes() == expected + b'{"new": true}\n'


@pytest.mark.parametrize("content", [b'{"a": 1}\n{"b": \n{"c": 3}\n', b'{"a": 1}\n{"b": \n'])
def test_a_corrupt_terminated_line_is_reported_with_its_number(tmp_path, content):
    path = tmp_path / "f.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"f.jsonl line 2 is not valid JSON"):
        files.read_jsonl(path)
    if content.count(b"\n") == 2:  # as the last line: the writer refuses to glue a record after it
        with pytest.raises(UserError, match=r"f.jsonl line 2 is not valid JSON"):
            files.append_jsonl(path, {"new": True})
    assert path.read_bytes() == content


def test_rewrite_is_atomic_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"a": 1}\n')
    files.rewrite_jsonl(path, [{"b": 2}, {"c": 3}])
    assert lines(path) == [{"b": 2}, {"c": 3}] and [p.name for p in tmp_path.iterdir()] == ["f.jsonl"]


def test_judge_killed_then_torn_line_then_unterminated_file_resumes(tmp_path, slow_judge):
    """kill -9 mid-run, cut the last line short, re-run; then delete lines and drop the final newline."""
    run = make_run(tmp_path, decoders=("baseline", "hydra"))  # 12 judgments, all judge calls
    path = run / "model_judgment" / "gpt-4_single.jsonl"
    first = subprocess.Popen(judge_cmd(run, slow_judge), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: path.exists() and path.read_text().count("\n") >= 3)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    kept = path.read_bytes()
    path.write_bytes(kept[:-25])  # the last line cut short (what a kill mid-write or a careless edit leaves)

    again = subprocess.run(judge_cmd(run, slow_judge), env=env(), capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr  # the kill released the run folder's lock too
    records = lines(path)
    keys = {(r["question_id"], r["model"], r["turn"]) for r in records}
    assert len(records) == len(keys) == 12
    assert path.read_bytes().startswith(kept[: kept.rfind(b"\n", 0, len(kept) - 1) + 1])  # whole lines untouched

    # A user deletes the last judgments by hand to have them asked again, saving without a final newline.
    text = path.read_text().splitlines()
    path.write_text("\n".join(text[:-3]))
    again = subprocess.run(judge_cmd(run, slow_judge), env=env(), capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    assert "3 judged, 0 reused, 9 already done" in " ".join(again.stderr.split())
    assert [json.dumps(r) for r in lines(path)[:9]] == [json.dumps(json.loads(t)) for t in text[:9]]
    assert len(lines(path)) == 12
    report = subprocess.run([sys.executable, "-m", "medusa_bench.cli", "report", str(run), "--format", "markdown",
                             "--out", str(tmp_path / "r.md")], env=env(), capture_output=True, text=True, timeout=180)
    assert report.returncode == 0, report.stderr


# ------------------------------------------------------------------------------ 2. re-ask unparseable
def test_retry_unparseable_replaces_the_old_lines(tmp_path):
    verdicts = {"text": "I cannot decide."}
    judge = FakeJudge(reply=lambda body: verdicts["text"])
    try:
        run = make_run(tmp_path, decoders=("baseline", "medusa"), qids=[81])  # medusa reuses the baseline's
        path = run / "model_judgment" / "gpt-4_single.jsonl"
        done = subprocess.run(judge_cmd(run, judge), env=env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "2 judged, 2 reused, 0 already done, 4 unparseable" in " ".join(done.stderr.split())
        before = lines(path)
        assert [r["score"] for r in before] == [-1] * 4

        verdicts["text"] = "Now clear. Rating: [[8]]"
        plain = subprocess.run(judge_cmd(run, judge), env=env(), capture_output=True, text=True, timeout=120)
        assert "0 judged, 0 reused, 4 already done, 0 unparseable" in " ".join(plain.stderr.split())

        retry = subprocess.run(judge_cmd(run, judge, "--retry-unparseable"), env=env(), capture_output=True, text=True, timeout=120)
        assert retry.returncode == 0, retry.stderr
        assert "2 judged, 2 reused, 0 already done, 0 unparseable (kept, counted as missing), 4 re-asked" in " ".join(retry.stderr.split())
        after = lines(path)
        assert [r["score"] for r in after] == [8] * 4
        key = lambda r: (r["question_id"], r["model"], r["turn"])  # noqa: E731
        assert [key(r) for r in after] == [key(r) for r in before]  # each replaced in place
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left
    finally:
        judge.close()


# ------------------------------------------------------------------------------ 4. one writer per folder
def test_second_writer_is_refused_naming_the_pid_and_sigkill_releases(tmp_path, slower_judge, slow_judge):
    run = make_run(tmp_path, decoders=("baseline", "hydra"))
    first = subprocess.Popen(judge_cmd(run, slower_judge), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: (run / ".lock").exists() and (run / ".lock").read_text().strip() == str(first.pid))
        second = subprocess.run(judge_cmd(run, slow_judge), env=env(), capture_output=True, text=True, timeout=120)
        message = " ".join(second.stderr.split())
        assert second.returncode == 2 and f"is in use by another medusa-bench process (PID {first.pid})" in message
        assert "Traceback" not in message
        rerun = subprocess.run([sys.executable, "-m", "medusa_bench.cli", "run", "--bench", "quick", "--limit", "1",
                                "--max-new-tokens", "4", "--warmup", "0", "--device", "cpu", "--out", str(run)],
                               env=env(), capture_output=True, text=True, timeout=180)
        assert rerun.returncode == 2 and f"(PID {first.pid})" in " ".join(rerun.stderr.split())
        report = subprocess.run([sys.executable, "-m", "medusa_bench.cli", "report", str(run), "--format", "markdown",
                                 "--out", str(tmp_path / "r.md")], env=env(), capture_output=True, text=True, timeout=180)
        assert report.returncode == 0, report.stderr  # reading needs no lock
        assert first.poll() is None  # the holder was at work all along
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    after = subprocess.run(judge_cmd(run, slow_judge), env=env(), capture_output=True, text=True, timeout=180)
    assert after.returncode == 0, after.stderr


# ------------------------------------------------------------------------------ 3. resume compares contents
def quick_args(out: Path, *extra) -> list:
    return ["run", "--max-new-tokens", "4", "--warmup", "0", "--device", "cpu", "--dtype", "float32", "--out", out, *extra]


def save_random_heads(folder: Path, seed: int) -> None:
    torch.manual_seed(seed)
    heads = MedusaHeads(num_heads=2, hidden_size=576, vocab_size=None)
    with torch.no_grad():
        heads.res_weight.normal_(0, 0.05)
    save_heads(heads, folder, format="v2", base_model_name_or_path="smollm2-135m")


def test_resume_refuses_retrained_heads(tmp_path, capsys, monkeypatch):
    heads, out = tmp_path / "heads", tmp_path / "run"
    save_random_heads(heads, seed=0)
    args = quick_args(out, "--bench", "quick", "--limit", "1", "--decoders", "medusa", "--medusa-heads", heads, "--tree", "chain-2")
    code, err = cli(capsys, monkeypatch, *args)
    assert code == 0, err
    recorded = json.loads((out / "run.json").read_text())["content_hashes"]["heads"]
    assert list(recorded) == [str(heads.resolve())]
    save_random_heads(heads, seed=1)  # retrained into the same folder
    code, err = cli(capsys, monkeypatch, *args)
    old = recorded[str(heads.resolve())]
    assert code == 2
    assert f"heads in {heads.resolve()} changed since this run started (hash {old[:8]}… → " in err
    assert err.endswith("); use another --out")


def test_resume_refuses_edited_questions_but_may_extend(tmp_path, capsys, monkeypatch):
    questions, out = tmp_path / "q.jsonl", tmp_path / "run"
    questions.write_text(QUICK.read_text())
    first_id = json.loads(QUICK.read_text().splitlines()[0])["question_id"]
    code, err = cli(capsys, monkeypatch, *quick_args(out, "--questions", questions, "--limit", "1"))
    assert code == 0, err
    code, err = cli(capsys, monkeypatch, *quick_args(out, "--questions", questions, "--limit", "2"))  # more questions: fine
    assert code == 0, err
    records = [json.loads(line) for line in questions.read_text().splitlines()]
    records[0]["turns"][0] += " (edited)"
    questions.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, err = cli(capsys, monkeypatch, *quick_args(out, "--questions", questions, "--limit", "1"))
    assert code == 2
    assert f"question {first_id} in {questions} changed since this run started (hash " in err and "use another --out" in err


# ------------------------------------------------------------------------------ judge --dry-run
@pytest.mark.parametrize("mode", ["single", "pairwise"])
def test_judge_dry_run_counts_what_the_judgment_sends_and_sends_nothing(tmp_path, capsys, monkeypatch, mode):
    """The dry run's count is the number of calls the real judgment then makes; it needs no key,
    sends nothing and writes nothing."""
    monkeypatch.setenv("MEDUSA_BENCH_DATA", str(DATA))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    run = make_run(tmp_path, decoders=("baseline", "medusa", "hydra"))
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    code, out, err = run_cli(capsys, monkeypatch, "judge", run, "--mode", mode, "--dry-run", "--max-tokens", "100")  # OpenAI, no key
    assert code == 0, err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    requests, tokens, most = (int(n.replace(",", "")) for n in
                              re.search(r"(\d+) judge requests, about ([\d,]+) prompt tokens \(\+ at most ([\d,]+) output", out).groups())
    assert requests > 0 and tokens > 200 * requests and most == 100 * requests  # a judge prompt is a few hundred tokens

    judge = FakeJudge()
    try:
        code, _, err = run_cli(capsys, monkeypatch, "judge", run, "--mode", mode, "--judge-base-url", judge.url, "--parallel", "1")
        assert code == 0, err
        assert len(judge.requests) == requests  # what the dry run said, call for call
    finally:
        judge.close()


# ------------------------------------------------------------------------------ 5. markdown escaping
def test_markdown_export_escapes_file_text(tmp_path, capsys, monkeypatch):
    run = make_run(tmp_path, decoders=("baseline", "medusa"), qids=[81])
    evil = "<script>alert(1)</script>|x&y"
    info = json.loads((run / "run.json").read_text())
    info["device"] = {"type": "cpu", "name": evil, "dtype": "float32"}
    info["decoders"] = ["baseline", evil]
    info["models"] = {"baseline": "smollm2-135m-baseline", evil: "smollm2-135m-medusa"}
    (run / "run.json").write_text(json.dumps(info))
    answers = run / "model_answer" / "smollm2-135m-medusa.jsonl"
    records = [dict(json.loads(line), decoder=evil, category=evil) for line in answers.read_text().splitlines()]
    answers.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, err = cli(capsys, monkeypatch, "report", run, "--format", "markdown", "--out", tmp_path / "r.md")
    assert code == 0, err
    text = (tmp_path / "r.md").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;\\|x&amp;y" in text
    assert "<script>" not in text and "x&y" not in text


# ------------------------------------------------------------------------------ 6. corrupt vs malicious
class Payload:
    """Any pickled object: refused for safety, never run."""


def test_corrupt_and_malicious_checkpoints_say_which(tmp_path, capsys, monkeypatch):
    heads = tmp_path / "heads"
    save_heads(MedusaHeads(num_heads=2, hidden_size=8, vocab_size=16), heads, format="medusa1")  # replaced below
    checkpoint = heads / "medusa_lm_head.pt"
    assert checkpoint.is_file()
    checkpoint.write_bytes(os.urandom(4096))
    code, err = cli(capsys, monkeypatch, *quick_args(tmp_path / "run", "--bench", "quick", "--limit", "1",
                                                     "--decoders", "medusa", "--medusa-heads", heads, "--tree", "chain-2"))
    assert code == 2
    assert f"{checkpoint} is not a valid checkpoint (corrupt or truncated, or not a torch file)" in err
    assert "pickled" not in err

    from medusa_bench.heads.medusa import load_heads

    torch.save({"0.0.linear.weight": torch.zeros(4, 4), "evil": Payload()}, checkpoint)
    with pytest.raises(UserError, match="contains pickled Python objects other than tensors — refused for safety"):
        load_heads(heads)
    torch.save({"0.0.linear.weight": torch.zeros(4, 4)}, checkpoint)  # a real one cut short: corrupt, not malicious
    checkpoint.write_bytes(checkpoint.read_bytes()[:200])
    with pytest.raises(UserError, match="not a valid checkpoint"):
        load_heads(heads)
