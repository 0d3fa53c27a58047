"""Head training: self-distillation (resume, benchmark refusal), Medusa-1 and Medusa-2 training
(loss goes down, checkpoints load and decode losslessly), early stopping on held-out accuracy,
heads stored in half precision load upcast, EAGLE-3's 7-step training-time test, shipped default
heads, bad inputs."""

import json
import time

import pytest
import torch

from medusa_bench.inputs.chat import build_prompt
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.decoders.registry import build_decoder
from medusa_bench.errors import UserError
from rich.console import Console

from medusa_bench.heads import io
from medusa_bench.heads.common import default_heads
from medusa_bench.heads.eagle import eagle3_layers, load_eagle_heads, new_eagle_heads, save_eagle_heads
from medusa_bench.heads.hydra import HydraHeads, load_hydra_heads, save_hydra_heads
from medusa_bench.heads.medusa import MedusaHeads, load_heads, save_heads
from medusa_bench.models import text_config
from medusa_bench.results import files
from medusa_bench.train.data import base_hidden_states, head_targets, last_hidden, load_sequences, tokenize
from medusa_bench.train.distill import describe_data, distill
from medusa_bench.train.prompts import read_prompts
from medusa_bench.train.instructions import BenchmarkOverlap, bootstrap_instructions
from medusa_bench.train.eagle import EagleFitConfig, batch_loss
from medusa_bench.train.fit import (PLATEAU_DROPS, FitConfig, check_out_folder, evaluate, fit_heads, head_logits,
                                    prepare_positions, summary, train_medusa)
from medusa_bench.train.medusa2 import Medusa2Config, train_medusa2
from medusa_bench.trees.tables import load_calibration

# Head 0 of the shipped heads must reach this top-1 on the base model's answers to prompts they
# never saw. Measured: 0.156 on UNSEEN_PROMPTS (0.18 on the training run's held-out split, see
# calibration.json); untrained heads score 0.0, and a broken or mismatched load about that.
DEFAULT_HEAD0_TOP1_FLOOR = 0.10
UNSEEN_PROMPTS = ["Describe how a bicycle gear works.", "List five tips for keeping houseplants alive.",
                  "Explain what a prime number is, with examples."]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def counting_conversations(n=24):
    """Short, learnable answers: the heads can lower their loss in a few steps."""
    records = []
    for i in range(n):
        start = 3 * i
        answer = f"Here are the numbers from {start} to {start + 12}: " + ", ".join(str(x) for x in range(start, start + 13)) + "."
        records.append({"id": str(i), "conversations": [{"from": "human", "value": f"Count from {start}."}, {"from": "gpt", "value": answer}]})
    return records


def greedy(loaded, decoder, prompt, n=24):
    ids = build_prompt(loaded, [{"role": "user", "content": prompt}])
    return decoder.generate(ids, n).token_ids


@pytest.fixture(scope="module")
def counting_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "count.jsonl", counting_conversations())


@pytest.fixture(scope="module")
def hidden_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hidden"))


@pytest.fixture(scope="module")
def trained(smollm, counting_data, hidden_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("heads") / "count-medusa"
    config = FitConfig(num_heads=3, epochs=3, batch_size=64, lr=3e-3, heldout=0.2, patience=5, hidden_cache=hidden_dir)
    return train_medusa(smollm, counting_data, out, config)


# ------------------------------------------------------------------------------ data


def test_tokenize_masks_assistant_tokens_and_end_of_turn(smollm):
    messages = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"},
                {"role": "user", "content": "Again."}, {"role": "assistant", "content": "Hello again."}]
    seq = tokenize(smollm, messages)
    masked = smollm.tokenizer.decode(seq.ids[seq.mask])
    assert masked == "Hi there!<|im_end|>Hello again.<|im_end|>"
    targets = head_targets(seq, 2)  # head k at t predicts t + k + 2, assistant tokens only
    t = int(seq.mask.nonzero()[0]) - 2
    assert targets[t, 0] == seq.ids[t + 2] and targets[t - 1, 0] == -100


def test_long_sequences_are_truncated_with_a_warning(smollm, counting_data):
    with pytest.warns(UserWarning, match="longer than 45 tokens; truncated"):
        sequences = load_sequences(smollm, counting_data, max_length=45)
    assert sequences and all(len(s) <= 45 for s in sequences)


# ------------------------------------------------------------------------------ bad input


def test_data_without_assistant_turns_is_a_clear_error(smollm, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"conversations": [{"from": "human", "value": "Hello?"}]}])
    with pytest.raises(UserError, match="no assistant turns"):
        load_sequences(smollm, path)


def test_zero_heads_is_a_clear_error(smollm, counting_data, tmp_path):
    with pytest.raises(UserError, match="--heads must be >= 1"):
        train_medusa(smollm, counting_data, tmp_path / "out", FitConfig(num_heads=0))


def test_output_folder_of_another_model_is_refused(smollm, tmp_path):
    other = tmp_path / "vicuna-heads"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"base_model_name_or_path": "lmsys/vicuna-7b-v1.3", "hidden_size": 4096,
                                                   "medusa_num_heads": 5, "medusa_num_layers": 1}))
    with pytest.raises(UserError, match="already holds heads for lmsys/vicuna-7b-v1.3"):
        check_out_folder(other, smollm)


# ------------------------------------------------------------------------------ distill


def test_distill_appends_and_resumes_after_a_kill(smollm, tmp_path):
    prompts = write_jsonl(tmp_path / "tasks.jsonl", [
        {"id": "a", "instruction": "Name a colour.", "instances": [{"input": ""}]},
        {"id": "b", "instruction": "Translate to French.", "instances": [{"input": "Good morning"}]},
        {"question": "Tom has 3 apples and buys 2 more. How many apples does he have?"},
    ])
    out = tmp_path / "distilled.jsonl"
    first = distill(smollm, [prompts], out, max_new_tokens=6, batch_size=2, limit=2)
    assert first.written == 2
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][:25])  # killed while writing the second record
    second = distill(smollm, [prompts], out, max_new_tokens=6, batch_size=2)
    records = files.read_jsonl(out)
    assert second.skipped == 1 and second.written == 2
    assert {r["id"] for r in records} == {"tasks:a", "tasks:b", "tasks:2"}
    assert records[0] == json.loads(lines[0])
    by_id = {r["id"]: r for r in records}
    assert by_id["tasks:b"]["conversations"][0]["value"] == "Translate to French.\n\nGood morning"
    assert [m["from"] for m in by_id["tasks:2"]["conversations"]] == ["human", "gpt"]
    assert distill(smollm, [prompts], out, max_new_tokens=6).written == 0


def test_distill_refuses_benchmark_questions(smollm, tmp_path):
    bench = tmp_path / "mt_bench"
    bench.mkdir()
    with pytest.raises(UserError, match="benchmark question file"):
        distill(smollm, [write_jsonl(bench / "question.jsonl", [{"question_id": 1, "turns": ["x"]}])], tmp_path / "o.jsonl")
    quick = [json.loads(line) for line in open(default_quick_file())][0]["turns"][0]
    sharegpt = write_jsonl(tmp_path / "mine.jsonl", [{"conversations": [{"from": "human", "value": quick}]}])
    with pytest.raises(UserError, match="benchmark questions"):
        distill(smollm, [sharegpt], tmp_path / "o.jsonl")


def test_distill_extends_conversations_with_model_follow_ups(smollm, tmp_path):
    prompts = write_jsonl(tmp_path / "tasks.jsonl", [
        {"id": "a", "instruction": "Name three fruits.", "instances": []},
        {"id": "b", "instruction": "Explain what a noun is.", "instances": []},
    ])
    first = distill(smollm, [prompts], tmp_path / "turn1.jsonl", max_new_tokens=12, batch_size=2)
    out = tmp_path / "two_turns.jsonl"
    second = distill(smollm, [], out, extend=(first.out,), follow_up="model", max_new_tokens=8, batch_size=2)
    assert second.written == 2 and 0 < second.new_tokens <= 16  # only the new turns count
    before = {r["id"]: r for r in files.read_jsonl(first.out)}
    for record in files.read_jsonl(out):
        turns = record["conversations"]
        assert [m["from"] for m in turns] == ["human", "gpt", "human", "gpt"]
        assert turns[:2] == before[record["id"]]["conversations"]  # the first answer is kept, not redone
        assert record["new_tokens"][0] == before[record["id"]]["new_tokens"][0] and len(record["new_tokens"]) == 2
        assert record["follow_up"] in ("model", "generic") and len(turns[2]["value"].split()) >= 4
        assert record["dtype"] == "float32"
    assert distill(smollm, [], out, extend=(first.out,), follow_up="model", max_new_tokens=8).written == 0  # resumes
    recipe = describe_data(out)
    assert recipe["user_turns"] == {"2": 2} and recipe["answer_tokens"] == second.new_tokens + sum(
        r["new_tokens"][0] for r in before.values())
    assert recipe["benchmark_overlap"]["conversations"] == 0
    assert recipe["calibration_overlap"] in (None, {"conversations": 0, "held_out_prompts": 64})  # None: no data folder
    with pytest.raises(UserError, match="not a `medusa-bench distill` output"):
        distill(smollm, [], tmp_path / "x.jsonl", extend=(prompts,), follow_up="model")
    with pytest.raises(UserError, match="valid values are none, generic, model"):
        distill(smollm, [prompts], tmp_path / "x.jsonl", follow_up="yes")


def test_benchmark_overlap_catches_copies_and_near_copies():
    overlap = BenchmarkOverlap({"Compose an engaging travel blog post about a recent trip to Hawaii, highlighting "
                                "cultural experiences and must-see attractions."})
    assert overlap("Write an engaging travel blog post about a recent trip to Hawaii, highlighting the food.")
    assert overlap("compose an ENGAGING travel blog post about a recent trip to Hawaii")  # an 8-word run
    assert not overlap("Write a travel blog post about Norway.")
    assert not overlap("List three prime numbers and explain why they are prime.")
    mt_bench = BenchmarkOverlap()  # the local MT-Bench / Spec-Bench / quick bench turns
    assert mt_bench.turns > 80 and mt_bench(default_quick_turn())


def test_bootstrap_instructions_filters_and_resumes(smollm, tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [
        {"id": "1", "instruction": "Write a poem about the sea.", "instances": []},
        {"id": "2", "instruction": "Give three tips for saving money.", "instances": []},
        {"id": "3", "instruction": "Explain how a rainbow forms.", "instances": []},
        {"id": "4", "instruction": "Suggest a name for a bakery.", "instances": []},
    ])
    out = tmp_path / "bootstrap.jsonl"
    tally = bootstrap_instructions(smollm, [seeds], 2, out, batch_size=4)
    assert tally["total"] == 2 and tally["generated"] == sum(tally[k] for k in ("kept", "near_copy", "bad_length", "benchmark_overlap"))
    again = bootstrap_instructions(smollm, [seeds], 3, out, batch_size=4)
    records = files.read_jsonl(out)
    assert again["total"] == 3 == len(records) and again["kept"] >= 1
    texts = [r["instruction"] for r in records]
    assert len(set(texts)) == 3 and all(4 <= len(t.split()) <= 60 and "\n" not in t for t in texts)
    assert [p.turns[0] for p in read_prompts([out])] == texts  # distill reads it like self_instruct


def default_quick_turn():
    return [json.loads(line) for line in open(default_quick_file())][0]["turns"][0]


def default_quick_file():
    from importlib import resources

    return str(resources.files("medusa_bench") / "data" / "quick_question.jsonl")


# ------------------------------------------------------------------------------ training


def test_medusa1_training_lowers_the_loss_and_writes_a_lossless_checkpoint(smollm, trained):
    curve = trained.curve
    assert curve[-1]["train_loss"] < curve[0]["train_loss"]
    folder = trained.out
    for name in ("config.json", "medusa_lm_head.safetensors", "calibration.json", "curve.csv", "training.json", "draft_vocab.json"):
        assert (folder / name).is_file(), name
    calibration = load_calibration(folder / "calibration.json")
    assert calibration.kind == "independent" and len(calibration.accuracy) == 3
    assert calibration.accuracy[0][0] == pytest.approx(trained.best["top1_head0"], abs=1e-3)
    heads = load_heads(folder, base_model=smollm.model)
    assert heads.num_heads == 3 and heads.shares_lm_head
    stored = io.load_tensors(folder / "medusa_lm_head.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}  # the default --save-dtype
    assert heads.res_weight.dtype == torch.float32  # upcast to the fp32 base on loading
    training = json.loads((folder / "training.json").read_text())
    assert training["stopping"]["stopped"] in ("converged", "max epochs")
    assert training["stopping"]["evaluations"] == len(curve) == len((folder / "curve.csv").read_text().splitlines()) - 1
    baseline = build_decoder("baseline", smollm)
    medusa = build_decoder("medusa", smollm, DecoderOptions(tree="[[0],[1],[0,0],[0,0,0]]", medusa_heads=str(folder)))
    for prompt in ("Count from 30.", "Write one sentence about rain."):
        assert greedy(smollm, medusa, prompt) == greedy(smollm, baseline, prompt)


def test_medusa2_init_heads_must_match(smollm, trained, counting_data, hidden_dir, tmp_path):
    with pytest.raises(UserError, match="has 3 heads"):
        train_medusa2(smollm, counting_data, tmp_path / "m2", Medusa2Config(num_heads=4, init_heads=str(trained.out), hidden_cache=hidden_dir))


def test_medusa2_adapter_trains_loads_and_decodes_losslessly(smollm, counting_data, tmp_path):
    out = tmp_path / "count-medusa2"
    config = Medusa2Config(num_heads=3, warmup_epochs=1, epochs=1, batch_size=4, lr=1e-3, lora_layers=1,
                           heldout=0.2, max_length=40, hidden_cache=str(tmp_path / "hidden"))
    result = train_medusa2(smollm, counting_data, out, config)
    assert {"adapter_config.json", "adapter_model.safetensors", "medusa_lm_head.safetensors", "calibration.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "smollm2-135m"
    assert result.best["heldout_kl"] >= 0 and result.info["stopping"]["evaluations"] == len(result.curve)
    assert {t.dtype for t in io.load_tensors(out / "adapter_model.safetensors").values()} == {torch.bfloat16}
    options = DecoderOptions(tree="chain-2", medusa2_model=str(out))
    medusa2, reference = build_decoder("medusa2", smollm, options), build_decoder("medusa2-baseline", smollm, options)
    assert medusa2.loaded.model is not smollm.model  # the LoRA is merged into a copy; the base is untouched
    assert not any(p.requires_grad for p in smollm.model.parameters())
    assert greedy(smollm, medusa2, "Count from 40.") == greedy(smollm, reference, "Count from 40.")


def test_early_stopping_stops_on_an_accuracy_plateau_and_keeps_the_best_weights(smollm, counting_data, hidden_dir):
    # min_delta 1.0: no later evaluation counts as a gain, so the first one (step 2) stays the best;
    # each plateau (patience 1) drops the learning rate, the plateau after the last drop stops.
    config = FitConfig(num_heads=2, epochs=50, batch_size=32, lr=3e-3, heldout=0.2, eval_every=2, patience=1,
                       min_delta=1.0, hidden_cache=hidden_dir)
    train, held, _ = prepare_positions(smollm, counting_data, config, Console(quiet=True))
    heads = MedusaHeads.for_model(smollm.model, 2, 1)
    heads.requires_grad_(True)
    curve, stopping = fit_heads(heads, train, held, config)
    assert stopping["stopped"] == "converged" and stopping["best_step"] == 2
    assert [row["steps"] for row in curve] == [2 * (i + 1) for i in range(PLATEAU_DROPS + 2)]
    assert curve[-1]["lr"] < curve[1]["lr"] == curve[0]["lr"]  # dropped on each plateau
    kept = summary(evaluate(heads, held, config.top_k))
    last = curve[-1]
    assert kept == {k: curve[0][k] for k in kept}  # the weights of the best (first) evaluation, not the last
    assert kept["heldout_loss"] != last["heldout_loss"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_heads_stored_in_half_precision_load_upcast_to_the_base_dtype(smollm, tmp_path, dtype):
    def check(heads, stored: dict):
        floats = [p for p in heads.state_dict().values() if p.is_floating_point()]
        assert floats and all(p.dtype == torch.float32 for p in floats)
        assert all(t.dtype == dtype for t in stored.values() if t.is_floating_point())

    medusa = MedusaHeads.for_model(smollm.model, 2, 1)
    save_heads(medusa.to(dtype), tmp_path / "medusa")
    loaded = load_heads(tmp_path / "medusa", base_model=smollm.model)
    check(loaded, io.load_tensors(tmp_path / "medusa" / "medusa_lm_head.safetensors"))
    assert torch.equal(loaded.res_weight, medusa.res_weight.float())

    hydra = HydraHeads.for_model(smollm.model, 2, 1, "mlp")
    path = save_hydra_heads(hydra, tmp_path / "hydra", dtype=dtype)
    assert path.name == "hydra_lm_head.safetensors"
    stored = io.load_tensors(path)
    check(load_hydra_heads(tmp_path / "hydra", base_model=smollm.model), stored)
    io.save_tensors(tmp_path / "hydra" / "hydra_lm_head.pt", stored)  # the format shipped before: still read
    path.unlink()
    old = load_hydra_heads(tmp_path / "hydra", base_model=smollm.model)
    check(old, stored)
    assert all(torch.equal(old.hydra_state_dict()[k], v.float()) for k, v in stored.items())

    for variant in ("eagle", "eagle3"):
        heads = new_eagle_heads(smollm.model, variant, torch.arange(64) if variant == "eagle3" else None)
        path = save_eagle_heads(heads, tmp_path / variant, dtype=dtype)
        check(load_eagle_heads(tmp_path / variant, smollm.model), io.load_tensors(path))


def test_heads_stored_in_int8_load_as_the_round_trip_predicts(smollm, tmp_path):
    """`heads compress` on every format at the real model's sizes: the loaders give exactly the
    weights io.round_trip computes (what trainers measure held-out accuracy on), half the bytes of bf16."""
    import copy

    def noisy(module):
        torch.manual_seed(0)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        return module

    cases = [
        (noisy(MedusaHeads.for_model(smollm.model, 2, 1)), save_heads, lambda f: load_heads(f, base_model=smollm.model),
         lambda h: h.medusa_state_dict()),
        (noisy(HydraHeads.for_model(smollm.model, 2, 1, "mlp")), save_hydra_heads,
         lambda f: load_hydra_heads(f, base_model=smollm.model), lambda h: h.hydra_state_dict()),
        (noisy(new_eagle_heads(smollm.model, "eagle3", torch.arange(64))), save_eagle_heads,
         lambda f: load_eagle_heads(f, smollm.model), lambda h: h.eagle_state_dict()),
    ]
    for k, (heads, save, load, state) in enumerate(cases):
        folder = tmp_path / str(k)
        path = save(heads.to(torch.bfloat16), folder)
        half = path.stat().st_size
        save(heads.float(), folder)
        assert io.compress_folder(folder) == [path]
        assert path.stat().st_size < 0.55 * half
        expected = state(io.round_trip(copy.deepcopy(heads), "int8"))
        got = state(load(folder))
        assert set(got) == set(expected) and all(torch.equal(got[n].float(), expected[n].float()) for n in expected), type(heads).__name__


def test_int8_storage_from_a_trainer_reports_the_accuracy_of_what_it_wrote(smollm, counting_data, hidden_dir, tmp_path):
    from safetensors import safe_open

    config = FitConfig(num_heads=2, epochs=1, batch_size=64, lr=3e-3, heldout=0.2, save_dtype="int8", hidden_cache=hidden_dir)
    result = train_medusa(smollm, counting_data, tmp_path / "m", config)
    with safe_open(str(tmp_path / "m" / "medusa_lm_head.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"I8", "F32", "BF16"}  # matrices, scales, biases
    _, held, _ = prepare_positions(smollm, counting_data, config, Console(quiet=True))
    assert summary(evaluate(load_heads(tmp_path / "m", base_model=smollm.model), held, config.top_k)) == result.best


def test_medusa2_int8_checks_the_heads_it_writes(smollm, counting_data, tmp_path, monkeypatch):
    """Medusa-2's held-out check runs on the int8 round trip of its heads (it used to run on bf16):
    exactly the heads loading its folder gives (#36)."""
    from medusa_bench.train import medusa2
    from medusa_bench.train.fit import FitResult

    config = Medusa2Config(num_heads=2, lora_layers=1, save_dtype="int8")
    sequences = load_sequences(smollm, counting_data)[:2]
    held = list(zip(sequences, base_hidden_states(smollm, sequences, False, None)))
    student = medusa2.make_student(smollm.model, config)
    heads = MedusaHeads.for_model(smollm.model, 2, 1)
    torch.manual_seed(0)
    with torch.no_grad():  # trained-looking weights: int8 and bf16 round them differently
        heads.res_weight.add_(torch.randn_like(heads.res_weight) * 0.02)
    heads.attach_lm_head(medusa2.lm_head_of(student))
    checked = []
    evaluate_joint = medusa2.evaluate_joint
    monkeypatch.setattr(medusa2, "evaluate_joint", lambda s, h, *rest: checked.append(h) or evaluate_joint(s, h, *rest))
    result = FitResult(tmp_path / "m2", [], info={"data": str(counting_data)})
    medusa2.write_medusa2(student, heads, smollm, tmp_path / "m2", held, config, result)
    written = load_heads(tmp_path / "m2", base_model=smollm.model).medusa_state_dict()
    measured = checked[0].medusa_state_dict()
    assert set(written) == set(measured) and all(torch.equal(written[k], measured[k].float()) for k in written)


def test_eagle3_trains_a_step_with_the_papers_seven_ttt_steps(smollm, counting_data):
    sequences = load_sequences(smollm, counting_data)[:2]
    layers = (*eagle3_layers(text_config(smollm.model.config).num_hidden_layers), -1)
    batch = list(zip(sequences, base_hidden_states(smollm, sequences, False, None, layers)))
    draft = torch.unique(torch.cat([seq.ids for seq in sequences]))  # every token of the data is draftable
    torch.manual_seed(0)
    heads = new_eagle_heads(smollm.model, "eagle3", draft)
    heads.requires_grad_(True)
    heads.decoder.get_input_embeddings().requires_grad_(False)
    config = EagleFitConfig(variant="eagle3", ttt_steps=7, draft_vocab=draft.numel())
    assert config.steps == 7
    loss = batch_loss(heads, batch, None, config)
    with torch.no_grad():  # depth 7 adds a term of its own
        assert batch_loss(heads, batch, None, EagleFitConfig(variant="eagle3", ttt_steps=6)) < loss
    optimiser = torch.optim.AdamW([p for p in heads.parameters() if p.requires_grad], lr=1e-3)
    loss.backward()
    assert torch.isfinite(loss) and heads.fc.weight.grad.abs().sum() > 0 and heads.lm_head.weight.grad.abs().sum() > 0
    optimiser.step()
    with torch.no_grad():
        assert batch_loss(heads, batch, None, config) < loss


# ------------------------------------------------------------------------------ shipped defaults


def test_shipped_default_heads_load_and_predict_unseen_answers(smollm):
    folder = default_heads(smollm, "medusa")
    assert folder is not None, "medusa_bench/data/heads/smollm2-135m-medusa is missing"
    heads = load_heads(folder, base_model=smollm.model)
    baseline = build_decoder("baseline", smollm)
    hits = total = 0
    for prompt in UNSEEN_PROMPTS:
        prompt_ids = build_prompt(smollm, [{"role": "user", "content": prompt}])
        ids = torch.tensor(prompt_ids + greedy(smollm, baseline, prompt, 48))
        hidden = last_hidden(smollm.model, ids)  # [T, H]
        with torch.no_grad():
            top1 = head_logits(heads, hidden[len(prompt_ids) - 1: -2]).argmax(-1)[0]  # head 0 at t predicts t + 2
        hits += int((top1 == ids[len(prompt_ids) + 1:]).sum())
        total += top1.numel()
    assert hits / total > DEFAULT_HEAD0_TOP1_FLOOR


def test_shipped_medusa2_adapter_is_lossless_against_its_backbone(smollm):
    assert default_heads(smollm, "medusa2") is not None, "medusa_bench/data/heads/smollm2-135m-medusa2 is missing"
    medusa2, reference = build_decoder("medusa2", smollm, DecoderOptions(tree="chain-2")), build_decoder("medusa2-baseline", smollm)
    prompt = UNSEEN_PROMPTS[0]
    assert greedy(smollm, medusa2, prompt) == greedy(smollm, reference, prompt)
