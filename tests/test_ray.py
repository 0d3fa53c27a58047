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
import time
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

import processes
from conftest import run_cli
from test_serve import free_port
from medusa_bench.bench.loop import RunConfig, run_benchmark
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.results import files

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["1001", "1002", "1003"]
DECODERS = ["baseline", "medusa"]
TREE = "chain-3"  # a small tree: CPU steps stay cheap


def cli(capsys, monkeypatch, *args) -> tuple[int, str]:
    code, _, err = run_cli(capsys, monkeypatch, *args)
    return code, " ".join(err.split())


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


def test_auto_tree_is_measured_once_per_device_type(smollm, tmp_path, monkeypatch):
    """`--tree auto` on Ray: the first worker of a device type measures, the next builds its tree
    from that plan without measuring; the driver keeps each device type's plan and files."""
    from medusa_bench.bench import autotree
    from medusa_bench.bench.distributed import Event, QuestionWorker
    from medusa_bench.bench.distributed import add_worker
    from medusa_bench.bench.run_folder import AnswerSource
    from medusa_bench.inputs.questions import load_questions

    searches = []
    real = autotree.auto_tree
    monkeypatch.setattr(autotree, "auto_tree", lambda *args, **kw: searches.append(1) or real(*args, **kw))
    tiny = autotree.AutoTreeSettings(cache_dir=str(tmp_path / "cache"), prompts=1, tokens=8, max_nodes=3, repeats=2, warmup=0, context_len=64)
    run_config = config(tmp_path / "run", options=DecoderOptions(tree="auto", extra={"autotree": tiny}))
    question = load_questions("quick", None, 1, None, None)[1][0]
    first, second = QuestionWorker(), QuestionWorker()
    for worker, name in ((first, "a:1"), (second, "a:2")):  # two workers of one device type (on this process's model)
        vars(worker).update(config=run_config, loaded=smollm, id=name, device_name="cpu-a")
    measured = first.build(None, question, with_reference=False)
    adopted = second.build(measured["plan"], question, with_reference=False)
    assert measured["measured"] and not adopted["measured"] and len(searches) == 1
    plan_tree = measured["plan"]["trees"]["medusa"]
    assert plan_tree["auto"] and second.decoders["medusa"].proposer.tree.hash == plan_tree["hash"] == first.decoders["medusa"].proposer.tree.hash
    # The driver: the first device type's files where in-process runs keep them, another's under devices/.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    source = AnswerSource("smollm2-135m", DECODERS, {"name": "cpu-a"}, trees={})
    for device in ("cpu-a", "GPU B"):
        info = {"id": f"{device}:1", "device": {"name": device}}
        add_worker(run_dir, source, Event("ready", info, built={**measured, "plan": json.loads(json.dumps(measured["plan"]))}), "cpu-a", None)
    assert (run_dir / "tree.json").is_file() and (run_dir / "devices" / "gpu-b" / "tree.json").is_file()
    assert source.device_plans["GPU B"]["trees"]["medusa"]["files"]["tree"] == "devices/gpu-b/tree.json"
    assert source.trees["medusa"]["files"]["tree"] == "tree.json" and "paths" not in source.trees["medusa"]


# ------------------------------------------------------------------------------ on a local Ray cluster
@pytest.fixture(scope="module")
def ray_temp():
    """Ray's temp folder for every Ray instance these tests start (short: Ray's socket paths have a
    length limit), removed at the end; the variables each test's processes see."""
    pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="mbray", dir="/tmp")
    try:
        # RAY_AUTH_MODE explicit: else Ray 2.60 turns token auth on or off by whether ~/.ray/auth_token
        # exists (a local ray.init writes one), and a head started after that refuses this process.
        yield {"RAY_TMPDIR": temp, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster(ray_temp, tmp_path_factory):
    """A local Ray cluster of 2 CPUs (`ray start --head --block`, watched: it exits when any Ray process
    of the head dies, and the running test then fails naming its exit code and signal); this
    process and drivers in subprocesses join it by address."""
    import ray

    port = free_port()
    address = f"127.0.0.1:{port}"
    ray_exe = Path(sys.executable).with_name("ray")
    log = tmp_path_factory.mktemp("ray") / "head.log"
    env = {**os.environ, **ray_temp}  # OMP_NUM_THREADS=1: the workers' one thread each
    head = processes.start("Ray head", [str(ray_exe), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                                        "--include-dashboard", "false", "--temp-dir", ray_temp["RAY_TMPDIR"],
                                        "--disable-usage-stats"],
                           log=log, env=env, ready=lambda: "Ray runtime started" in log.read_text(), timeout=180)
    saved = {key: os.environ.get(key) for key in ray_temp}
    os.environ.update(ray_temp)  # this process joins as its subprocesses do (one thread a worker, auth mode)
    try:
        ray.init(address=address, logging_level="warning")
        yield address
    finally:
        ray.shutdown()
        processes.stop(head, first=signal.SIGTERM, timeout=30)  # `ray start --block` stops the head's processes
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def one_process(smollm, tmp_path_factory):
    """The questions answered in this process with one thread, like each worker: the reference."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_benchmark(config(tmp_path_factory.mktemp("one") / "run"), console=Console(file=StringIO()), loaded=smollm)
    finally:
        torch.set_num_threads(threads)


def command(out: Path, *cluster: str) -> list[str]:
    """The console script on the test's questions, over Ray (`cluster`: --workers / --ray-address)."""
    exe = REPO / ".venv" / "bin" / "medusa-bench"
    return [str(exe) if exe.exists() else "medusa-bench", "run", *cluster, "--bench", "quick", "--question-ids", ",".join(QUESTIONS),
            "--decoders", ",".join(DECODERS), "--tree", TREE, "--max-new-tokens", "16", "--warmup", "0", "--device", "cpu",
            "--dtype", "float32", "--out", str(out)]


def has_answers(path: Path) -> bool:
    return path.exists() and path.read_text().count("\n") > 0


@pytest.mark.slow
def test_two_workers_answer_what_one_process_answers(ray_temp, one_process, tmp_path):
    """`run --workers 2` (its own local Ray instance): the answers of one process, token for token."""
    out = tmp_path / "run"
    finished = subprocess.run(command(out, "--workers", "2"), env={**os.environ, **ray_temp}, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert "Ray: 2 workers on a local Ray instance (1 CPU, 0 GPU each)" in finished.stderr
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
    # The same command again: nothing to do, and no Ray started for it.
    log = StringIO()
    run_benchmark(config(out, workers=2), console=Console(file=log, width=200))
    assert "nothing to do" in log.getvalue() and "Ray:" not in log.getvalue()


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_nothing(ray_cluster, one_process, tmp_path, monkeypatch):
    """A worker SIGKILLed the moment it is handed its second question (so it has answered one and
    provably holds unanswered work: no race with its finishing): that question goes to another
    worker, and every question is answered exactly once."""
    from medusa_bench.bench.distributed import WorkerPool

    out, killed, handed = tmp_path / "run", [], {}

    def kill_on_second_question(worker: dict, job) -> None:
        handed[worker["pid"]] = handed.get(worker["pid"], 0) + 1
        if handed[worker["pid"]] == 2 and not killed:
            os.kill(worker["pid"], signal.SIGKILL)
            killed.append((worker["pid"], worker["id"]))

    monkeypatch.setattr(WorkerPool, "on_dispatch", staticmethod(kill_on_second_question))
    log = StringIO()
    run_benchmark(config(out, workers=2), console=Console(file=log, width=200))
    print(log.getvalue())
    assert killed, "no worker was handed a second question"
    assert f"worker {killed[0][1]} died" in log.getvalue()
    assert_each_question_once(out)
    assert tokens(out) == tokens(one_process)


@pytest.mark.slow
def test_a_killed_driver_resumes_with_the_same_command(ray_cluster, ray_temp, one_process, tmp_path):
    """The console script (a driver joining the cluster) SIGKILLed after its first answer; the
    same command again finishes the run, every question once."""
    out = tmp_path / "run"
    same = command(out, "--workers", "2", "--ray-address", ray_cluster)
    env = {**os.environ, **ray_temp}
    driver = subprocess.Popen(same, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and driver.poll() is None and not has_answers(out / "model_answer" / "smollm2-135m-baseline.jsonl"):
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    killed_output = driver.communicate(timeout=60)[0]
    kept = {name: len(records) for name, records in answers(out).items()}
    assert 1 <= kept["baseline"] < len(QUESTIONS), killed_output
    finished = subprocess.run(same, env=env, capture_output=True, text=True, timeout=300)
    print(f"killed after {kept} answers; resumed:\n{finished.stderr}")
    assert finished.returncode == 0, finished.stderr
    assert_each_question_once(out)
    assert tokens(out) == tokens(one_process)
