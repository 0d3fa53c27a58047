"""Was the tree optimiser right? Each `--tree auto` decoder's prediction checked on the run's own text.

The optimiser predicts speedup = τ(tree) / (t(tree) / t(1)): τ from a calibration table, the step
times t from a profile (bench/autotree.py). A run measures the speedup. This module splits the gap
between the two into its causes, so a miss is explained, not only seen:

- **τ on this text.** The decoder's own heads rank the true tokens of the run's greedy answers
  (every turn, its prompt rebuilt as the run built it): the calibration's own measurement
  (`calibrate.rank_table`), on the benchmark's text instead of the calibration prompts. The
  decoding is then *replayed* in decode order: a step at answer position i accepts the tree's
  longest path matching the true ranks there and moves on to i + accepted + 1 (trees/replay.py).
  For a lossless greedy decoder on a static tree this reproduces the measured τ, answer ends
  included, up to a near-tie that one full forward ranks apart from the run's incremental ones
  (hydra, 16 MT-Bench questions: 1.643 replayed, 1.637 measured), so predicted − replayed τ is
  the calibration text's share of the error. The per-position mean
  (what a calibration table averages) is kept beside it: their gap is the decode-order effect
  (steps spend more time where acceptance is low). Measured on the Zen 2 EPYC, hydra n = 6 on
  8 MT-Bench turn-1 answers of 128 tokens: calibration 1.93, per-position 1.61, replayed 1.574,
  measured 1.578.
- **Step cost.** Measured t(tree)/t(1) = τ_measured / speedup_measured against the profile's;
  beside it the run's own timed steps (answers' `step_times`, drafting and forward) over the
  baseline's (`timed_step_ratio`): what the profile priced, without prefill and loop.
- **Prefill.** The prediction prices decoding steps; a run's speedup is over whole turns, whose
  wall time includes the prompt's prefill, the same work for every decoder, which pulls every
  speedup towards 1. Answers record each turn's `prefill_time`, so the verdict splits the gap
  after the text's share into the steps' share (the decoding alone, `decode_speedup`) and the
  prefill's (`prefill_share` of the baseline's time).
- **Hindsight.** Every profiled tree size replayed on this text with the profile's step times:
  the tree the search would have chosen had it known this text's τ. It explains; nothing is
  tuned on benchmark questions (the run's tree stays what the optimiser chose beforehand).

Dynamic trees (EAGLE-2/3) draft a different tree each step: sized by the dynamic search, they are
replayed from the draft's expansion at every position of the run's answers (`dynamic_replay`), the
search's best knob sets beside the chosen ones; otherwise measured against predicted only. Sampled
runs likewise (acceptance is random).

Prompt lookup's `pld:auto` (`audit_knob_search`): its knob search replayed its drafting on the
calibration answers (bench/pld_search.py); here the same replay, with the step profile it decided
by, runs on the run's own answers, for the chosen knobs and every knob set of its grid. Prompt
lookup has no heads: its τ depends on the text (and, through what its policy drafts, on the same
profile), so predicted − on-this-text is the calibration text's share, on-this-text − measured the
profile's. Measured (Xeon with AMX, bf16, 16 MT-Bench questions, 128 tokens, `benchmarks/pld_text.py`):
the defaults' τ replayed on the run's baseline answers 1.72 against 1.79 measured; on the self-instruct
calibration answers 2.13–2.49 (16 or 64 prompts, 64 or 128 tokens):
their inputs are copied into the answers, and "summarize your answer" copies turn 1 into turn 2.
Turn 2 asked as the model's own follow-up (as `distill --follow-up model` asks) would take prompt
lookup's turn 2 below the benchmark's but lift the heads' turn-2 τ 0.18–0.21 above it (the script's
session-25 table): one text calibrates every decoder, so it keeps the generic follow-ups.

Also here: the in-run check (`early_check`), after the first questions, and `audit_folder`: the
same for a finished run folder, from the optimiser's files it keeps (`medusa-bench tree --audit`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from medusa_bench.bench import calibrate as cal
from medusa_bench.bench.tree_cache import trained_on_note
from medusa_bench.decoders.pld import StepCosts
from medusa_bench.inputs.chat import build_prompt, conversation
from medusa_bench.results import files
from medusa_bench.results.prediction import AUDIT_FILE, errors_noise, half_width  # the report reads what this writes
from medusa_bench.results.stats import MIN_QUESTIONS_FOR_CI, bootstrap_tau_ci, paired_speedup, tau_of
from medusa_bench.trees.replay import replayed_tau
from medusa_bench.trees.tree import Tree


MACHINE_MOVED = 0.04  # the baseline's step this far from the profile's: say the machine moved (2% apart is a quiet run here)


def machine_moved(predicted: dict, measured: dict) -> str:
    """The baseline's own step in the run against the profile's: the one-token step is the same work both
    times, so a change there is the machine's. On the 2-core Xeon with AMX, runs whose baseline step was
    within 2% of the profile's priced their tree steps within 1–3%; the two 7% off (one faster, one slower)
    ran every tree step 3–7% dearer than profiled (docs/results/cpu-repeat-xeon-amx-16q.md)."""
    then, now = predicted.get("baseline_step_time"), measured.get("baseline_step_time")
    if not (then and now):
        return ""
    change = now / then - 1
    said = "; the machine moved since the profile, and step ratios move with it" if abs(change) >= MACHINE_MOVED else ""
    return f"; the baseline's own step {1000 * now:.1f} ms in the run, {1000 * then:.1f} ms when profiled ({change:+.0%}{said})"


# ------------------------------------------------------------------------------ the run's text
def answer_texts(loaded, questions: list, choices: dict[str, dict]) -> list[tuple[list[int], int]]:
    """(prompt + answer ids, prompt length) for every answered turn, prompts built as the run built them."""
    sequences = []
    for question in questions:
        choice = choices.get(str(question.question_id))
        if not choice or not choice.get("token_ids"):
            continue
        for turn, answer in enumerate(choice["token_ids"]):
            prompt = build_prompt(loaded, conversation(question.turns[: turn + 1], choice["turns"][:turn]))
            sequences.append((prompt + list(answer), len(prompt)))
    return sequences


def text_ranks(loaded, proposer, sequences: list[tuple[list[int], int]], depth: int, top_k: int) -> list[tuple[list[list[int]], int]]:
    """Per sequence: the true-token rank rows of its answer positions and the answer's length."""
    out = []
    for ids, prompt_len in sequences:
        answer_len = len(ids) - prompt_len
        rows = cal.rank_table(loaded, proposer, [(ids, prompt_len)], depth, top_k).tolist() if answer_len >= 2 else []
        out.append((rows, answer_len))
    return out


# ------------------------------------------------------------------------------ measured
def measured(choices: dict[str, dict], base_choices: dict[str, dict]) -> dict:
    """τ and the speedup on common questions, in the report's convention (results/stats.paired_speedup),
    each with its 95% interval over questions; where both decoders recorded their prefill times, also the
    speedup of the decoding alone and the prefill's share of the baseline's time (`prefill_share`)."""
    import pandas as pd

    def frame(answers: dict[str, dict]) -> pd.DataFrame:
        return pd.DataFrame([{"question_id": q, "new_tokens": sum(c["new_tokens"]), "wall_time": sum(c["wall_time"]),
                              "prefill_time": prefill_of(c), "steps": sum(c["decoding_steps"])} for q, c in answers.items()])

    mine, base = frame(choices), frame(base_choices)
    speed = paired_speedup(mine, base)
    out = {"questions": len(choices), "compared": speed["n_compared"], "tau": tau_of(mine),
           "tau_ci": list(bootstrap_tau_ci(mine.new_tokens, mine.steps)),
           "speedup": speed["speedup"], "speedup_ci": [speed["speedup_ci_low"], speed["speedup_ci_high"]]}
    common = [q for q in choices if q in base_choices]
    timed = {name: [recorded(answers[q], "step_times") for q in common] for name, answers in (("mine", choices), ("base", base_choices))}
    if common and all(turns is not None for per in timed.values() for turns in per):  # what the profile prices
        forward = {name: [t for turns in per for times in turns for t in times if t > 0] for name, per in timed.items()}  # 0.0: no forward
        out["timed_step_ratio"] = float(np.mean(forward["mine"]) / np.mean(forward["base"]))
        out["baseline_step_time"] = float(np.mean(forward["base"]))  # against the profile's: has the machine moved?
    if not (mine.prefill_time.isna().any() or base.prefill_time.isna().any()):
        decoding = paired_speedup(mine.assign(wall_time=mine.wall_time - mine.prefill_time),
                                  base.assign(wall_time=base.wall_time - base.prefill_time))["speedup"]
        common = base[base.question_id.isin(mine.question_id)]
        out |= {"decode_speedup": decoding, "prefill_share": float(common.prefill_time.sum() / common.wall_time.sum())}
    return out


def recorded(choice: dict, key: str) -> Optional[list]:
    """An answer's per-turn field (`prefill_time`, `step_times`) where every turn recorded it; None where one
    did not (answers from before session 23, endpoints)."""
    values = choice.get(key) or []
    return values if len(values) == len(choice["wall_time"]) and all(value is not None for value in values) else None


def prefill_of(choice: dict) -> float:
    """Seconds of the answer's wall time its prompts' prefills took (NaN where not recorded)."""
    prefill = recorded(choice, "prefill_time")
    return math.nan if prefill is None else float(sum(prefill))


# ------------------------------------------------------------------------------ one decoder
def audit_decoder(loaded, decoder, questions: list, choices: dict[str, dict], base_choices: dict[str, dict]) -> dict:
    """Predicted against measured for one auto decoder, the gap split into τ and step cost, and hindsight."""
    auto = decoder.autotree
    choice, latency = auto.result.choice, auto.latency
    base_t = latency.baseline_step_time or latency.step_time[1]
    got = measured(choices, base_choices)
    out = {
        "decoder": decoder.name, "tree_nodes": choice.n, "greedy": all(c.get("temperature", 0) == 0 for c in choices.values()),
        "predicted": {"tau": choice.tau, "step_ratio": choice.step_time / base_t, "speedup": choice.speedup,
                      "noise": choice.noise,  # relative 95% half-widths: calibration answers and profile rounds
                      "baseline_step_time": base_t},
        "measured": {**got, "step_ratio": got["tau"] / got["speedup"] if got["speedup"] else math.nan},
        "calibration": auto.calibration.meta.get("source") or auto.info.get("calibration", {}).get("file"),
        "calibration_trained_on": trained_on_note(auto.info),  # τ reads high on training text
        "profile": {"context_len": latency.context_len, "device": latency.device, "dtype": latency.dtype},
    }
    out["error"] = {"speedup": got["speedup"] / choice.speedup - 1,
                    "step": out["measured"]["step_ratio"] / out["predicted"]["step_ratio"] - 1}  # each: measured / predicted - 1
    out["noise"] = error_noises(out)
    # Drafting dynamic trees whenever it drafts (EAGLE-2/3; on the empty tree `proposer.dynamic` is False).
    dynamic = bool(getattr(decoder.proposer, "dynamic_trees", getattr(decoder.proposer, "dynamic", False)))
    if dynamic and out["greedy"] and auto.calibration.meta.get("kind") == "dynamic":  # sized by the dynamic search
        out["knobs"] = auto.tree.name if auto.tree.num_nodes > 1 else "empty"
        out["replay"] = dynamic_replay(loaded, decoder, auto, answer_texts(loaded, questions, choices))
        out["error"]["tau"] = out["replay"]["tau"] / choice.tau - 1
        out["verdict"] = verdict(out)
        return out
    if dynamic or not out["greedy"]:
        out["replay"] = None
        out["why_no_replay"] = "dynamic trees draft a new tree each step" if dynamic else "sampled answers: acceptance is random"
        out["error"]["tau"] = got["tau"] / choice.tau - 1
        out["verdict"] = verdict(out)
        return out
    top_k = auto.calibration.top_k
    depth = max(c.tree.depth for c in auto.result.candidates)
    probe = decoder.sizing.make_proposer(Tree([(0,) * d for d in range(1, max(depth, 1) + 1)]))
    ranked = text_ranks(loaded, probe, answer_texts(loaded, questions, choices), max(depth, 1), top_k)
    sizes = sorted(set(latency.step_time) | {choice.n})
    predicted_tau = {row["n"]: row["tau"] for row in choice.table}  # the search's τ (replayed, where it could)
    step_time = {row["n"]: row["step_time"] for row in choice.table}  # the search's: the fresh rounds' where timed again
    rows = []
    for n in sizes:
        candidate = auto.result.candidates[n - 1]
        replayed, mean = replayed_tau(ranked, candidate.tree, top_k)
        ratio = step_time.get(n, latency.at(n)) / base_t if n > 1 else 1.0
        tau = predicted_tau.get(n, candidate.tau) if n > 1 else 1.0
        rows.append({"n": n, "depth": candidate.tree.depth, "tau_predicted": tau, "tau_replayed": replayed,
                     "tau_per_position": mean, "step_ratio": ratio, "speedup_predicted": tau / ratio,
                     "speedup_on_text": replayed / ratio})
    chosen = next(row for row in rows if row["n"] == choice.n)
    best = max(rows, key=lambda row: (row["speedup_on_text"], -row["n"]))
    out["replay"] = {"tau": chosen["tau_replayed"], "tau_per_position": chosen["tau_per_position"], "sizes": rows,
                     "hindsight_best": {"n": best["n"], "speedup_on_text": best["speedup_on_text"],
                                        "chosen_on_text": chosen["speedup_on_text"]}}
    out["error"]["tau"] = chosen["tau_replayed"] / choice.tau - 1
    out["verdict"] = verdict(out)
    return out


def dynamic_replay(loaded, decoder, auto, sequences: list[tuple[list[int], int]], rows: int = 12) -> dict:
    """τ on this text of the chosen dynamic knobs and of the search's best `rows` others: the decoder's draft
    expanded at every position of the run's own answers (bench/dynamic_search.measure_tau), replayed."""
    from medusa_bench.bench.dynamic_search import measure_tau
    from medusa_bench.trees.dynamic import DynamicKnobs

    table = auto.result.choice.table
    chosen = DynamicKnobs.parse(auto.tree)
    knobs = [DynamicKnobs.parse(row["knobs"]) for row in table[:rows]]
    knobs += [chosen] if chosen is not None and chosen not in knobs else []
    ratios = auto.latency.meta.get("dynamic_ratios") or {}
    tokens, steps = measure_tau(loaded, decoder.sizing.dynamic, sequences, knobs, max(k.depth for k in knobs))
    predicted = {row["knobs"]: row["tau"] for row in table}
    out = [{"n": 1, "depth": 0, "top_k": 0, "knobs": "empty", "tau_predicted": 1.0, "tau_replayed": 1.0,
            "tau_per_position": None, "step_ratio": 1.0, "speedup_predicted": 1.0, "speedup_on_text": 1.0}]
    for k in knobs:
        tau, ratio = sum(tokens) / sum(steps[k.name]), ratios[k.name][0]
        out.append({"n": k.nodes, "depth": k.depth, "top_k": k.top_k, "knobs": k.name, "tau_predicted": predicted[k.name],
                    "tau_replayed": tau, "tau_per_position": None, "step_ratio": ratio,
                    "speedup_predicted": predicted[k.name] / ratio, "speedup_on_text": tau / ratio})
    mine = next(row for row in out if row["knobs"] == (chosen.name if chosen else "empty"))
    best = max(out, key=lambda row: (row["speedup_on_text"], -row["n"]))
    return {"tau": mine["tau_replayed"], "tau_per_position": None, "sizes": out,
            "hindsight_best": {"n": best["n"], "knobs": best["knobs"], "speedup_on_text": best["speedup_on_text"],
                               "chosen_on_text": mine["speedup_on_text"]}}


def audit_knob_search(loaded, decoder, questions: list, choices: dict[str, dict], base_choices: dict[str, dict],
                      rows: int = 12) -> dict:
    """pld:auto's prediction against the run: its knobs, and its grid's, replayed on the run's own answers
    with the profile it decided by (see the module docstring)."""
    from medusa_bench.bench.pld_search import grid, knob_suffix, replay

    search = decoder.knob_search
    predicted = search["predicted"]
    got = measured(choices, base_choices)
    out = {
        "decoder": decoder.name, "knobs": search["spec"], "tree_nodes": None,
        "greedy": all(c.get("temperature", 0) == 0 for c in choices.values()),
        "predicted": {"tau": predicted["tau"], "step_ratio": predicted["tau"] / predicted["speedup"], "speedup": predicted["speedup"],
                      "noise": {"speedup": half_width(*predicted["speedup_ci"], predicted["speedup"])},  # its search keeps no τ interval
                      "baseline_step_time": StepCosts(decoder.step_profile).one},  # its profile's one-token step
        "measured": {**got, "step_ratio": got["tau"] / got["speedup"] if got["speedup"] else math.nan},
        "calibration": (search.get("calibration") or {}).get("file"),
        "profile": search.get("profile"),
    }
    out["error"] = {"speedup": got["speedup"] / predicted["speedup"] - 1,
                    "step": out["measured"]["step_ratio"] / out["predicted"]["step_ratio"] - 1}
    out["noise"] = error_noises(out)
    if not out["greedy"]:
        out["replay"], out["why_no_replay"] = None, "sampled answers: acceptance is random"
        out["error"]["tau"] = got["tau"] / predicted["tau"] - 1
        out["verdict"] = verdict(out)
        return out
    text = answer_texts(loaded, questions, choices)
    predicted_rows = {row["spec"]: row for row in search.get("grid") or []}
    # the grid, and the choice (a resumed run's may lie outside it)
    configs = {knob_suffix(knobs): knobs for knobs in grid(search["defaults"]["knobs"]) + [search["chosen"]]}
    table = []
    for spec, knobs in configs.items():
        replayed = replay(text, knobs, decoder.step_profile)
        before = predicted_rows.get(spec) or {}
        table.append({"n": None, "knobs": spec, "tau_predicted": before.get("tau"), "tau_replayed": replayed.tau,
                      "step_ratio": replayed.tau / replayed.speedup, "speedup_predicted": before.get("speedup"),
                      "speedup_on_text": replayed.speedup})
    table.sort(key=lambda row: -row["speedup_on_text"])
    mine = next(row for row in table if row["knobs"] == search["spec"])
    best = table[0]
    kept = table[:rows] + ([mine] if mine not in table[:rows] else [])
    out["replay"] = {"tau": mine["tau_replayed"], "tau_per_position": None, "sizes": kept, "step_ratio": mine["step_ratio"],
                     "hindsight_best": {"n": None, "knobs": best["knobs"], "speedup_on_text": best["speedup_on_text"],
                                        "chosen_on_text": mine["speedup_on_text"]}}
    out["error"]["tau"] = mine["tau_replayed"] / predicted["tau"] - 1
    out["verdict"] = verdict(out)
    return out


def error_noises(audit: dict) -> dict:
    """The 95% noise of the speedup and τ errors: the prediction's own (its calibration answers and profile
    rounds) and the run's (its questions), in quadrature (results/prediction.error_noise); NaN where the
    prediction kept no noise."""
    return errors_noise(audit["predicted"].get("noise") or {}, audit["measured"])


def verdict(audit: dict) -> str:
    """One line: predicted and measured, and what moved them apart."""
    p, m, e = audit["predicted"], audit["measured"], {k: round(v, 2) + 0.0 for k, v in audit["error"].items()}  # + 0.0: no "-0%"
    low, high = m["speedup_ci"]
    inside = not math.isnan(low) and low <= p["speedup"] <= high
    noise = (audit.get("noise") or {}).get("speedup", math.nan)
    within = "" if math.isnan(noise) else f", {'inside' if abs(audit['error']['speedup']) <= noise else 'outside'} the two figures' noise ±{noise:.0%}"
    chosen = audit.get("knobs") if audit.get("tree_nodes") is None else f"n={audit['tree_nodes']}"
    line = (f"{audit['decoder']} ({chosen}): predicted {p['speedup']:.2f}×, measured {m['speedup']:.2f}× "
            f"({e['speedup']:+.0%}{', inside its 95% interval' if inside else ''}{within}); ")
    tau_source = "on this text" if audit.get("replay") else "measured"
    tau_value = audit["replay"]["tau"] if audit.get("replay") else m["tau"]
    step_on_text = (audit.get("replay") or {}).get("step_ratio")  # pld:auto: its step mix follows the text
    timed = f"; its timed steps {m['timed_step_ratio']:.2f}×" if m.get("timed_step_ratio") else ""
    line += (f"τ {p['tau']:.2f} predicted, {tau_value:.2f} {tau_source} ({e['tau']:+.0%}); step {p['step_ratio']:.2f}× the baseline's "
             f"predicted{f' ({step_on_text:.2f}× on this text)' if step_on_text else ''}, {m['step_ratio']:.2f}× measured ({e['step']:+.0%}{timed})")
    line += machine_moved(p, m)
    if audit.get("calibration_trained_on") and e["tau"] < 0:
        line += f"; {audit['calibration_trained_on']}"
    replay = audit.get("replay")
    if replay:
        best = replay["hindsight_best"]
        named = best.get("knobs") or f"n={best['n']}"  # a dynamic search's rows are knob sets
        on_text = best["chosen_on_text"]
        line += f"; on this text the profile gives {on_text:.2f}× (the text's share {on_text / p['speedup'] - 1:+.0%}, "
        if m.get("decode_speedup"):  # the rest split: the decoding's own, then the prefill every decoder repeats
            line += (f"the steps' {m['decode_speedup'] / on_text - 1:+.0%}, the prefill's {m['speedup'] / m['decode_speedup'] - 1:+.0%}: "
                     f"{m['prefill_share']:.0%} of the baseline's time, the same work for every decoder)")
        else:
            line += f"the rest {m['speedup'] / on_text - 1:+.0%})"
        if round(best["speedup_on_text"], 2) > round(best["chosen_on_text"], 2) and named != audit.get("knobs", f"n={audit['tree_nodes']}"):
            line += f"; in hindsight {named} at {best['speedup_on_text']:.2f}× (chosen {chosen}: {best['chosen_on_text']:.2f}×)"
        else:
            line += "; in hindsight the chosen " + ("knobs were the best replayed ones" if audit.get("tree_nodes") is None
                                                    else "size was the best profiled one")
    return line


# ------------------------------------------------------------------------------ the run
def audit_run(run_dir: Path, decoders: dict, questions: list, loaded, log=print) -> Optional[dict]:
    """prediction.json for every `--tree auto` decoder and knob search (pld:auto) of the run (None when there is none)."""
    autos = {name: decoder for name, decoder in decoders.items()
             if getattr(decoder, "autotree", None) is not None or getattr(decoder, "knob_search", None) is not None}
    for name in [name for name, decoder in autos.items() if getattr(decoder, "autotree", None) is not None and not sized_alone(decoder)]:
        log(f"prediction check: {name} skipped: its tree sizes only part of its drafting (the optimiser predicts that part alone)")
        del autos[name]
    if not autos:
        return None
    from medusa_bench.bench.run_folder import model_id

    answers = {name: {str(r["question_id"]): r["choices"][0] for r in files.read_jsonl(files.answer_path(run_dir, model_id(loaded, name)))}
               for name in {*autos, *(d.baseline_name for d in autos.values())} if files.answer_path(run_dir, model_id(loaded, name)).is_file()}
    result = {}
    for name, decoder in autos.items():
        mine, base = answers.get(name) or {}, answers.get(decoder.baseline_name) or {}
        if not mine or not base:
            continue
        audit = audit_decoder if getattr(decoder, "autotree", None) is not None else audit_knob_search
        result[name] = audit(loaded, decoder, questions, mine, base)
        log(f"prediction check: {result[name]['verdict']}")
    if result:
        files.write_json(Path(run_dir) / AUDIT_FILE, _plain(result))
    return result


def sized_alone(decoder) -> bool:
    """Does the optimiser's proposer do all of this decoder's drafting? Not for samd-eagle2, whose
    tree sizes the EAGLE-2 part only (SAM drafts the rest)."""
    return type(decoder.proposer) is type(decoder.sizing.make_proposer(Tree.chain(1)))


def audit_folder(run_dir: Path, log=print) -> Optional[dict]:
    """prediction.json for a finished run folder: its auto decoders rebuilt on the trees, calibration
    and step profile the run used (its tree/calibration/latency files), pld:auto on its recorded search
    and profile (pld-search.json, pld-profile.json), its answers replayed."""
    from medusa_bench.bench.autotree import AutoTree, saved_profiles
    from medusa_bench.bench.build import build_decoder
    from medusa_bench.bench.pld_search import saved_searches
    from medusa_bench.decoders.options import DecoderOptions, declared
    from medusa_bench.errors import UserError
    from medusa_bench.inputs.questions import read_questions
    from medusa_bench.models import load_model
    from medusa_bench.bench.dynamic_search import DynamicCalibration
    from medusa_bench.trees.search import BudgetChoice, SearchResult, best_tree
    from medusa_bench.trees.tables import load_calibration, load_latency

    run_dir = Path(run_dir)
    info = files.load_run(run_dir)
    settings = info.get("settings") or {}
    autos = {name: record for name, record in (info.get("trees") or {}).items() if record.get("auto")}
    searches = saved_searches(run_dir, info.get("decoders") or [])  # pld:auto's knob searches
    if not autos and not searches:
        raise UserError(f"{run_dir}: no decoder of this run had its tree chosen by --tree auto or its knobs by "
                        "pld:auto; nothing to check")
    options = DecoderOptions(**{o.name: settings[o.name] for o in declared() if o.name in settings})
    loaded = load_model(settings.get("model", "smollm2-135m"), settings.get("device", "auto"), settings.get("dtype", "auto"))
    decoders = {}
    for name, record in autos.items():
        names = record.get("files") or {}
        tree_file = files.read_json(run_dir / names.get("tree", "tree.json"))
        latency = load_latency(run_dir / names.get("latency", "latency.json"))
        tree = Tree(tree_file["tree"], name=tree_file.get("name"))
        decoder = build_decoder(name, loaded, options, plan={"trees": {name: {"auto": True, "paths": tree.to_list(),
                                                                              "name": tree.name}}})
        auto_info = tree_file.get("autotree") or {}
        calibration_data = files.read_json(run_dir / names.get("calibration", "calibration.json"))
        if (calibration_data or {}).get("kind") == "dynamic":  # the dynamic search's files: its table is the choice's
            choice = BudgetChoice(**{**tree_file["search"], "table": tree_file.get("candidates") or []})
            decoder.autotree = AutoTree(tree, SearchResult(tree, choice, []), DynamicCalibration(calibration_data),
                                        latency, run_dir, True, auto_info)
            decoders[name] = decoder
            continue
        calibration = load_calibration(run_dir / names.get("calibration", "calibration.json"))
        limit = min((auto_info.get("settings") or {}).get("max_nodes", 64), max(latency.step_time))
        search = best_tree(calibration, latency, limit, auto_info.get("depth"), decoder.sizing.depth)
        if search.candidates[tree.num_nodes - 1].tree.paths != tree.paths:
            raise UserError(f"{run_dir}: {name}'s tree is not what its calibration.json and latency.json give; "
                            "the folder's optimiser files were changed after the run")
        choice = search.choice.__class__(**{**tree_file["search"], "table": tree_file.get("candidates") or []})
        decoder.autotree = AutoTree(tree, SearchResult(tree, choice, search.candidates), calibration, latency, run_dir, True, auto_info)
        decoders[name] = decoder
    profiles = saved_profiles(run_dir, info.get("decoders") or [], options)  # the profiles the searches decided by
    for name in searches:
        decoders[name] = build_decoder(name, loaded, options, plan={"searches": searches, "profiles": profiles})
    return audit_run(run_dir, decoders, read_questions(run_dir / "question.jsonl"), loaded, log)


def early_check(name: str, decoder, counts: list[tuple[int, int]]) -> Optional[str]:
    """After the first questions: a line when an auto decoder's predicted τ is outside the 95%
    interval of its measured τ (per-question (tokens, steps), resampled by question): a tree the
    optimiser sized, or prompt lookup's searched knobs (`decoder.knob_search`, bench/pld_search.py)."""
    auto, search = getattr(decoder, "autotree", None), getattr(decoder, "knob_search", None)
    if len(counts) < MIN_QUESTIONS_FOR_CI:
        return None
    sized = auto is not None and auto.result.choice.n > 1 and sized_alone(decoder)
    if sized:
        choice = auto.result.choice
        predicted_tau, predicted_speedup, what = choice.tau, choice.speedup, f"{choice.n}-node steps"
        step = choice.step_time * choice.baseline_throughput  # the profile's step cost, × the baseline's
    elif search is not None and (search.get("predicted") or {}).get("tau"):
        predicted_tau, predicted_speedup, what = search["predicted"]["tau"], search["predicted"]["speedup"], "steps"
        step = predicted_tau / predicted_speedup  # the search's step cost, × the baseline's
    else:
        return None
    tokens, steps = (np.array(column, dtype=float) for column in zip(*counts))
    low, high = bootstrap_tau_ci(tokens, steps)
    if low <= predicted_tau <= high:
        return None
    tau, easier = tokens.sum() / steps.sum(), predicted_tau > high
    if sized:
        trained_on = trained_on_note(auto.info) if easier else None
        why = (f"the calibration text is {'easier' if easier else 'harder'} for these heads than this benchmark"
               + (f" ({trained_on})" if trained_on else ""))
    else:
        why = f"the calibration answers repeat themselves {'more' if easier else 'less'} than this benchmark's"
    return (f"{name}: τ {tau:.2f} ({low:.2f}–{high:.2f}) over the first {len(counts)} questions, predicted "
            f"{predicted_tau:.2f}: {why}; at this τ its {what} ({step:.2f}× the baseline's) give about {tau / step:.2f}×, "
            f"predicted {predicted_speedup:.2f}×; {AUDIT_FILE if sized else 'the report'} will split the error at the end")


def _plain(value):
    """JSON-ready: NaN as null, numpy numbers as floats."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else round(float(value), 4)
    return value
