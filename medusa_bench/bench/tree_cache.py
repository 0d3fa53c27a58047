"""The optimiser's cache: measured tables keyed by everything they depend on, published in one rename.

Used by the static tree search (bench/autotree.py), the dynamic one (bench/dynamic_search.py)
and prompt lookup's knob search: a cached answer is reused only where it would be measured again the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from medusa_bench import __version__
from medusa_bench.bench import calibrate as cal
from medusa_bench.errors import UserError
from medusa_bench.inputs.calibration import is_default_file
from medusa_bench.models import linear_kernel_of

# The code that shapes the tables, with the proposer's and its heads' own modules: a change measures again.
CODE_FILES = ("bench/calibrate.py", "bench/autotree.py", "trees/search.py", "trees/tables.py", "trees/tree.py",
              "decoders/spec.py", "decoders/acceptance.py", "runtime/forward.py", "runtime/cache.py", "trees/levels.py",
              "trees/replay.py", "trees/dynamic.py", "bench/dynamic_search.py", "bench/tree_cache.py", "inputs/calibration.py")


def calibration_source(option: Optional[str], heads_path=None) -> tuple[Optional[Path], Path]:
    """(calibration.json to use as is, or None to measure; the prompts file) for `--calibration`.

    Default: measure on the self-distillation prompts, both turns, and replay decoding on those
    answers (trees/replay.py). The heads' own calibration.json (`medusa-bench train`, held out from
    their training conversations) is the fallback where the data folder is absent: it keeps no
    answers, and on the Zen 2 EPYC it promised hydra's 6-node tree τ 1.93 where 16 MT-Bench
    questions gave 1.64 (+18%), while a fresh two-turn calibration on the self-instruct prompts
    promised 1.72 (+4%, 16 prompts × 128 tokens; docs/results/cpu-prediction-check-mt-bench-16q.md).
    Most of that held-out split is instructions the model wrote itself, easier for its heads than
    people's questions.
    """
    if option is None:
        try:
            return None, cal.default_prompt_file()
        except UserError:
            shipped = Path(heads_path) / "calibration.json" if heads_path is not None else None
            if shipped is not None and shipped.is_file():
                return shipped, cal.profiling_prompt_file()
            raise
    path = Path(option).expanduser()
    if not path.is_file():
        raise UserError(f"--calibration {path}: file not found; pass a prompts file (.jsonl or text) or a calibration.json")
    if path.suffix.lower() == ".json":  # a measured table: still needs prompts for the profiling context
        return path, cal.profiling_prompt_file()
    return None, path


def cache_info(loaded, heads_path, kind: str, settings, depth: int, source: Path, proposer) -> dict:
    """Everything the measured tables depend on (JSON-plain: compared as is on reuse)."""
    import torch

    measured = {k: v for k, v in asdict(settings).items() if k not in ("refresh", "cache_dir", "min_speedup", "calibration")}
    measured["sizes"] = list(measured["sizes"])
    return {
        "kind": kind, "model": loaded.spec, "model_source": str(loaded.source), "heads": proposer.fingerprint(),
        "device": cal.device_name(loaded), "dtype": str(loaded.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "linear": linear_kernel_of(loaded), "code": code_version(proposer), "depth": depth,
        "draft_vocab": proposer.draft_vocab_size,  # restricted drafting
        "calibration": {"file": str(source), "sha256": file_hash(source), "trained_on": heads_trained_on(heads_path, source)},
        "settings": measured,
    }


def heads_trained_on(heads_path, source: Path) -> Optional[str]:
    """Why the heads may find the calibration text easy, from their training.json: they were trained on
    answers to these prompts (τ then reads high: +5-7% measured, inputs/calibration.py); None if not, or not recorded."""
    record = Path(heads_path) / "training.json" if heads_path is not None else None
    if record is None or not record.is_file():
        return None
    try:
        recipe = json.loads(record.read_text()).get("data_recipe") or {}
    except (OSError, ValueError, AttributeError):
        return None
    overlap = recipe.get("calibration_overlap")
    if overlap is not None and is_default_file(source):  # trained after the split was held out: counted
        n = overlap.get("conversations", 0)
        return f"the heads were trained on {n} of the calibration prompts" if n else None
    trained = (recipe.get("sources") or {}).get(Path(source).name)
    if not trained:
        return None
    return (f"the heads were trained on {trained.get('conversations', 'some')} conversations from {Path(source).name}, "
            "the calibration prompts' file")


def trained_on_note(info: dict) -> Optional[str]:
    """The cached tables' note that the heads were trained on the calibration prompts, if they were."""
    return (info.get("calibration") or {}).get("trained_on")


_SAID: set[str] = set()  # notes already printed in this process: every auto decoder of a run shares the prompts


def say_trained_on(info: dict, log) -> None:
    """One line when the heads were trained on the calibration prompts (see heads_trained_on), once per note."""
    note = trained_on_note(info)
    if note and note not in _SAID:
        _SAID.add(note)
        log(f"tree auto: {note}, so the predicted τ may read high; --calibration FILE with prompts they never "
            "saw measures it on unseen text")


def code_version(proposer=None) -> str:
    """Package version + a hash of the files that shape the tables (another decoder's edits don't count)."""
    root = Path(__file__).resolve().parents[1]
    files = [root / name for name in CODE_FILES]
    for obj in (proposer, proposer.heads if proposer is not None else None):
        module = sys.modules.get(type(obj).__module__) if obj is not None else None
        if getattr(module, "__file__", None):
            files.append(Path(module.__file__))
    digest = hashlib.sha256()
    for file in files:
        if file.is_file():
            digest.update(file.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"


def cache_folder(loaded, kind: str, info: dict, settings) -> Path:
    from medusa_bench.models import cache_dir

    root = Path(settings.cache_dir) if settings.cache_dir else cache_dir() / "trees"
    key = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]
    return root / f"{loaded.name}-{kind}-{key}"


def partial_folder(folder: Path) -> Path:
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    return partial


def publish(folder: Path) -> None:
    """Move the freshly measured tables into place in one rename (a killed run leaves no half cache)."""
    import shutil

    partial = partial_folder(folder)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        partial.rename(folder)
    except OSError:  # another process published the same tables first
        shutil.rmtree(partial, ignore_errors=True)


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def write_json(path: Path, data) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


PROFILE_FILE = "pld-profile.json"


def cached_step_profile(loaded, settings) -> dict:
    """Prompt lookup's step-time profile (`calibrate.shape_profile` at STEP_PROFILE_SIZES on the profiling
    text), measured once per model, device, dtype, threads and code, and kept beside the tree tables.

    Why cached: measured again in each process, it moved enough between two quiet runs to flip
    `pld:auto`'s knobs (ngram5-tokens15-branches2, 1.80× predicted and 1.75× measured; then
    ngram3-tokens15-branches3, 2.08× predicted and 1.49× measured; Zen 4 EPYC, bf16,
    docs/results/cpu-optimiser-zen4-bf16-16q.md). Keyed like the tables (model, device, dtype,
    threads, code, the profiled sizes and context); `AutoTreeSettings.refresh` measures it again.
    """
    import torch

    context = cal.profile_context(loaded)
    info = {"kind": "pld-profile", "model": loaded.spec, "model_source": str(loaded.source), "device": cal.device_name(loaded),
            "dtype": str(loaded.dtype).replace("torch.", ""), "threads": torch.get_num_threads(), "linear": linear_kernel_of(loaded), "code": code_version(),
            "sizes": list(cal.STEP_PROFILE_SIZES),
            "context": hashlib.sha256(json.dumps(context).encode()).hexdigest()[:16]}
    folder = cache_folder(loaded, "pld-profile", info, settings)
    if not settings.refresh and str(folder) in _PROFILES:  # one process: one object for every decoder
        return _PROFILES[str(folder)]
    profile = read_json(folder / PROFILE_FILE) if not settings.refresh and read_json(folder / "key.json") == info else None
    if not isinstance(profile, dict):
        profile = cal.shape_profile(loaded, context, cal.STEP_PROFILE_SIZES)
        partial = partial_folder(folder)
        write_json(partial / "key.json", info)
        write_json(partial / PROFILE_FILE, profile)
        publish(folder)
    _PROFILES[str(folder)] = profile
    return profile


_PROFILES: dict[str, dict] = {}  # cache folder -> the profile read or measured there in this process
