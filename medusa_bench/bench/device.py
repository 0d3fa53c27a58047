"""Which device a number was measured on: one identity for run.json, Ray's device plans and the tree cache.

Figures are only comparable within one device model, so the name is the CUDA device's name or
the CPU's model name ('AMD EPYC 7B13'), never just the architecture ('x86_64').
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def cpu_model() -> Optional[str]:
    """The CPU's model name as lscpu shows it ('AMD EPYC …'), or None where /proc/cpuinfo has none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip() or None
    except OSError:
        pass
    return None


def cpu_name() -> str:
    import platform

    return cpu_model() or platform.processor() or platform.machine()


def device_name(loaded) -> str:
    """'NVIDIA H100 80GB HBM3' or 'AMD EPYC 7B13': what Ray plans are keyed by and answer records carry."""
    if loaded.device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(loaded.device)
    return cpu_name()


def device_key(loaded) -> str:
    """'cuda:NVIDIA H100 80GB HBM3' | 'cpu:AMD EPYC 7B13': the tree optimiser's cache key and its files' `device`."""
    return f"{loaded.device.type}:{device_name(loaded)}"


def device_info(loaded) -> dict:
    """run.json's `device`: {type, name, dtype, threads, cpu, attn_implementation, engine}."""
    import torch

    from medusa_bench.runtime.engine import engine_of

    return {"type": loaded.device.type, "dtype": str(loaded.dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "cpu": cpu_name(),
            "attn_implementation": getattr(loaded, "attn_implementation", "") or None,
            "engine": engine_of(loaded).describe(), "name": device_name(loaded),
            **({"linear_kernel": loaded.linear_kernel} if getattr(loaded, "linear_kernel", None) else {})}
