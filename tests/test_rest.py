"""REST: the datastore (suffix array, lookup), retrieval into a trie, the CLI, and losslessness."""

import json
import random

import numpy as np
import pytest

from conftest import SHORT_NEW, run_cli
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.decoders.registry import build_decoder
from medusa_bench.decoders.rest import Datastore, retrieve, suffix_array
from medusa_bench.errors import UserError

# ------------------------------------------------------------------------------ the datastore


def store_of(tokens):
    tokens = np.array(tokens, dtype=np.int64)
    return Datastore(tokens, suffix_array(tokens))


def test_the_suffix_array_sorts_suffixes_and_finds_every_occurrence():
    rng = random.Random(0)
    tokens = [rng.randrange(4) for _ in range(200)] + [-1] + [rng.randrange(4) for _ in range(50)]
    store = store_of(tokens)
    order = store.suffixes.tolist()
    assert sorted(order) == list(range(len(tokens)))
    assert [tokens[i:i + 16] for i in order] == sorted(tokens[i:i + 16] for i in range(len(tokens)))
    for n in (1, 3, 6):
        for start in range(0, 240, 17):
            query = tokens[start:start + n]
            lo, hi = store.occurrences(query)
            found = sorted(order[lo:hi])
            assert found == [i for i in range(len(tokens)) if tokens[i:i + n] == query]
    assert store.occurrences([9]) == (store.occurrences([9])[0],) * 2  # absent: an empty range


def test_retrieval_merges_the_continuations_of_the_longest_match_into_a_trie():
    # "1 2" is followed by 3 4 twice and by 3 5 once; "7 1 2" only once (by 3 5)
    store = store_of([1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 7, 1, 2, 3, 5, -1, 1, 2, 9])
    trie, matched = retrieve(store, [8, 1, 2], max_suffix=16, candidates=100, length=2)
    assert matched == 2 and trie.count[0] == 4  # four continuations after "1 2"; the last one is cut at 9's end
    three = trie.children[0][3]
    assert trie.count[three] == 3 and trie.count[trie.children[three][4]] == 2
    assert trie.count[trie.children[0][9]] == 1
    trie, matched = retrieve(store, [7, 1, 2], max_suffix=16, candidates=100, length=2)
    assert matched == 3 and list(trie.children[0]) == [3] and trie.count[trie.children[trie.children[0][3]][5]] == 1
    _, matched = retrieve(store, [42], max_suffix=16, candidates=100, length=2)
    assert matched == 0
    trie, _ = retrieve(store, [5, 1, 2], max_suffix=16, candidates=100, length=4)
    five = trie.children[trie.children[0][3]][5]
    assert trie.children[five] == {} and trie.count[0] == 4  # "3 5" stops at its document's end


# ------------------------------------------------------------------------------ the CLI and decoding
NEW = SHORT_NEW  # new tokens per prompt (conftest.short_references: the baseline's answers)


def test_datastore_build_and_greedy_rest_is_lossless(smollm, short_references, tmp_path, capsys, monkeypatch):
    # a corpus of training answers: one is the model's own answer to the second prompt, one unrelated
    answer = smollm.tokenizer.decode(short_references[1][1])
    corpus = tmp_path / "distilled.jsonl"
    corpus.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": v}]}) + "\n"
                              for v in (answer, "The weather is nice today. The dog sleeps.")))
    out = tmp_path / "store.npz"
    code, stdout, stderr = run_cli(capsys, monkeypatch, "datastore", "build", "--from", corpus, "--out", out)
    assert code == 0 and out.is_file(), stderr
    for variant in ({}, {"extra": {"rest_adaptive": False}}):
        decoder = build_decoder("rest", smollm, DecoderOptions(rest_datastore=str(out), **variant))
        for ids, expected in short_references:
            result = decoder.generate(ids, NEW)
            assert result.token_ids == expected
            assert sum(result.accept_lengths) == len(result.token_ids)
        assert len(expected) / result.steps > 2  # the datastore holds this answer: tau > 2
    with pytest.raises(UserError, match="--rest-datastore"):
        build_decoder("rest", smollm)
    bench = tmp_path / "question.jsonl"
    bench.write_text(json.dumps({"question_id": 81, "turns": ["Write a poem."]}) + "\n")
    code, _, stderr = run_cli(capsys, monkeypatch, "datastore", "build", "--from", bench, "--out", tmp_path / "no.npz")
    assert code != 0 and "benchmark" in stderr


def test_a_run_without_datastore_is_refused_before_the_model_loads(capsys, monkeypatch, tmp_path):
    # `--decoders spec-bench` includes rest: the missing datastore is one line at once, not after the trees are sized
    code, _, stderr = run_cli(capsys, monkeypatch, "run", "--decoders", "baseline,rest", "--limit", "1",
                              "--max-new-tokens", "4", "--out", tmp_path / "run")
    assert code == 2 and "needs --rest-datastore PATH" in stderr
    assert not (tmp_path / "run").exists()
