"""Predicted against measured: the tree optimiser's promise for each `--tree auto` decoder, what the
run measured, and where the gap came from (prediction.json, written by bench/audit.py at the end
of a run).

One row per auto decoder: speedup predicted / measured (with its 95% interval) and the error;
τ predicted / on this text (the run's answers replayed through the heads) / measured; beside each
error its noise: the prediction's own 95% noise (bootstrap over its calibration answers and profile
rounds) and the run's (over its questions) in quadrature, an error inside it being one the two
figures cannot tell from none; the step's
cost against the baseline's, predicted by the profile / measured; and the tree size that, with
this text's τ and the profile's step times, would have been fastest (hindsight, never used to
choose).

Where the run swept fixed trees beside the auto one (`--decoders hydra:sweep`), the row also names
the fastest fixed tree of the same decoder, auto's speed over it paired over their common questions
(with its bootstrap interval: the two decoders' question-to-question swings cancel, which the two
speedup intervals side by side do not show), and whether auto kept up with it within the A/A
control's noise band.

Prompt lookup's `pld:auto` has a row too: its knob search (pld-search.json, bench/pld_search.py)
predicted τ and speedup by replaying its drafting on the calibration answers; prediction.json replays
it on the run's own answers with the same step profile (τ on this text, speedup on this text); a run
folder from before that keeps only the search (`search_rows`): measured from the run's speed table.
Either is set against the fixed knobs of `pld:sweep` where they ran.
"""

from __future__ import annotations

import math

import pandas as pd

from medusa_bench.results.acceptance import tree_files
from medusa_bench.results.runs import RunData, load_optional_json
from medusa_bench.results.speed import noise_band
from medusa_bench.results.stats import bootstrap_tau_ci, interval_text, paired_speedup

AUDIT_FILE = "prediction.json"  # bench/audit.py writes it, this reads it
SEARCH_FILE = "pld-search.json"  # bench/pld_search.py writes pld:auto's knob search (then pld-search-<decoder>.json)
SEARCH_FILES = "pld-search*.json"
TITLE = "Tree optimiser: predicted against measured"
NOTE = ("Predicted: the tree optimiser's numbers for the tree it chose, before the run. τ on this text: the run's own "
        "answers scored by the decoder's heads and decoding replayed on them (for greedy static trees this reproduces "
        "the measured τ), so τ error is the calibration text's share and step error the profile's. Hindsight: the profiled tree "
        "size fastest on this text with the profiled step times; it explains, it never chooses. Speedup on this text: τ on "
        "this text over the predicted step cost, what the prediction would have been on the benchmark's own text. Step timed: "
        "the run's own steps (drafting and verify forward, each turn's prefill and loop left out) over the baseline's. Baseline's "
        "step against the profile's: the same one-token work timed in the run and when profiled, so a change is the machine's, "
        "and step ratios move with it. pld:auto: "
        "its knob search's prediction, prompt lookup replayed on the calibration answers (pld-search.json), then on the "
        "run's answers with the same step profile; its hindsight is the knob set fastest on this text.")


def prediction_table(runs: list[RunData], speed: pd.DataFrame, frames: dict[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """`frames`: each run's per-question frame (runs.question_frame), for auto against the fixed trees, paired."""
    rows = []
    for run in runs:
        audits = load_optional_json(run.path / AUDIT_FILE, run.notes) or {}
        run_speed = speed[speed.run == run.label] if not speed.empty else speed
        questions = (frames or {}).get(run.label)
        for decoder, audit in audits.items():
            if isinstance(audit, dict):
                audit = with_noise(run, decoder, audit, run_speed, questions)
                fixed = knob_alternatives(run, decoder) if audit.get("tree_nodes") is None else None  # pld:auto: no tree
                rows.append({**prediction_row(run.label, decoder, audit), **against_fixed(run, decoder, run_speed, fixed, questions)})
        rows += [row for row in search_rows(run, run_speed, questions) if row["decoder"] not in audits]
    table = pd.DataFrame(rows)
    if not table.empty and table["best_fixed"].isna().all():
        table = table.drop(columns=["best_fixed", "best_fixed_speedup", "auto_over_fixed", "auto_vs_fixed"])  # no sweep in these runs
    for column in ("knobs", "hindsight_knobs", "step_timed", "baseline_moved"):
        if column in table and table[column].isna().all():
            table = table.drop(columns=[column])
    return table


def search_rows(run: RunData, speed: pd.DataFrame, questions: pd.DataFrame | None = None) -> list[dict]:
    """A row per knob search the run folder keeps (pld:auto): its prediction, and the run's measurement."""
    rows = []
    for path in sorted(run.path.glob(SEARCH_FILES)):
        record = load_optional_json(path, run.notes)
        if not isinstance(record, dict) or not isinstance(record.get("decoder"), str):
            continue
        decoder, predicted = record["decoder"], record.get("predicted") or {}
        mine = speed[speed.decoder == decoder] if not speed.empty else speed
        got = mine.iloc[0] if len(mine) else pd.Series(dtype=object)  # several device types: the run's first
        tau, speedup = _num(predicted.get("tau")), _num(predicted.get("speedup"))
        measured_tau, measured = _num(got.get("tau")), _num(got.get("speedup"))
        own = half_width(*(predicted.get("speedup_ci") or [None, None])[:2], speedup)  # its search kept no τ interval
        noise = error_noise(own, half_width(got.get("speedup_ci_low"), got.get("speedup_ci_high"), measured))
        rows.append({
            "run": run.label, "decoder": decoder, "knobs": record.get("spec"), "tree_nodes": None,
            "n_compared": got.get("n_compared"), "speedup_predicted": speedup, "speedup": measured,
            "speedup_ci_low": _num(got.get("speedup_ci_low")), "speedup_ci_high": _num(got.get("speedup_ci_high")),
            "speedup_error": _ratio_error(measured, speedup), "speedup_noise": noise,
            "tau_predicted": tau, "tau_on_text": math.nan, "tau": measured_tau,
            "tau_error": _ratio_error(measured_tau, tau), "tau_noise": math.nan, "step_predicted": _ratio(tau, speedup),
            "step_measured": _ratio(measured_tau, measured), "step_error": _ratio_error(_ratio(measured_tau, measured), _ratio(tau, speedup)),
            "speedup_on_text": math.nan, "hindsight_nodes": None, "hindsight_knobs": None, "hindsight_speedup": math.nan,
            **against_fixed(run, decoder, speed, knob_alternatives(run, decoder), questions),
        })
    return rows


def knob_alternatives(run: RunData, decoder: str) -> list[str]:
    """The run's other decoders of a knob-searched decoder's method (`pld:sweep`'s fixed knobs beside pld:auto)."""
    family = decoder.split(":")[0]
    return [name for name in run.info.get("decoders") or [] if name.split(":")[0] == family and name != decoder]


def against_fixed(run: RunData, decoder: str, speed: pd.DataFrame, fixed: list[str] | None = None,
                  questions: pd.DataFrame | None = None) -> dict:
    """The fastest fixed tree (or `fixed` decoders) of the same decoder in this run, auto's speed over it
    paired over their common questions where `questions` (the run's question frame) is given, and auto's
    standing: at least as fast, within the A/A control's half-width, behind but inside the paired
    interval, or slower."""
    none = {"best_fixed": None, "best_fixed_speedup": math.nan, "auto_over_fixed": None, "auto_vs_fixed": None}
    trees = run.info.get("trees") or {}
    family = decoder.split(":")[0]
    if fixed is None:
        fixed = [name for name, record in trees.items() if name.split(":")[0] == family and not record.get("auto")]
    rows = speed[speed.decoder.isin(fixed)].dropna(subset=["speedup"]) if not speed.empty else speed
    mine = speed[speed.decoder == decoder] if not speed.empty else speed
    if rows.empty or not len(mine) or pd.isna(mine.speedup.iloc[0]):
        return none
    best = rows.loc[rows.speedup.idxmax()]
    auto = float(mine.speedup.iloc[0])
    over, paired, high = auto / float(best.speedup), None, math.nan
    one_device = "device" not in speed or speed.device.nunique() <= 1  # device types are never pooled (speed.by_device)
    if questions is not None and "model_id" in speed and one_device:
        pair = paired_speedup(questions[questions.model_id == mine.model_id.iloc[0]], questions[questions.model_id == best.model_id])
        if pair["n_compared"]:
            over, high = pair["speedup"], pair["speedup_ci_high"]
            paired = f"{over:.3f}× ({interval_text(pair['speedup_ci_low'], high, pair['n_compared'])})"
    band = noise_band(speed) or (1.0, 1.0)
    margin = max(1.0 - band[0], band[1] - 1.0)  # the A/A control's half-width: differences inside it are noise
    if over >= 1.0:
        standing = "auto fastest"
    elif over >= 1.0 - margin:
        standing = f"within noise ({margin:.2f})"
    elif high >= 1.0:  # NaN (no interval) compares False
        standing = "fixed ahead, inside the paired interval"
    else:
        standing = "fixed faster"
    return {"best_fixed": best.decoder, "best_fixed_speedup": float(best.speedup), "auto_over_fixed": paired, "auto_vs_fixed": standing}


def prediction_notes(table: pd.DataFrame) -> list[str]:
    """A note for each auto decoder whose speedup error is outside its noise (the two figures' together), or
    where that noise is unknown, whose predicted speedup is outside its measured 95% interval."""
    notes = []
    for row in table.itertuples():
        low, high, predicted = row.speedup_ci_low, row.speedup_ci_high, row.speedup_predicted
        noise = getattr(row, "speedup_noise", math.nan)
        if not math.isnan(noise):
            if abs(row.speedup_error) <= noise:
                continue
        elif any(math.isnan(x) for x in (low, high, predicted)) or low <= predicted <= high:
            continue
        tau = row.tau_on_text if not math.isnan(row.tau_on_text) else row.tau
        notes.append(f"{row.decoder}: the tree optimiser predicted {predicted:.2f}×, the run measured {row.speedup:.2f}× "
                     f"({low:.2f}–{high:.2f}); τ {row.tau_predicted:.2f} predicted, {tau:.2f} on this text "
                     f"({row.tau_error:+.0%}); step cost {row.step_predicted:.2f}× the baseline's predicted, "
                     f"{row.step_measured:.2f}× measured ({row.step_error:+.0%})"
                     + ("" if math.isnan(noise) else f"; the error is outside the two figures' noise, ±{noise:.0%}")
                     + (f"; {row.calibration_trained_on}" if isinstance(getattr(row, "calibration_trained_on", None), str) and row.tau_error < 0 else "")
                     + f". See “{TITLE}”.")
    return notes


def prediction_row(label: str, decoder: str, audit: dict) -> dict:
    predicted, measured = audit.get("predicted") or {}, audit.get("measured") or {}
    replay, noise = audit.get("replay") or {}, audit.get("noise") or {}
    best = replay.get("hindsight_best") or {}
    low, high = (measured.get("speedup_ci") or [None, None])[:2]
    return {
        "run": label, "decoder": decoder, "knobs": audit.get("knobs"),  # a dynamic tree's knobs (dynamic-n8-d2-k4)
        "tree_nodes": audit.get("tree_nodes"), "n_compared": measured.get("compared"),
        "speedup_predicted": _num(predicted.get("speedup")), "speedup": _num(measured.get("speedup")),
        "speedup_ci_low": _num(low), "speedup_ci_high": _num(high),  # one '95% CI' cell, as every table shows it (display.py)
        "speedup_error": _ratio_error(measured.get("speedup"), predicted.get("speedup")), "speedup_noise": _num(noise.get("speedup")),
        "tau_predicted": _num(predicted.get("tau")), "tau_on_text": _num(replay.get("tau")), "tau": _num(measured.get("tau")),
        "tau_error": _ratio_error(replay.get("tau", measured.get("tau")), predicted.get("tau")), "tau_noise": _num(noise.get("tau")),
        "step_predicted": _num(predicted.get("step_ratio")), "step_measured": _num(measured.get("step_ratio")),
        "step_error": _ratio_error(measured.get("step_ratio"), predicted.get("step_ratio")),
        "step_timed": _num(measured.get("timed_step_ratio")),  # the run's own step times: what the profile priced
        "baseline_moved": _ratio_error(measured.get("baseline_step_time"), predicted.get("baseline_step_time")),  # the machine's change
        "speedup_on_text": _num(best.get("chosen_on_text")),  # τ on this text over the predicted step cost
        "hindsight_nodes": best.get("n"), "hindsight_knobs": best.get("knobs"),  # a dynamic tree's or pld:auto's knobs
        "hindsight_speedup": _num(best.get("speedup_on_text")),
        "calibration_trained_on": audit.get("calibration_trained_on"),  # why τ may read high (bench/tree_cache.py)
    }


def with_noise(run: RunData, decoder: str, audit: dict, speed: pd.DataFrame, questions: pd.DataFrame | None) -> dict:
    """`audit` with its errors' noise; prediction.json from before session 20 kept none: the prediction's
    from the decoder's tree file (its search's "noise"), the run's τ interval from its question frame."""
    if audit.get("noise") or not isinstance(audit.get("measured"), dict):
        return audit
    own = (audit.get("predicted") or {}).get("noise") or ((tree_files(run, decoder).get("tree") or {}).get("search") or {}).get("noise") or {}
    measured = dict(audit["measured"])
    mine = speed[speed.decoder == decoder] if not speed.empty and "model_id" in speed else speed
    if "tau_ci" not in measured and questions is not None and len(mine):
        rows = questions[questions.model_id == mine.model_id.iloc[0]]
        measured["tau_ci"] = list(bootstrap_tau_ci(rows.new_tokens, rows.steps))
    return {**audit, "measured": measured, "noise": errors_noise(own, measured)}


def errors_noise(own: dict, measured: dict) -> dict:
    """{speedup, tau}: the 95% noise of each error, from the prediction's own relative half-widths `own` and
    the run's `measured` intervals (speedup_ci, tau_ci), by `error_noise`."""
    def half(key: str) -> float:
        return half_width(*(measured.get(f"{key}_ci") or [None, None])[:2], measured.get(key))

    return {key: error_noise(own.get(key), half(key)) for key in ("speedup", "tau")}


def half_width(low, high, value) -> float:
    """A 95% interval's half-width relative to its value (NaN where any is missing)."""
    low, high, value = _num(low), _num(high), _num(value)
    return (high - low) / 2 / value if value and not any(math.isnan(x) for x in (low, high, value)) else math.nan


def error_noise(predicted: float | None, measured: float | None) -> float:
    """The 95% noise of measured / predicted − 1: the two figures' relative half-widths in quadrature (they
    are independent: a calibration text and profile rounds against the run's questions and steps). Medusa
    n = 6 (Zen 4 EPYC, bf16, 16 MT-Bench questions): ±8.2% and ±6.6% give ±10.5%; NaN where either is unknown."""
    p, m = _num(predicted), _num(measured)
    return math.hypot(p, m) if not (math.isnan(p) or math.isnan(m)) else math.nan


def _num(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _ratio(numerator, denominator) -> float:
    n, d = _num(numerator), _num(denominator)
    return n / d if d and not math.isnan(n) and not math.isnan(d) else math.nan


def _ratio_error(measured, predicted) -> float:
    """measured / predicted − 1 (a fraction; −0.19 is 19% below the prediction)."""
    m, p = _num(measured), _num(predicted)
    return m / p - 1 if p and not math.isnan(m) and not math.isnan(p) else math.nan
