"""Batch > 1 (decoders/batched.py, runtime/batch.py): rows decoded together equal the same rows decoded alike.

fp32 on the embedded model: each row of the batched baseline equals that prompt decoded alone,
and each row of a batched speculative decoder equals the same row of the batched baseline.
"""

from __future__ import annotations

import json
from io import StringIO

import pytest
import torch
from rich.console import Console

from medusa_bench.bench.autotree import AutoTreeSettings
from medusa_bench.bench.batch_sweep import BATCH_FILE, check_batch_run, parse_batch_sizes
from medusa_bench.bench.batch_trees import tree_for_batch
from medusa_bench.bench.config import RunConfig
from medusa_bench.bench.loop import run_benchmark
from medusa_bench.bench.verdict import Divergence, divergence, divergences, logits_in_batch, margin_at, rounding_noise, verdict
from medusa_bench.decoders.batched import BatchedDecoder
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.decoders.registry import build_decoder
from medusa_bench.errors import UserError
from medusa_bench.inputs.chat import build_prompt
from medusa_bench.results.report import build_report, collect
from medusa_bench.results.tables import TABLE_TITLES
from medusa_bench.runtime.cache import SlotCache

NEW = 24
PROMPTS = [  # lengths differ (left padding), one repeats itself (prompt lookup drafts), one is short
    "Repeat this sentence three times: the quick brown fox jumps over the lazy dog.",
    "Name a colour.",
    "Summarize: The committee met on Monday. The committee approved the budget. The budget funds two new parks.",
    "Write a haiku about the sea.",
]


def batched(spec: str, loaded, size: int, **options) -> BatchedDecoder:
    return BatchedDecoder([build_decoder(spec, loaded, DecoderOptions(**options)) for _ in range(size)])


@pytest.fixture(scope="module")
def prompts(smollm):
    return [build_prompt(smollm, [{"role": "user", "content": p}]) for p in PROMPTS]


@pytest.fixture(scope="module")
def alone(smollm, prompts):
    """Each prompt decoded alone by the baseline: what batch 1 gives."""
    baseline = build_decoder("baseline", smollm)
    return [baseline.generate(ids, NEW).token_ids for ids in prompts]


@pytest.fixture(scope="module")
def batched_baseline(smollm, prompts):
    return batched("baseline", smollm, len(prompts)).generate(prompts, NEW)


def test_batched_baseline_rows_equal_each_prompt_alone(batched_baseline, alone):
    assert [g.token_ids for g in batched_baseline] == alone
    for generation in batched_baseline:
        assert generation.steps == len(generation.token_ids) and generation.accept_lengths == [1] * generation.steps
        assert generation.wall_time > 0


@pytest.mark.parametrize("spec, options, least_tau", [("hydra", {"tree": "mc_sim_7b_63"}, 1.2), ("medusa", {"tree": "tree-8"}, 1.2),
                                                      ("eagle2", {"tree": "tree-8"}, 1.2), ("pld:full", {}, 1.2),
                                                      ("recycling:full", {"recycling_nodes": 24}, 1.05)],
                         ids=["hydra", "medusa", "eagle2", "pld", "recycling"])
def test_batched_decoder_rows_equal_the_batched_baseline(smollm, prompts, batched_baseline, spec, options, least_tau):
    """Per-row acceptance on one forward: different trees per row (pld, eagle2's dynamic trees), each row's
    own drafting state (EAGLE's draft cache, Token Recycling's matrix: cold here), rows leaving at different steps."""
    out = batched(spec, smollm, len(prompts), **options).generate(prompts, NEW)
    assert [g.token_ids for g in out] == [g.token_ids for g in batched_baseline]
    for generation in out:
        assert sum(generation.accept_lengths) == len(generation.token_ids) == generation.steps + sum(
            a - 1 for a in generation.accept_lengths)
    tau = sum(len(g.token_ids) for g in out) / sum(g.steps for g in out)
    assert tau > least_tau, f"{spec}: drafts accepted in the batch (tau {tau:.2f})"


def test_a_batch_smaller_than_its_decoder_and_uneven_limits(smollm, prompts, alone):
    """Two prompts on a batch of three; a prompt that ends at once (limit 1) leaves before the first forward."""
    decoder = batched("hydra", smollm, 3, tree="chain-2")
    out = decoder.generate(prompts[:2], NEW)
    assert [g.token_ids for g in out] == alone[:2]
    one = decoder.generate(prompts[:2], 1)
    assert [g.token_ids for g in one] == [a[:1] for a in alone[:2]] and all(g.steps == 1 for g in one)


@pytest.mark.parametrize("spec, options", [("baseline", {}), ("eagle2", {"tree": "tree-8"})], ids=["baseline", "eagle2"])
def test_more_prompts_than_slots_stream_through_the_batch(smollm, prompts, alone, spec, options):
    """Continuous batching: six prompts through two slots, uneven limits, so rows leave at different
    steps and newcomers join a running batch (realigned columns, leading columns dropped); every row
    equals its prompt decoded alone (EAGLE-2: each newcomer's draft cache starts afresh)."""
    order = [0, 1, 2, 3, 1, 0]
    limits = [NEW, 6, NEW, 9, NEW, 3]
    out = batched(spec, smollm, 2, **options).generate([prompts[i] for i in order], limits)
    assert [g.token_ids for g in out] == [alone[i][:limit] for i, limit in zip(order, limits)]
    assert all(g.wall_time > 0 for g in out)


def test_join_right_aligns_both_batches_and_drops_unused_columns():
    from medusa_bench.runtime.batch import Columns

    mine, theirs = SlotCache(1, 8), SlotCache(1, 4)
    for cache, rows, length, base in ((mine, 2, 6, 0.0), (theirs, 1, 3, 100.0)):
        slots = torch.arange(cache.capacity, dtype=torch.float32) + base
        keys = slots.repeat(rows, 1, 1)[..., None].expand(rows, 1, cache.capacity, 2).clone()  # [B, heads, C, dim]
        cache.layers[0].lazy_initialization(keys, keys)
        cache.storage[0, 0].copy_(keys)
        cache.length = cache.start = length
    mine.join(theirs, start=2, width=5, capacity=7)  # mine's slots 2..5 and theirs's 0..2 end at slot 5
    keys = mine.layers[0].keys[:, 0, :, 0]  # [B, C]
    assert keys.shape == (3, 7) and mine.length == 5
    assert keys[0].tolist() == [0, 2, 3, 4, 5, 0, 0] and keys[2].tolist() == [0, 0, 100, 101, 102, 0, 0]
    columns, joining = Columns([4, 2], 8, torch.device("cpu")), Columns([3], 4, torch.device("cpu"))
    columns.valid[0, :2] = False  # row 0's first two columns are gone (a row that left used them)
    assert columns.first_used() == 2
    columns.join(joining, start=2, width=3, capacity=7)
    assert columns.valid.int().tolist() == [[0, 1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0]]
    assert columns.lengths.tolist() == [4, 2, 3] and columns.width == 3


def test_keep_rows_gathers_each_rows_own_path():
    """Row b keeps slots start + keep[b]: a real SlotCache, written as a forward writes it."""
    cache = SlotCache(num_layers=2, capacity=8)
    cache.start = 0
    keys = torch.arange(2 * 1 * 5 * 1, dtype=torch.float32).reshape(2, 1, 5, 1)  # [B=2, heads=1, q=5, dim=1]
    for layer in cache.layers:
        layer.update(keys, -keys)
    cache.length = 5
    cache.keep_rows(2, torch.tensor([[0, 2], [0, 1]]), contiguous=False)  # row 0 keeps slots 2, 4; row 1 slots 2, 3
    assert cache.length == 4
    assert cache.layers[1].keys[0, 0, :4, 0].tolist() == [0, 1, 2, 4]
    assert cache.layers[1].keys[1, 0, :4, 0].tolist() == [5, 6, 7, 8]
    assert cache.layers[0].values[0, 0, :4, 0].tolist() == [0, -1, -2, -4]
    cache.select_rows(torch.tensor([1]))
    assert cache.layers[0].keys.shape[0] == 1 and cache.layers[0].keys[0, 0, :4, 0].tolist() == [5, 6, 7, 8]


def test_refusals(smollm):
    with pytest.raises(ValueError, match="each row needs its own proposer"):
        decoder = build_decoder("pld", smollm)
        BatchedDecoder([decoder, decoder])
    with pytest.raises(UserError, match="pld: batched decoding verifies greedily only, not --acceptance typical; decode it at batch 1"):
        batched("pld", smollm, 2, acceptance="typical")


# ------------------------------------------------------------------------------ the losslessness verdict
def test_divergence_and_verdict_lines():
    assert divergence([1, 2, 3], [1, 2, 3]) is None and divergence([1, 5, 3], [1, 2, 3]) == 1 and divergence([1, 2], [1, 2, 3]) == 2
    assert verdict([], 1e-5, 4) == "exact: 4/4 answers identical"
    flip = Divergence(0, 7, 1e-6)
    assert verdict([flip], 1e-5, 4).startswith("lossless up to rounding: 1 of 4 answers part at a tie")
    real = Divergence(2, 3, 0.5)
    line = verdict([flip, real], 1e-5, 4)
    assert line.startswith("NOT explained by rounding: 1 divergence(s) at margins answer 2 token 3: 0.5") and "1 tie flip(s)" in line


def test_margin_and_rounding_noise_on_the_real_model(smollm, prompts, alone):
    """fp32: the shapes move logits by float rounding only; the margin is the reference's own top-2 gap."""
    noise = rounding_noise(smollm, prompts[:2], 2)
    assert 0 <= noise < 1e-3
    (logits,) = logits_in_batch(smollm, [prompts[0] + alone[0][:3]])
    top = torch.topk(logits[-1], 2)
    assert int(top.indices[0]) == alone[0][3]  # the batch-1 forward predicts the reference's next token
    assert margin_at(smollm, prompts[0], alone[0], 3) == pytest.approx(float(top.values[0] - top.values[1]))
    found = divergences(smollm, prompts[:1], [alone[0][:5] + [0] * 19], alone[:1])
    assert [(d.index, d.position) for d in found] == [(0, 5)] and found[0].margin > 2 * noise  # a real divergence, not a tie


# ------------------------------------------------------------------------------ the optimiser at batch B
def test_tree_for_batch_searches_on_step_times_at_b_rows(smollm, tmp_path):
    settings = AutoTreeSettings(cache_dir=str(tmp_path / "cache"), prompts=1, tokens=8, max_nodes=4, sizes=(1, 2, 4),
                                repeats=1, warmup=0, context_len=64)
    sized = tree_for_batch("hydra", smollm, 2, DecoderOptions(extra={"autotree": settings}), repeats=1, warmup=0)
    assert sized.latency.meta["batch_size"] == 2 and set(sized.latency.step_time) == {1, 2, 4}
    choice = sized.result.choice
    # the search may pick an unprofiled size (n = 3): its step time is interpolated (Latency.at)
    assert sized.tree.num_nodes == choice.n and 1 <= sized.single.tree.num_nodes <= 4
    assert choice.speedup == pytest.approx(choice.tau * sized.latency.step_time[1] / sized.latency.at(choice.n))


# ------------------------------------------------------------------------------ run --batch-size and the report
@pytest.mark.slow
def test_run_batch_sweep_appends_resumes_and_reports(smollm, tmp_path):
    settings = AutoTreeSettings(cache_dir=str(tmp_path / "cache"), prompts=1, tokens=8, max_nodes=3, sizes=(1, 2, 3), repeats=1,
                                warmup=0, context_len=64, min_speedup=0.0)  # min_speedup 0: a tree is chosen at every B
    out = tmp_path / "run"
    config = RunConfig(bench="quick", question_ids=["1001", "1004"], max_new_tokens=10, warmup=0, out=out, device="cpu",
                       decoders=["baseline", "hydra:auto", "pld:full", "control"], batch_sizes=[1, 2],
                       options=DecoderOptions(extra={"autotree": settings}))
    run_benchmark(config, console=Console(file=StringIO()), loaded=smollm)
    records = [json.loads(line) for line in (out / BATCH_FILE).read_text().splitlines()]
    levels = {(r["decoder"], r["batch_size"]) for r in records}
    assert {("baseline", 1), ("baseline", 2), ("control", 2), ("pld:full", 2), ("hydra:auto", 1), ("hydra:auto", 2)} <= levels
    by = {(r["decoder"], r["batch_size"]): r for r in records}
    requests = by[("baseline", 1)]["requests"]
    assert requests == 4 and all(r["requests"] == requests for r in records)  # 2 questions × 2 turns
    for record in records:  # fp32: every row equals the same-B baseline's, and batch 1's
        assert record["same_as_batched_baseline"] == requests, record["decoder"]
        assert record["verdict"] == f"exact: {requests}/{requests} answers identical"
    assert by[("hydra:auto", 2)]["tree_nodes"] >= 1 and "2" in by[("hydra:auto", 2)]["step_time_ms"]
    assert by[("pld:full", 2)]["output_tokens"] == by[("baseline", 2)]["output_tokens"] and by[("pld:full", 2)]["tau"] >= 1.0

    log = StringIO()
    run_benchmark(config, console=Console(file=log, width=200), loaded=smollm)  # the same command: nothing to redo
    assert len((out / BATCH_FILE).read_text().splitlines()) == len(records) and "batch sweep" not in log.getvalue()

    report = collect([out])
    table = report.tables["batch"]
    assert set(table.batch_size) == {1, 2} and list(table[table.decoder == "baseline"].speedup) == [1.0, 1.0]
    assert any(note.startswith("Batch sweep: pld:full ") for note in report.notes)
    markdown = build_report([out], fmt="markdown")
    assert f"## {TABLE_TITLES['batch']}" in markdown and "| batch |" in markdown
    page = build_report([out], out=tmp_path / "report.html").read_text()
    assert "Speedup and throughput against batch size" in page


def test_batch_size_refusals():
    assert parse_batch_sizes("4,16") == [1, 4, 16] and parse_batch_sizes(None) == []
    with pytest.raises(UserError, match=r"^--batch-size must be comma-separated whole numbers, e.g. 1,4,16; got 'x'$"):
        parse_batch_sizes("x")
    with pytest.raises(UserError, match="add baseline to --decoders"):
        check_batch_run(RunConfig(decoders=["pld"], batch_sizes=[1, 2]))
    with pytest.raises(UserError, match="use --temperature 0"):
        check_batch_run(RunConfig(decoders=["baseline"], batch_sizes=[1, 2], temperature=0.7))
