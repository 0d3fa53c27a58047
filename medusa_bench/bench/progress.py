"""The run's progress line: answers done, time left, and the live tokens/s of the answer being timed."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def run_progress(console: Console) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    return Progress(*columns, console=console, transient=False)


def live_rate(progress: Progress, task, question, name: str):
    """on_step callback: the live tokens/s of this answer in the progress line."""
    live = {"tokens": 0, "start": time.perf_counter()}

    def on_step(tokens):
        live["tokens"] += len(tokens)
        rate = live["tokens"] / max(time.perf_counter() - live["start"], 1e-9)
        progress.update(task, description=f"q {question.question_id} · {name} · {rate:5.1f} tok/s")

    return on_step
