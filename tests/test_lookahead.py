"""Lookahead decoding: the n-gram pool, the Jacobi window, the draft tree and its mask, the CLI, and losslessness."""

import json

import pytest
import torch

from conftest import SHORT_NEW, run_cli
from medusa_bench.decoders.base import Sampling
from medusa_bench.decoders.lookahead import JacobiWindow, LookaheadProposer, NgramPool, draft_tree, lookahead_nodes, spread
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.decoders.registry import build_decoder
from medusa_bench.errors import UserError
from medusa_bench.trees.tree import TreeBuffers

# ------------------------------------------------------------------------------ the pool and the window


def test_the_pool_keeps_the_newest_g_per_first_token():
    pool = NgramPool(size=2)
    pool.add(1, (2, 3))
    pool.add(1, (4, 5))
    pool.add(1, (2, 3))  # a repeat becomes the newest
    assert pool.guesses(1) == [(2, 3), (4, 5)]
    pool.add(1, (6, 7))  # a third evicts the oldest
    assert pool.guesses(1) == [(6, 7), (2, 3)]
    assert pool.guesses(9) == []
    empty = NgramPool(size=0)
    empty.add(1, (2, 3))
    assert empty.guesses(1) == []


def test_the_window_starts_from_the_prompt_and_warms_up_to_n_minus_1_levels_of_w():
    assert spread([10, 11, 12, 13, 14, 15], 3) == [10, 12, 14] and spread([10, 11], 5) == [10, 11, 10, 11, 10]
    window, pool = JacobiWindow(window=3, ngram=4, prompt=[10, 11, 12, 13, 14, 15]), NgramPool(7)
    assert window.levels == [[10, 11, 13, 14]] and window.width == 5  # W + N - 3 beside the root, deterministic
    window.advance(0, [20, 21, 22, 23, 24], pool)  # the root's row and level 0's
    assert window.levels == [[11, 13, 14], [21, 22, 23, 24]]  # one column on; new less its first column
    window.advance(0, [30, 31, 32, 33], pool)
    assert window.levels == [[13, 14], [22, 23, 24], [31, 32, 33]] and window.full and window.width == 3
    assert pool.by_key == {}  # n-grams only once the window is full (the reference's warm-up)


def test_a_full_window_collects_each_columns_trajectory_and_drops_its_oldest_level():
    window, pool = JacobiWindow(window=3, ngram=4, prompt=[1]), NgramPool(7)
    window.levels = [[11, 12], [20, 21, 22], [30, 31, 32]]  # level 0 beside root 10; column j at root + l + j
    window.advance(10, [40, 41, 42], pool)
    assert pool.guesses(10) == [(20, 30, 40)] and pool.guesses(11) == [(21, 31, 41)] and pool.guesses(12) == [(22, 32, 42)]
    assert window.levels == [[21, 22], [30, 31, 32], [40, 41, 42]]
    two = JacobiWindow(window=3, ngram=2, prompt=[5, 6, 7])  # N = 2: one level, full from the start
    assert two.full and two.levels == [[5, 6]]
    two.advance(4, [8, 9, 10], pool)
    assert pool.guesses(5) == [(9,)] and two.levels == [[9, 10]]


# ------------------------------------------------------------------------------ the draft tree


def reference_mask(width: int, levels: int) -> torch.Tensor:
    """The reference's lookahead block (lade `j_make_causal_mask_multilevel`, one worker, no guesses): rows and
    columns level by level, the root as level 0's column 0; level 0 causal; level l's column j sees level 0's
    columns 0 … j and column j of levels 1 … l."""
    n = width * levels
    mask = torch.zeros(n, n, dtype=torch.bool)
    causal = torch.ones(width, width).tril().bool()
    for level in range(levels):
        rows = slice(width * level, width * (level + 1))
        mask[rows, :width] = causal
        for above in range(1, level + 1):
            mask[rows, width * above: width * (above + 1)] |= torch.eye(width, dtype=torch.bool)
    return mask


def test_the_lookahead_branch_is_the_references_mask_and_positions():
    levels = [[11, 12], [20, 21, 22], [30, 31, 32]]  # W = 3, N = 4
    tokens, parents, top = draft_tree(10, [], levels)
    assert tokens == [10, 11, 12, 20, 21, 22, 30, 31, 32] and top == [6, 7, 8]
    buffers = TreeBuffers.from_parents(parents)
    assert torch.equal(buffers.attn_mask, reference_mask(width=3, levels=3))
    assert buffers.depths.tolist() == [0, 1, 2, 1, 2, 3, 2, 3, 4]  # level l, column j: depth l + j (the reference's positions)


def test_guesses_share_prefixes_in_a_trie_under_the_root_before_the_window():
    tokens, parents, top = draft_tree(10, [(1, 2, 3), (1, 2, 4), (5, 6, 7)], [[11], [20, 21]])
    assert tokens == [10, 1, 2, 3, 4, 5, 6, 7, 11, 20, 21]
    assert parents == [-1, 0, 1, 2, 2, 0, 5, 6, 0, 0, 8]
    assert top == [9, 10]
    mask = TreeBuffers.from_parents(parents).attn_mask
    assert mask[4].nonzero().squeeze(1).tolist() == [0, 1, 2, 4]  # a guess sees the root and its own prefix
    assert mask[10].nonzero().squeeze(1).tolist() == [0, 8, 10]  # a window node its trajectory only


def test_draft_size_covers_the_widest_warm_up_step():
    proposer = LookaheadProposer(window=7, ngram=5, guess=7)
    assert lookahead_nodes(7, 5) == 27 and proposer.draft_size == 27 + 7 * 4  # the paper's W, N, G: 55 nodes at most
    assert lookahead_nodes(2, 5) == 8  # narrow windows are widest in warm-up: 3 levels of 3 columns, less the root
    for window, ngram in ((2, 5), (7, 5), (3, 2), (1, 3)):
        proposer = LookaheadProposer(window, ngram, guess=0)
        proposer.reset(list(range(30)))
        for _ in range(ngram + 1):
            draft = proposer.propose(1, None, [])
            assert draft.buffers.num_nodes - 1 <= proposer.draft_size
            proposer.observe_logits(draft.tokens, torch.randn(draft.buffers.num_nodes, 50))
        assert proposer.window.full and proposer.window.width == window


# ------------------------------------------------------------------------------ decoding
NEW = SHORT_NEW  # new tokens per prompt (conftest.short_references: the baseline's answers)


@pytest.mark.parametrize("variant", [{}, {"lookahead_window": 3, "lookahead_ngram": 3, "lookahead_guess": 2}],
                         ids=["paper", "small"])
def test_greedy_lookahead_is_lossless(smollm, short_references, variant):
    decoder = build_decoder("lookahead", smollm, DecoderOptions(**variant))
    steps = tokens = 0
    for ids, expected in short_references:
        result = decoder.generate(ids, NEW)
        assert result.token_ids == expected
        assert sum(result.accept_lengths) == len(result.token_ids) and result.steps == len(result.accept_lengths)
        steps, tokens = steps + result.steps, tokens + len(result.token_ids)
    assert tokens / steps > 1.1  # drafts accepted: tau > 1


def test_rewind_keeps_decoding_the_baselines_tokens(smollm, short_references):
    ids, expected = short_references[0]
    decoder = build_decoder("lookahead", smollm, DecoderOptions(lookahead_window=4, lookahead_ngram=3))
    state = decoder.prefill(ids)
    decoder.step(state)
    checkpoint = state.checkpoint()
    for _ in range(3):
        decoder.step(state)
    decoder.rewind(state, checkpoint)
    assert decoder.proposer.pending is None
    n = min(12, len(expected))
    while len(state.tokens) < n:
        decoder.step(state)
    assert state.tokens[:n] == expected[:n]


def test_typical_and_sampled_acceptance_run(smollm, short_references):
    ids, expected = short_references[0]
    small = dict(lookahead_window=3, lookahead_ngram=3, lookahead_guess=2)
    typical = build_decoder("lookahead", smollm, DecoderOptions(acceptance="typical", **small))
    assert typical.generate(ids, 8).token_ids == expected[:8]  # typical falls back to greedy at temperature 0
    for decoder in (typical, build_decoder("lookahead", smollm, DecoderOptions(**small))):
        result = decoder.generate(ids, 8, Sampling(temperature=0.7, seed=1))
        assert 0 < len(result.token_ids) <= 8 and sum(result.accept_lengths) == len(result.token_ids)


@pytest.mark.parametrize("option, value, flag", [("lookahead_window", 0, "--lookahead-window"),
                                                 ("lookahead_ngram", 1, "--lookahead-ngram"),
                                                 ("lookahead_guess", -1, "--lookahead-guess")])
def test_options_out_of_range_are_clear_errors(option, value, flag):
    with pytest.raises(UserError, match=flag):
        DecoderOptions(**{option: value})


def test_cli_options_reach_the_decoder(smollm, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    code, _, stderr = run_cli(capsys, monkeypatch, "run", "--decoders", "baseline,lookahead", "--lookahead-window", "3",
                              "--lookahead-ngram", "3", "--lookahead-guess", "2", "--bench", "quick", "--limit", "1",
                              "--max-new-tokens", "4", "--warmup", "0", "--device", "cpu", "--dtype", "float32",
                              "--precision-reference", "none", "--out", out)
    assert code == 0, stderr
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert (settings["lookahead_window"], settings["lookahead_ngram"], settings["lookahead_guess"]) == (3, 3, 2)
    (record,) = [json.loads(line) for line in (out / "model_answer" / "smollm2-135m-lookahead.jsonl").read_text().splitlines()]
    assert all(record["choices"][0]["exact_match"])
