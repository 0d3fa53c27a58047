"""`--tree auto` for dynamic trees (EAGLE-2/3): nodes, depth and top-k chosen together, each by its own τ and step.

The static search (bench/autotree.py) sizes one fixed shape per size. A dynamic tree drafts a new shape
every step from three knobs (trees/dynamic.DynamicKnobs), so it is sized by what it does:

1. **τ.** For each top-k of `TOP_KS`, one expansion per calibration answer (`EagleProposer.expansion`:
   the draft at every answer position, on the true context, the same greedy text as the static
   calibration, `calibrate.greedy_sequences`); the τ of every (nodes, depth) is read off it and replayed
   in decode order (trees/replay.replay_steps). Checked against the proposer's own drafts position by
   position: 0 differences in 1,208 (eagle2 and eagle3, four knob sets, Zen 4 EPYC, fp32).
2. **Step time.** The real dynamic step (`SpeculativeDecoder.step` on a proposer of those knobs: catch-up,
   depth draft forwards, the verify forward, acceptance) of every knob set of the grid (`knob_grid`),
   interleaved round by round with the baseline step as the static profile is (`calibrate.time_steps`),
   as the mean paired ratio.
3. **Confirmation.** The screen takes the best of 42 noisy step ratios, so its best was often timed cheap by
   chance (s18: eagle3's chosen step 9% dearer in the run than profiled, τ exact). Its `CONFIRM_TOP` + 1
   best knob sets are timed again on fresh decoders and `CONFIRM_ROUNDS` × the rounds (`tables.confirmed`).
4. **Choice.** Of those, the knobs with the most tokens per second on their fresh rounds, taken when they
   beat the baseline by more than 1 + their own noise (τ bootstrapped over the answers, the ratio's
   interval from the fresh rounds), else the empty tree.

Cache: `<user cache>/trees/<model>-<kind>-dynamic-<key>/` (bench/tree_cache.py), dynamic.json holding both tables.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from medusa_bench.bench import calibrate as cal
from medusa_bench.bench.tree_cache import (
    cache_folder, cache_info, calibration_source, partial_folder, publish, read_json, say_trained_on, write_json,
)
from medusa_bench.decoders.spec import Proposer, SpeculativeDecoder
from medusa_bench.trees.dynamic import DynamicKnobs, accepted
from medusa_bench.trees.noise import tau_of_answers
from medusa_bench.trees.replay import replay_steps
from medusa_bench.trees.search import BudgetChoice
from medusa_bench.trees.tables import Latency
from medusa_bench.trees.tree import Tree

TOP_KS = (1, 2, 4, 8)  # EAGLE-2's default is 10 at 60 nodes: on a CPU the fastest trees are far smaller
MAX_DEPTH = 8  # EAGLE-3 users gained from depth 7-8 over 5 (SafeAILab/EAGLE issue 209)
PROFILED_DEPTHS = (2, 4, 8)
PROFILED_NODES = (4, 8, 16, 32, 64)


@dataclass
class DynamicTables:
    """What the search reads: per knobs the steps of each calibration answer, per knobs the step ratio."""

    answer_tokens: list[int]
    steps: dict[str, list[int]]  # knobs name -> steps per answer (replayed)
    ratios: dict[str, list[float]]  # knobs name -> [mean t/t(1), 95% low, high]
    baseline_step_time: float
    meta: dict = field(default_factory=dict)
    # The screen's best few knob sets timed again on fresh rounds: these choose among them and predict.
    confirmed: dict[str, list[float]] = field(default_factory=dict)  # knobs name -> [mean t/t(1), 95% low, high]

    def to_json(self) -> dict:
        return {**self.meta, "answer_tokens": self.answer_tokens, "baseline_step_time": self.baseline_step_time,
                "steps": self.steps, "ratios": self.ratios, "confirmed": self.confirmed}

    @classmethod
    def from_json(cls, data: dict) -> "DynamicTables":
        tables = ("answer_tokens", "baseline_step_time", "steps", "ratios", "confirmed")
        meta = {k: v for k, v in data.items() if k not in tables}
        return cls(data["answer_tokens"], data["steps"], data["ratios"], data["baseline_step_time"], meta,
                   data.get("confirmed") or {})

    def tau(self, name: str) -> float:
        return sum(self.answer_tokens) / sum(self.steps[name])


@dataclass
class DynamicCalibration:
    """calibration.json of a dynamic search: the replayed τ of every knob set (duck-types trees/tables.Calibration)."""

    meta: dict

    def to_json(self) -> dict:
        return self.meta


@dataclass
class DynamicSearch:
    knobs: Optional[DynamicKnobs]  # None: the empty tree
    tree: Tree
    choice: BudgetChoice
    calibration: DynamicCalibration
    latency: Latency
    folder: Path
    reused: bool
    info: dict


# ------------------------------------------------------------------------------ the grid
def knob_grid(max_nodes: int, max_depth: int) -> list[DynamicKnobs]:
    """The knob sets the search prices, each profiled (no step time is interpolated: the real dynamic steps of
    near knob sets differed by more than their interval under load, so an interpolated or extrapolated one
    could not be trusted). Top-k 1 is a chain at every depth; for top-k 2, 4, 8 the depths PROFILED_DEPTHS
    with PROFILED_NODES, the smallest tree of that depth and the largest the expansion drafts
    (1 + k + (depth - 1)·k²), up to `max_nodes`."""
    grid = []
    for k in TOP_KS:
        if k == 1:
            grid += [DynamicKnobs(depth + 1, depth, 1) for depth in range(1, min(max_depth, max_nodes - 1) + 1)]
            continue
        for depth in sorted({d for d in PROFILED_DEPTHS if d <= max_depth} | {max_depth}):
            most = min(max_nodes, 1 + k + (depth - 1) * k * k)
            least = max(k, depth) + 1
            if least <= most:
                grid += [DynamicKnobs(n, depth, k) for n in sorted({least, most} | {n for n in PROFILED_NODES if least <= n <= most})]
    return grid


# ------------------------------------------------------------------------------ measuring
def measure_tau(loaded, make: Callable[[DynamicKnobs], Proposer], sequences, grid: list[DynamicKnobs],
                max_depth: int) -> tuple[list[int], dict[str, list[int]]]:
    """(answer tokens, {knobs: steps per answer}) replayed over the greedy `sequences`."""
    answers = [(ids, p) for ids, p in sequences if len(ids) - p >= 2]
    steps: dict[str, list[int]] = {knobs.name: [] for knobs in grid}
    for ids, prompt_len in answers:
        probe = make(DynamicKnobs(max_depth + 1, max_depth, 1))
        hidden = cal.last_hidden(loaded, ids, probe.feature_layers)  # [S, W]
        tokens = torch.tensor(ids, device=loaded.device)  # [S]
        positions = torch.arange(prompt_len - 1, len(ids) - 2, device=loaded.device)  # [T], as calibrate.rank_table
        for k in TOP_KS:
            expansion = probe.expansion(hidden, tokens, positions, max_depth, k)
            for knobs in (g for g in grid if g.top_k == k):
                drafts = accepted(expansion, knobs.nodes, knobs.depth).tolist()
                steps[knobs.name].append(replay_steps(drafts, len(ids) - prompt_len))
    return [len(ids) - p for ids, p in answers], steps


def measure_ratios(loaded, make, grid: list[DynamicKnobs], contexts, repeats: int, warmup: int) -> tuple[float, dict]:
    """(median baseline step seconds, {knobs: [mean paired ratio, 95% low, high]}) of the real dynamic steps."""
    decoders = {0: [SpeculativeDecoder("n1", loaded, Proposer()) for _ in contexts]}
    for i, knobs in enumerate(grid, start=1):
        decoders[i] = [SpeculativeDecoder(knobs.name, loaded, make(knobs)) for _ in contexts]
    times = cal.time_steps(loaded, decoders, contexts, repeats, warmup)
    ratios = {}
    for i, knobs in enumerate(grid, start=1):
        paired = [t / b for t, b in zip(times[i], times[0])]
        ratios[knobs.name] = [statistics.fmean(paired), *cal.bootstrap_interval(paired, statistics.fmean)]
    return statistics.median(times[0]), ratios


# ------------------------------------------------------------------------------ the search
def search_dynamic(loaded, sizing, settings, log: Callable[[str], None]) -> DynamicSearch:
    """The fastest dynamic-tree knobs for `sizing`'s heads on this model and device: measured once, then cached."""
    max_depth = min(MAX_DEPTH, settings.max_depth or MAX_DEPTH)
    max_nodes = settings.max_nodes
    _, prompt_file = calibration_source(settings.calibration, sizing.heads_path)
    probe = sizing.dynamic(DynamicKnobs(max_depth + 1, max_depth, 1))
    grid = knob_grid(max_nodes, max_depth)
    info = cache_info(loaded, sizing.heads_path, f"{sizing.kind}-dynamic", settings, max_depth, prompt_file, probe)
    info["dynamic"] = {"top_ks": list(TOP_KS), "knobs": [k.name for k in grid]}
    folder = cache_folder(loaded, f"{sizing.kind}-dynamic", info, settings)
    tables, reused = None, False
    if not settings.refresh and read_json(folder / "key.json") == info and (folder / "dynamic.json").is_file():
        tables, reused = DynamicTables.from_json(read_json(folder / "dynamic.json")), True
        log(f"tree auto: reusing the dynamic {sizing.kind} tables measured on this device ({folder})")
    if tables is None:
        prompts = cal.calibration_prompts(prompt_file, settings.prompts)
        log(f"tree auto: calibrating dynamic {sizing.kind} trees (top-k {', '.join(map(str, TOP_KS))}, depth ≤ {max_depth}) "
            f"on {len(prompts)} prompts × {settings.turns} turns × {settings.tokens} greedy tokens …")
        sequences = cal.greedy_sequences(loaded, prompts, settings.tokens, settings.turns)
        tokens, steps = measure_tau(loaded, sizing.dynamic, sequences, grid, max_depth)
        room = loaded.context_length - max_nodes - cal.PROFILE_RUN * (max_depth + 1)
        contexts = cal.profile_contexts(loaded, prompts, min(settings.context_len, room), settings.tokens, room)
        log(f"tree auto: profiling {len(grid)} dynamic steps beside the baseline step "
            f"at {' / '.join(str(len(c)) for c in contexts)} cached tokens ({settings.repeats} rounds) …")
        base, ratios = measure_ratios(loaded, sizing.dynamic, grid, contexts, settings.repeats, settings.warmup)
        tables = DynamicTables(tokens, steps, ratios, base, {
            "device": cal.device_name(loaded), "dtype": str(loaded.dtype).replace("torch.", ""),
            "contexts": [len(c) for c in contexts], "repeats": settings.repeats, "warmup": settings.warmup,
            "confirm_repeats": settings.repeats * cal.CONFIRM_ROUNDS,
            "statistic": "τ replayed in decode order; median t(1) x mean paired ratio t/t(1)", "source": str(prompt_file)})
        shortlist = screen_best(tables, grid)
        log(f"tree auto: timing the screen's best {len(shortlist)} knob sets again on "
            f"{settings.repeats * cal.CONFIRM_ROUNDS} fresh rounds …")
        _, tables.confirmed = measure_ratios(loaded, sizing.dynamic, shortlist, contexts,
                                             settings.repeats * cal.CONFIRM_ROUNDS, settings.warmup)
        write_json(partial_folder(folder) / "dynamic.json", tables.to_json())
        write_json(partial_folder(folder) / "key.json", info)
        publish(folder)
    search = choose(tables, grid, settings.min_speedup)
    search.folder, search.reused, search.info = folder, reused, info
    log(f"tree auto: {search.choice.reason}")
    say_trained_on(info, log)
    return search


def screen_best(tables: DynamicTables, grid: list[DynamicKnobs]) -> list[DynamicKnobs]:
    """The `CONFIRM_TOP` + 1 knob sets the screen (every set, `repeats` rounds) predicts fastest."""
    speedup = {knobs.name: tables.tau(knobs.name) / tables.ratios[knobs.name][0] for knobs in grid}
    return sorted(grid, key=lambda knobs: (-speedup[knobs.name], knobs.nodes))[:cal.CONFIRM_TOP + 1]


def choose(tables: DynamicTables, grid: list[DynamicKnobs], min_speedup: Optional[float] = None) -> DynamicSearch:
    """The knobs with the most predicted tokens/s; the empty tree unless they beat 1 + their noise (or `min_speedup`).

    Where the screen's best few were timed again (`tables.confirmed`), only those compete, on their fresh
    rounds (the winner's curse, trees/search.confirmed_ratios); the table keeps the screen's figure beside."""
    base_t = tables.baseline_step_time
    rows = []
    for knobs in grid:
        tau, ratio = tables.tau(knobs.name), tables.ratios[knobs.name][0]
        row = {"n": knobs.nodes, "depth": knobs.depth, "top_k": knobs.top_k, "knobs": knobs.name, "tau": tau}
        if knobs.name in tables.confirmed:
            row["screen_speedup"], row["confirmed"] = tau / ratio, True
            ratio = tables.confirmed[knobs.name][0]
        rows.append({**row, "step_time": base_t * ratio, "throughput": tau / (base_t * ratio), "speedup": tau / ratio})
    contenders = [row for row in rows if row.get("confirmed")] or rows
    best = max(contenders, key=lambda row: (row["speedup"], -row["n"]))
    noise = prediction_noise(tables, DynamicKnobs.parse(best["knobs"]))
    margin = 1.0 + noise["speedup"] if min_speedup is None else min_speedup
    table = sorted(rows, key=lambda row: (not row.get("confirmed"), -row["speedup"], row["n"]))  # the contenders first
    if best["speedup"] > margin:
        knobs = DynamicKnobs.parse(best["knobs"])
        reason = (f"dynamic tree {knobs.name} predicts {best['speedup']:.2f}x the baseline: tau {best['tau']:.2f} per "
                  f"{best['step_time'] * 1e3:.1f} ms step = {best['throughput']:.1f} tok/s vs {1 / base_t:.1f} "
                  f"(margin {margin:.3f}x: 1 + its 95% noise, τ ±{noise['tau']:.1%}, step ratio ±{noise['step_ratio']:.1%})")
        if tables.confirmed:
            reason += (f"; chosen among the screen's best {len(tables.confirmed)}, timed again on "
                       f"{tables.meta.get('confirm_repeats')} fresh rounds")
        row, tree = best, knobs.tree()
    else:
        knobs = None
        reason = (f"no dynamic tree beats the baseline by more than {margin:.2f}x (best: {best['knobs']} at "
                  f"{best['speedup']:.2f}x, tau {best['tau']:.2f} per {best['step_time'] * 1e3:.1f} ms step); using the empty tree (n=1)")
        row, tree = {"n": 1, "tau": 1.0, "step_time": base_t, "throughput": 1 / base_t, "speedup": 1.0}, Tree.empty()
    choice = BudgetChoice(n=row["n"], tau=row["tau"], step_time=row["step_time"], throughput=row["throughput"],
                          baseline_throughput=1 / base_t, speedup=row["speedup"], beats_baseline=knobs is not None,
                          reason=reason, table=table, margin=margin, noise=noise,
                          tau_statistic=f"dynamic trees replayed in decode order over {len(tables.answer_tokens)} answers")
    step_time = {1: base_t, **({row["n"]: row["step_time"]} if knobs else {})}
    latency = Latency(step_time, device=tables.meta.get("device"), dtype=tables.meta.get("dtype"),
                      context_len=round(statistics.fmean(tables.meta.get("contexts") or [0])), baseline_step_time=base_t,
                      meta={"dynamic_ratios": tables.ratios, "statistic": tables.meta.get("statistic")})
    calibration = DynamicCalibration({"kind": "dynamic", "source": tables.meta.get("source"),
                                      "answer_tokens": tables.answer_tokens,
                                      "tau": {name: round(tables.tau(name), 4) for name in tables.steps}})
    return DynamicSearch(knobs, tree, choice, calibration, latency, Path("."), False, {})


def prediction_noise(tables: DynamicTables, knobs: DynamicKnobs, resamples: int = 400, seed: int = 0) -> dict:
    """Relative 95% half-widths of the knobs' predicted speedup (as trees/noise.prediction_noise): τ's from a
    bootstrap over the calibration answers, the step ratio's from its profile rounds."""
    pairs = list(zip(tables.steps[knobs.name], tables.answer_tokens))  # (steps, tokens) per answer
    low, high = cal.bootstrap_interval(pairs, tau_of_answers, resamples, seed)
    tau_noise = (high - low) / 2 / tables.tau(knobs.name)
    ratio, low, high = tables.confirmed.get(knobs.name) or tables.ratios[knobs.name]
    ratio_noise = (high - low) / 2 / ratio
    return {"speedup": round(math.hypot(tau_noise, ratio_noise), 4), "tau": round(tau_noise, 4),
            "step_ratio": round(ratio_noise, 4), "from": "bootstrap over calibration answers and profile rounds"}
