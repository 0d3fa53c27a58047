"""The optimiser's prediction checked on a run's own text (bench/audit.py, results/prediction.py).

The end-to-end test runs the shipped Hydra heads on `hydra:auto` (tiny search settings, a tree
forced by min_speedup 0) over two quick questions, both turns, and checks that the replay of the
run's answers through the heads gives the τ the run measured.
"""

import json
import math

import pytest

from conftest import run_cli as cli
from medusa_bench.bench.audit import AUDIT_FILE, early_check
from medusa_bench.bench.autotree import AutoTreeSettings
from medusa_bench.bench.loop import RunConfig, run_benchmark
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.results.report import build_report
from medusa_bench.trees.replay import accepted_drafts, replay_steps, replayed_tau
from medusa_bench.trees.tree import Tree


def test_accepted_drafts_follow_the_tree_and_the_true_ranks():
    tree = Tree([(0,), (0, 0), (1,), (1, 0)])
    rows = [[0, 0, 3], [1, 0, 0], [1, 1, 0], [2, 0, 0], [0, -1, -1], [0, 10, 0]]
    # depth 3 is not in the tree; rank 1 then 1 is not a path; rank 2 is not drafted; -1 is past the end; >= top_k is a miss
    assert accepted_drafts(rows, tree, top_k=10) == [2, 2, 1, 0, 1, 1]


def test_replay_counts_steps_as_generate_does():
    # 6 answer tokens, 5 positions with a depth-1 target: 0 accepts 2 -> position 3 accepts 1 -> 5 is the last root alone
    assert replay_steps([2, 0, 0, 1, 0], 6) == 3
    assert replay_steps([0, 0, 0], 4) == 4  # nothing accepted: one token a step
    assert replay_steps([], 1) == 1  # a one-token answer: its root, no forward, still a step


@pytest.mark.slow
def test_a_run_checks_its_auto_tree_on_its_own_text(smollm, tmp_path, capsys, monkeypatch):
    settings = AutoTreeSettings(cache_dir=str(tmp_path / "cache"), prompts=1, tokens=8, max_nodes=3, repeats=1, warmup=0,
                                context_len=64, min_speedup=0.0)  # min_speedup 0: a tree is chosen, whatever the timings
    out = tmp_path / "run"
    config = RunConfig(bench="quick", question_ids=["1001", "1004"], max_new_tokens=24, warmup=0, out=out, device="cpu",
                       decoders=["baseline", "hydra:auto", "hydra:chain-1"], options=DecoderOptions(extra={"autotree": settings}))
    run_benchmark(config, loaded=smollm)

    audit = json.loads((out / AUDIT_FILE).read_text())["hydra:auto"]
    tree = json.loads((out / "tree.json").read_text())
    assert audit["tree_nodes"] == len(tree["tree"]) + 1 > 1
    assert audit["predicted"]["tau"] == pytest.approx(tree["search"]["tau"], abs=1e-4)
    assert audit["predicted"]["speedup"] == pytest.approx(tree["search"]["speedup"], abs=1e-4)
    answers = [json.loads(line)["choices"][0] for line in (out / "model_answer" / "smollm2-135m-hydra-auto.jsonl").read_text().splitlines()]
    tau = sum(sum(c["new_tokens"]) for c in answers) / sum(sum(c["decoding_steps"]) for c in answers)
    assert audit["measured"]["tau"] == pytest.approx(tau, abs=1e-4) and audit["measured"]["compared"] == 2
    # The replay reproduces the run's τ (the heads' ranks from one full forward against the run's incremental
    # drafts: a near-tie may flip once in a while, hence the tolerance).
    assert audit["replay"]["tau"] == pytest.approx(tau, rel=0.08)
    sizes = {row["n"]: row for row in audit["replay"]["sizes"]}
    assert set(sizes) == {1, 2, 3} and sizes[1]["tau_replayed"] == 1.0 and sizes[1]["speedup_on_text"] == 1.0
    assert audit["replay"]["hindsight_best"]["n"] in sizes
    assert audit["measured"]["speedup_ci"] == [None, None] == audit["measured"]["tau_ci"]  # two questions: no interval
    assert audit["predicted"]["noise"] == tree["search"].get("noise")  # the prediction's own: kept, the errors' unknown
    assert audit["noise"] == {"speedup": None, "tau": None}
    assert audit["verdict"].startswith(f"hydra:auto (n={audit['tree_nodes']}): predicted")
    # Each turn records its prefill, so the gap after the text's share splits into the steps' and the prefill's.
    assert all(0 < p < w for c in answers for p, w in zip(c["prefill_time"], c["wall_time"]))
    assert 0 < audit["measured"]["prefill_share"] < 1 and audit["measured"]["decode_speedup"] > 0
    assert all(len(times) == steps for c in answers for times, steps in zip(c["step_times"], c["decoding_steps"]))
    assert audit["measured"]["timed_step_ratio"] > 0 and "its timed steps" in audit["verdict"]
    assert f"of the baseline's time, the same work for every decoder)" in audit["verdict"]

    # The report shows it, with the note that says what each column means.
    markdown = build_report([out], fmt="markdown")
    assert "## Tree optimiser: predicted against measured" in markdown and "τ on this text" in markdown
    assert "it explains, it never chooses" in markdown
    from medusa_bench.results.report import collect

    row = collect([out]).tables["prediction"].iloc[0]  # the fixed tree ran beside it: named, and auto judged against it
    assert row.decoder == "hydra:auto" and row.best_fixed == "hydra:chain-1"
    assert row.auto_vs_fixed in ("auto fastest", "fixed faster")  # no --control: no noise band to be within
    assert row.auto_over_fixed.endswith("× (n=2, no CI)")  # paired over the two questions: too few for an interval

    # `tree --audit` on the finished folder rebuilds the decoder from the run's own files: the same figures.
    import medusa_bench.models

    monkeypatch.setattr(medusa_bench.models, "load_model", lambda *args, **kwargs: smollm)
    in_run = (out / AUDIT_FILE).read_text()
    (out / AUDIT_FILE).unlink()
    code, stdout, stderr = cli(capsys, monkeypatch, "tree", "--audit", out)
    assert code == 0, stderr
    assert json.loads((out / AUDIT_FILE).read_text()) == json.loads(in_run)
    assert stdout.strip() == str(out / AUDIT_FILE) and "prediction check: hydra:auto" in stderr
    code, _, stderr = cli(capsys, monkeypatch, "tree", "--audit", tmp_path)
    assert code == 2 and "is not a medusa-bench run folder" in stderr

    # The in-run check speaks only when the prediction is outside the measured τ's interval.
    from medusa_bench.bench.build import build_decoder

    decoder = build_decoder("hydra:auto", smollm, DecoderOptions(extra={"autotree": settings}))
    predicted = decoder.autotree.result.choice.tau
    steps = round(100 / predicted)
    around = [(100, steps + d) for d in (-6, -3, 0, 3, 6)]  # τ varying around the prediction
    assert early_check("hydra", decoder, around[:4]) is None  # too few for an interval
    assert early_check("hydra", decoder, around) is None
    line = early_check("hydra", decoder, [(100, 100), (90, 88), (100, 99), (80, 80), (100, 97)])
    assert line.startswith("hydra: τ 1.01 (") and f"predicted {predicted:.2f}" in line and "easier" in line
    choice = decoder.autotree.result.choice
    step = choice.step_time * choice.baseline_throughput
    assert f"give about {470 / 464 / step:.2f}×, predicted {choice.speedup:.2f}×" in line


def test_replayed_tau_is_below_the_per_position_mean_when_acceptance_is_bursty():
    easy = [[0, 0]] * 5 + [[0, -1]]  # 7 tokens, two drafts accepted everywhere: steps at 0, 3 and the last root
    hard = [[5, 5]] * 3  # 4 tokens, nothing accepted
    replayed, mean = replayed_tau([(easy, 7), (hard, 4)], Tree.chain(2), top_k=10)
    assert replayed == pytest.approx(11 / 7) and mean == pytest.approx(1 + 11 / 9)


def test_sweep_runs_auto_beside_the_fixed_trees():
    from medusa_bench.bench.config import SWEEP_TREES, expand_groups
    from medusa_bench.errors import UserError

    assert expand_groups(["baseline", "hydra:sweep", "pld"]) == ["baseline", *(f"hydra:{t}" for t in SWEEP_TREES), "pld"]
    assert SWEEP_TREES[0] == "auto" and "mc_sim_7b_63" in SWEEP_TREES
    with pytest.raises(UserError, match="samd has no tree and no knobs to sweep"):  # pld:sweep: its knobs (test_pld_search.py)
        expand_groups(["samd:sweep"])


def test_only_decoders_whose_tree_is_all_their_drafting_are_checked(smollm):
    """samd-eagle2's tree sizes its EAGLE-2 part only: its τ is SAM's too, so no prediction is checked for it."""
    from medusa_bench.bench.audit import sized_alone
    from medusa_bench.decoders.registry import build_decoder

    options = DecoderOptions(tree="chain-1")
    assert sized_alone(build_decoder("eagle2", smollm, options)) and sized_alone(build_decoder("hydra", smollm, options))
    assert not sized_alone(build_decoder("samd-eagle2", smollm, options))
    # eagle2 on the empty tree still drafts dynamically whenever it drafts: its hindsight is no static replay
    from medusa_bench.bench.audit import audit_decoder
    from medusa_bench.bench.autotree import AutoTree
    from medusa_bench.trees.search import best_tree
    from medusa_bench.trees.tables import Calibration, Latency

    eagle2 = build_decoder("eagle2", smollm, DecoderOptions(tree="empty"))
    calibration, latency = Calibration("independent", 2, accuracy=[[0.3, 0.1]]), Latency({1: 0.05, 2: 0.09})
    search = best_tree(calibration, latency, 2, 1, 1, min_speedup=1.03)
    eagle2.autotree = AutoTree(Tree.empty(), search, calibration, latency, None, True)
    answer = {"1": {"new_tokens": [10], "decoding_steps": [10], "wall_time": [1.0], "temperature": 0.0}}
    audit = audit_decoder(smollm, eagle2, [], answer, answer)
    assert audit["replay"] is None and audit["why_no_replay"] == "dynamic trees draft a new tree each step"
    assert audit["measured"]["speedup"] == 1.0 and "hindsight" not in audit["verdict"]


def test_a_prediction_outside_the_measured_interval_is_a_report_note():
    import pandas as pd

    from medusa_bench.results.prediction import prediction_notes, prediction_row

    audit = {"tree_nodes": 6, "predicted": {"tau": 1.93, "step_ratio": 1.82, "speedup": 1.06},
             "measured": {"tau": 1.64, "speedup": 0.90, "speedup_ci": [0.86, 0.95], "step_ratio": 1.81},
             "replay": {"tau": 1.64, "hindsight_best": {"n": 1, "speedup_on_text": 1.0}}}
    inside = {**audit, "predicted": {**audit["predicted"], "speedup": 0.93}}
    table = pd.DataFrame([prediction_row("run", name, a) for name, a in {"hydra": audit, "medusa": inside}.items()])
    notes = prediction_notes(table)
    assert notes == ["hydra: the tree optimiser predicted 1.06×, the run measured 0.90× (0.86–0.95); τ 1.93 predicted, "
                     "1.64 on this text (-15%); step cost 1.82× the baseline's predicted, 1.81× measured (-1%). "
                     "See “Tree optimiser: predicted against measured”."]


def test_an_error_inside_the_two_figures_noise_is_no_note():
    """The prediction's own noise (calibration answers, profile rounds) and the run's (its questions) in
    quadrature: medusa's −6% against ±8.2% and ±6.6% (session 19, Zen 4) is not a miss these figures show."""
    import pandas as pd

    from medusa_bench.results.display import format_value
    from medusa_bench.results.prediction import error_noise, half_width, prediction_notes, prediction_row

    assert error_noise(0.082, 0.070) == pytest.approx(0.1078, abs=1e-4)
    assert math.isnan(error_noise(None, 0.07)) and math.isnan(half_width(None, 1.3, 1.2))
    assert half_width(1.14, 1.30, 1.21) == pytest.approx(0.0661, abs=1e-4)
    measured = {"tau": 1.54, "speedup": 1.21, "speedup_ci": [1.14, 1.30], "step_ratio": 1.27}
    audit = {"tree_nodes": 6, "predicted": {"tau": 1.59, "step_ratio": 1.23, "speedup": 1.30},
             "measured": measured, "replay": {"tau": 1.54, "hindsight_best": {"n": 6, "speedup_on_text": 1.26}},
             "noise": {"speedup": error_noise(0.082, half_width(1.14, 1.30, 1.21)), "tau": error_noise(0.075, 0.048)}}
    sure = {**audit, "noise": {"speedup": 0.03, "tau": 0.02}}  # a tight prediction of the same gap: a miss
    table = pd.DataFrame([prediction_row("run", name, a) for name, a in {"medusa": audit, "hydra": sure}.items()])
    assert format_value("speedup_noise", table.speedup_noise[0]) == "±11%" and format_value("tau_noise", table.tau_noise[0]) == "±9%"
    notes = prediction_notes(table)
    assert len(notes) == 1 and notes[0].startswith("hydra: the tree optimiser predicted 1.30×, the run measured 1.21×")
    assert "the error is outside the two figures' noise, ±3%" in notes[0]


def test_tau_interval_resamples_whole_questions():
    from medusa_bench.results.stats import bootstrap_tau_ci

    low, high = bootstrap_tau_ci([100] * 8, [50] * 8)  # every question at τ 2: no spread
    assert low == high == 2.0
    low, high = bootstrap_tau_ci([100, 100, 100, 100, 100, 100], [40, 50, 60, 45, 55, 50])
    assert 100 / 60 < low < 100 * 6 / 300 < high < 100 / 40  # around the pooled τ, inside the questions' own range
    assert all(math.isnan(x) for x in bootstrap_tau_ci([100] * 4, [50] * 4))  # too few questions for an interval


def test_the_verdict_says_when_the_machine_moved_since_the_profile():
    """The baseline's one-token step is the same work in the profile and in the run: a change there is the
    machine's (session 24, Xeon: 26.2 ms in the run against 28.4 ms profiled, every tree step 3–7% dearer)."""
    from medusa_bench.bench.audit import machine_moved
    from medusa_bench.decoders.pld import StepCosts
    from medusa_bench.results.display import format_value
    from medusa_bench.results.prediction import prediction_row

    moved = machine_moved({"baseline_step_time": 0.0284}, {"baseline_step_time": 0.0262})
    assert moved == ("; the baseline's own step 26.2 ms in the run, 28.4 ms when profiled (-8%; the machine moved since the "
                     "profile, and step ratios move with it)")
    assert machine_moved({"baseline_step_time": 0.0284}, {"baseline_step_time": 0.0288}).endswith("(+1%)")  # a quiet run
    assert machine_moved({}, {"baseline_step_time": 0.0288}) == ""  # older prediction.json: nothing to compare
    assert StepCosts({"chain": {"1": 0.026, "2": 0.028}}).one == 0.026 and StepCosts(None).one is None  # pld:auto's profile step
    row = prediction_row("run", "hydra:auto", {"tree_nodes": 12, "predicted": {"speedup": 1.38, "baseline_step_time": 0.0284},
                                               "measured": {"speedup": 1.31, "baseline_step_time": 0.0262}})
    assert format_value("baseline_moved", row["baseline_moved"]) == "-8%"
