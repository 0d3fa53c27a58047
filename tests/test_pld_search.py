"""`pld:auto` (bench/pld_search.py): prompt lookup's knobs searched by replaying its own drafting on the
calibration answers; fixed knobs in a spec (`pld:tokens5`); `pld:sweep`; the run folder's record and resume.

The step profile is a fixed one (cheap drafts, so drafting pays and the knobs matter): what is checked is
the replay against the real decoding loop, not this machine's timings.
"""

import json
from io import StringIO

import pytest
from rich.console import Console

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
    if record["taken_over_defaults"]:  # beyond the noise: the paired interval lies above 1
        assert record["chosen"] == record["best"]["knobs"] and record["best"]["vs_defaults_ci"][0] > 1
    else:
        assert record["chosen"] == default_knobs() and record["reason"].startswith(("kept the defaults", "the defaults"))
    # a tie goes to the smaller draft
    fastest = [row for row in record["grid"] if row["speedup"] == best["speedup"]]
    assert record["best"]["knobs"] == min(fastest, key=lambda row: (row["draft"], row["knobs"]["pld_max_ngram"]))["knobs"]


# ------------------------------------------------------------------------------ the run folder
def test_the_run_folder_keeps_the_search_and_a_resume_builds_on_it(smollm, answers, tmp_path):
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

    monkeypatch.setattr(cal, "step_profile", lambda loaded: PROFILE)  # no timing here: the fixed profile
    out = tmp_path / "run"
    config = RunConfig(bench="quick", question_ids=["1001"], max_new_tokens=16, warmup=0, out=out, device="cpu",
                       decoders=["baseline", "pld:auto", "pld:tokens5"], options=DecoderOptions(extra={"autotree": SETTINGS}))
    run_benchmark(config, console=Console(file=StringIO()), loaded=smollm)
    record = json.loads((out / "pld-search.json").read_text())
    assert record["decoder"] == "pld:auto" and json.loads((out / "pld-profile.json").read_text()) == PROFILE
    row = collect([out]).tables["prediction"].set_index("decoder").loc["pld:auto"]
    assert row.tau_predicted == pytest.approx(record["predicted"]["tau"]) and row.knobs == record["spec"]
    assert row.speedup_predicted == pytest.approx(record["predicted"]["speedup"]) and row.best_fixed == "pld:tokens5"
    assert row.step_predicted == pytest.approx(record["predicted"]["tau"] / record["predicted"]["speedup"])


def test_ray_workers_search_once_per_device_type_and_the_driver_keeps_the_file(smollm, tmp_path, monkeypatch):
    """The first worker of a device type searches; its plan carries the choice (not the grid) to the others,
    and the driver writes pld-search.json where an in-process run keeps it."""
    from medusa_bench.bench import pld_search
    from medusa_bench.bench.distributed import Event, QuestionWorker, add_worker
    from medusa_bench.bench.run_folder import AnswerSource
    from medusa_bench.inputs.questions import load_questions

    monkeypatch.setattr(cal, "step_profile", lambda loaded: PROFILE)
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
