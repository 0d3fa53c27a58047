"""`--tree auto` and `medusa-bench tree`: calibration statistics, profiling, cache, run folder files.

The search itself (optimality, budget choice, file formats) is tested in test_tree_search.py.
Everything here runs tiny settings (a prompt or two, a few tokens, trees of <= 3 nodes).
"""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from conftest import run_cli as cli
from medusa_bench.bench import autotree
from medusa_bench.bench import calibrate as cal
from medusa_bench.bench.autotree import AutoTreeSettings, auto_tree, store_in_run
from medusa_bench.bench.build import build_decoder
from medusa_bench.bench.loop import RunConfig, run_benchmark
from medusa_bench.decoders import registry
from medusa_bench.decoders.medusa import MedusaProposer
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.errors import UserError
from medusa_bench.heads.medusa import MedusaHeads, load_heads, save_heads
from medusa_bench.inputs.chat import build_prompt
from medusa_bench.trees.ranks import statistics_of
from medusa_bench.trees.tables import conditional_prob, load_calibration, load_latency
from medusa_bench.trees.tree import Tree

TINY = dict(prompts=1, tokens=8, max_nodes=3, repeats=2, warmup=0, context_len=64)


@pytest.fixture(scope="module")
def heads_dir(smollm, tmp_path_factory):
    """Random heads through the shared lm_head (quality is irrelevant to the mechanics)."""
    torch.manual_seed(0)
    heads = MedusaHeads(num_heads=3, hidden_size=smollm.hidden_size, vocab_size=None)
    with torch.no_grad():
        heads.res_weight.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("heads")
    save_heads(heads, folder, format="v2", base_model_name_or_path="smollm2-135m")
    return folder


def good_table(path):
    """A hand-made table under which a chain clearly pays."""
    path.write_text(json.dumps({"kind": "independent", "top_k": 2, "accuracy": [[0.9, 0.05], [0.9, 0.05], [0.9, 0.05]]}))
    return path


# ------------------------------------------------------------------------------ statistics
def test_statistics_are_joint_path_frequencies():
    ranks = torch.tensor([
        [0, 0, 1],
        [0, 1, -1],  # the sequence ended: no depth-3 target
        [1, 0, 0],
        [0, 12, 0],  # rank 12 is outside top-2: nothing below it counts
        [5, 0, 0],
        [0, 0, 0],
    ])
    calib = statistics_of(ranks, top_k=2)
    assert calib.kind == "conditional" and calib.top_k == 2 and calib.samples == 6
    paths = calib.paths
    assert paths[(0,)] == pytest.approx(4 / 6) and paths[(1,)] == pytest.approx(1 / 6)
    assert paths[(0, 0)] == pytest.approx(2 / 4) and paths[(0, 1)] == pytest.approx(1 / 4)
    assert paths[(0, 0, 1)] == pytest.approx(1 / 2) and paths[(1, 0, 0)] == 1.0
    prob = conditional_prob(paths)
    assert prob((0, 0)) == pytest.approx(2 / 6)  # product along the path = joint frequency
    assert prob((0, 0, 0)) == pytest.approx(1 / 6)
    assert calib.meta["top1"] == [pytest.approx(x, abs=1e-4) for x in (4 / 6, 4 / 6, 4 / 5)]  # marginals
    assert calib.meta["positions"] == [6, 6, 5]
    assert statistics_of(torch.tensor([[7, 7]]), top_k=2).paths == {(0,): 0.0}  # never right: still a valid table
    with pytest.raises(UserError, match="no positions"):
        statistics_of(torch.full((3, 2), -1), top_k=2)


def test_prompt_files_in_the_common_formats(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    rows = [{"instruction": "Fix this.", "instances": [{"input": "teh cat", "output": "x"}]},
            {"question": "Why?"}, {"turns": ["First turn", "second"]},
            {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "Hi there"}]}]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert cal.read_prompts(jsonl) == ["Fix this.\n\nteh cat", "Why?", "First turn", "Hi there"]
    text = tmp_path / "p.txt"
    text.write_text("one\n\ntwo\n")
    assert cal.read_prompts(text) == ["one", "two"]
    assert cal.pick(list("abcdefgh"), 4) == ["a", "c", "e", "g"] and cal.pick(["a"], 16) == ["a"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(UserError, match="no prompts"):
        cal.read_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"nothing": 1}\n')
    with pytest.raises(UserError, match="line 1: no prompt"):
        cal.read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"prompt": \n')
    with pytest.raises(UserError, match="not valid JSON"):
        cal.read_prompts(tmp_path / "broken.jsonl")


def test_default_prompts_are_self_instruct_not_benchmark_questions(data_dir):
    path = cal.default_prompt_file()
    assert "self_instruct" in str(path)
    prompts = cal.read_prompts(path)
    questions = {t for line in (data_dir / "mt_bench" / "question.jsonl").read_text().splitlines()
                 for t in json.loads(line)["turns"]}
    assert len(prompts) > 100 and not questions & set(prompts)


def test_medusa_true_ranks_match_a_slow_reference(smollm, heads_dir):
    heads = load_heads(heads_dir, base_model=smollm.model)
    ids = build_prompt(smollm, [{"role": "user", "content": "Count to five."}])[:20]
    hidden = cal.last_hidden(smollm, ids)  # [S, H]
    tokens = torch.tensor(ids)
    positions = torch.tensor([3, 10, 16, 17])

    def slow(vocab=None):
        """Rank among the drafted candidates, one position and head at a time; top_k = not drafted."""
        out = torch.full((len(positions), 3), -1)
        for i, t in enumerate(positions.tolist()):
            logits = heads.draft_logits(hidden[t], head=slice(3))  # [3, V]
            for d in range(3):
                target = t + 2 + d
                if target < len(ids):
                    allowed = torch.tensor(vocab) if vocab is not None else torch.arange(logits.shape[-1])
                    inside = bool((allowed == ids[target]).any())
                    rank = int((logits[d, allowed] > logits[d, ids[target]]).sum()) if inside else 50
                    out[i, d] = min(rank, 50)
        return out

    ranks = cal.medusa_true_ranks(heads, hidden, tokens, positions, depth=3, top_k=50)
    assert torch.equal(ranks, slow()) and (ranks == -1).any()
    proposer = MedusaProposer(heads, Tree.chain(3), smollm.device)
    assert torch.equal(cal.true_ranks(proposer, hidden, tokens, positions, 3, 50), ranks)
    # A restricted draft vocabulary: ranks count only drafted tokens, the rest are misses.
    vocab = sorted(set(range(0, 49152, 3)) | set(ids[:12]))
    heads.restrict_draft_vocab(torch.tensor(vocab))
    try:
        assert torch.equal(cal.medusa_true_ranks(heads, hidden, tokens, positions, depth=3, top_k=50), slow(vocab))
    finally:
        heads.restrict_draft_vocab(None)
    with pytest.raises(UserError, match="true_ranks"):
        cal.true_ranks(object(), hidden, tokens, positions, 3, 50)


# ------------------------------------------------------------------------------ refusals
def test_auto_without_heads_is_refused(smollm):
    nameless = replace(smollm, name="model-without-default-heads")
    with pytest.raises(UserError, match="needs heads: pass --medusa-heads"):
        build_decoder("medusa:auto", nameless, DecoderOptions())
    with pytest.raises(UserError, match="'baseline' drafts on no tree; the tree optimiser sizes trees for .*medusa"):
        autotree.size_tree("baseline", smollm, DecoderOptions())


def test_auto_is_resolved_in_the_bench_layer_the_registry_builds_concrete_trees(smollm, heads_dir, monkeypatch):
    """Every tree decoder defaults to auto; the registry refuses it (it has no model to measure on), the bench
    builds it, and a plan's tree (a Ray worker's device type, measured once) is built without measuring."""
    assert DecoderOptions().tree == "auto"
    assert {"medusa", "medusa2", "hydra", "eagle", "eagle2", "eagle3"} <= set(registry.tree_decoders())
    assert not {"baseline", "control", "pld", "medusa2-baseline"} & set(registry.tree_decoders())
    options = DecoderOptions(medusa_heads=str(heads_dir))
    with pytest.raises(UserError, match="'medusa': --tree auto is measured .* by the bench layer"):
        registry.build_decoder("medusa", smollm, options)
    monkeypatch.setattr("medusa_bench.bench.build.size_tree", lambda *a: pytest.fail("measured despite the plan"))
    planned = build_decoder("medusa", smollm, options, plan={"trees": {"medusa": {"auto": True, "paths": [[0], [0, 0]]}}})
    assert planned.proposer.tree == Tree.chain(2) and planned.autotree is None
    assert build_decoder("baseline", smollm).draft_size == 0  # no tree to size: built at once


def test_bad_settings_and_calibration_files_are_clear(smollm, heads_dir, tmp_path):
    with pytest.raises(UserError, match="max-nodes must be >= 1"):
        AutoTreeSettings(max_nodes=0)
    options = lambda **kw: DecoderOptions(tree="auto", medusa_heads=str(heads_dir),  # noqa: E731
                                          extra={"autotree": AutoTreeSettings(cache_dir=str(tmp_path), **TINY, **kw)})
    with pytest.raises(UserError, match="--calibration .*not found"):
        build_decoder("medusa", smollm, options(calibration=str(tmp_path / "missing.jsonl")))  # bench/build.py: auto
    bad = tmp_path / "calibration.json"
    bad.write_text(json.dumps({"kind": "independent", "accuracy": [[0.9, 0.5]]}))
    with pytest.raises(UserError, match="sums to 1.400"):
        build_decoder("medusa", smollm, options(calibration=str(bad)))


def test_resuming_with_another_tree_is_refused(tmp_path):
    decoder = SimpleNamespace(proposer=SimpleNamespace(tree=Tree.chain(2)), autotree=None, step_profile=None)  # what SpeculativeDecoder declares
    previous = {"trees": {"medusa:auto": {"hash": "0123456789ab"}}}
    with pytest.raises(UserError, match="another tree for medusa:auto"):
        store_in_run(tmp_path, {"medusa:auto": decoder}, previous)
    store_in_run(tmp_path, {"medusa:auto": decoder}, {"trees": {"medusa:auto": {"hash": Tree.chain(2).hash}}})


# ------------------------------------------------------------------------------ end to end
def test_auto_measures_caches_and_fills_the_run_folder(smollm, heads_dir, tmp_path, monkeypatch, data_dir):
    settings = AutoTreeSettings(cache_dir=str(tmp_path / "cache"), **TINY)
    heads = load_heads(heads_dir, base_model=smollm.model)
    make = lambda tree: MedusaProposer(heads, tree, smollm.device)  # noqa: E731
    lines = []
    first = auto_tree(smollm, make, heads_dir, heads.num_heads, settings=settings, log=lines.append)
    assert not first.reused and any("calibrating" in line for line in lines)
    tree = first.tree
    tree.check_fits(num_heads=3)
    assert tree.num_nodes <= 3 and set(first.latency.step_time) == {1, 2, 3}
    contexts = first.latency.meta["contexts"]  # chat contexts spread around context_len, cut inside an answer
    assert 1 <= len(contexts) <= 3 and first.latency.context_len == round(sum(contexts) / len(contexts))
    assert set(first.latency.meta["ratio_ci"]) == {"2", "3"} and first.latency.device.startswith("cpu")
    confirmed = first.latency.meta["confirmed"]  # the screen's best sizes timed again: they choose and predict
    assert set(confirmed["ratios"]) == {"2", "3"} and confirmed["repeats"] == 3 * settings.repeats
    for n, record in confirmed.get("shallower", {}).items():  # and each one level shallower, where the size fits
        assert len(record["tree"]) + 1 == int(n) and max(map(len, record["tree"])) == max(map(len, confirmed["trees"][n])) - 1
    assert "3" in confirmed.get("shallower", {}) or max(map(len, confirmed["trees"]["3"])) == 1
    if first.result.choice.n > 1:
        ratio = confirmed["ratios"][str(first.result.choice.n)][0]
        assert first.result.choice.step_time == pytest.approx(first.latency.baseline_step_time * ratio)
    timed_again = [row for row in autotree.summary_rows(first) if "screen_speedup" in row]
    assert {row["n"] for row in timed_again} == {2, 3}  # with the screen's figure beside
    marks = list(autotree.summary_table(first).columns[-1]._cells)  # `tree`'s table marks them
    assert len(marks) == len(autotree.summary_rows(first)) and set(marks) <= {"← chosen", "re-timed", ""}
    assert marks.count("re-timed") == 2 - (first.result.choice.n > 1)
    assert first.calibration.kind == "conditional" and first.calibration.meta["prompts"] == 1
    assert first.calibration.meta["turns"] == 2 and len(first.calibration.answers) == 2  # turn 1 and its follow-up
    assert lines[-1] == f"tree auto: {first.result.choice.reason}"
    if not first.result.choice.beats_baseline:  # random heads: the empty tree, and it says why
        assert tree.num_nodes == 1 and "no tree beats the baseline" in lines[-1]
    for name in ("key", "calibration", "latency", "tree"):
        assert (first.folder / f"{name}.json").is_file()

    # The second call measures nothing: the tables come from the cache.
    def refuse(*args, **kwargs):
        raise AssertionError("measured again instead of reusing the cache")

    monkeypatch.setattr(cal, "calibrate", refuse)
    monkeypatch.setattr(cal, "profile", refuse)
    again = auto_tree(smollm, make, heads_dir, heads.num_heads, settings=settings, log=lines.append)
    assert again.reused and again.tree == tree and again.latency.step_time == first.latency.step_time

    # `run` with a per-decoder auto tree reuses it too and keeps its files beside the answers.
    out = tmp_path / "run"
    config = RunConfig(bench="quick", question_ids=["1005"], max_new_tokens=6, warmup=0, out=out, device="cpu",
                       decoders=["baseline", "medusa:auto"],
                       options=DecoderOptions(medusa_heads=str(heads_dir), extra={"autotree": settings}))
    run_benchmark(config, loaded=smollm)
    saved = json.loads((out / "tree.json").read_text())
    assert Tree.parse(out / "tree.json") == tree and saved["hash"] == tree.hash
    assert saved["search"]["tau"] == pytest.approx(first.result.choice.tau)
    assert [row["n"] for row in saved["candidates"]] == [1, 2, 3]
    assert load_calibration(out / "calibration.json").paths == first.calibration.paths
    assert load_latency(out / "latency.json").step_time == first.latency.step_time
    run = json.loads((out / "run.json").read_text())
    assert run["trees"]["medusa:auto"] == {"name": tree.name, "hash": tree.hash, "num_nodes": tree.num_nodes,
                                           "depth": tree.depth, "auto": True,
                                           "files": {name: f"{name}.json" for name in ("tree", "calibration", "latency")}}
    answers = (out / "model_answer" / "smollm2-135m-medusa-auto.jsonl").read_text().splitlines()
    assert json.loads(answers[0])["choices"][0]["exact_match"] == [True, True]


def test_tree_command_uses_a_given_calibration_table(smollm, heads_dir, tmp_path, monkeypatch, capsys):
    """`--calibration calibration.json` (a table, such as the held-out one heads trained here ship) is used as is."""
    import shutil

    import medusa_bench.models

    monkeypatch.setattr(medusa_bench.models, "load_model", lambda *args, **kwargs: smollm)
    monkeypatch.setenv("MEDUSA_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cal, "calibrate", lambda *a, **k: pytest.fail("measured instead of using calibration.json"))
    heads = shutil.copytree(heads_dir, tmp_path / "heads")
    table = good_table(heads / "calibration.json")
    out = tmp_path / "search" / "tree.json"
    code, stdout, stderr = cli(capsys, monkeypatch, "tree", "--medusa-heads", heads, "--max-nodes", 3, "--prompts", 1,
                               "--repeats", 2, "--context-len", 64, "--device", "cpu", "--out", out, "--calibration", table,
                               "--export", "vllm,trtllm")
    assert code == 0, stderr
    exported = {e: json.loads((out.parent / f"{e}-config.json").read_text()) for e in ("vllm", "trtllm")}
    chosen = json.loads(out.read_text())["tree"]
    assert exported["trtllm"]["config"] == ({"medusa_choices": chosen} if chosen else None)  # the chosen tree, as it is
    assert exported["vllm"]["tree"]["nodes"] == len(chosen) + 1
    saved = json.loads(out.read_text())
    assert saved["autotree"]["calibration"]["file"] == str(table) and f"statistics from {table}" in stderr
    assert saved["tree"] in ([], [[0]], [[0], [0, 0]]) and saved["search"]["reason"] in stderr
    assert (out.parent / "calibration.json").is_file() and (out.parent / "latency.json").is_file()
    assert str(out) in stdout and "pred. τ" in stdout
    assert any(p.name.startswith("smollm2-135m-medusa-") for p in (tmp_path / "cache" / "trees").iterdir())
    code, _, stderr = cli(capsys, monkeypatch, "tree", "--decoder", "baseline", "--out", out)
    assert code == 2 and "drafts on no tree" in stderr
    code, _, stderr = cli(capsys, monkeypatch, "tree", "--decoder", "medusa", "--export", "sglang", "--out", out)
    assert code == 2 and "sglang has no speculative method for 'medusa'" in stderr  # before any measuring


def test_shipped_tables_need_no_data_folder(smollm, tmp_path, monkeypatch):
    """Heads that ship their calibration.json: `--tree auto` only profiles, on the package's own text."""
    from medusa_bench.heads.common import default_heads

    monkeypatch.setenv("MEDUSA_BENCH_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("MEDUSA_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("medusa_bench.inputs.questions.BENCH_URLS", {})
    heads = default_heads(smollm, "medusa")
    table, prompts = autotree.calibration_source(None, heads)
    assert table == heads / "calibration.json" and prompts.name == "quick_question.jsonl"
    assert cal.read_prompts(prompts)
    with pytest.raises(UserError, match="MEDUSA_BENCH_DATA"):
        autotree.calibration_source(None, tmp_path)  # no table: it must measure, on data it cannot find


def test_with_the_data_folder_it_calibrates_afresh(smollm, data_dir):
    """Shipped tables are only the fallback: a fresh two-turn calibration keeps its answers for the replay."""
    from medusa_bench.heads.common import default_heads

    table, prompts = autotree.calibration_source(None, default_heads(smollm, "medusa"))
    assert table is None and prompts == cal.default_prompt_file()
