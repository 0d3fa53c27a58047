"""The configuration table: what each run measured and on what (settings, device, versions, git
hash), runs side by side; and the engine in words for the report's banner and header."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from medusa_bench.results.runs import RunData, is_number

CONFIG_ORDER = ("model", "dtype", "device", "tree", "tree_hash", "max_new_tokens", "bench", "acceptance",
                "temperature", "top_p", "seed", "warmup")


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def config_table(runs: list[RunData]) -> pd.DataFrame:
    """What each run measured and on what: settings, device, versions, git hash; runs side by side."""
    per_run = {run.label: _run_settings(run) for run in runs}
    keys: list[str] = []
    for values in per_run.values():
        keys += [k for k in values if k not in keys]
    table = pd.DataFrame({"setting": keys})
    for label, values in per_run.items():
        table[label] = [values.get(k, "") for k in keys]
    return table


def _run_settings(run: RunData) -> dict[str, str]:
    """One run's column of the configuration table, setting -> text, in display order."""
    info, settings = run.info, run.settings
    values = {key: _as_text(settings[key]) for key in CONFIG_ORDER if key in settings}
    values.update({key: _as_text(v) for key, v in settings.items() if key not in CONFIG_ORDER})
    for key, v in (info.get("device") or {}).items():
        if key == "dtype_auto" and isinstance(v, dict):
            values.update(_dtype_auto_rows(v))
        else:
            values[f"device.{key}"] = _as_text(v)
    reference = info.get("precision_reference")
    if isinstance(reference, dict):
        values["precision_reference"] = f"{_as_text(reference.get('dtype'))}: {_as_text(reference.get('file'))}"
    values["decoders"] = ", ".join(str(d) for d in info.get("decoders") or run.model_ids())
    if info.get("warmup") is not None:
        values["warmup"] = _as_text(info["warmup"])
    values["medusa-bench"] = _as_text(info.get("version"))
    values["git_hash"] = _as_text(info.get("git_hash"))
    values["created"] = _as_text(info.get("created"))
    for package, version in (info.get("versions") or {}).items():
        values[f"version.{package}"] = _as_text(version)
    return values


def _dtype_auto_rows(auto: dict) -> dict[str, str]:
    """`--dtype auto`'s choice in words: the dtype, what each candidate cost per forward, and why."""
    timings = auto.get("ms_per_forward") if isinstance(auto.get("ms_per_forward"), dict) else {}
    costs = ", ".join(f"{dtype} {ms:.1f} ms" if is_number(ms) else f"{dtype} {_as_text(ms)}" for dtype, ms in timings.items())
    chosen = _as_text(auto.get("chosen"))
    rows = {"device.dtype_auto": chosen + (f" (per forward: {costs})" if costs else "")}
    if "native_bf16" in auto:
        rows["device.dtype_auto.native_bf16"] = _as_text(auto["native_bf16"])
    if auto.get("reason"):
        rows["device.dtype_auto.reason"] = _as_text(auto["reason"])
    predicted = auto.get("predicted") if isinstance(auto.get("predicted"), dict) else {}
    words = [f"{dtype}: {row.get('decoder')} at {row.get('tokens_per_s')} tok/s" for dtype, row in predicted.items()
             if isinstance(row, dict)]
    if words:  # tree and precision chosen together (bench/precision.choose_dtype)
        rows["device.dtype_auto.predicted"] = "; ".join(words)
    return rows


def engine_words(engine) -> str:
    """run.json's device.engine in words: 'static KV cache, CUDA graphs' (empty for runs before engines)."""
    if not isinstance(engine, dict):
        return ""
    mode = {"cuda-graphs": "CUDA graphs", "torch-compile": "torch.compile", "off": "eager"}.get(engine.get("compile"), str(engine.get("compile")))
    return f"{engine.get('cache')} KV cache, {mode}"
