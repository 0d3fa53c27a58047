"""`--tree auto`: calibrate → profile → search, cached, and the files a run folder keeps.

The measured tables depend on the model, the heads, the device, the dtype, the settings and
the code that measures them; all of these make the cache key, so a cached answer is reused
only where it would be measured again the same. The search itself is cheap and always re-run
on the cached tables.

Cache folder: `<user cache>/trees/<model>-<kind>-<key>/` holding key.json, calibration.json,
latency.json and tree.json (`medusa_bench.models.cache_dir()`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from medusa_bench.bench import calibrate as cal
from medusa_bench.bench.dynamic_search import search_dynamic
from medusa_bench.bench.tree_cache import (  # calibration_source: also this module's name for it
    cache_folder, cache_info, calibration_source, partial_folder, publish, read_json, say_trained_on, write_json,
)
from medusa_bench.decoders.registry import build_decoder, needs_step_profile, spec_options, tree_decoders
from medusa_bench.errors import UserError
from medusa_bench.trees.search import SearchResult, best_tree, greedy_tree, shallower_candidate
from medusa_bench.trees.tables import (
    Calibration, Latency, load_calibration, load_latency, save_calibration, save_latency,
)
from medusa_bench.trees.tree import Tree

DEFAULT_MIN_SPEEDUP = None  # a tree must beat 1 + its prediction's measured noise (trees/search.prediction_noise)
RUN_FILES = ("tree", "calibration", "latency")


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
        write_json(paths["tree"], self.tree_json())
        write_json(paths["calibration"], self.calibration.to_json())
        write_json(paths["latency"], self.latency.to_json())
        return paths


def settings_of(options) -> AutoTreeSettings:
    """The optimiser's settings a decoder's options carry (`options.extra["autotree"]`), else the defaults."""
    return options.extra.get("autotree") or AutoTreeSettings()


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
    settings = settings_of(options)
    if sizing.dynamic is not None:  # EAGLE-2/3: nodes, depth and top-k of the tree it drafts anew each step
        if calibration_source(settings.calibration, sizing.heads_path)[0] is None:
            return dynamic_tree(loaded, sizing, settings)
        # A measured table (--calibration X.json, or the heads' shipped one without the data folder) has no
        # text to expand the draft on: the static search sizes the dynamic tree, as it did before.
        _stderr("tree auto: no calibration text for a dynamic search (a measured table); sizing the dynamic tree "
                "by the static search")
    return auto_tree(loaded, sizing.make_proposer, sizing.heads_path, sizing.depth, sizing.kind, settings)


def dynamic_tree(loaded, sizing, settings: AutoTreeSettings, log: Optional[Callable[[str], None]] = None) -> AutoTree:
    """The dynamic search (bench/dynamic_search.py) as an AutoTree: its tree is the chosen knobs' stand-in,
    named by them (`dynamic-n16-d5-k4`, what the decoder is built on), or the empty tree."""
    found = search_dynamic(loaded, sizing, settings, log or _stderr)
    auto = AutoTree(found.tree, SearchResult(found.tree, found.choice, []), found.calibration, found.latency,
                    found.folder, found.reused, found.info)
    write_json(found.folder / "tree.json", auto.tree_json())
    return auto


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
    if not settings.refresh and (folder / "key.json").is_file() and read_json(folder / "key.json") == info:
        calibration = load_calibration(folder / "calibration.json")
        latency = load_latency(folder / "latency.json")
        log(f"tree auto: reusing the {kind} tables measured on this device ({folder})")
    reused = calibration is not None
    if not reused:
        calibration, latency = measure_tables(loaded, probe, make_proposer, depth, settings, table_file, prompt_file, log)
        save_calibration(calibration, partial_folder(folder) / "calibration.json")
        save_latency(latency, partial_folder(folder) / "latency.json")
        write_json(partial_folder(folder) / "key.json", info)
        publish(folder)
    result = best_tree(calibration, latency, min(settings.max_nodes, max(latency.step_time)), depth, num_heads, settings.min_speedup)
    auto = AutoTree(result.tree, result, calibration, latency, folder, reused, info)
    write_json(folder / "tree.json", auto.tree_json())
    log(f"tree auto: {result.choice.reason}")
    say_trained_on(info, log)
    return auto


def measure_tables(loaded, probe, make_proposer, depth: int, settings: AutoTreeSettings, table_file: Optional[Path],
                   prompt_file: Path, log) -> tuple[Calibration, Latency]:
    """Calibrate (unless given a table), then profile the search's best tree at each size."""
    prompts = cal.calibration_prompts(prompt_file, settings.prompts)
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
    latency = cal.profile(loaded, make_proposer, trees, contexts, settings.repeats, settings.warmup)
    return calibration, confirm_sizes(loaded, calibration, latency, make_proposer, depth, settings, contexts, log)


def confirm_sizes(loaded, calibration: Calibration, latency: Latency, make_proposer, depth: int,
                  settings: AutoTreeSettings, contexts, log) -> Latency:
    """The screen's best few sizes timed again, on fresh decoders and `CONFIRM_ROUNDS` times the rounds:
    the `CONFIRM_TOP` fastest profiled sizes and the screen's own best (maybe an interpolated size), and
    each one level shallower (trees/search.shallower_candidate). Their rounds alone choose among them and
    predict (trees/search.confirmed_ratios says why); latency.meta["confirmed"] keeps them."""
    screen = best_tree(calibration, latency, min(settings.max_nodes, max(latency.step_time)), depth, depth, 1.0)
    rows = [row for row in screen.choice.table if row["n"] > 1]
    if not rows:
        return latency
    fastest = sorted(rows, key=lambda row: -row["throughput"])
    profiled = [row["n"] for row in fastest if row["n"] in latency.step_time][:cal.CONFIRM_TOP]
    sizes = sorted({fastest[0]["n"], *profiled})
    trees = {n: screen.candidates[n - 1].tree for n in sizes}
    rounds = settings.repeats * cal.CONFIRM_ROUNDS
    log(f"tree auto: timing the screen's best sizes {', '.join(map(str, sizes))} again on {rounds} fresh rounds …")
    again = cal.profile(loaded, make_proposer, trees, contexts, rounds, settings.warmup)
    latency.meta["confirmed"] = {
        "ratios": {str(n): mean_ratio(again, n) for n in sizes},
        "repeats": rounds, "statistic": "mean paired ratio t(n)/t(1) over fresh rounds, 95% bootstrap interval",
        "trees": {str(n): tree.to_list() for n, tree in trees.items()}}
    shallower = {n: found.tree for n in sizes if (found := shallower_candidate(calibration, trees[n])) is not None}
    if shallower:  # a level is a draft head to run: the same size one level shallower may step cheaper for its τ
        log(f"tree auto: timing the same sizes one level shallower ({', '.join(map(str, shallower))}) on {rounds} fresh rounds …")
        shallow = cal.profile(loaded, make_proposer, shallower, contexts, rounds, settings.warmup)
        latency.meta["confirmed"]["shallower"] = {str(n): {"ratio": mean_ratio(shallow, n), "tree": tree.to_list()}
                                                  for n, tree in shallower.items()}
    return latency


def mean_ratio(latency: Latency, n: int) -> list[float]:
    """[mean paired ratio t(n)/t(1), 95% low, high] of a profile's rounds at size n."""
    return [round(statistics.fmean(latency.meta["ratios"][str(n)]), 5), *latency.meta["ratio_ci"][str(n)]]


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
            write_json(path, decoders[name].step_profile)


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
    profiles = {spec: read_json(Path(run_dir) / file) for spec, file in profile_file_names(deciding).items()}
    return {spec: profile for spec, profile in profiles.items() if profile is not None}


# ------------------------------------------------------------------------------ output
def summary_rows(auto: AutoTree) -> list[dict]:
    """The profiled budgets (and the chosen one, and those timed again): n, depth, τ, step ms, tokens/s, × baseline."""
    if not auto.result.candidates:  # a dynamic search: its rows are knob sets, the best first
        return [{**row, "chosen": row["knobs"] == auto.tree.name} for row in auto.result.choice.table[:12]]
    profiled = set(auto.latency.step_time) | {auto.result.choice.n}
    rows = []
    for row in auto.result.choice.table:
        if row["n"] in profiled or row.get("confirmed"):
            tree = auto.result.candidates[row["n"] - 1].tree
            rows.append({**row, "depth": tree.depth, "chosen": row["n"] == auto.result.choice.n})
    return rows


def summary_table(auto: AutoTree):
    from rich.table import Table

    table = Table(title=f"tree search ({auto.latency.device}, {auto.latency.dtype}, {auto.latency.context_len} cached tokens; "
                        f"τ {auto.result.choice.tau_statistic})")
    for column in ("nodes", "depth", "top-k", "pred. τ", "step ms", "pred. tok/s", "× baseline", ""):
        table.add_column(column, justify="right")
    for row in summary_rows(auto):  # re-timed: a size (knob set) the screen found among the best, priced by fresh rounds
        mark = "← chosen" if row["chosen"] else "re-timed" if "screen_speedup" in row else ""
        table.add_row(str(row["n"]), str(row["depth"]), str(row.get("top_k", "")), f"{row['tau']:.3f}", f"{row['step_time'] * 1e3:.1f}",
                      f"{row['throughput']:.1f}", f"{row['speedup']:.3f}", mark)
    return table


def _stderr(line: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(line, highlight=False, soft_wrap=True)
