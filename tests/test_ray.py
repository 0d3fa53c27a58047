"""`run --workers N` / `--ray-address`: one run sharded over Ray workers (bench/distributed.py).

On a real local Ray cluster (2 CPUs, one thread per worker) with the embedded model: two workers
answer token for token what one process answers, each question exactly once per decoder; a
worker SIGKILLed mid-run and a driver SIGKILLed mid-run still end with every question exactly
once. The report never pools speedups across device types. Kept few and short (16 tokens).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from medusa_bench.bench.loop import RunConfig, run_benchmark
from medusa_bench.cli import main
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.results import files

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["1001", "1002", "1003", "1004"]
DECODERS = ["baseline", "medusa"]
TREE = "chain-3"  # a small tree: CPU steps stay cheap
MARKER = "MEDUSA_BENCH_RAY_TEST"  # in the environment of every process these tests start (cleanup finds them by it)


def cli(capsys, monkeypatch, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["medusa-bench", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code or 0
    return code, " ".join(capsys.readouterr().err.split())


def config(out: Path, **changes) -> RunConfig:
    base = dict(bench="quick", question_ids=QUESTIONS, decoders=DECODERS, max_new_tokens=16, warmup=0, out=out,
                device="cpu", dtype="float32", options=DecoderOptions(tree=TREE))
    return RunConfig(**{**base, **changes})


def answers(run_dir: Path) -> dict[str, list[dict]]:
    """Per decoder, its answer records in file order."""
    return {name: files.read_jsonl(run_dir / "model_answer" / f"smollm2-135m-{name}.jsonl") for name in DECODERS}


def tokens(run_dir: Path) -> dict[tuple[str, str], list]:
    return {(name, str(r["question_id"])): r["choices"][0]["token_ids"] for name, records in answers(run_dir).items() for r in records}


def assert_each_question_once(run_dir: Path) -> None:
    for name, records in answers(run_dir).items():
        assert sorted(str(r["question_id"]) for r in records) == QUESTIONS, name


# ------------------------------------------------------------------------------ without Ray
def test_workers_without_ray_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    code, err = cli(capsys, monkeypatch, "run", "--workers", "2", "--bench", "quick", "--out", tmp_path / "o")
    assert code == 2 and err == "error: --workers needs Ray: pip install 'medusa-bench[ray]'"
    assert not (tmp_path / "o").exists()  # refused before anything was made


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--gpus-per-worker", "1"], "--gpus-per-worker and --cpus-per-worker size Ray workers: add --workers N or --ray-address ADDR"),
    (["--workers", "2", "--remeasure-flagged"], "--remeasure-flagged re-times in one process"),
])
def test_cluster_options_are_checked(args, message, tmp_path, capsys, monkeypatch):
    code, err = cli(capsys, monkeypatch, "run", "--bench", "quick", "--out", tmp_path / "o", *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_report_never_pools_device_types(tmp_path):
    """Two device types in one run: a speed row per type, each speedup against the baseline on
    that type (2.00× and 1.50×); pooled it would read 1.52×."""
    from medusa_bench.results.report import collect

    run = tmp_path / "run"
    (run / "model_answer").mkdir(parents=True)
    # (question, device, baseline seconds, medusa seconds) for 100 tokens each
    timings = [(1, "GPU-A", 10.0, 5.0), (2, "GPU-A", 10.0, 5.0), (3, "GPU-B", 1.0, 2 / 3), (4, "GPU-B", 1.0, 2 / 3)]
    for name, column in (("baseline", 2), ("medusa", 3)):
        records = [{"question_id": t[0], "decoder": name, "baseline": "baseline", "model_id": f"m-{name}", "category": "writing",
                    "device": t[1], "worker": f"host-{t[1]}:1",
                    "choices": [{"index": 0, "turns": ["x"], "new_tokens": [100], "wall_time": [t[column]], "decoding_steps": [100 if name == "baseline" else 50],
                                 "accept_lengths": [[1] * 100 if name == "baseline" else [2] * 50], "token_ids": [[1] * 100], "exact_match": None}]}
                   for t in timings]
        (run / "model_answer" / f"m-{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "run.json").write_text(json.dumps({"settings": {"model": "m", "dtype": "bfloat16", "device": "cuda"}, "decoders": ["baseline", "medusa"],
                                              "device": {"type": "cuda", "name": "GPU-A", "dtype": "bfloat16"}}))
    report = collect([run])
    speed = report.tables["speed"].set_index(["decoder", "device"])
    assert len(speed) == 4
    assert speed.loc[("medusa", "GPU-A"), "speedup"] == pytest.approx(2.0)
    assert speed.loc[("medusa", "GPU-B"), "speedup"] == pytest.approx(1.5)
    assert speed.loc[("medusa", "GPU-A"), "n_compared"] == 2
    assert set(report.tables["categories"].device) == {"GPU-A", "GPU-B"}
    assert any("timed on 2 device types" in note for note in report.notes)
    single = collect([_without_devices(run, tmp_path / "single")]).tables["speed"]
    assert "device" not in single.columns  # one device type: the tables look as before


def _without_devices(run: Path, copy: Path) -> Path:
    shutil.copytree(run, copy)
    for path in (copy / "model_answer").glob("*.jsonl"):
        records = [{k: v for k, v in r.items() if k not in ("device", "worker")} for r in files.read_jsonl(path)]
        files.rewrite_jsonl(path, records)
    return copy


# ------------------------------------------------------------------------------ on a local Ray cluster
@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs owned by this process; every process it (or a test) started
    is gone afterwards, and so is its temp folder."""
    ray = pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="mbray", dir="/tmp")  # short: Ray's socket paths have a length limit
    previous = {key: os.environ.get(key) for key in (MARKER, "OMP_NUM_THREADS")}
    os.environ.update({MARKER: temp, "OMP_NUM_THREADS": "1"})
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level="warning")
    try:
        yield {"address": ray.get_runtime_context().gcs_address, "temp": temp}
    finally:
        ray.shutdown()
        for key, value in previous.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        kill_marked(temp)
        shutil.rmtree(temp, ignore_errors=True)


def kill_marked(temp: str) -> None:
    """SIGKILL what is left of the processes these tests started (a SIGKILLed driver's Ray agents)."""
    needle = f"{MARKER}={temp}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture(scope="module")
def one_process(ray_cluster, smollm, tmp_path_factory):
    """The same questions answered in this process, one thread like each worker: the reference."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_benchmark(config(tmp_path_factory.mktemp("one") / "run"), console=Console(file=StringIO()), loaded=smollm)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_workers_answer_what_one_process_answers(ray_cluster, one_process, tmp_path):
    out = run_benchmark(config(tmp_path / "run", workers=2), console=Console(file=StringIO()))
    assert_each_question_once(out)
    assert tokens(out) == tokens(one_process)
    run = files.load_run(out)
    assert len(run["workers"]) == 2 and len({w["id"] for w in run["workers"]}) == 2
    for worker in run["workers"]:
        assert worker["host"] and worker["device"]["name"] and worker["dtype"] == "float32" and worker["compile"] == "off"
    records = [r for rs in answers(out).values() for r in rs]
    assert {r["worker"] for r in records} <= {w["id"] for w in run["workers"]} and all(r["device"] for r in records)
    assert all(r["choices"][0]["exact_match"] == [True, True] for r in answers(out)["medusa"])
    assert run["settings"]["device"] == "cpu" and run["trees"]["medusa"]["name"] == TREE
    # The same command again: nothing to do, no Ray worker started.
    log = StringIO()
    run_benchmark(config(tmp_path / "run", workers=2), console=Console(file=log, width=200))
    assert "nothing to do" in log.getvalue() and "Ray:" not in log.getvalue()


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_nothing(ray_cluster, one_process, tmp_path):
    out, killed = tmp_path / "run", []

    def kill_a_worker():
        """SIGKILL the newest worker as soon as the first answer is on disk (run.json names its pid)."""
        first = out / "model_answer" / "smollm2-135m-baseline.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and not (first.exists() and first.read_text().count("\n")):
            time.sleep(0.1)
        pid = files.load_run(out)["workers"][-1]["pid"]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    watcher = threading.Thread(target=kill_a_worker, daemon=True)
    watcher.start()
    log = StringIO()
    run_benchmark(config(out, workers=2), console=Console(file=log, width=200))
    watcher.join(timeout=10)
    print(log.getvalue())
    assert killed and f":{killed[0]} died" in log.getvalue()
    assert_each_question_once(out)
    assert tokens(out) == tokens(one_process)


@pytest.mark.slow
def test_a_killed_driver_resumes_with_the_same_command(ray_cluster, one_process, tmp_path):
    """The console script with --workers 2 (its own local Ray instance), SIGKILLed after its
    first answer; the same command again finishes the run, every question once."""
    out = tmp_path / "run"
    exe = REPO / ".venv" / "bin" / "medusa-bench"
    command = [str(exe) if exe.exists() else "medusa-bench", "run", "--workers", "2", "--bench", "quick",
               "--question-ids", ",".join(QUESTIONS), "--decoders", ",".join(DECODERS), "--tree", TREE,
               "--max-new-tokens", "16", "--warmup", "0", "--device", "cpu", "--dtype", "float32", "--out", str(out)]
    env = {**os.environ, "RAY_TMPDIR": ray_cluster["temp"]}
    first = out / "model_answer" / "smollm2-135m-baseline.jsonl"
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and driver.poll() is None and not (first.exists() and first.read_text().count("\n")):
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    killed_output = driver.communicate(timeout=60)[0]
    kept = {name: len(records) for name, records in answers(out).items()}
    assert 1 <= kept["baseline"] < len(QUESTIONS), killed_output
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    print(f"killed after {kept} answers; resumed:\n{finished.stderr}")
    assert finished.returncode == 0, finished.stderr
    assert_each_question_once(out)
    assert tokens(out) == tokens(one_process)
