"""Shared fixtures: the real SmolLM2 model is loaded once per test session."""

import os
from pathlib import Path

import pytest
import torch

# processes.py: servers and clusters the tests start fail the running test the moment they die;
# pytester: tests/test_processes.py runs a small inner session to prove it.
pytest_plugins = ["processes", "pytester"]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests read MT-Bench & co. from ../shared/data (never copied into the repo).
if "MEDUSA_BENCH_DATA" not in os.environ and SHARED_DATA.is_dir():
    os.environ["MEDUSA_BENCH_DATA"] = str(SHARED_DATA)


def run_cli(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """The real CLI entry point in-process: (exit code, stdout, stderr)."""
    import sys

    from medusa_bench.cli import main

    monkeypatch.setattr(sys, "argv", ["medusa-bench", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def pytest_collection_modifyitems(config, items):
    """Heavier end-to-end tests run last so quick failures show first."""
    items.sort(key=lambda item: 1 if item.get_closest_marker("slow") else 0)


@pytest.fixture(scope="session")
def smollm():
    """The embedded default model (fp32, CPU), loaded once for the whole session."""
    from medusa_bench.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("MEDUSA_BENCH_DATA", SHARED_DATA))
    if not (path / "mt_bench" / "question.jsonl").is_file():
        pytest.skip(f"MT-Bench data not found under {path}; set MEDUSA_BENCH_DATA")
    return path


# Short prompts the training-free decoders' tests share (test_samd, test_suffix, test_recycling, test_rest).
SHORT_NEW = 24
SHORT_PROMPTS = [
    "Repeat this sentence three times: the quick brown fox jumps over the lazy dog.",  # repeats itself
    "Summarize: The committee met on Monday. The committee approved the budget. The budget funds two new parks.",
]


@pytest.fixture(scope="session")
def short_references(smollm):
    """[(prompt ids, the baseline's SHORT_NEW greedy tokens)] for SHORT_PROMPTS, decoded once per session."""
    from medusa_bench.decoders.registry import build_decoder
    from medusa_bench.inputs.chat import build_prompt

    baseline = build_decoder("baseline", smollm)
    prompts = [build_prompt(smollm, [{"role": "user", "content": p}]) for p in SHORT_PROMPTS]
    return [(ids, baseline.generate(ids, SHORT_NEW).token_ids) for ids in prompts]


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of small forwards (tiny models, one-token draft steps): on a
    shared 2-core machine a second thread only adds contention (10-30x slower for tiny matmuls).
    A module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
