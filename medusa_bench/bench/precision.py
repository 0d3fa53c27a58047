"""Which dtype a run decodes in (`--dtype auto`), and how much a precision moves the output.

On CPU the answer is measured, not assumed. On the project's 2-core AMD EPYC (avx512_bf16) a
SmolLM2-135M forward over k new tokens at a 300-token context costs 62/99/97/87/103 ms in fp32
and 40/37/39/43/50 ms in bf16 for k = 1/2/4/8/16: bf16 is faster and makes trees nearly free.
Without native bf16 (no avx512_bf16 / amx_bf16) torch emulates it and it is far slower, so
there we stay in fp32 without timing it. On CUDA: bf16 where supported, else fp16.

bf16 is not exact: a verify forward over n tokens rounds differently than n one-token
forwards, so a lossless decoder's tokens part from the baseline's at some positions. The run's
precision reference (the baseline decoded again in fp32) shows how much of that is the
precision itself.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from medusa_bench.bench.contention import cpu_meter
from medusa_bench import models
from medusa_bench.models import cache_kwargs, cpu_flags
from medusa_bench.results import files

CONTEXT = 300  # cached tokens when a step is timed: a typical MT-Bench turn-2 context
RUNS = 7  # timed one-token steps per dtype (median); ~0.3 s each way on SmolLM2


def native_bf16_flag(flags: Optional[set[str]] = None) -> Optional[str]:
    """The flag showing the CPU computes bf16 natively, or None (models.native_bf16_flag on this CPU's flags)."""
    return models.native_bf16_flag(cpu_flags() if flags is None else flags)


class StepTimer:
    """Times one forward of 1 new token over `context` cached tokens (the baseline's step)."""

    @torch.inference_mode()
    def __init__(self, model, device: torch.device, context: int = CONTEXT):
        from transformers import DynamicCache

        self.model, self.device, self.context = model, device, context
        vocab = model.get_output_embeddings().weight.shape[0]
        ids = (torch.arange(context + 1, device=device) * 7919 % (vocab - 100) + 100)[None]  # [1, context + 1], no special ids
        self.cache = DynamicCache()
        model(input_ids=ids[:, :context], **cache_kwargs(model, self.cache), use_cache=True, logits_to_keep=1)
        self.step_ids, self.position = ids[:, context:], torch.tensor([[context]], device=device)  # [1, 1] each

    @torch.inference_mode()
    def seconds(self) -> float:
        from medusa_bench.runtime.cache import crop_cache
        from medusa_bench.runtime.forward import sync

        sync(self.device)
        start = time.perf_counter()
        self.model(input_ids=self.step_ids, position_ids=self.position, **cache_kwargs(self.model, self.cache), use_cache=True)
        sync(self.device)
        seconds = time.perf_counter() - start
        crop_cache(self.cache, self.context)  # back to `context` cached tokens for the next run
        return seconds


def time_dtypes(models: dict[str, torch.nn.Module], device: torch.device, runs: int = RUNS) -> dict[str, float]:
    """Median ms per step for each model, the dtypes taking turns so drift hits them alike."""
    timers = {name: StepTimer(model, device) for name, model in models.items()}
    for timer in timers.values():  # warm-up: first-call allocations and kernel selection
        timer.seconds()
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(runs):
        for name, timer in timers.items():
            times[name].append(timer.seconds())
    return {name: round(statistics.median(values) * 1000, 1) for name, values in times.items()}


def choose_dtype(loaded, predict: Optional[Callable] = None) -> dict:
    """Settle `--dtype auto` for a model loaded in float32 (CPU) or load_model's auto (CUDA); converts it in place.

    With native bf16 the faster one-token step decides, unless `predict(loaded) -> {"decoder",
    "speedup", …} | None` (bench/build.fastest_prediction over the run's `--tree auto`
    decoders and `pld:auto`) answers for both precisions: then the faster predicted configuration does, tree and
    precision chosen together (in bf16 a CPU with AMX verifies big trees nearly for free, so a
    precision slower by one token can be the faster one with a tree). Each precision's figure is its
    predicted speedup over the one-token step timed here, the two in turn, so machine drift cancels;
    the tables' own tokens/s may be hours old.

    Returns run.json's record: {"chosen", "ms_per_forward", "native_bf16", "reason"[, "predicted"]}.
    """
    if loaded.device.type == "cuda":
        chosen = str(loaded.dtype).replace("torch.", "")
        return {"chosen": chosen, "ms_per_forward": {}, "native_bf16": torch.cuda.is_bf16_supported(),
                "reason": f"CUDA: {chosen} ({'the GPU supports bf16' if chosen == 'bfloat16' else 'no bf16 on this GPU'}), not measured"}
    flag = native_bf16_flag()
    if flag is None:
        ms = time_dtypes({"float32": loaded.model}, loaded.device)
        return {"chosen": "float32", "ms_per_forward": ms, "native_bf16": False,
                "reason": "float32: this CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag), so bf16 would be emulated"}
    bf16 = copy.deepcopy(loaded.model).to(torch.bfloat16)
    with cpu_meter(loaded.device) as usage:
        ms = time_dtypes({"float32": loaded.model, "bfloat16": bf16}, loaded.device)
    chosen = "bfloat16" if ms["bfloat16"] < ms["float32"] else "float32"
    faster, slower = (ms["bfloat16"], ms["float32"]) if chosen == "bfloat16" else (ms["float32"], ms["bfloat16"])
    reason = f"{chosen}: {faster} vs {slower} ms per 1-token step at {CONTEXT} cached tokens (CPU has {flag})"
    predicted = None
    if predict is not None:
        predicted = {"float32": predict(loaded), "bfloat16": predict(dataclasses.replace(loaded, model=bf16, dtype=torch.bfloat16))}
        if all(predicted.values()):
            for name, row in predicted.items():  # its speedup at the one-token step timed just now, in turn with the other's
                row["tokens_per_s_at_timed_step"] = round(row["speedup"] * 1000.0 / ms[name], 2)
            chosen = max(predicted, key=lambda name: predicted[name]["tokens_per_s_at_timed_step"])
            other_name = "float32" if chosen == "bfloat16" else "bfloat16"
            best, other = predicted[chosen], predicted[other_name]
            reason = (f"{chosen}: its fastest predicted configuration, {best['decoder']} at {best['speedup']:.2f}× a "
                      f"{ms[chosen]} ms one-token step ({best['tokens_per_s_at_timed_step']:.1f} tok/s), beats "
                      f"{other['decoder']} at {other['speedup']:.2f}× a {ms[other_name]} ms step "
                      f"({other['tokens_per_s_at_timed_step']:.1f} tok/s) in the other precision (the two steps timed in "
                      f"turn at {CONTEXT} cached tokens; CPU has {flag})")
    if chosen == "bfloat16":
        loaded.model, loaded.dtype = bf16, torch.bfloat16
    del bf16
    if usage["contended"]:
        reason += f"; the CPU was shared while timing (cpu_share {usage['cpu_share']}): measure on a quiet machine or pass --dtype"
    record = {"chosen": chosen, "ms_per_forward": ms, "native_bf16": True, "reason": reason}
    return {**record, "predicted": predicted} if predicted and all(predicted.values()) else record


def load_auto(spec: str, device: str, trust_remote_code: bool = False, predict: Optional[Callable] = None):
    """load_model with `--dtype auto` settled by measurement (`choose_dtype`, with `predict` where the
    run sizes trees); the record is in `loaded.dtype_auto`."""
    from medusa_bench.models import load_model, resolve_device

    cpu = resolve_device(device).type != "cuda"
    loaded = load_model(spec, device, "float32" if cpu else "auto", trust_remote_code)
    loaded.dtype_auto = choose_dtype(loaded, predict)
    return loaded


def run_dtype(dtype: str, run_dir: Path) -> str:
    """A resumed `--dtype auto` run keeps the dtype its folder chose instead of measuring again."""
    if dtype != "auto" or not (Path(run_dir) / files.RUN_FILE).exists():
        return dtype
    return files.load_run(run_dir).get("settings", {}).get("dtype") or dtype


def check_reference_option(option: Optional[str]) -> None:
    from medusa_bench.errors import UserError

    if option not in (None, "auto", "float32", "none"):
        raise UserError(f"--precision-reference must be float32 or none (or auto), got {option!r}")


def reference_dtype(option: Optional[str], run_dtype_name: str) -> str:
    """--precision-reference: float32 | none; default (auto) float32 unless the run already is float32."""
    check_reference_option(option)
    if option in (None, "auto"):
        return "none" if run_dtype_name == "float32" else "float32"
    return option
