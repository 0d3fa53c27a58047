"""`pld:auto` (bench/pld_search.py): prompt lookup's knobs searched by replaying its own drafting on the
calibration answers; fixed knobs in a spec (`pld:tokens5`); `pld:sweep`; the run folder's record and resume.

The step profile is a fixed one (cheap drafts, so drafting pays and the knobs matter): what is checked is
the replay against the real decoding loop, not this machine's timings.
"""

import json
from io import StringIO

import pytest
from rich.console import Console

from medusa_bench.bench import build
from medusa_bench.bench import calibrate as cal
from medusa_bench.bench.autotree import AutoTreeSettings
from medusa_bench.bench.config import RunConfig, expand_groups
from medusa_bench.bench.pld_search import (calibration_answers, choose_knobs, default_knobs, replay, saved_searches,
                                           search, store_searches)
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.decoders.registry import AUTO_KNOBS, build_decoder, spec_options
from medusa_bench.errors import UserError

PROFILE = {"device": "test", "dtype": "float32", "threads": 1, "context_len": 300,
           "chain": {"1": 0.030, "2": 0.033, "4": 0.036, "8": 0.044, "16": 0.058},
           "tree": {"4": 0.038, "8": 0.047, "16": 0.062}}
SETTINGS = AutoTreeSettings(prompts=2, tokens=24, turns=2)  # small calibration text: 4 answers
pytestmark = pytest.mark.usefixtures("one_thread")  # small forwards: a second thread only adds contention on 2 cores


@pytest.fixture(scope="module")
def answers(smollm):
    found, _ = calibration_answers(smollm, SETTINGS)
    return found


# ------------------------------------------------------------------------------ specs
@pytest.mark.parametrize("spec, knobs", [("pld:tokens5", (3, 5, 1)), ("pld:ngram4-branches2-tokens7", (4, 7, 2)),
                                         ("pld:branches3", (3, 10, 3)), ("pld", (3, 10, 1))])
def test_a_spec_sets_the_knobs_of_that_decoder_only(spec, knobs):
    _, options = spec_options(spec, DecoderOptions())
    assert (options.pld_max_ngram, options.pld_tokens, options.pld_branches) == knobs
    assert spec_options("pld:full")[1].extra == {"pld_adaptive": False}  # still the paper's drafting
    assert spec_options("pld:auto")[1].extra == {AUTO_KNOBS: True}


@pytest.mark.parametrize("spec, says", [("pld:tokens0", "--pld-tokens must be an integer from 1 to 64, got 0"),
                                        ("pld:width4", "'width4' is no knob of pld"),
                                        ("pld:tokens5-tokens6", "'tokens6' is set twice"),
                                        ("pld:ngram", "pld drafts on no tree, so ':ngram' means nothing to it"),
                                        ("pld:chain-2", "pld drafts on no tree, so ':chain-2' means nothing to it")])
def test_a_bad_knob_is_one_line_naming_the_valid_form(spec, says):
    with pytest.raises(UserError) as error:
        RunConfig.from_cli(decoders=f"baseline,{spec}", question_ids=None, categories=None, temperature="0",
                           max_new_tokens=8, warmup=0)  # refused before any model loads
    assert str(error.value).startswith(f"{spec}: ") and says in str(error.value) and "\n" not in str(error.value)
    assert "pld:ngramN-tokensN-branchesN" in str(error.value) and "pld:auto" in str(error.value)


def test_the_registry_builds_no_unresolved_auto(smollm):
    with pytest.raises(UserError, match="knobs are searched on the loaded model by the bench layer"):
        build_decoder("pld:auto", smollm)


def test_sweep_runs_auto_beside_the_defaults_and_fixed_knobs():
    swept = expand_groups(["baseline", "pld:sweep"])
    assert swept[:3] == ["baseline", "pld:auto", "pld"] and {"pld:tokens5", "pld:ngram1", "pld:branches2"} <= set(swept)
    for spec in swept[1:]:
        spec_options(spec)  # each one parses
    with pytest.raises(UserError, match="samd has no tree and no knobs to sweep; sweep one of .*hydra.*pld"):
        expand_groups(["samd:sweep"])


# ------------------------------------------------------------------------------ the replay
@pytest.mark.parametrize("spec", ["pld", "pld:ngram2-tokens5-branches2"])
def test_the_replay_steps_as_generate_does(smollm, answers, spec):
    """Per answer, the replay takes exactly the steps the real decoder takes on the same greedy text
    (the proposer and its statistics carried from answer to answer in both)."""
    _, options = spec_options(spec, DecoderOptions(extra={"step_profile": PROFILE}))
    knobs = {name: getattr(options, name) for name in default_knobs()}
    replayed = replay(answers, knobs, PROFILE)
    decoder = build_decoder(spec, smollm, options)
    for (ids, prompt_len), steps in zip(answers, replayed.steps):
        generation = decoder.generate(ids[:prompt_len], SETTINGS.tokens)
        assert generation.token_ids == ids[prompt_len:]  # fp32: the batched calibration text is batch-1's
        assert generation.steps == steps
    assert replayed.tau > 1.1  # it drafted and was accepted: the comparison had something to compare


def test_the_choice_is_at_least_the_defaults_and_its_interval_holds_it(answers):
    record = search(answers, PROFILE)
    predicted, defaults = record["predicted"], record["defaults"]
    assert predicted["speedup"] >= defaults["speedup"]
    assert predicted["speedup_ci"][0] <= predicted["speedup"] <= predicted["speedup_ci"][1]
    assert len(record["grid"]) == 90 and all(len(row["steps"]) == len(answers) for row in record["grid"])
    best = max(record["grid"], key=lambda row: row["speedup"])
    assert record["best"]["speedup"] == best["speedup"]
    tied = record["tied_with_best"]
    assert record["spec"] in tied and best["spec"] in tied
    if record["taken_over_defaults"]:  # the fastest beats the defaults beyond the noise: the paired interval lies above 1
        assert record["best"]["vs_defaults_ci"][0] > 1 and default_knobs() != record["chosen"]
        moved = lambda knobs: sum(knobs[k] != v for k, v in default_knobs().items())  # noqa: E731
        rows = {row["spec"]: row for row in record["grid"]}
        assert moved(record["chosen"]) == min(moved(rows[spec]["knobs"]) for spec in tied)  # the nearest of the tied
    else:
        assert record["chosen"] == default_knobs() and record["reason"].startswith(("kept the defaults", "the defaults"))
    # a tie goes to the smaller draft
    fastest = [row for row in record["grid"] if row["speedup"] == best["speedup"]]
    assert record["best"]["knobs"] == min(fastest, key=lambda row: (row["draft"], row["knobs"]["pld_max_ngram"]))["knobs"]


def test_the_profile_noise_widens_the_interval_the_choice_must_clear(answers):
    """The replay's step shapes price exactly its cost; a profile whose timed rounds disagree widens every
    interval, one whose rounds agree changes nothing (it is the same profile as one without rounds)."""
    from medusa_bench.decoders.pld import StepCosts

    replayed = replay(answers, default_knobs(), PROFILE)
    costs = StepCosts(PROFILE)
    for shapes, cost in zip(replayed.shapes, replayed.cost):
        assert sum(count * costs.relative(*shape) for shape, count in shapes.items()) == pytest.approx(cost)
    axes = {"pld_max_ngram": (3,), "pld_tokens": (5, 10), "pld_branches": (1, 2)}
    quiet = {"chain": {n: [1.0 + 0.1 * int(n)] * 6 for n in ("2", "4", "8", "16")}, "tree": {n: [1.2] * 6 for n in ("4", "8", "16")}}
    noisy = {"chain": {n: [0.7, 1.3, 0.9, 1.2, 0.8, 1.1] for n in ("2", "4", "8", "16")},
             "tree": {n: [1.4, 0.6, 1.0, 1.3, 0.7, 1.0] for n in ("4", "8", "16")}}
    plain, agreed, spread = (search(answers, {**PROFILE, **extra}, axes=axes) for extra in ({}, {"ratios": quiet}, {"ratios": noisy}))
    assert "profile" not in plain["bootstrap"]["over"] and "step profile's rounds" in spread["bootstrap"]["over"]
    assert agreed["predicted"] == plain["predicted"] and agreed["best"] == plain["best"]
    assert [row["speedup"] for row in spread["grid"]] == [row["speedup"] for row in plain["grid"]]  # the point costs stay
    width = lambda record: [row["speedup_ci"][1] - row["speedup_ci"][0] for row in record["grid"]]  # noqa: E731
    assert all(w > v for w, v in zip(width(spread), width(plain)))
    assert spread["best"]["vs_defaults_ci"][0] <= plain["best"]["vs_defaults_ci"][0]


def test_the_step_profile_is_measured_once_per_machine_and_kept_beside_the_tree_tables(smollm, tmp_path, monkeypatch):
    from medusa_bench.bench import tree_cache

    settings = AutoTreeSettings(cache_dir=str(tmp_path))
    profile = tree_cache.cached_step_profile(smollm, settings)
    rounds = profile["ratios"]["chain"]["16"]
    assert len(rounds) == profile["repeats"] and profile["chain"]["16"] / profile["chain"]["1"] > 1
    assert set(profile["ratios"]["tree"]) == set(profile["tree"]) - {"1"}
    assert tree_cache.cached_step_profile(smollm, settings) is profile  # this process: the same object
    monkeypatch.setattr(tree_cache, "_PROFILES", {})  # another process on this machine: the file
    monkeypatch.setattr(cal, "shape_profile", lambda *args, **kwargs: pytest.fail("measured again"))
    assert tree_cache.cached_step_profile(smollm, settings) == profile
    (folder,) = tmp_path.glob("*-pld-profile-*")
    assert json.loads((folder / "key.json").read_text())["sizes"] == list(cal.STEP_PROFILE_SIZES)
    monkeypatch.setattr(cal, "shape_profile", lambda *args, **kwargs: {"chain": {"1": 0.01}, "again": True})
    refreshed = AutoTreeSettings(cache_dir=str(tmp_path), refresh=True)
    assert tree_cache.cached_step_profile(smollm, refreshed)["again"]


# ------------------------------------------------------------------------------ the run folder
def test_the_run_folder_keeps_the_search_and_a_resume_builds_on_it(smollm, answers, tmp_path):
    from medusa_bench.bench.audit import early_check
    from medusa_bench.bench.build import build_decoder as build_measured

    options = DecoderOptions(extra={"autotree": SETTINGS})
    plan = {"profiles": {"pld:auto": PROFILE}}
    decoder = build_measured("pld:auto", smollm, options, plan)
    record = decoder.knob_search
    chosen = record["chosen"]
    assert (decoder.proposer.max_ngram, decoder.proposer.max_tokens, decoder.proposer.branches) == (
        chosen["pld_max_ngram"], chosen["pld_tokens"], chosen["pld_branches"])
    store_searches(tmp_path, {"baseline": build_decoder("baseline", smollm), "pld:auto": decoder})
    saved = json.loads((tmp_path / "pld-search.json").read_text())
    assert saved["decoder"] == "pld:auto" and saved["chosen"] == chosen
    assert saved["calibration"]["prompts"] == 2 and saved["calibration"]["answers"] == len(answers)
    assert saved["profile"]["device"] == "test" and len(saved["profile"]["sha256"]) == 16
    assert {"knobs", "tau", "speedup", "speedup_ci", "steps", "cost"} <= set(saved["grid"][0])

    # In the run, after the first questions: a line only when the searched τ is outside the measured τ's interval.
    predicted = record["predicted"]["tau"]
    steps = round(100 / predicted)
    assert early_check("pld:auto", decoder, [(100, steps + d) for d in (-4, -2, 0, 2, 4)]) is None
    line = early_check("pld:auto", decoder, [(100, 100), (90, 88), (100, 99), (80, 80), (100, 97)])
    assert line.startswith("pld:auto: τ 1.01 (") and f"predicted {predicted:.2f}: the calibration answers repeat themselves more" in line
    step = predicted / record["predicted"]["speedup"]
    assert f"give about {470 / 464 / step:.2f}×, predicted {record['predicted']['speedup']:.2f}×; the report" in line

    # A resume decides as the run did: the recorded choice, whatever a search would say now.
    recorded = {"pld_max_ngram": 2, "pld_tokens": 4, "pld_branches": 1}  # outside the grid: only the file says so
    (tmp_path / "pld-search.json").write_text(json.dumps({**saved, "chosen": recorded}))
    resumed = saved_searches(tmp_path, ["baseline", "pld:auto"])
    assert set(resumed) == {"pld:auto"}
    again = build_measured("pld:auto", smollm, options, {**plan, "searches": resumed})
    assert (again.proposer.max_ngram, again.proposer.max_tokens) == (2, 4) and again.knob_search["chosen"] == recorded
    store_searches(tmp_path, {"pld:auto": again})  # the file stays as it was
    assert json.loads((tmp_path / "pld-search.json").read_text())["chosen"] == recorded
    with pytest.raises(UserError, match="no knob search for samd"):
        choose_knobs("samd:auto", smollm, options)


@pytest.mark.slow
def test_a_run_keeps_the_search_and_the_report_shows_it(smollm, tmp_path, monkeypatch):
    from medusa_bench.bench.loop import run_benchmark
    from medusa_bench.results.report import collect

    monkeypatch.setattr(build, "cached_step_profile", lambda loaded, settings: PROFILE)  # no timing here: the fixed profile
    out = tmp_path / "run"
    config = RunConfig(bench="quick", question_ids=["1001"], max_new_tokens=16, warmup=0, out=out, device="cpu",
                       decoders=["baseline", "pld:auto", "pld:tokens5"], options=DecoderOptions(extra={"autotree": SETTINGS}))
    run_benchmark(config, console=Console(file=StringIO()), loaded=smollm)
    record = json.loads((out / "pld-search.json").read_text())
    assert record["decoder"] == "pld:auto" and json.loads((out / "pld-profile.json").read_text()) == PROFILE
    row = collect([out]).tables["prediction"].set_index("decoder").loc["pld:auto"]
    assert row.tau_predicted == pytest.approx(record["predicted"]["tau"]) and row.knobs == record["spec"]
    assert row.speedup_predicted == pytest.approx(record["predicted"]["speedup"]) and row.best_fixed == "pld:tokens5"
    assert row.step_predicted == pytest.approx(record["predicted"]["tau"] / record["predicted"]["speedup"], abs=1e-4)

    # The end-of-run check replays the chosen knobs on the run's own answers with the same profile: prompt
    # lookup's τ is the text's alone, so the replay gives the τ the run measured.
    audit = json.loads((out / "prediction.json").read_text())["pld:auto"]
    answers = [json.loads(line)["choices"][0] for line in (out / "model_answer" / "smollm2-135m-pld-auto.jsonl").read_text().splitlines()]
    tau = sum(sum(c["new_tokens"]) for c in answers) / sum(sum(c["decoding_steps"]) for c in answers)
    assert audit["knobs"] == record["spec"] and audit["tree_nodes"] is None
    assert audit["replay"]["tau"] == pytest.approx(tau, abs=1e-3) == audit["measured"]["tau"]
    assert audit["error"]["tau"] == pytest.approx(tau / record["predicted"]["tau"] - 1, abs=1e-3)
    rows = {r["knobs"]: r for r in audit["replay"]["sizes"]}
    assert record["spec"] in rows and audit["replay"]["hindsight_best"]["knobs"] in rows
    assert audit["replay"]["hindsight_best"]["speedup_on_text"] == max(r["speedup_on_text"] for r in rows.values())
    assert audit["verdict"].startswith(f"pld:auto ({record['spec']}): predicted {record['predicted']['speedup']:.2f}×")
    row = collect([out]).tables["prediction"].set_index("decoder").loc["pld:auto"]  # one row, now from the audit
    assert row.tau_on_text == pytest.approx(tau, abs=1e-3) and row.best_fixed == "pld:tokens5"
    assert row.speedup_on_text == pytest.approx(audit["replay"]["hindsight_best"]["chosen_on_text"], abs=1e-3)


def test_ray_workers_search_once_per_device_type_and_the_driver_keeps_the_file(smollm, tmp_path, monkeypatch):
    """The first worker of a device type searches; its plan carries the choice (not the grid) to the others,
    and the driver writes pld-search.json where an in-process run keeps it."""
    from medusa_bench.bench import pld_search
    from medusa_bench.bench.distributed import Event, QuestionWorker, add_worker
    from medusa_bench.bench.run_folder import AnswerSource
    from medusa_bench.inputs.questions import load_questions

    monkeypatch.setattr(build, "cached_step_profile", lambda loaded, settings: PROFILE)
    searched = []
    real = pld_search.search_for
    monkeypatch.setattr(pld_search, "search_for", lambda *args: searched.append(1) or real(*args))
    run_config = RunConfig(bench="quick", max_new_tokens=8, warmup=0, out=tmp_path / "run", device="cpu",
                           decoders=["baseline", "pld:auto"], options=DecoderOptions(extra={"autotree": SETTINGS}))
    question = load_questions("quick", None, 1, None, None)[1][0]
    first, second = QuestionWorker(), QuestionWorker()
    for worker, name in ((first, "a:1"), (second, "a:2")):
        vars(worker).update(config=run_config, loaded=smollm, id=name, device_name="cpu-a")
    measured = first.build(None, question, with_reference=False)
    planned = json.loads(json.dumps(measured["plan"]))  # as run.json keeps it
    adopted = second.build(planned, question, with_reference=False)
    assert len(searched) == 1 and "grid" not in planned["searches"]["pld:auto"]
    assert second.decoders["pld:auto"].proposer.max_ngram == first.decoders["pld:auto"].proposer.max_ngram
    assert not adopted["measured"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    source = AnswerSource("smollm2-135m", ["baseline", "pld:auto"], {"name": "cpu-a"}, trees={})
    add_worker(run_dir, source, Event("ready", {"id": "a:1", "device": {"name": "cpu-a"}}, built=measured), "cpu-a", None)
    assert saved_searches(run_dir, ["pld:auto"])["pld:auto"]["grid"]  # the whole record, in the file
