"""SAM decoding: the suffix automaton, its matching state, the corpus, and losslessness."""

import json
import random

import pytest

from conftest import SHORT_NEW
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.decoders.registry import build_decoder
from medusa_bench.decoders.samd import SamIndex, SuffixAutomaton, corpus_texts
from medusa_bench.errors import UserError

# ------------------------------------------------------------------------------ the automaton


def occurs(tokens, piece):
    n = len(piece)
    return [i + n - 1 for i in range(len(tokens) - n + 1) if tokens[i:i + n] == piece]  # end positions


def test_the_automaton_recognises_exactly_the_substrings_and_their_first_end():
    rng = random.Random(0)
    for _ in range(20):
        tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 25))]
        sam = SuffixAutomaton(tokens)
        assert len(sam.next) <= max(2 * len(tokens) - 1, 2)  # at most 2n - 1 states
        for start in range(len(tokens)):
            for end in range(start + 1, len(tokens) + 1):
                state, length = sam.match(tokens[start:end])
                assert length == end - start
                assert sam.endpos[state] == occurs(tokens, tokens[start:end])[0]
        state, length = sam.match(tokens + [7])  # 7 never occurs: nothing matches after it
        assert (state, length) == (0, 0)


def brute_force_match(tokens):
    """Longest suffix of tokens that occurs ending before the last token, and its first end."""
    for n in range(len(tokens) - 1, 0, -1):
        ends = [e for e in occurs(tokens, tokens[-n:]) if e < len(tokens) - 1]
        if ends:
            return n, ends[0]
    return 0, None


def test_the_matching_state_follows_the_growing_context():
    rng = random.Random(1)
    for _ in range(30):
        tokens = [rng.randrange(4) for _ in range(40)]
        index = SamIndex([], None, alpha=1.0, len_bias=5)
        for end in range(1, len(tokens) + 1):
            index.extend(tokens[end - 1:end])
            length, first_end = brute_force_match(tokens[:end])
            assert index.length == length
            if length:
                assert index.automaton.endpos[index.state] == first_end


def test_draft_is_the_continuation_and_grows_with_the_match():
    index = SamIndex([1, 2, 3, 4, 5, 6, 9, 9, 1, 2, 3], None, alpha=1.0, len_bias=5)
    (match,) = index.matches(max_tokens=10)
    assert match.tokens == [4, 5, 6] and match.ngram == 3  # alpha 1: as many tokens as matched
    index = SamIndex([1, 2, 3, 4, 5, 6, 9, 9, 1, 2, 3], None, alpha=4.0, len_bias=5)
    assert index.matches(max_tokens=5)[0].tokens == [4, 5, 6, 9, 9]  # capped by max_tokens
    assert SamIndex([1, 2, 3], None, 4.0, 5).matches(8) == []  # nothing occurred before
    # a match running into the end repeats with its period
    assert SamIndex([5, 6, 5, 6], None, 4.0, 5).matches(5)[0].tokens == [5, 6, 5, 6, 5]


def test_the_static_automaton_wins_only_with_a_clearly_longer_match():
    corpus = SuffixAutomaton([10, 11, 12, 13, 14, 15, 16, 17, 18, 19, -1, 1, 2, 30])
    context = [1, 2, 40, 1, 2]  # the context knows "1 2" → 40; the corpus "1 2" → 30 (not longer)
    assert SamIndex(context, corpus, 4.0, 0).matches(4)[0].tokens == [40, 1, 2, 40]
    long = [10, 11, 12, 13, 14, 15]  # the context has no repeat; the corpus matches all 6 tokens
    assert SamIndex(long, corpus, 4.0, 5).matches(4)[0].tokens == [16, 17, 18, 19]  # 6 - 5 > 0
    assert SamIndex(long, corpus, 4.0, 6).matches(4) == []  # not longer by more than 6: the context's (none)
    assert SamIndex([18, 19], corpus, 4.0, 0).matches(8) == []  # a continuation stops at a document's end


def test_corpus_reads_assistant_turns_and_refuses_benchmark_questions(tmp_path):
    good = tmp_path / "distilled.jsonl"
    good.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}) + "\n")
    assert corpus_texts(good) == ["hello"]
    bench = tmp_path / "question.jsonl"
    bench.write_text(json.dumps({"question_id": 81, "turns": ["Write a poem."]}) + "\n")
    with pytest.raises(UserError, match="benchmark"):
        corpus_texts(bench)
    plain = tmp_path / "notes.txt"
    plain.write_text("some text")
    assert corpus_texts(plain) == ["some text"]


# ------------------------------------------------------------------------------ decoding

NEW = SHORT_NEW  # new tokens per prompt (conftest.short_references: the baseline's answers)


@pytest.mark.parametrize("variant", [{}, {"extra": {"samd_adaptive": False}}], ids=["adaptive", "paper"])
def test_greedy_samd_is_lossless(smollm, short_references, variant):
    decoder = build_decoder("samd", smollm, DecoderOptions(**variant))
    for ids, expected in short_references:
        result = decoder.generate(ids, NEW)
        assert result.token_ids == expected
        assert sum(result.accept_lengths) == len(result.token_ids) and result.steps == len(result.accept_lengths)
        if ids is short_references[0][0]:
            assert len(result.token_ids) / result.steps > 1.5  # the repeat is drafted and accepted: tau > 1


def test_a_corpus_drafts_what_the_context_cannot(smollm, short_references, tmp_path):
    ids, expected = short_references[1]  # the summary: little to copy from its own context
    answer = smollm.tokenizer.decode(expected)
    corpus = tmp_path / "distilled.jsonl"
    corpus.write_text(json.dumps({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": answer}]}) + "\n")
    decoder = build_decoder("samd", smollm, DecoderOptions(samd_corpus=str(corpus), samd_len_bias=0,
                                                           extra={"samd_adaptive": False}))
    result = decoder.generate(ids, NEW)
    assert result.token_ids == expected
    assert result.steps < len(expected) / 2  # the corpus holds the answer: long drafts accepted
