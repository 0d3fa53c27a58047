"""samd-eagle2: SAM decoding with EAGLE-2 drafting where the automaton's match is short.

Lossless on the training-free decoders' prompts (conftest.short_references), each drafter used where
it should be, EAGLE's draft cache in step after SAM-drafted steps and after a rewind."""

import random

import pytest

from conftest import SHORT_NEW
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.decoders.registry import build_decoder
from medusa_bench.decoders.samd import SamIndex, SuffixAutomaton

NEW = SHORT_NEW
TREE = "tree-16"  # EAGLE-2's dynamic trees of 16 nodes, as tests/test_eagle.py's default-heads test
COPY = {"samd_len_threshold": 2, "extra": {"samd_adaptive": False}}  # SAM drafts early and whole: many switches


def tau(result) -> float:
    return len(result.token_ids) / result.steps


@pytest.fixture(scope="module")
def eagle_heads(smollm):
    from medusa_bench.heads.common import default_heads

    if default_heads(smollm, "eagle") is None:
        pytest.skip("no default eagle heads in medusa_bench/data/heads")


def samd_eagle2(smollm, **options):
    return build_decoder("samd-eagle2", smollm, DecoderOptions(tree=TREE, **options))


def recording(decoder):
    """Record (drafter, root, context, draft tokens, parents) of every draft the decoder's proposer makes."""
    proposer, drafts = decoder.proposer, []
    propose = proposer.propose

    def record(root, hidden, context):
        draft = propose(root, hidden, context)
        if draft is not None:
            drafts.append((proposer.drafter, root, list(context), draft.tokens.tolist(), draft.buffers.parents.tolist()))
        return draft

    proposer.propose = record
    return drafts


# ------------------------------------------------------------------------------ the decision
def test_the_decision_length_is_the_match_extend_gives():
    rng = random.Random(2)
    corpus = SuffixAutomaton([rng.randrange(4) for _ in range(60)])
    for static, bias in ((None, 5), (corpus, 3)):
        index = SamIndex([], static, alpha=4.0, len_bias=bias)
        for _ in range(80):
            token = rng.randrange(4)
            expected = index.length_after(token)
            index.extend([token])
            static_length = index.static_length - bias if static is not None else 0
            assert expected == max(index.length, static_length)


# ------------------------------------------------------------------------------ decoding
@pytest.fixture(scope="module")
def paper_answers(smollm, short_references, eagle_heads):
    """samd-eagle2 with its defaults (the paper's threshold 5) on both prompts: (result, steps per drafter)."""
    decoder = samd_eagle2(smollm)
    answers = []
    for ids, _ in short_references:
        result = decoder.generate(ids, NEW)
        answers.append((result, dict(decoder.proposer.steps)))
    return answers


def test_greedy_samd_eagle2_is_lossless_and_drafts_with_both(short_references, paper_answers):
    for (ids, expected), (result, _) in zip(short_references, paper_answers):
        assert result.token_ids == expected
        assert sum(result.accept_lengths) == len(result.token_ids) and result.steps == len(result.accept_lengths)
    (_, repeat), (_, summary) = paper_answers
    assert repeat["sam"] >= 1 and repeat["eagle"] >= 1  # the repeated sentence: the match reaches 5 tokens
    assert summary["sam"] == 0 and summary["eagle"] >= 1  # nothing 5 tokens long repeats: EAGLE-2 all along


def test_where_sam_never_drafts_it_is_eagle2(smollm, short_references, paper_answers):
    eagle2 = build_decoder("eagle2", smollm, DecoderOptions(tree=TREE))
    for (ids, _), (combined, steps) in zip(short_references, paper_answers):
        alone = eagle2.generate(ids, NEW)
        assert tau(combined) >= tau(alone)
        if steps["sam"] == 0:
            assert combined.accept_lengths == alone.accept_lengths


def test_eagle_drafts_after_sam_steps_are_a_fresh_eagle2s(smollm, short_references, eagle_heads):
    """SAM drafting early: accepted copies, and every EAGLE draft after SAM-drafted steps (its draft layer
    fed their rows at once) equals the draft of an eagle2 that saw the whole context in one prefill."""
    decoder = samd_eagle2(smollm, **COPY)
    fresh = build_decoder("eagle2", smollm, DecoderOptions(tree=TREE))
    drafts, checked, taus = recording(decoder), 0, []
    for ids, expected in short_references:
        drafts.clear()
        result = decoder.generate(ids, NEW)
        assert result.token_ids == expected
        taus.append(tau(result))
        drafters = [d[0] for d in drafts]
        assert "sam" in drafters and "eagle" in drafters
        for i, (drafter, root, context, tokens, parents) in enumerate(drafts):
            if drafter != "eagle" or "sam" not in drafters[:i]:
                continue
            state = fresh.prefill(context)
            draft = fresh.proposer.propose(root, state.hidden, context)
            assert (draft.tokens.tolist(), draft.buffers.parents.tolist()) == (tokens, parents)
            checked += 1
    assert checked >= 1
    assert taus[0] > 2  # the repeat is copied


def test_rewind_then_step_repeats_both_drafters(smollm, short_references, eagle_heads):
    decoder = samd_eagle2(smollm, **COPY)
    drafts = recording(decoder)
    ids, expected = short_references[0]
    state = decoder.prefill(ids)
    decoder.step(state)
    checkpoint, before = state.checkpoint(), len(drafts)
    first = [decoder.step(state) for _ in range(3)]
    made = drafts[before:]
    assert {"sam", "eagle"} <= {d[0] for d in drafts}
    decoder.rewind(state, checkpoint)
    proposer = decoder.proposer
    assert proposer.eagle.cache.get_seq_length() == proposer.eagle.fed <= checkpoint.length
    assert proposer.sam.index.tokens == (ids + state.tokens)[:len(proposer.sam.index.tokens)]
    del drafts[before:]
    again = [decoder.step(state) for _ in range(3)]
    assert [(r.tokens, r.path) for r in again] == [(r.tokens, r.path) for r in first]
    assert drafts[before:] == made  # the same drafters drafted the same trees
    while len(state.tokens) < NEW:
        decoder.step(state)
    assert state.tokens[:len(expected)] == expected  # generate stops at EOS, the steps go on
