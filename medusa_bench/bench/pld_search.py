"""`pld:auto`: prompt lookup's knobs (n-gram size, draft length, branches) chosen for this model on this machine.

Prompt lookup needs no model forward to predict itself: what it drafts depends on the tokens, and
how much of it (decoders/pld.choose_nodes) on the tokens, the acceptance it has seen and the step
profile. So each configuration of a small grid is *replayed* on the calibration answers (the tree
optimiser's text: `calibrate.greedy_sequences` on its self-instruct prompts and their follow-ups,
never benchmark questions) with the real `PromptLookupProposer` and the run's step profile, as
`SpeculativeDecoder.generate` decodes greedily: at answer position i the root is the true token i,
`propose(root, None, context)` sees the true context, the step accepts the longest drafted path
equal to the true next tokens, `update(accepted)`, and decoding moves on to i + 1 + accepted; the
last root is a step of its own without a forward (`trees/replay.replay_steps`). One proposer
decodes the answers in turn, so its acceptance statistics carry over as in a run.

Predicted τ = answer tokens / steps. Predicted speedup = tokens / Σ step cost, a step's cost
`StepCosts.relative(nodes, chain)` from the profile the decoder decides by (a plain step 1.0, the
baseline's step; the answer's last root counts 1.0 in both, as it counts one step in τ). The
noise is a paired bootstrap over the answers and the step profile's timed rounds (`cost_draws`).
The choice is, of the configurations not slower than the fastest beyond that noise (the 95%
interval of their speedup over its reaches 1), the one with the fewest knobs moved from the
defaults, then the smaller draft: so the defaults stay unless the fastest beats them beyond the
noise, and a near-tie between n-gram sizes does not flip the choice from one profile to the next.
The profile is cached beside the tree tables (bench/tree_cache.cached_step_profile), so two runs
on one machine decide on the same one.

The run folder keeps the search as pld-search.json (`store_searches`; further pld:auto decoders
pld-search-<decoder>.json): the grid (knobs, τ, speedup and its interval, steps and cost per
answer), the choice, the calibration and the step profile's identity. A resume (`saved_searches`,
a plan's "searches") and Ray workers build on the recorded choice instead of searching again.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from medusa_bench.bench import calibrate as cal
from medusa_bench.decoders.options import DecoderOptions, declared
from medusa_bench.decoders.pld import KNOBS, PromptLookupProposer, StepCosts
from medusa_bench.decoders.registry import AUTO_KNOBS, split_spec
from medusa_bench.errors import UserError
from medusa_bench.results import files
from medusa_bench.results.prediction import SEARCH_FILE, SEARCH_FILES

# Why this grid (90 configurations, 3 s of replay on 2 cores): the curve is flat at its ends. On the Zen 4
# EPYC (family 25 model 17, 2 cores, fp32; a profile measured with the machine quiet: 1 token 60.5 ms,
# a 16-token chain 96 ms) over the 32 default calibration answers: n-grams 3, 4 and 5 predict within 0.1%
# (1.830×, 1.831×, 1.831× at 10 tokens) and 1-grams 1.63×; drafts of 15 and 20 tokens predict alike
# (the policy cuts each step's draft to what pays) and 3 tokens 1.53×; the fastest of all 90, 1.85×
# (ngram5-tokens15-branches2), was 0.9% above the defaults' 1.83× (95% −1.0…+2.9%): the defaults stayed.
GRID = {"pld_max_ngram": (1, 2, 3, 4, 5), "pld_tokens": (3, 5, 7, 10, 15, 20), "pld_branches": (1, 2, 3)}
RESAMPLES = 1000  # bootstrap resamples of the calibration answers
_SEARCHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {key: record}: one search per process


# ------------------------------------------------------------------------------ replay
@dataclass
class Replay:
    """One configuration decoded over the calibration answers: per answer its tokens, steps, Σ step cost,
    and how many steps of each shape ((nodes, chain?) → count: a plain step is (1, True)) made that cost."""

    knobs: dict
    tokens: list[int]
    steps: list[int]
    cost: list[float]
    shapes: list[dict] = field(default_factory=list)

    @property
    def tau(self) -> float:
        return sum(self.tokens) / sum(self.steps)

    @property
    def speedup(self) -> float:
        return sum(self.tokens) / sum(self.cost)


def replay(answers: list[tuple[list[int], int]], knobs: dict, profile: Optional[dict]) -> Replay:
    """`knobs` ({option: value}) decoded greedily over `answers` ((prompt + answer ids, prompt length)) by the
    real proposer and draft policy, one proposer for all answers in turn, as one decoder answers a run."""
    proposer = PromptLookupProposer(knobs["pld_max_ngram"], knobs["pld_tokens"], knobs["pld_branches"], profile=profile)
    out = Replay(dict(knobs), [], [], [])
    for ids, prompt_len in answers:
        proposer.reset(ids[:prompt_len])
        i, end, steps, cost, shapes = prompt_len, len(ids), 0, 0.0, Counter()
        while i < end:
            steps += 1
            if i == end - 1:  # the last root ends the answer: emitted without a forward (a plain step's worth)
                cost += 1.0
                shapes[PLAIN] += 1
                break
            draft = proposer.propose(ids[i], None, ids[:i])  # the root ids[i] after the true context
            accepted = 0
            if draft is None:  # a plain one-token step: the baseline's
                cost += 1.0
                shapes[PLAIN] += 1
            else:
                shape = (draft.buffers.num_nodes, draft.buffers.max_depth == draft.buffers.num_nodes - 1)
                cost += proposer.costs.relative(*shape)
                shapes[shape if shape[0] > 1 else PLAIN] += 1
                accepted = accepted_of(draft, ids, i)
            proposer.update(accepted)
            i += 1 + accepted
        out.tokens.append(end - prompt_len)
        out.steps.append(steps)
        out.cost.append(cost)
        out.shapes.append(dict(shapes))
    return out


PLAIN = (1, True)  # a one-token step's shape


def cost_draws(profile: Optional[dict], shapes: list[tuple[int, bool]], resamples: int,
               rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """([R, S] relative cost of each shape under each bootstrap draw of the profile's rounds, resampled?).

    A draw resamples the profile's rounds (`calibrate.shape_profile`'s "ratios"; the same rounds for
    every size of a kind, as each round paired them with one baseline step) and scales each size's
    time by its resampled mean ratio over the measured one. The draft policy's choices stay those it
    made on the measured profile: this prices the steps it took, not the ones it would take. A profile
    without rounds (an older pld-profile.json, the prior) gives its point costs in every draw."""
    ratios = (profile or {}).get("ratios") or {}
    rounds = {kind: {n: np.array(values) for n, values in (ratios.get(kind) or {}).items() if values}
              for kind in ("chain", "tree")}
    counts = {kind: {len(values) for values in per.values()} for kind, per in rounds.items() if per}
    if not profile or not counts or any(len(c) != 1 or min(c) < 2 for c in counts.values()):
        point = StepCosts(profile)
        return np.array([[point.relative(*shape) for shape in shapes]] * resamples), False  # [R, S]
    draws = np.empty((resamples, len(shapes)))
    for r in range(resamples):
        drawn = {}
        for kind, (count,) in counts.items():  # chains and trees were timed apart: drawn apart
            picks = rng.integers(0, count, size=count)
            drawn[kind] = {n: float(profile[kind][n]) * values[picks].mean() / values.mean() for n, values in rounds[kind].items()}
        costs = StepCosts({**profile, **{kind: {**profile.get(kind, {}), **drawn[kind]} for kind in drawn}})
        draws[r] = [costs.relative(*shape) for shape in shapes]
    return draws, True


def accepted_of(draft, ids: list[int], i: int) -> int:
    """Greedy acceptance of a draft rooted at ids[i]: its longest path equal to ids[i + 1:] (within the answer)."""
    tokens, parents = draft.tokens.tolist(), draft.buffers.parents.tolist()  # [n], [n]: node 0 the root
    node = accepted = 0
    while i + 1 + accepted < len(ids):
        want = ids[i + 1 + accepted]
        node = next((c for c in range(1, len(tokens)) if parents[c] == node and tokens[c] == want), None)
        if node is None:
            break
        accepted += 1
    return accepted


# ------------------------------------------------------------------------------ search
def default_knobs() -> dict:
    """The knobs' declared defaults (decoders/pld.py)."""
    knobs = {option for _, option in KNOBS.words}
    return {option.name: option.default for option in declared() if option.name in knobs}


def knob_suffix(knobs: dict) -> str:
    """{'pld_max_ngram': 3, …} → 'ngram3-tokens10-branches1', the spec suffix that sets them."""
    return "-".join(f"{word}{knobs[option]}" for word, option in KNOBS.words)


def grid(defaults: dict, axes: Optional[dict] = None) -> list[dict]:
    """Every combination of the axes' values, the defaults included."""
    rows = [{}]
    for option, values in (axes or GRID).items():
        rows = [{**row, option: value} for row in rows for value in values]
    rows = [{**defaults, **row} for row in rows]
    return rows if defaults in rows else rows + [defaults]


def search(answers: list[tuple[list[int], int]], profile: Optional[dict], defaults: Optional[dict] = None,
           axes: Optional[dict] = None, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Every grid configuration replayed; the fastest prediction chosen over the defaults (the knobs plain
    `pld` has: the declared ones unless --pld-* said otherwise) only when it beats them beyond the answers'
    noise. The record pld-search.json keeps (without calibration and profile)."""
    if not answers:
        raise UserError("pld:auto: the calibration produced no answers to replay; use other prompts or more --tokens")
    defaults = defaults or default_knobs()
    replays = [replay(answers, knobs, profile) for knobs in grid(defaults, axes)]
    tokens = np.array(replays[0].tokens, dtype=float)  # [A]
    shapes = sorted({shape for r in replays for per in r.shapes for shape in per})  # [S]: (nodes, chain?)
    counts = np.array([[[per.get(shape, 0) for shape in shapes] for per in r.shapes] for r in replays], dtype=float)  # [K, A, S]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(tokens), size=(resamples, len(tokens)))  # [R, A]: shared, so paired
    draws, profile_noise = cost_draws(profile, shapes, resamples, rng)  # [R, S]: shared too
    cost = np.einsum("kas,rs->kra", counts, draws)  # [K, R, A]: each answer's cost under each draw of the profile
    picked = np.take_along_axis(cost, picks[None], axis=2).sum(axis=2)  # [K, R]
    speedups = tokens[picks].sum(axis=1) / picked  # [K, R]
    low, high = np.quantile(speedups, [0.025, 0.975], axis=1)  # [K] each
    d = next(k for k, r in enumerate(replays) if r.knobs == defaults)
    b = max(range(len(replays)), key=lambda k: (round(replays[k].speedup, 9), -draft_size(replays[k].knobs),
                                                 -replays[k].knobs["pld_max_ngram"]))
    ratio_low, ratio_high = np.quantile(speedups[b] / speedups[d], [0.025, 0.975])
    # Tied with the fastest: not slower than it beyond the noise. Of those, the fewest knobs moved from the
    # defaults, then the smaller draft: n-grams 3, 4 and 5 predict within 0.1% of each other, and three fresh
    # step profiles on one quiet machine made each of them "the fastest" once (Zen 4 EPYC, bf16).
    tied = [k for k in range(len(replays)) if k == b or np.quantile(speedups[k] / speedups[b], 0.975) >= 1]
    moved = lambda k: sum(replays[k].knobs[option] != defaults[option] for option in defaults)  # noqa: E731
    chosen = min(tied, key=lambda k: (moved(k), draft_size(replays[k].knobs), replays[k].knobs["pld_max_ngram"]))
    taken = chosen != d
    rows = [{"knobs": r.knobs, "spec": knob_suffix(r.knobs), "tau": round(r.tau, 4), "speedup": round(r.speedup, 4),
             "speedup_ci": [round(float(low[k]), 4), round(float(high[k]), 4)], "draft": draft_size(r.knobs),
             "steps": r.steps, "cost": [round(c, 4) for c in r.cost]} for k, r in enumerate(replays)]
    best, default, pick = rows[b], rows[d], rows[chosen]
    gain = f"{best['speedup'] / default['speedup'] - 1:+.1%} (95% {ratio_low - 1:+.1%}…{ratio_high - 1:+.1%})"
    if b == d:
        reason = f"the defaults {default['spec']} predict fastest"
    elif chosen == b:
        reason = f"{best['spec']} beats the defaults {default['spec']} by {gain}"
    elif taken:
        reason = (f"{pick['spec']}: within the noise of the fastest, {best['spec']} ({pick['speedup'] / best['speedup'] - 1:+.1%}), "
                  f"with fewer knobs moved from the defaults {default['spec']}, which the fastest beats by {gain}")
    else:
        reason = (f"kept the defaults {default['spec']}: the fastest, {best['spec']}, beats them by only {gain}, within the "
                  + ("answers' and the step profile's noise" if profile_noise else "answers' noise"))
    return {"method": "pld", "chosen": pick["knobs"], "spec": pick["spec"], "taken_over_defaults": taken, "reason": reason,
            "predicted": {"tau": pick["tau"], "speedup": pick["speedup"], "speedup_ci": pick["speedup_ci"]},
            "best": {"knobs": best["knobs"], "speedup": best["speedup"], "vs_defaults": round(best["speedup"] / default["speedup"], 4),
                     "vs_defaults_ci": [round(float(ratio_low), 4), round(float(ratio_high), 4)]},
            "defaults": {"knobs": default["knobs"], "tau": default["tau"], "speedup": default["speedup"]},
            "tied_with_best": [rows[k]["spec"] for k in tied],
            "bootstrap": {"resamples": resamples, "seed": seed,
                          "over": ("calibration answers and the step profile's rounds" if profile_noise else "calibration answers")
                          + " (paired: the same draws for every row)"},
            "answers": {"count": len(tokens), "tokens": replays[0].tokens}, "grid": rows}


def draft_size(knobs: dict) -> int:
    """The most nodes a configuration drafts in a step (pld.PromptLookupProposer.draft_size)."""
    return knobs["pld_tokens"] * knobs["pld_branches"]


# ------------------------------------------------------------------------------ for a decoder
KNOBS_DECODER = "pld"  # the one decoder with a knob search (registry.Knobs with ':auto')


def choose_knobs(spec: str, loaded, options: DecoderOptions, plan: Optional[dict] = None,
                 log: Optional[Callable[[str], None]] = None) -> tuple[DecoderOptions, dict]:
    """`pld:auto`'s options with the knobs set: the plan's record (a resumed run's pld-search.json, a Ray
    device plan), else searched now on the calibration text with `options.extra["step_profile"]`."""
    if split_spec(spec)[0] != KNOBS_DECODER:
        raise UserError(f"{spec}: no knob search for {split_spec(spec)[0]}; ':auto' knobs are searched for {KNOBS_DECODER} only")
    record = ((plan or {}).get("searches") or {}).get(spec)
    if record is None:
        record = {"decoder": spec, **search_for(loaded, options, log or _stderr)}
    extra = {key: value for key, value in options.extra.items() if key != AUTO_KNOBS}
    return options.replace(**record["chosen"], extra=extra), record


def search_for(loaded, options: DecoderOptions, log: Callable[[str], None]) -> dict:
    """The search on this model's calibration answers and step profile (once per process and inputs)."""
    from medusa_bench.bench.autotree import settings_of

    settings = settings_of(options)
    profile = options.extra.get("step_profile")
    defaults = {option: getattr(options, option) for option in default_knobs()}
    answers, calibration = calibration_answers(loaded, settings)
    identity = profile_identity(profile)
    key = json.dumps([str(loaded.dtype), calibration, identity, defaults, GRID], sort_keys=True)
    cached = _SEARCHES.setdefault(loaded.model, {})
    if key not in cached:
        record = search(answers, profile, defaults)
        cached[key] = {**record, "calibration": calibration, "profile": identity}
        log(f"pld auto: {record['spec']}: predicted τ {record['predicted']['tau']:.2f}, {record['predicted']['speedup']:.2f}× "
            f"the baseline (95% {record['predicted']['speedup_ci'][0]:.2f}–{record['predicted']['speedup_ci'][1]:.2f}) "
            f"on {len(answers)} calibration answers; {record['reason']}")
    return cached[key]


def calibration_answers(loaded, settings) -> tuple[list[tuple[list[int], int]], dict]:
    """The tree optimiser's calibration text (its prompts, tokens and turns: `AutoTreeSettings`) and what it was."""
    from medusa_bench.bench.autotree import calibration_source

    table, prompt_file = calibration_source(settings.calibration)
    if table is not None:
        raise UserError(f"pld:auto replays decoding on calibration text; --calibration {table} is a measured table "
                        "without it: pass a prompts file (.jsonl or text)")
    prompts = cal.calibration_prompts(prompt_file, settings.prompts)
    answers = cal.greedy_sequences(loaded, prompts, settings.tokens, settings.turns)
    info = {"file": str(prompt_file), "sha256": hashlib.sha256(Path(prompt_file).read_bytes()).hexdigest()[:16],
            "prompts": len(prompts), "tokens": settings.tokens, "turns": settings.turns, "answers": len(answers),
            "answer_tokens": sum(len(ids) - p for ids, p in answers)}
    return answers, info


def profile_identity(profile: Optional[dict]) -> dict:
    """Which step profile the predictions used: its device, dtype, threads, context, and a hash of its
    JSON (sorted keys): the run folder's pld-profile.json with the same content matches it."""
    if profile is None:
        return {"sha256": None, "note": "no profile: the prior step-cost curve (decoders/pld.StepCosts.PRIOR)"}
    digest = hashlib.sha256(json.dumps(profile, sort_keys=True).encode()).hexdigest()[:16]
    return {"sha256": digest, **{key: profile.get(key) for key in ("device", "dtype", "threads", "context_len")}}


# ------------------------------------------------------------------------------ run folders
def search_files(decoders: dict) -> dict[str, str]:
    """{decoder: file} for the decoders built on a search: pld-search.json, then pld-search-<decoder>.json."""
    names = [name for name, decoder in decoders.items() if getattr(decoder, "knob_search", None) is not None]
    return {name: SEARCH_FILE if i == 0 else SEARCH_FILE.replace(".json", "-" + "".join(c if c.isalnum() else "-" for c in name) + ".json")
            for i, name in enumerate(names)}


def store_searches(run_dir: Path, decoders: dict) -> None:
    """Each search's record in the run folder; one already there stays (a resume built on it: `saved_searches`)."""
    for name, file in search_files(decoders).items():
        if name not in saved_searches(run_dir, [name]):
            files.write_json(Path(run_dir) / file, {**decoders[name].knob_search, "decoder": name})


def plan_record(record: dict) -> dict:
    """What a plan needs of a search (a Ray device plan in run.json): the choice and its prediction, not the grid."""
    return {key: value for key, value in record.items() if key not in ("grid", "answers")}


def saved_searches(run_dir: Path, specs: list[str]) -> dict[str, dict]:
    """{spec: record} of the run folder's searches for these decoders (by the decoder each record names),
    for a plan's "searches": a resume builds on the choice the run made, never a new search."""
    found = {}
    for path in sorted(Path(run_dir).glob(SEARCH_FILES)):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and record.get("decoder") in specs and isinstance(record.get("chosen"), dict):
            found[record["decoder"]] = record
    return found


def _stderr(line: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(line, highlight=False, soft_wrap=True)
