"""Dynamic trees under `--tree auto` (EAGLE-2/3): the expansion the search reads τ from is the proposer's own
drafting, the knobs round-trip through specs and run folders, and the chosen knobs decode losslessly.

Shipped EAGLE heads on the real model; tiny settings (a couple of prompts, a few tokens, 2 profile rounds).
"""

import json

import torch
import pytest

from medusa_bench.bench import calibrate as cal
from medusa_bench.bench.autotree import AutoTreeSettings, size_tree, summary_rows, tree_records
from medusa_bench.bench.build import build_decoder
from medusa_bench.bench.dynamic_search import DynamicTables, choose, knob_grid
from medusa_bench.decoders import registry
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.errors import UserError
from medusa_bench.inputs.chat import build_prompt
from medusa_bench.trees.dynamic import DynamicKnobs, accepted

TINY = dict(prompts=1, tokens=10, turns=1, max_nodes=6, max_depth=2, repeats=2, warmup=0, context_len=48)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> AutoTreeSettings:
    """Tiny search settings, one cache for the module: measured once, reused after (min_speedup 0: knobs are chosen)."""
    return AutoTreeSettings(**TINY, cache_dir=str(tmp_path_factory.mktemp("trees")), min_speedup=0.0)


def walk(tokens: list[int], parents: list[int], truth: list[int]) -> int:
    """Drafts greedy decoding accepts from one drafted tree: its longest path equal to `truth`."""
    node = count = 0
    while count < len(truth):
        children = [c for c in range(len(tokens)) if parents[c] == node and tokens[c] == truth[count]]
        if not children:
            break
        node, count = children[0], count + 1
    return count


@pytest.mark.parametrize("name", ["eagle2", "eagle3"])
def test_expansion_accepts_what_the_proposer_drafts(smollm, name):
    """At every answer position, the τ the search reads off one expansion equals what `propose` drafts there."""
    decoder = registry.build_decoder(name, smollm, DecoderOptions(tree="dynamic-n9-d3-k2"))
    prompts = cal.pick(cal.read_prompts(cal.default_prompt_file()), 2)
    (ids, prompt_len), = cal.greedy_sequences(smollm, prompts[:1], 16, turns=1)
    hidden = cal.last_hidden(smollm, ids, decoder.proposer.feature_layers)
    positions = torch.arange(prompt_len - 1, len(ids) - 2)
    for knobs in (DynamicKnobs(9, 3, 2), DynamicKnobs(6, 2, 4), DynamicKnobs(4, 3, 1)):
        proposer = decoder.sizing.dynamic(knobs)
        drafted = accepted(proposer.expansion(hidden, torch.tensor(ids), positions, knobs.depth, knobs.top_k),
                           knobs.nodes, knobs.depth).tolist()
        for i, t in enumerate(positions.tolist()):
            proposer.reset([])
            proposer.observe(hidden[:t])
            draft = proposer.propose(ids[t + 1], hidden[t], ids[: t + 1])
            assert draft.tokens.shape[0] == min(knobs.nodes, draft.tokens.shape[0])
            assert walk(draft.tokens.tolist(), draft.buffers.parents.tolist(), ids[t + 2:]) == drafted[i], (knobs, t)


def test_knob_specs_and_grid():
    knobs = DynamicKnobs.parse("dynamic-n60-d5-k10")
    assert (knobs.nodes, knobs.depth, knobs.top_k) == (60, 5, 10) and knobs.tree().num_nodes == 60
    assert knobs.tree().depth == 5 and DynamicKnobs.parse(knobs.tree()) == knobs and DynamicKnobs.parse("chain-3") is None
    with pytest.raises(UserError, match="depth of at most 3"):
        DynamicKnobs.parse("dynamic-n4-d5-k2")
    grid = knob_grid(16, 4)
    assert all(k.nodes <= 16 and k.depth <= 4 and k.nodes - 1 <= k.top_k + (k.depth - 1) * k.top_k ** 2 for k in grid)
    assert {k.top_k for k in grid} == {1, 2, 4, 8} and DynamicKnobs(5, 4, 1) in grid


def test_choice_needs_to_beat_its_noise():
    """The fastest knobs are taken only when they beat 1 + their own noise."""
    grid = [DynamicKnobs(3, 2, 1), DynamicKnobs(5, 2, 2)]
    tables = DynamicTables([10] * 8, {grid[0].name: [6] * 8, grid[1].name: [5] * 8},
                           {grid[0].name: [1.2, 1.19, 1.21], grid[1].name: [1.4, 1.3, 1.5]}, 0.05)
    search = choose(tables, grid)
    assert search.knobs == grid[1] and search.choice.speedup == pytest.approx(2.0 / 1.4)  # τ 2.0 per 1.4× the step
    slow = DynamicTables([10] * 8, {grid[0].name: [9] * 8, grid[1].name: [9] * 8},
                         {grid[0].name: [1.1, 1.0, 1.2], grid[1].name: [1.2, 1.1, 1.3]}, 0.05)
    assert choose(slow, grid).knobs is None and choose(slow, grid).tree.num_nodes == 1


def test_the_screens_best_timed_again_choose_and_predict():
    """The winner's curse: a knob set the screen timed cheap by chance loses on its fresh rounds, and the
    prediction is read from those rounds, the screen's figure kept beside."""
    grid = [DynamicKnobs(3, 2, 1), DynamicKnobs(5, 2, 2), DynamicKnobs(9, 3, 2)]
    steps = {grid[0].name: [6] * 8, grid[1].name: [5] * 8, grid[2].name: [5] * 8}  # τ 1.67, 2.0, 2.0
    screen = {grid[0].name: [1.2, 1.19, 1.21], grid[1].name: [1.25, 1.2, 1.3], grid[2].name: [1.9, 1.8, 2.0]}
    confirmed = {grid[0].name: [1.21, 1.2, 1.22], grid[1].name: [1.6, 1.55, 1.65]}
    tables = DynamicTables([10] * 8, steps, screen, 0.05, {"confirm_repeats": 30}, confirmed)
    assert choose(DynamicTables([10] * 8, steps, screen, 0.05), grid).knobs == grid[1]  # the screen alone: 1.6×
    search = choose(tables, grid)
    assert search.knobs == grid[0] and search.choice.speedup == pytest.approx((10 / 6) / 1.21)
    assert search.choice.noise["step_ratio"] == pytest.approx(0.01 / 1.21, abs=1e-4)  # the fresh rounds' interval
    assert "timed again on 30 fresh rounds" in search.choice.reason
    best, second, third = search.choice.table
    assert (best["knobs"], best["screen_speedup"]) == (grid[0].name, pytest.approx((10 / 6) / 1.2))
    assert second["knobs"] == grid[1].name and second["speedup"] == pytest.approx(2.0 / 1.6) and "confirmed" not in third
    assert DynamicTables.from_json(tables.to_json()) == tables


def test_auto_sizes_the_dynamic_tree_and_decodes_losslessly(smollm, tiny):
    options = DecoderOptions(extra={"autotree": tiny})
    auto = size_tree("eagle2", smollm, options)
    knobs = DynamicKnobs.parse(auto.tree)
    assert knobs is not None and auto.tree.num_nodes == knobs.nodes <= 6 and knobs.depth <= 2
    assert (auto.folder / "dynamic.json").is_file()
    assert auto.tree_json()["search"]["tau_statistic"].startswith("dynamic trees replayed")
    assert summary_rows(auto)[0]["knobs"] == knobs.name  # the table's best row is the chosen one (margin 0)
    tables = DynamicTables.from_json(json.loads((auto.folder / "dynamic.json").read_text()))
    assert len(tables.confirmed) == 4 and knobs.name in tables.confirmed  # the screen's best 4, timed again
    assert auto.result.choice.step_time == pytest.approx(tables.baseline_step_time * tables.confirmed[knobs.name][0])
    assert size_tree("eagle2", smollm, options).reused  # cached

    decoder = build_decoder("eagle2", smollm, options)  # the bench layer builds on the knobs it chose
    assert decoder.proposer.dynamic and decoder.proposer.top_k == knobs.top_k and decoder.proposer.tree.depth == knobs.depth
    record = tree_records({"eagle2": decoder})["eagle2"]
    assert record["name"] == knobs.name and record["auto"]
    again = build_decoder("eagle2", smollm, options, plan={"trees": {"eagle2": {**record, "paths": auto.tree.to_list()}}})
    assert again.proposer.top_k == knobs.top_k  # a resumed run or a Ray worker builds the same knobs
    prompt = build_prompt(smollm, [{"role": "user", "content": "List three fruits."}])
    assert decoder.generate(prompt, 24).token_ids == build_decoder("baseline", smollm).generate(prompt, 24).token_ids


def test_static_eagle_refuses_dynamic_knobs(smollm):
    with pytest.raises(UserError, match="use eagle2"):
        registry.build_decoder("eagle", smollm, DecoderOptions(tree="dynamic-n9-d3-k2"))


def test_a_run_replays_its_dynamic_tree_on_its_own_text(smollm, tiny, tmp_path, capsys, monkeypatch):
    """prediction.json for eagle2:auto: the chosen knobs' τ replayed on the run's answers is the run's τ (a
    lossless greedy decoder drafts exactly the expansion's trees), and `tree --audit` rebuilds the same."""
    import json

    import medusa_bench.models
    from conftest import run_cli
    from medusa_bench.bench.loop import RunConfig, run_benchmark
    from medusa_bench.results.prediction import AUDIT_FILE

    out = tmp_path / "run"
    config = RunConfig(bench="quick", question_ids=["1001", "1004"], max_new_tokens=24, warmup=0, out=out, device="cpu",
                       decoders=["baseline", "eagle2:auto"], options=DecoderOptions(extra={"autotree": tiny}))
    run_benchmark(config, loaded=smollm)
    audit = json.loads((out / AUDIT_FILE).read_text())["eagle2:auto"]
    run = json.loads((out / "run.json").read_text())
    assert run["trees"]["eagle2:auto"]["name"] == audit["knobs"] and audit["knobs"].startswith("dynamic-")
    answers = [json.loads(line)["choices"][0] for line in (out / "model_answer" / "smollm2-135m-eagle2-auto.jsonl").read_text().splitlines()]
    tau = sum(sum(c["new_tokens"]) for c in answers) / sum(sum(c["decoding_steps"]) for c in answers)
    assert audit["replay"]["tau"] == pytest.approx(tau, rel=0.05) and audit["measured"]["tau"] == pytest.approx(tau, abs=1e-4)
    assert {row["knobs"] for row in audit["replay"]["sizes"]} >= {"empty", audit["knobs"]}

    monkeypatch.setattr(medusa_bench.models, "load_model", lambda *args, **kwargs: smollm)
    in_run = json.loads((out / AUDIT_FILE).read_text())
    (out / AUDIT_FILE).unlink()
    code, _, stderr = run_cli(capsys, monkeypatch, "tree", "--audit", out)
    assert code == 0, stderr
    assert json.loads((out / AUDIT_FILE).read_text()) == in_run


def test_a_dynamic_sweep_runs_knob_sets_beside_auto(smollm):
    from medusa_bench.bench.config import DYNAMIC_SWEEP, expand_sweep

    swept = expand_sweep("eagle3:sweep")
    assert swept[0] == "eagle3:auto" and "eagle3:dynamic-n61-d7-k10" in swept and len(swept) == len(DYNAMIC_SWEEP)
    decoder = registry.build_decoder("eagle3:dynamic-n61-d7-k10", smollm)  # EAGLE-3's own default, deeper than --eagle-depth
    assert decoder.proposer.tree.num_nodes == 61 and decoder.proposer.depth == 7 and decoder.proposer.top_k == 10


def test_a_measured_table_sizes_the_dynamic_tree_by_the_static_search(smollm, tmp_path):
    """--calibration X.json has no text to expand the draft on: the static search sizes eagle2's tree, as before."""
    import json

    table = tmp_path / "calibration.json"
    table.write_text(json.dumps({"kind": "independent", "top_k": 2, "accuracy": [[0.6, 0.2], [0.5, 0.1]]}))
    settings = AutoTreeSettings(**TINY, cache_dir=str(tmp_path / "trees"), calibration=str(table))
    auto = size_tree("eagle2", smollm, DecoderOptions(extra={"autotree": settings}))
    assert auto.result.candidates and DynamicKnobs.parse(auto.tree) is None and not (auto.folder / "dynamic.json").exists()
