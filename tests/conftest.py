"""Shared fixtures: the real SmolLM2 model is loaded once per test session."""

import os
from pathlib import Path

import pytest

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
