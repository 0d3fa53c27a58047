"""`medusa-bench run`: answer files, resume, refusal of mismatched settings, bad input."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import run_cli
from medusa_bench.bench.loop import RunConfig, run_benchmark
from medusa_bench.results import files

REPO = Path(__file__).resolve().parents[1]


def cli(capsys, monkeypatch, *args) -> tuple[int, str]:
    """Run the real CLI entry point in-process; returns (exit code, stderr)."""
    code, _, err = run_cli(capsys, monkeypatch, *args)
    return code, err


def quick_config(out, **kw) -> RunConfig:
    base = dict(bench="quick", question_ids=["1005", "1007"], max_new_tokens=8, warmup=0, out=out, device="cpu")
    base.update(kw)
    return RunConfig(**base)


def test_answer_file_fields_and_resume(smollm, tmp_path):
    out = tmp_path / "run"
    run_benchmark(quick_config(out), loaded=smollm)
    path = out / "model_answer" / "smollm2-135m-baseline.jsonl"
    first = path.read_text()
    records = [json.loads(line) for line in first.splitlines()]
    assert [r["question_id"] for r in records] == [1005, 1007]
    for record in records:
        assert {"question_id", "answer_id", "model_id", "category", "tstamp", "choices"} <= set(record)
        choice = record["choices"][0]
        assert choice["index"] == 0 and len(choice["turns"]) == 2
        for turn in range(2):
            assert 1 <= choice["new_tokens"][turn] <= 8
            assert choice["decoding_steps"][turn] == len(choice["accept_lengths"][turn])
            assert sum(choice["accept_lengths"][turn]) == choice["new_tokens"][turn] == len(choice["token_ids"][turn])
            assert choice["wall_time"][turn] > 0
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["max_new_tokens"] == 8 and run["versions"]["torch"] and run["device"]["type"] == "cpu"
    # FastChat's data/<bench>/ layout: the questions answered beside model_answer/, as in the source file
    source = {str(q["question_id"]): q for q in map(json.loads, (REPO / "medusa_bench" / "data" / "quick_question.jsonl").read_text().splitlines())}
    assert files.read_jsonl(out / "question.jsonl") == [source["1005"], source["1007"]]
    # Re-running adds nothing and rewrites nothing.
    run_benchmark(quick_config(out), loaded=smollm)
    assert path.read_text() == first
    # A line cut short by a kill is dropped and redone; whole lines stay as they were.
    lines = first.splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:40])
    run_benchmark(quick_config(out), loaded=smollm)
    again = path.read_text().splitlines(keepends=True)
    assert again[0] == lines[0] and len(again) == 2 and json.loads(again[1])["question_id"] == 1007
    # Other settings are refused, naming the difference.
    from medusa_bench.errors import UserError

    with pytest.raises(UserError, match="max_new_tokens was 8, now 9"):
        run_benchmark(quick_config(out, max_new_tokens=9), loaded=smollm)


def test_bad_question_file_names_the_line(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "category": "x", "turns": ["hi"]}\n{"question_id": 2, "turns": [}\n')
    code, err = cli(capsys, monkeypatch, "run", "--questions", bad, "--out", tmp_path / "o")
    assert code == 2 and f"{bad} line 2" in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--decoders", "basline"], "unknown decoder 'basline'; valid names are: baseline"),
    (["--bench", "mtbench"], "unknown bench 'mtbench'; valid names are: mt_bench, quick, spec_bench"),
    (["--model", "smollm-9b"], "unknown model alias 'smollm-9b'"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--temperature", "hot"], "--temperature must be a number"),
    (["--device", "tpu"], "invalid --device 'tpu'"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--question-ids", "1,2"], "question ids 1, 2 not in"),
    (["--categories", "poetry"], "unknown categories poetry"),
    (["--limit", "0"], "--limit must be >= 1"),
])
def test_bad_input_is_one_clear_line(args, message, tmp_path, capsys, monkeypatch):
    code, err = cli(capsys, monkeypatch, "run", "--bench", "quick", "--out", tmp_path / "o", *args)
    assert code == 2
    assert message in " ".join(err.split())
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # a refused run leaves nothing behind (not even its .lock)


def test_dtype_takes_the_short_names_people_type(tmp_path, capsys, monkeypatch):
    """`--dtype bf16` is bfloat16 from the command line on (run.json and every comparison use that name)."""
    from medusa_bench.bench import loop
    from medusa_bench.errors import UserError

    def stop(config, **kwargs):
        raise UserError(f"would run in {config.dtype}")

    monkeypatch.setattr(loop, "run_benchmark", stop)
    for typed, name in (("bf16", "bfloat16"), ("FP32", "float32"), ("fp16", "float16"), ("bfloat16", "bfloat16")):
        code, err = cli(capsys, monkeypatch, "run", "--bench", "quick", "--dtype", typed, "--out", tmp_path / "o")
        assert code == 2 and f"would run in {name}" in err


def test_refused_resume_keeps_the_folder_and_a_refused_run_in_a_new_one_leaves_none(smollm, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    run_benchmark(quick_config(out, question_ids=["1005"]), loaded=smollm)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, err = cli(capsys, monkeypatch, "run", "--bench", "quick", "--question-ids", "1005", "--max-new-tokens", "9",
                    "--warmup", "0", "--device", "cpu", "--out", out)
    assert code == 2 and "max_new_tokens was 8, now 9" in " ".join(err.split())
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # the run it refused is untouched
    fresh = tmp_path / "deeper" / "run"  # refused after the folder was made (a decoder that cannot load its heads)
    code, err = cli(capsys, monkeypatch, "run", "--bench", "quick", "--limit", "1", "--decoders", "medusa",
                    "--medusa-heads", tmp_path / "no-heads", "--tree", "chain-2", "--device", "cpu", "--dtype", "float32", "--out", fresh)
    assert code == 2 and not fresh.exists()


def test_cli_run_prints_the_glance_table_and_the_folder(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(capsys, monkeypatch, "run", "--bench", "quick", "--limit", "1", "--max-new-tokens", "4",
                                   "--warmup", "0", "--device", "cpu", "--dtype", "float32", "--precision-reference", "none", "--out", out)
    assert code == 0, stderr
    assert stdout.strip() == str(out)  # stdout: the run folder alone, for scripts
    assert "At a glance" in stderr and "baseline" in stderr


def test_version(capsys, monkeypatch):
    from medusa_bench import __version__

    code, stdout, _ = run_cli(capsys, monkeypatch, "--version")
    assert code == 0 and stdout.startswith(f"medusa-bench {__version__}")


def test_unwritable_out_folder(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, err = cli(capsys, monkeypatch, "run", "--bench", "quick", "--out", blocker / "run")
    assert code == 2 and "cannot write to output folder" in err


def test_offline_without_data_says_what_to_pass(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDUSA_BENCH_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("MEDUSA_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("medusa_bench.inputs.questions.BENCH_URLS", {})
    code, err = cli(capsys, monkeypatch, "run", "--bench", "spec_bench", "--out", tmp_path / "o")
    assert code == 2 and "pass --questions PATH or set MEDUSA_BENCH_DATA" in " ".join(err.split())


@pytest.mark.slow
def test_console_script_killed_then_resumed(tmp_path, data_dir):
    """The real console script on MT-Bench: SIGINT mid-run leaves whole lines; a re-run completes."""
    out = tmp_path / "run"
    exe = REPO / ".venv" / "bin" / "medusa-bench"
    command = [str(exe) if exe.exists() else "medusa-bench", "run", "--bench", "mt_bench", "--limit", "3",
               "--max-new-tokens", "8", "--warmup", "0", "--out", str(out), "--device", "cpu"]
    env = {**os.environ, "MEDUSA_BENCH_DATA": str(data_dir)}
    answers = out / "model_answer" / "smollm2-135m-baseline.jsonl"
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and (not answers.exists() or not answers.read_text().count("\n")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    kept = answers.read_text()
    assert 1 <= kept.count("\n") <= 3 and kept.endswith("\n")
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    records = files.read_jsonl(answers)
    assert [r["question_id"] for r in records] == [81, 82, 83]
    assert answers.read_text().startswith(kept)
