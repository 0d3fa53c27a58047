"""The optimiser's calibration prompts are held out of training (inputs/calibration.py), and heads trained
on them are named as such wherever their τ prediction is shown (bench/tree_cache.heads_trained_on)."""

import json
from pathlib import Path

import pandas as pd
import pytest

from medusa_bench.bench.audit import verdict
from medusa_bench.bench.tree_cache import heads_trained_on
from medusa_bench.errors import UserError
from medusa_bench.inputs import calibration as cal
from medusa_bench.results.prediction import prediction_notes, prediction_row
from medusa_bench.train.data import record_turns
from medusa_bench.train.distill import describe_data
from medusa_bench.train.prompts import read_prompts as training_prompts

SHIPPED = Path(__file__).resolve().parents[1] / "medusa_bench" / "data" / "heads"


def test_calibration_draws_from_the_held_out_split_only(data_dir, tmp_path):
    path = cal.default_prompt_file()
    everything = cal.read_prompts(path)
    held_out = cal.held_out_texts()
    assert len(held_out) == cal.HELD_OUT
    for count in (16, 32):  # the split keeps the prompts these counts always calibrated on
        assert cal.calibration_prompts(path, count) == cal.pick(everything, count)
        assert set(cal.calibration_prompts(path, count)) <= held_out
    assert set(cal.calibration_prompts(path, 24)) <= held_out
    with pytest.raises(UserError, match=r"^--prompts 65: the default calibration file keeps 64 prompts out of training; "):
        cal.calibration_prompts(path, 65)
    mine = tmp_path / "mine.txt"
    mine.write_text("\n".join(f"prompt {i}" for i in range(100)))
    assert cal.calibration_prompts(mine, 80) == cal.pick([f"prompt {i}" for i in range(100)], 80)  # a file of one's own: any count


def test_training_leaves_the_split_out_and_counts_any_overlap(data_dir, tmp_path):
    path = cal.default_prompt_file()
    kept = training_prompts([path])
    assert len(kept) == len(cal.read_prompts(path)) - cal.HELD_OUT
    assert not {p.turns[0] for p in kept} & cal.held_out_texts()

    one_held_out = sorted(cal.held_out_texts())[0]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"source": path.name, "new_tokens": [3], "finish": ["stop"], "conversations": [
        {"from": "human", "value": text}, {"from": "gpt", "value": "An answer."}]}) for text in (one_held_out, kept[0].turns[0])))
    assert describe_data(data)["calibration_overlap"] == {"conversations": 1, "held_out_prompts": cal.HELD_OUT}


def test_calibration_and_training_read_an_instruction_record_alike():
    # the split compares these texts: one formatter for both sides, so a held-out prompt is never missed
    records = [
        {"instruction": " Sort these. ", "instances": [{"input": " 3, 1, 2 ", "output": "1, 2, 3"}]},
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},  # Alpaca
        {"instruction": "Tell a joke.", "instances": [{"input": "", "output": "..."}]},
    ]
    expected = ["Sort these.\n\n3, 1, 2", "Translate to French.\n\nGood morning", "Tell a joke."]
    assert [cal.prompt_text(r) for r in records] == expected
    assert [record_turns(r) for r in records] == [[text] for text in expected]


def test_heads_trained_on_the_calibration_prompts_are_named(data_dir, tmp_path):
    path = cal.default_prompt_file()
    heads_dir = SHIPPED / "smollm2-135m-medusa"
    # the shipped heads were distilled on all 252 instructions, before the split was held out
    assert heads_trained_on(heads_dir, path) == ("the heads were trained on 252 conversations from "
                                                 "user_oriented_instructions.jsonl, the calibration prompts' file")
    assert heads_trained_on(heads_dir, tmp_path / "never_trained_on.jsonl") is None
    assert heads_trained_on(None, path) is None
    mine = tmp_path / "heads"
    mine.mkdir()
    recipe = {"sources": {path.name: {"conversations": 188}}, "calibration_overlap": {"conversations": 0, "held_out_prompts": 64}}
    (mine / "training.json").write_text(json.dumps({"data_recipe": recipe}))
    assert heads_trained_on(mine, path) is None  # trained on the file, not on its split
    recipe["calibration_overlap"]["conversations"] = 3
    (mine / "training.json").write_text(json.dumps({"data_recipe": recipe}))
    assert heads_trained_on(mine, path) == "the heads were trained on 3 of the calibration prompts"


def test_an_over_predicted_tau_names_the_training_overlap():
    trained_on = "the heads were trained on 252 conversations from user_oriented_instructions.jsonl, the calibration prompts' file"
    audit = {"decoder": "medusa:auto", "tree_nodes": 6, "predicted": {"tau": 1.63, "step_ratio": 1.08, "speedup": 1.51},
             "measured": {"tau": 1.45, "speedup": 1.26, "speedup_ci": [1.20, 1.34], "step_ratio": 1.14},
             "replay": {"tau": 1.45, "hindsight_best": {"n": 6, "speedup_on_text": 1.34, "chosen_on_text": 1.34}},
             "error": {"speedup": -0.164, "tau": -0.113, "step": 0.06}, "noise": {"speedup": 0.03, "tau": 0.02},
             "calibration_trained_on": trained_on}
    assert f"; {trained_on}; on this text the profile gives 1.34× (the text's share -11%, the rest -6%); in hindsight" in verdict(audit)
    under = {**audit, "error": {**audit["error"], "tau": 0.05}}
    assert trained_on not in verdict(under)  # τ under-predicted: the overlap is not what moved it
    notes = prediction_notes(pd.DataFrame([prediction_row("run", "medusa:auto", audit)]))
    assert len(notes) == 1 and notes[0].endswith(f"; {trained_on}. See “Tree optimiser: predicted against measured”.")
