"""Suffix decoding: the suffix trie and its counts, the frequency-scored tree, and losslessness."""

import random

import pytest

from conftest import SHORT_NEW
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.decoders.pld import StepCosts
from medusa_bench.decoders.registry import build_decoder
from medusa_bench.decoders.suffix import SpecTree, SuffixProposer, SuffixTrie, best_tree, choose_prefix, grow

# ------------------------------------------------------------------------------ the suffix trie


def occurrences(texts, piece):
    n = len(piece)
    return sum(text[i:i + n] == piece for text in texts for i in range(len(text) - n + 1))


def test_the_trie_counts_every_substring_up_to_its_depth():
    rng = random.Random(0)
    texts = [[rng.randrange(3) for _ in range(rng.randrange(1, 20))] for _ in range(3)]
    trie = SuffixTrie(max_depth=4)
    trie.extend(texts[0])  # grown token by token, as a request's context
    for text in texts[1:]:
        trie.add_text(text)  # separate texts: no suffix crosses from one into the next
    assert trie.count[0] == sum(map(len, texts))
    for text in texts:
        for start in range(len(text)):
            for end in range(start + 1, min(start + 6, len(text)) + 1):
                node = trie.find(text[start:end])
                if end - start > 4:
                    assert node is None  # cut at the depth
                else:
                    assert trie.count[node] == occurrences(texts, text[start:end])


def test_the_tree_grows_best_first_by_frequency():
    trie = SuffixTrie(max_depth=4)
    trie.extend([1, 2, 3, 1, 2, 4, 1, 2, 3])
    tree = grow(trie, trie.find([1, 2]), budget=5, min_prob=0.1)
    # after "1 2": 3 twice, 4 once, the last "1 2 3" has no continuation yet
    assert tree.tokens[:2] == [3, 4] and tree.parents[:2] == [-1, -1]
    assert tree.scores[0] == pytest.approx(2 / 3) and tree.scores[1] == pytest.approx(1 / 3)
    assert tree.scores == sorted(tree.scores, reverse=True)  # best first: a prefix is a tree
    assert all(parent < i for i, parent in enumerate(tree.parents))
    assert grow(trie, trie.find([1, 2]), budget=5, min_prob=0.5).tokens == [3]  # 4 scores below 0.5
    assert len(grow(trie, trie.find([1, 2]), budget=1, min_prob=0.0).tokens) == 1


def test_longer_patterns_draft_more_and_the_best_scoring_tree_wins():
    trie = SuffixTrie(max_depth=8)
    trie.extend([5, 6, 7, 8, 9, 10, 0, 7, 11])
    # pattern "7" (p=1, factor 1: one node) 8 or 11 at 0.5; "6 7" (two nodes) 8 9; "5 6 7" (three) 8 9 10
    tree = best_tree([trie], [5, 6, 7], max_nodes=8, factor=1.0, min_prob=0.1)
    assert tree.tokens == [8, 9, 10] and tree.score == pytest.approx(3.0)
    assert best_tree([trie], [5, 6, 7], max_nodes=2, factor=1.0, min_prob=0.1).tokens == [8, 9]
    assert best_tree([trie], [42], max_nodes=8, factor=1.0, min_prob=0.1).tokens == []


def test_choose_prefix_drafts_only_what_pays():
    costs = StepCosts()  # the prior curve
    sure = SpecTree([1, 2, 3, 4], [-1, 0, 1, 2], [0.99, 0.98, 0.97, 0.96])
    doubtful = SpecTree([1, 2], [-1, 0], [0.05, 0.01])
    assert choose_prefix(sure, costs) == 4 and choose_prefix(doubtful, costs) == 0


def test_the_global_tree_learns_answers_across_generations():
    proposer = SuffixProposer(max_depth=8, max_nodes=8, factor=4.0, adaptive=False)
    proposer.reset([100, 101])
    proposer.propose(1, None, [100, 101])
    proposer.propose(5, None, [100, 101, 1, 2, 3, 4])  # an answer 1 2 3 4 5 …
    proposer.reset([200])  # a new prompt: the answer is in the global tree now
    draft = proposer.propose(1, None, [200])
    assert draft.tokens.tolist()[:4] == [1, 2, 3, 4]
    proposer.rewind(1)  # back to the prompt: the request's own tree forgets the root
    assert proposer.tokens == [200]


# ------------------------------------------------------------------------------ decoding
NEW = SHORT_NEW  # new tokens per prompt (conftest.short_references: the baseline's answers)


@pytest.mark.parametrize("variant", [{}, {"extra": {"suffix_adaptive": False}}], ids=["adaptive", "paper"])
def test_greedy_suffix_is_lossless_and_learns_across_requests(smollm, short_references, variant):
    decoder = build_decoder("suffix", smollm, DecoderOptions(**variant))
    for ids, expected in short_references:
        result = decoder.generate(ids, NEW)
        assert result.token_ids == expected
        assert sum(result.accept_lengths) == len(result.token_ids) and result.steps == len(result.accept_lengths)
    ids, expected = short_references[1]
    again = decoder.generate(ids, NEW)  # the same question again: the global tree holds its answer
    assert again.token_ids == expected
    assert len(expected) / again.steps > 2  # tau > 2
