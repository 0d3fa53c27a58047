"""Was the CPU ours while a turn was timed? Runs taken beside other jobs print fake speedups.

Per generation we record the CPU time the process got over what its threads could have used
(`cpu_share` = process CPU seconds / (wall seconds × torch threads)) and the 1-minute load
average. A turn is *contended* when cpu_share falls markedly below what an unshared run gets.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

# Measured on the project's 2-core EPYC (SmolLM2 fp32, 32-token generations at a 300-token
# prompt, 2 torch threads; `others` = the machine's CPU time not ours, from /proc/stat):
#   alone (others 0.01):                cpu_share 0.956, 0.956   wall 2.7-3.0 s
#   one CPU-burning process (others 0.37): cpu_share 0.63          wall 7.5 s
#   two burners (others 0.72):          cpu_share 0.27, 0.28     wall 26-31 s
# Under sharing, cpu_share + others stayed at 0.99-1.00 over 14 more generations: what we do
# not get, someone else does. And wall time suffers far more than the share says (OpenMP
# threads wait at every barrier for a descheduled sibling): one burner already costs 2.5x.
# 0.8 lies between alone (0.96) and half the machine taken (0.63).
CONTENDED_BELOW = 0.8

TIMING_FIELDS = ("wall_time", "prefill_time", "step_times", "cpu_share", "load_avg", "contended")  # what --remeasure-flagged replaces


@contextmanager
def cpu_meter(device: torch.device) -> Iterator[dict]:
    """Measure the enclosed generation; the yielded dict gets cpu_share, load_avg and contended."""
    usage: dict = {}
    cpu, wall = time.process_time(), time.perf_counter()
    yield usage
    seconds = max(time.perf_counter() - wall, 1e-9)
    share = (time.process_time() - cpu) / (seconds * torch.get_num_threads())
    usage["cpu_share"] = round(share, 3)
    usage["load_avg"] = round(os.getloadavg()[0], 2)
    # Only meaningful on CPU: on CUDA the host thread waits on the GPU, whatever else runs.
    usage["contended"] = device.type == "cpu" and share < CONTENDED_BELOW


def is_flagged(record: dict) -> bool:
    return any(record["choices"][0].get("contended") or [])


def count_flagged(records: Iterable[dict]) -> tuple[int, int]:
    """(contended turns, all turns) over answer records."""
    flagged = total = 0
    for record in records:
        choice = record["choices"][0]
        total += len(choice.get("turns") or [])
        flagged += sum(bool(flag) for flag in choice.get("contended") or [])
    return flagged, total
