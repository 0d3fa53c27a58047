"""Prompt lookup decoding: the match search, the draft policy, option checks, and losslessness."""

import json

import pytest

from medusa_bench.decoders.base import Sampling
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.decoders.pld import (AcceptanceStats, NgramIndex, PromptLookupProposer, StepCosts, choose_nodes,
                                       find_matches, merge)
from medusa_bench.decoders.registry import build_decoder
from medusa_bench.errors import UserError
from medusa_bench.inputs.chat import build_prompt

# ------------------------------------------------------------------------------ match search


def continuations(context, **kw):
    return [m.tokens for m in find_matches(context, **kw)]


def test_longest_ngram_wins_over_a_more_recent_shorter_one():
    # tail "1 2 3": the 3-gram occurs once (→ 7); "3" alone occurred more recently (→ 8)
    context = [1, 2, 3, 7, 5, 3, 8, 1, 2, 3]
    matches = find_matches(context, max_ngram=3, max_tokens=2)
    assert matches[0].tokens == [7, 5] and matches[0].ngram == 3
    assert continuations(context, max_ngram=1, max_tokens=2) == [[8, 1]]


def test_most_recent_match_first_and_shorter_ngrams_fill_the_branches():
    context = [4, 5, 6, 10, 4, 5, 6, 11, 9, 6, 12, 4, 5, 6]
    assert continuations(context, max_ngram=3, max_tokens=1, branches=1) == [[11]]
    assert continuations(context, max_ngram=3, max_tokens=1, branches=3) == [[11], [10], [12]]
    ngrams = [m.ngram for m in find_matches(context, max_ngram=3, max_tokens=1, branches=3)]
    assert ngrams == [3, 3, 1]


def test_branches_are_deduplicated():
    context = [1, 2, 7, 8, 1, 2, 7, 8, 1, 2, 9, 1, 2]
    assert continuations(context, max_ngram=2, max_tokens=2, branches=4) == [[9, 1], [7, 8]]


def test_a_match_running_into_the_tail_repeats_with_its_period():
    assert continuations([1, 2, 3, 1, 2, 3], max_ngram=3, max_tokens=7) == [[1, 2, 3, 1, 2, 3, 1]]
    assert continuations([5, 5], max_ngram=3, max_tokens=3) == [[5, 5, 5]]


def test_no_match_and_tiny_contexts():
    assert find_matches([1, 2, 3, 4], max_ngram=3) == []
    assert find_matches([1]) == [] and find_matches([]) == []


def test_match_length_measures_how_far_the_copy_goes_back():
    context = [9, 1, 2, 3, 4, 5, 0, 8, 1, 2, 3, 4, 5]
    (match,) = find_matches(context, max_ngram=2, max_tokens=1)
    assert match.tokens == [0] and match.ngram == 2 and match.length == 5


def test_the_index_grows_like_a_fresh_search():
    context = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9, 5]
    index = NgramIndex(3)
    for end in range(len(context)):
        index.extend(context[end:end + 1])
        assert index.matches(4, 3) == find_matches(context[:end + 1], 3, 4, 3)


def test_merge_shares_prefixes_and_marks_alternatives():
    matches = find_matches([1, 2, 7, 8, 1, 2, 7, 9, 1, 2], max_ngram=2, max_tokens=2, branches=2)
    trie = merge(matches)
    assert trie.tokens[1:] == [7, 9, 8] and trie.parents == [-1, 0, 1, 1]
    assert [key[0] for key in trie.keys[1:]] == [False, False, True]


# ------------------------------------------------------------------------------ draft policy


class FixedStats(AcceptanceStats):
    def __init__(self, p):
        super().__init__()
        self.value = p

    def p(self, key):
        return self.value


def test_policy_drafts_only_what_pays():
    trie = merge(find_matches([1, 2, 3, 4, 5, 6, 7, 8, 1, 2], max_ngram=2, max_tokens=6))
    costs = StepCosts()
    assert choose_nodes(trie, FixedStats(0.05), costs) == []  # a plain step
    assert choose_nodes(trie, FixedStats(0.99), costs) == [1, 2, 3, 4, 5, 6]
    short = choose_nodes(trie, FixedStats(0.6), costs)
    assert 0 < len(short) < 6 and short == list(range(1, len(short) + 1))


def test_step_costs_follow_the_profile():
    costs = StepCosts()  # no profile: the prior
    assert costs.relative(1) == 1.0 and costs.relative(4) == pytest.approx(1.58)
    assert 1.4 < costs.relative(3) < 1.58 < costs.relative(5)
    costs = StepCosts({"chain": {"1": 0.010, "4": 0.030}})
    assert costs.relative(4) == pytest.approx(3.0)
    assert costs.relative(2) == pytest.approx(1 + 2 / 3)  # between profiled sizes: interpolated
    assert costs.relative(8) == pytest.approx(StepCosts.prior(8) * 3.0 / 1.58)  # beyond them: the prior, scaled
    assert costs.relative(4, chain=False) == pytest.approx(3.0 * 1.05)  # no trees profiled: chains + the mask
    costs = StepCosts({"chain": {"1": 0.010, "4": 0.030}, "tree": {"3": 0.033, "4": 0.036}})
    assert costs.relative(4, chain=False) == pytest.approx(3.6) and costs.relative(4) == pytest.approx(3.0)


def test_the_profile_is_measured_once_and_kept_in_the_run_folder(smollm, references, tmp_path):
    """The bench measures the profile (once per model) and hands it to the factory; the registry alone,
    with no profile, decides by the prior curve."""
    from medusa_bench.bench.autotree import saved_profiles, store_in_run
    from medusa_bench.bench.build import build_decoder as build_measured

    first = build_measured("pld", smollm)
    profile = first.step_profile
    assert set(profile["chain"]) >= {"1", "4", "16"} and set(profile["tree"]) >= {"4", "16"}
    assert all(t > 0 for t in profile["chain"].values()) and profile["context_len"] > 100
    assert build_measured("pld", smollm).step_profile is profile  # measured once per model
    assert build_decoder("pld", smollm).step_profile is None  # the registry measures nothing
    store_in_run(tmp_path, {"pld": first}, None)
    assert json.loads((tmp_path / "pld-profile.json").read_text()) == profile
    # a resume decides with the run's own profile, not a fresh measurement
    recorded = {**profile, "chain": {"1": 0.010, "16": 0.020}, "tree": {}}  # cheap drafts: PLD drafts a lot
    (tmp_path / "pld-profile.json").write_text(json.dumps(recorded))
    plan = {"profiles": saved_profiles(tmp_path, ["baseline", "pld"], DecoderOptions())}
    assert plan == {"profiles": {"pld": recorded}}
    second = build_measured("pld", smollm, plan=plan)
    store_in_run(tmp_path, {"pld": second}, {"trees": {}})
    assert second.step_profile == recorded and second.proposer.costs.relative(16) == pytest.approx(2.0)
    assert json.loads((tmp_path / "pld-profile.json").read_text()) == recorded
    # the same profile, the same tokens: the same choices (τ), however busy the machine is
    third = build_decoder("pld", smollm, DecoderOptions(extra={"step_profile": recorded}))
    lengths = [second.generate(ids, 32).accept_lengths for ids, _ in references]
    assert lengths == [third.generate(ids, 32).accept_lengths for ids, _ in references]
    assert max(max(row) for row in lengths) > 1


def test_proposer_returns_none_without_a_match_and_learns_from_outcomes():
    proposer = PromptLookupProposer(max_ngram=2, max_tokens=3, adaptive=False)
    proposer.reset([10, 11, 12])
    assert proposer.propose(13, None, [10, 11, 12]) is None
    proposer.reset([1, 2, 3, 4, 5, 1])
    draft = proposer.propose(2, None, [1, 2, 3, 4, 5, 1])
    assert draft.tokens.tolist() == [2, 3, 4, 5] and draft.buffers.num_nodes == 4
    proposer.update(1)  # 3 accepted, 4 rejected
    proposer.propose(9, None, [1, 2, 3, 4, 5, 1, 2, 3])
    tried = sum(entry[1] for entry in proposer.stats.data.values())
    accepted = sum(entry[0] for entry in proposer.stats.data.values())
    assert (accepted, tried) == (1, 2)


# ------------------------------------------------------------------------------ options


@pytest.mark.parametrize("option, value, flag", [("pld_max_ngram", 0, "--pld-max-ngram"), ("pld_tokens", 0, "--pld-tokens"),
                                                 ("pld_tokens", 1000, "--pld-tokens"), ("pld_branches", 0, "--pld-branches"),
                                                 ("pld_branches", 2.5, "--pld-branches")])
def test_options_out_of_range_are_clear_errors(option, value, flag):
    with pytest.raises(UserError, match=flag):
        build_decoder("pld", None, DecoderOptions(**{option: value}))


# ------------------------------------------------------------------------------ decoding

PROMPTS = [
    "Repeat this sentence three times: the quick brown fox jumps over the lazy dog.",  # repeats itself
    "Write one sentence about autumn.",  # nothing to copy
    "Summarize: The committee met on Monday. The committee approved the budget. The budget funds two new parks.",
]
VARIANTS = [{}, {"extra": {"pld_adaptive": False}}, {"pld_branches": 3, "pld_tokens": 4, "extra": {"pld_adaptive": False}},
            {"pld_max_ngram": 1, "pld_tokens": 2, "pld_branches": 2}]


@pytest.fixture(scope="module")
def references(smollm):
    baseline = build_decoder("baseline", smollm)
    prompts = [build_prompt(smollm, [{"role": "user", "content": p}]) for p in PROMPTS]
    return [(ids, baseline.generate(ids, 32).token_ids) for ids in prompts]


@pytest.mark.parametrize("variant", VARIANTS, ids=["adaptive", "always", "tree", "unigram-tree"])
def test_greedy_pld_is_lossless(smollm, references, variant):
    decoder = build_decoder("pld", smollm, DecoderOptions(**variant))
    for ids, expected in references:
        result = decoder.generate(ids, 32)
        assert result.token_ids == expected
        assert sum(result.accept_lengths) == len(result.token_ids) and result.steps == len(result.accept_lengths)
        if variant.get("extra") and ids is references[0][0]:  # drafting every step pays on a repeat
            assert result.steps < len(result.token_ids)


def test_typical_and_sampled_acceptance_run(smollm, references):
    ids, expected = references[0]
    typical = build_decoder("pld", smollm, DecoderOptions(acceptance="typical", extra={"pld_adaptive": False}))
    assert typical.generate(ids, 32).token_ids == expected  # typical falls back to greedy at temperature 0
    result = typical.generate(ids, 16, Sampling(temperature=0.7, seed=1))
    assert 0 < len(result.token_ids) <= 16 and sum(result.accept_lengths) == len(result.token_ids)
