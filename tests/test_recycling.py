"""Token Recycling: the adjacency matrix, the template, the loop's observe_logits hook, and losslessness."""

import pytest
import torch

from conftest import SHORT_NEW
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.decoders.recycling import RANK_PRIOR, Adjacency, RecyclingProposer, fill, template
from medusa_bench.decoders.registry import build_decoder
from medusa_bench.decoders.spec import Draft, Proposer, SpeculativeDecoder
from medusa_bench.inputs.chat import build_prompt
from medusa_bench.trees.tree import TreeBuffers

# ------------------------------------------------------------------------------ the matrix and the template


def logits_preferring(rows, vocab=10):
    """[n, vocab] logits whose top-k order is each given row's order."""
    out = torch.zeros(len(rows), vocab)
    for i, row in enumerate(rows):
        for rank, token in enumerate(row):
            out[i, token] = 10.0 - rank
    return out


def test_the_matrix_keeps_each_tokens_latest_top_k():
    adjacency = Adjacency(top_k=2)
    assert adjacency.successors(torch.tensor([3]), torch.tensor([0])).tolist() == [-1]  # nothing seen yet
    adjacency.update(torch.tensor([3, 4]), logits_preferring([[5, 6], [7, 8]]))
    assert adjacency.matrix[3].tolist() == [5, 6] and adjacency.matrix[4].tolist() == [7, 8]
    adjacency.update(torch.tensor([3]), logits_preferring([[9, 1]]))  # a later forward replaces the row
    assert adjacency.matrix[3].tolist() == [9, 1] and adjacency.matrix[4].tolist() == [7, 8]
    assert adjacency.successors(torch.tensor([3, 4, 2, -1]), torch.tensor([1, 0, 0, 0])).tolist() == [1, 7, -1, -1]


def test_the_template_is_the_most_probable_rank_paths_parents_first():
    parents, ranks = template(80, top_k=8)
    assert len(parents) == 81 and parents[0] == -1
    assert all(0 <= p < i for i, p in enumerate(parents) if i)
    probability = [1.0]
    for parent, rank in zip(parents[1:], ranks[1:]):
        probability.append(probability[parent] * RANK_PRIOR[rank])
    assert probability[1:] == sorted(probability[1:], reverse=True)  # best first: every prefix is a tree
    assert ranks[1:3] == [0, 0] and parents[1:3] == [0, 1]  # the top-1 chain first (0.45, 0.2 > 0.12)
    assert template(3, top_k=1) == ([-1, 0, 1, 2], [0, 0, 0, 0])  # k = 1: a chain


def test_fill_walks_the_matrix_breadth_first_from_the_root():
    adjacency = Adjacency(top_k=2)
    adjacency.update(torch.tensor([1, 2, 3]), logits_preferring([[2, 3], [4, 5], [6, 7]]))
    parents, ranks = [-1, 0, 0, 1, 1, 2, 3], [0, 0, 1, 0, 1, 0, 0]
    depths = [0, 1, 1, 2, 2, 2, 3]
    # root 1 → 2, 3; 2 → 4, 5; 3 → 6; 4 is unknown → -1
    assert fill(adjacency, 1, parents, ranks, depths).tolist() == [1, 2, 3, 4, 5, 6, -1]


# ------------------------------------------------------------------------------ the loop's hook


class Recorder(Proposer):
    """A chain of fixed guesses that records what observe_logits is shown."""

    wants_logits = True
    draft_size = 2

    def __init__(self):
        self.seen = []
        self.turn = 0

    def observe_logits(self, tokens, logits):
        self.seen.append((tokens.tolist(), logits.clone()))

    def propose(self, root, hidden, context):
        self.turn += 1
        if self.turn % 2:
            return None  # a plain step
        return Draft(torch.tensor([root, 13, 14]), TreeBuffers.from_parents([-1, 0, 0]))


def test_the_loop_shows_every_verified_node_its_logits(smollm):
    ids = build_prompt(smollm, [{"role": "user", "content": "Count: one, two, three"}])
    recorder = Recorder()
    decoder = SpeculativeDecoder("recorder", smollm, recorder)
    state = decoder.prefill(ids)
    assert recorder.seen[0][0] == ids and recorder.seen[0][1].shape[0] == len(ids)  # every prompt token's row
    assert torch.equal(recorder.seen[0][1][-1], state.logits)
    decoder.step(state)  # plain: the root's row
    root = state.tokens[0]
    assert recorder.seen[1][0] == [root] and torch.equal(recorder.seen[1][1][0], state.logits)
    decoder.step(state)  # a two-branch draft: three rows, the root's first
    tokens, logits = recorder.seen[2]
    assert tokens[1:] == [13, 14] and logits.shape[0] == 3
    # the base model's own logits after the root (a fresh forward over the same text)
    full = torch.tensor([ids + state.tokens[:2]])
    with torch.inference_mode():
        expected = smollm.model(full).logits[0, -1]
    assert torch.allclose(logits[0], expected, atol=1e-3)


# ------------------------------------------------------------------------------ decoding
NEW = SHORT_NEW  # new tokens per prompt (conftest.short_references: the baseline's answers)


@pytest.mark.parametrize("spec, variant", [("recycling", {}), ("recycling:full", {"recycling_nodes": 24})],
                         ids=["adaptive", "whole-template"])
def test_greedy_recycling_is_lossless(smollm, short_references, spec, variant):
    decoder = build_decoder(spec, smollm, DecoderOptions(**variant))
    assert decoder.proposer.adaptive == (spec == "recycling") and decoder.name == spec  # `:full`: the paper's drafting
    steps = tokens = 0
    for ids, expected in short_references + short_references[:1]:  # the first prompt again: the matrix is hot
        result = decoder.generate(ids, NEW)
        assert result.token_ids == expected
        assert sum(result.accept_lengths) == len(result.token_ids) and result.steps == len(result.accept_lengths)
        steps, tokens = steps + result.steps, tokens + len(result.token_ids)
    assert tokens / steps > 1.2  # drafts accepted: tau > 1


def test_plain_steps_still_teach_the_policy():
    proposer = RecyclingProposer(nodes=4, top_k=2)
    proposer.costs.relative = lambda k, chain=True: 10.0 * k  # nothing ever pays: every step is plain
    proposer.observe_logits(torch.tensor([1, 2]), logits_preferring([[2, 3], [4, 5]]))
    assert proposer.propose(1, None, [7]) is None  # filled (1 → 2, 3; 2 → 4, 5) but not drafted
    proposer.update(0)
    proposer.propose(2, None, [7, 1])  # the base model chose 2 after 1: rank 0 right, rank 1 wrong
    assert proposer.stats.data[(1, 0)] == [1.0, 1.0] and proposer.stats.data[(1, 1)] == [0.0, 1.0]
