"""`--tree auto`: calibrate → profile → search, cached, and the files a run folder keeps.

The measured tables depend on the model, the heads, the device, the dtype, the settings and
the code that measures them; all of these make the cache key, so a cached answer is reused
only where it would be measured again the same. The search itself is cheap and always re-run
on the cached tables.

Cache folder: `<user cache>/trees/<model>-<kind>-<key>/` holding key.json, calibration.json,
latency.json and tree.json (`medusa_bench.models.cache_dir()`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from medusa_bench import __version__
from medusa_bench.bench import calibrate as cal
from medusa_bench.decoders.registry import build_decoder, needs_step_profile, spec_options, tree_decoders
from medusa_bench.errors import UserError
from medusa_bench.trees.search import (
    Calibration, Latency, SearchResult, best_tree, greedy_tree, load_calibration, load_latency,
    save_calibration, save_latency,
)
from medusa_bench.trees.tree import Tree

DEFAULT_MIN_SPEEDUP = None  # a tree must beat 1 + its prediction's measured noise (trees/search.prediction_noise)
RUN_FILES = ("tree", "calibration", "latency")
# The code that shapes the tables, with the proposer's and its heads' own modules: a change measures again.
CODE_FILES = ("bench/calibrate.py", "bench/autotree.py", "trees/search.py", "trees/tree.py", "decoders/spec.py",
              "decoders/acceptance.py", "runtime/forward.py", "runtime/cache.py", "trees/levels.py",
              "trees/replay.py")


@dataclass
class AutoTreeSettings:
    """What the optimiser measures and searches; everything but `refresh`/`cache_dir`/`min_speedup` keys the cache."""

    max_nodes: int = 64  # largest tree, root included
    max_depth: Optional[int] = None  # default: as deep as the heads go
    top_k: int = 10  # candidates per depth that calibration ranks
    calibration: Optional[str] = None  # a prompts file, or a calibration.json to use as is
    prompts: int = 16
    tokens: int = 64  # greedy answer tokens per calibration prompt and turn
    turns: int = 2  # 2: each prompt's generic follow-up answered too (a benchmark's turn-2 contexts)
    context_len: int = 300  # cached tokens when profiling a step
    sizes: tuple[int, ...] = cal.PROFILE_SIZES
    repeats: int = 10
    warmup: int = 3
    min_speedup: Optional[float] = DEFAULT_MIN_SPEEDUP  # None: 1 + the measured noise
    refresh: bool = False
    cache_dir: Optional[str] = None  # default: <user cache>/trees

    def __post_init__(self):
        for name in ("max_nodes", "top_k", "prompts", "tokens", "turns", "context_len", "repeats"):
            if getattr(self, name) < 1:
                raise UserError(f"tree optimiser: --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_depth is not None and self.max_depth < 1:
            raise UserError(f"tree optimiser: --max-depth must be >= 1, got {self.max_depth}")


@dataclass
class AutoTree:
    """The optimiser's answer: the tree, why, and the tables it came from."""

    tree: Tree
    result: SearchResult
    calibration: Calibration
    latency: Latency
    folder: Path  # the cache folder holding the files
    reused: bool  # tables came from the cache
    info: dict = field(default_factory=dict)  # the cache key's fields

    def tree_json(self) -> dict:
        data = self.result.tree_json()
        data["autotree"] = self.info
        return data

    def write(self, paths: dict[str, Path]) -> dict[str, Path]:
        for path in paths.values():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        _write(paths["tree"], self.tree_json())
        _write(paths["calibration"], self.calibration.to_json())
        _write(paths["latency"], self.latency.to_json())
        return paths


def size_tree(spec: str, loaded, options) -> AutoTree:
    """`--tree auto` for the decoder `spec` (and `medusa-bench tree`): the optimiser's search over
    proposers on the decoder's own heads.

    The registry builds the decoder once on the empty tree; its `sizing` (decoders/base.TreeSizing)
    makes the proposers calibrated and timed here. Settings: `options.extra["autotree"]`.
    """
    found, options = spec_options(spec, options)
    if not found.tree:
        raise UserError(f"decoder {spec!r} drafts on no tree; the tree optimiser sizes trees for {', '.join(tree_decoders())}")
    sizing = build_decoder(found.name, loaded, options.replace(tree=Tree.empty())).sizing
    return auto_tree(loaded, sizing.make_proposer, sizing.heads_path, sizing.depth, sizing.kind, options.extra.get("autotree"))


def save_tree_files(auto: AutoTree, out: Path) -> dict[str, Path]:
    """tree.json at `out`; calibration.json and latency.json beside it."""
    out = Path(out)
    return auto.write({"tree": out, "calibration": out.parent / "calibration.json", "latency": out.parent / "latency.json"})


def auto_tree(loaded, make_proposer: cal.MakeProposer, heads_path, num_heads: int, kind: str = "medusa",
              settings: Optional[AutoTreeSettings] = None, log: Optional[Callable[[str], None]] = None) -> AutoTree:
    """The fastest tree for these heads on this model and device: measured once, then cached."""
    settings = settings or AutoTreeSettings()
    log = log or _stderr
    depth = min(num_heads, settings.max_depth or num_heads)
    table_file, prompt_file = calibration_source(settings.calibration, heads_path)
    probe = make_proposer(Tree([(0,) * d for d in range(1, depth + 1)]))  # a chain: the heads up to `depth`
    info = cache_info(loaded, heads_path, kind, settings, depth, table_file or prompt_file, probe)
    folder = cache_folder(loaded, kind, info, settings)
    calibration = latency = None
    if not settings.refresh and (folder / "key.json").is_file() and _read(folder / "key.json") == info:
        calibration = load_calibration(folder / "calibration.json")
        latency = load_latency(folder / "latency.json")
        log(f"tree auto: reusing the {kind} tables measured on this device ({folder})")
    reused = calibration is not None
    if not reused:
        calibration, latency = measure_tables(loaded, probe, make_proposer, depth, settings, table_file, prompt_file, log)
        save_calibration(calibration, _partial(folder) / "calibration.json")
        save_latency(latency, _partial(folder) / "latency.json")
        _write(_partial(folder) / "key.json", info)
        _publish(folder)
    result = best_tree(calibration, latency, min(settings.max_nodes, max(latency.step_time)), depth, num_heads, settings.min_speedup)
    auto = AutoTree(result.tree, result, calibration, latency, folder, reused, info)
    _write(folder / "tree.json", auto.tree_json())
    log(f"tree auto: {result.choice.reason}")
    return auto


def measure_tables(loaded, probe, make_proposer, depth: int, settings: AutoTreeSettings, table_file: Optional[Path],
                   prompt_file: Path, log) -> tuple[Calibration, Latency]:
    """Calibrate (unless given a table), then profile the search's best tree at each size."""
    prompts = cal.pick(cal.read_prompts(prompt_file), settings.prompts)
    if table_file:
        log(f"tree auto: acceptance statistics from {table_file}")
        calibration = load_calibration(table_file)
    else:
        calibration = measure_calibration(loaded, probe, prompts, depth, settings, log)
    trees = profile_trees(calibration, settings, depth)
    room = loaded.context_length - max(trees) - cal.PROFILE_RUN * (depth + 1)  # the states decode on a little
    contexts = cal.profile_contexts(loaded, prompts, min(settings.context_len, room), settings.tokens, room)
    log(f"tree auto: profiling decoding steps for tree sizes {', '.join(map(str, trees))} "
        f"at {' / '.join(str(len(c)) for c in contexts)} cached tokens ({settings.repeats} rounds) …")
    return calibration, cal.profile(loaded, make_proposer, trees, contexts, settings.repeats, settings.warmup)


def measure_calibration(loaded, proposer, prompts: list[str], depth: int, settings: AutoTreeSettings, log) -> Calibration:
    log(f"tree auto: calibrating the draft heads on {len(prompts)} prompts × {settings.turns} turns × "
        f"{settings.tokens} greedy tokens …")
    calibration = cal.calibrate(loaded, proposer, prompts, depth, settings.top_k, settings.tokens, turns=settings.turns)
    top1 = " / ".join(f"{x:.2f}" for x in calibration.meta["top1"])
    log(f"tree auto: top-1 per depth {top1}; top-{settings.top_k} "
        + " / ".join(f"{x:.2f}" for x in calibration.meta[f"top{settings.top_k}"]))
    return calibration


def profile_trees(calibration: Calibration, settings: AutoTreeSettings, depth: int) -> dict[int, Tree]:
    """The search's best tree at each profiled size: the step times are those of the trees it will pick from."""
    depth = min(depth, calibration.max_depth)
    candidates = greedy_tree(calibration.prob_fn(), settings.max_nodes, depth, calibration.top_k)
    sizes = sorted({n for n in (*settings.sizes, len(candidates)) if 1 <= n <= len(candidates)} | {1})
    return {n: candidates[n - 1].tree for n in sizes}


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


# ------------------------------------------------------------------------------ cache
def cache_info(loaded, heads_path, kind: str, settings: AutoTreeSettings, depth: int, source: Path, proposer) -> dict:
    """Everything the measured tables depend on (JSON-plain: compared as is on reuse)."""
    import torch

    measured = {k: v for k, v in asdict(settings).items() if k not in ("refresh", "cache_dir", "min_speedup", "calibration")}
    measured["sizes"] = list(measured["sizes"])
    return {
        "kind": kind, "model": loaded.spec, "model_source": str(loaded.source), "heads": proposer.fingerprint(),
        "device": cal.device_name(loaded), "dtype": str(loaded.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "code": code_version(proposer), "depth": depth,
        "draft_vocab": proposer.draft_vocab_size,  # restricted drafting
        "calibration": {"file": str(source), "sha256": _file_hash(source)}, "settings": measured,
    }


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


def cache_folder(loaded, kind: str, info: dict, settings: AutoTreeSettings) -> Path:
    from medusa_bench.models import cache_dir

    root = Path(settings.cache_dir) if settings.cache_dir else cache_dir() / "trees"
    key = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]
    return root / f"{loaded.name}-{kind}-{key}"


def _partial(folder: Path) -> Path:
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    return partial


def _publish(folder: Path) -> None:
    """Move the freshly measured tables into place in one rename (a killed run leaves no half cache)."""
    import shutil

    partial = _partial(folder)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        partial.rename(folder)
    except OSError:  # another process published the same tables first
        shutil.rmtree(partial, ignore_errors=True)


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------ run folders
def tree_of(decoder) -> Optional[Tree]:
    return decoder.proposer.tree


def tree_records(decoders: dict) -> dict:
    """run.json's "trees": each drafting decoder's tree, its hash, whether the optimiser chose it, and its files.

    The first auto decoder's files are tree.json, calibration.json, latency.json; any further
    ones get the decoder's name as a suffix (tree-hydra-auto.json …).
    """
    records, autos = {}, 0
    for name, decoder in decoders.items():
        tree = tree_of(decoder)
        if not isinstance(tree, Tree):
            continue
        auto = decoder.autotree is not None
        records[name] = {"name": tree.name, "hash": tree.hash, "num_nodes": tree.num_nodes, "depth": tree.depth, "auto": auto}
        if auto:
            suffix = "" if autos == 0 else "-" + "".join(c if c.isalnum() else "-" for c in name)
            records[name]["files"] = {file: f"{file}{suffix}.json" for file in RUN_FILES}
            autos += 1
    return records


def store_in_run(run_dir: Path, decoders: dict, previous: Optional[dict]) -> None:
    """Copy the optimiser's files into the run folder (names from `tree_records`); refuse to resume with another tree.

    Prompt lookup's step-time profile goes there too (`profile_files`); a resume reads it back.
    """
    before = (previous or {}).get("trees") or {}
    for name, record in tree_records(decoders).items():
        old = before.get(name, {}).get("hash")
        if old is not None and old != record["hash"]:
            raise UserError(f"{run_dir} was run with another tree for {name} ({old}, now {record['hash']}: "
                            "the optimiser re-measured?); use another --out, or pass that run's tree.json as --tree to resume")
        if record["auto"]:
            decoders[name].autotree.write({file: Path(run_dir) / path for file, path in record["files"].items()})
    for name, file in profile_files(decoders).items():
        path = Path(run_dir) / file
        if not path.is_file():  # a resume built its decoders with the file's profile (saved_profiles)
            _write(path, decoders[name].step_profile)


def profile_files(decoders: dict) -> dict[str, str]:
    """Prompt lookup's step-time profiles in the run folder: pld-profile.json for the first, then
    pld-profile-<decoder>.json (decoders with a `step_profile`, see decoders/pld.py)."""
    return profile_file_names([name for name, decoder in decoders.items() if decoder.step_profile is not None])


def profile_file_names(names: list[str]) -> dict[str, str]:
    files = {}
    for name in names:
        suffix = "" if not files else "-" + "".join(c if c.isalnum() else "-" for c in name)
        files[name] = f"pld-profile{suffix}.json"
    return files


def saved_profiles(run_dir: Path, specs: list[str], options) -> dict[str, dict]:
    """{spec: profile} a run folder keeps for the decoders that decide by one (a resume decides as the
    run did: with its own profile, not a fresh measurement); bench/build.py takes them as a plan's."""
    deciding = [spec for spec in specs if needs_step_profile(spec, options)]
    profiles = {spec: _read(Path(run_dir) / file) for spec, file in profile_file_names(deciding).items()}
    return {spec: profile for spec, profile in profiles.items() if profile is not None}


# ------------------------------------------------------------------------------ output
def summary_rows(auto: AutoTree) -> list[dict]:
    """The profiled budgets (and the chosen one): n, depth, τ, step ms, tokens/s, × baseline."""
    profiled = set(auto.latency.step_time) | {auto.result.choice.n}
    rows = []
    for row in auto.result.choice.table:
        if row["n"] in profiled:
            tree = auto.result.candidates[row["n"] - 1].tree
            rows.append({**row, "depth": tree.depth, "chosen": row["n"] == auto.result.choice.n})
    return rows


def summary_table(auto: AutoTree):
    from rich.table import Table

    table = Table(title=f"tree search ({auto.latency.device}, {auto.latency.dtype}, {auto.latency.context_len} cached tokens; "
                        f"τ {auto.result.choice.tau_statistic})")
    for column in ("nodes", "depth", "pred. τ", "step ms", "pred. tok/s", "× baseline", ""):
        table.add_column(column, justify="right")
    for row in summary_rows(auto):
        table.add_row(str(row["n"]), str(row["depth"]), f"{row['tau']:.3f}", f"{row['step_time'] * 1e3:.1f}",
                      f"{row['throughput']:.1f}", f"{row['speedup']:.3f}", "← chosen" if row["chosen"] else "")
    return table


def _stderr(line: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(line, highlight=False, soft_wrap=True)


def _write(path: Path, data) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _read(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None

