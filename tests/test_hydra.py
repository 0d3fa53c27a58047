"""Hydra heads: level-by-level drafting vs a slow reference, checkpoint I/O, lossless decoding."""

from __future__ import annotations

import json

import pytest
import torch

from medusa_bench.inputs.chat import build_prompt
from medusa_bench.decoders.base import Sampling
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.decoders.registry import build_decoder
from medusa_bench.decoders.hydra import HydraProposer, draft_tree
from medusa_bench.decoders.spec import Draft, SpeculativeDecoder
from medusa_bench.errors import UserError
from medusa_bench.heads import io
from medusa_bench.heads.hydra import HydraHeads, load_hydra_heads, save_hydra_heads
from medusa_bench.trees.levels import level_plan
from medusa_bench.trees.tree import Tree

H, V = 16, 50
SMALL_TREES = ["chain-3", "[[0],[1],[2],[0,0],[0,1],[1,0],[0,0,0],[0,0,1],[2,0]]", "tree-16"]
PROMPTS = ["Explain why the sky is blue.", "Write a haiku about autumn."]


def tiny_llama(hidden=H, vocab=V, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def random_heads(model, arch="mlp", shared=True, K=3, L=1, scale=0.5, seed=0) -> HydraHeads:
    """Every weight random (Hydra's zero init would hide bugs in the blocks)."""
    heads = HydraHeads.for_model(model, num_heads=K, num_layers=L, arch=arch, shared_lm_head=shared)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, scale / p.shape[-1] ** 0.5 if p.dim() > 1 else scale)
    return heads.requires_grad_(False)


def slow_draft(heads: HydraHeads, tree: Tree, state: torch.Tensor, root: int) -> list[int]:
    """One path at a time, one head call per token: the obvious reading of the Hydra paper."""
    tokens = [root]
    for path in tree.paths:
        x = torch.cat([state, heads.embed(torch.tensor(root))])  # [2H]
        for depth, rank in enumerate(path):
            logits = heads.head_logits(depth, x[None])[0]  # [V]
            token = logits.topk(rank + 1).indices[rank]
            x = torch.cat([x, heads.embed(token)])
        tokens.append(int(token))
    return tokens


# ------------------------------------------------------------------------------ drafting
@pytest.mark.parametrize("arch", ["mlp", "prefix-mlp"])
@pytest.mark.parametrize("tree", SMALL_TREES + ["mc_sim_7b_63"])
def test_level_drafting_matches_slow_reference(arch, tree):
    model = tiny_llama().double()
    tree = Tree.parse(tree)
    heads = random_heads(model, arch, shared=arch == "mlp", K=tree.depth).double()
    plan = level_plan(tree.buffers())
    for seed in range(3):
        torch.manual_seed(seed)
        state, root = torch.randn(H, dtype=torch.float64), seed + 3
        fast = draft_tree(heads, plan, state, root, tree.num_nodes).tolist()
        assert fast == slow_draft(heads, tree, state, root)


def test_draft_vocab_restricts_the_candidates():
    model = tiny_llama()
    heads = random_heads(model, "mlp", shared=False, K=2)
    tree = Tree.parse("[[0],[1],[0,0],[1,0]]")
    plan, state = level_plan(tree.buffers()), torch.randn(H)
    full = draft_tree(heads, plan, state, 3, tree.num_nodes)
    heads.restrict_draft_vocab(torch.randperm(V))  # every token, another order: the same drafts
    assert torch.equal(draft_tree(heads, plan, state, 3, tree.num_nodes), full)
    heads.restrict_draft_vocab(torch.arange(10, 20))
    assert all(10 <= t < 20 for t in draft_tree(heads, plan, state, 3, tree.num_nodes)[1:].tolist())


def test_level_plan_runs_each_head_once_over_nodes_with_children():
    plan = level_plan(Tree.parse("[[0],[1],[2],[0,0],[0,1],[2,0],[0,0,0]]").buffers())
    assert [level.head for level in plan] == [0, 1, 2]
    assert [len(level.expand) for level in plan] == [1, 2, 1]  # depth 1 node [1] is a leaf: not expanded
    assert [level.top_k for level in plan] == [3, 2, 1]


# ------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("arch", ["mlp", "prefix-mlp"])
@pytest.mark.parametrize("shared", [True, False])
def test_checkpoint_round_trip(tmp_path, arch, shared):
    model = tiny_llama()
    heads = random_heads(model, arch, shared, K=3, L=2)
    save_hydra_heads(heads, tmp_path, base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["hydra_num_heads"] == 3 and config["hydra_num_layers"] == 2
    assert config["hydra_head_arch"] == arch and config["grounded_heads"] is True
    assert config["base_model_name_or_path"] == "tiny"

    names = io.tensor_names(tmp_path / "hydra_lm_head.safetensors")
    first = "hydra_mlp.2.1" if arch == "prefix-mlp" else "hydra_mlp.2.0"
    assert f"{first}.res_connection.weight" in names  # the reference's layout
    projection = "hydra_lm_head.0.1.weight" if arch == "prefix-mlp" else "hydra_lm_head.0.weight"
    assert (projection in names) == (not shared)
    assert any(n.startswith("prefix_embeding_layer.layers.0.") for n in names) == (arch == "prefix-mlp")

    loaded = load_hydra_heads(tmp_path, base_model=model)
    before, after = heads.hydra_state_dict(), loaded.hydra_state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    hidden, ids = torch.randn(12, H), torch.randint(0, V, (12,))
    assert torch.equal(heads.true_ranks(hidden, ids), loaded.true_ranks(hidden, ids))


def test_reads_reference_checkpoint_with_full_prefix_embedding(tmp_path):
    """The reference saves its prefix layer's unused [V, H] embedding table: read past it."""
    model = tiny_llama()
    heads = random_heads(model, "prefix-mlp", shared=False)
    tensors = heads.hydra_state_dict()
    tensors["prefix_embeding_layer.embed_tokens.weight"] = torch.randn(V, H)
    io.save_tensors(tmp_path / "hydra_lm_head.pt", tensors)
    (tmp_path / "config.json").write_text(json.dumps({"hydra_num_heads": 3, "hydra_num_layers": 1,
                                                      "hydra_head_arch": "prefix-mlp", "grounded_heads": True}))
    loaded = load_hydra_heads(tmp_path, base_model=model)
    assert torch.equal(loaded.prefix.layers[0].self_attn.q_proj.weight, heads.prefix.layers[0].self_attn.q_proj.weight)


def test_mismatches_are_clear_errors(tmp_path):
    model = tiny_llama()
    save_hydra_heads(random_heads(model, shared=False), tmp_path / "own")
    with pytest.raises(UserError, match="vocabulary 50 vs the base model's 60"):
        load_hydra_heads(tmp_path / "own", base_model=tiny_llama(vocab=60))
    with pytest.raises(UserError, match="hidden size 16 vs the base model's 24"):
        load_hydra_heads(tmp_path / "own", base_model=tiny_llama(hidden=24))
    (tmp_path / "medusa").mkdir()
    io.save_tensors(tmp_path / "medusa" / "hydra_lm_head.pt", {"0.0.linear.weight": torch.zeros(H, H)})
    with pytest.raises(UserError, match="no Hydra head tensors"):
        load_hydra_heads(tmp_path / "medusa", base_model=model)
    with pytest.raises(UserError, match="has no Hydra heads"):
        load_hydra_heads(tmp_path, base_model=model)
    with pytest.raises(UserError, match="depth 4 but only 3"):
        HydraProposer(random_heads(model), Tree.parse("chain-4"), torch.device("cpu"))


@pytest.mark.parametrize("arch", ["mlp", "prefix-mlp"])
def test_true_ranks_condition_on_the_true_path(arch):
    """Calibration's ranks: head d - 1 at position t, fed the true tokens t + 1 .. t + d, ranks token t + 1 + d."""
    model = tiny_llama().double()
    heads = random_heads(model, arch, shared=False, K=3).double()
    proposer = HydraProposer(heads, Tree.parse("chain-3"), torch.device("cpu"))
    hidden, ids = torch.randn(9, H, dtype=torch.float64), torch.randint(0, V, (9,))
    positions = torch.tensor([0, 3, 5, 6, 7])
    ranks = proposer.true_ranks(hidden, ids, positions, 3)
    states = heads.prefix_states(hidden[None])[0]
    for i, t in enumerate(positions.tolist()):
        for d in range(1, 4):
            if t + 1 + d >= len(ids):
                assert ranks[i, d - 1] == -1
                continue
            x = torch.cat([states[t], *heads.embed(ids[t + 1: t + 1 + d])])
            logits = heads.head_logits(d - 1, x[None])[0]
            assert ranks[i, d - 1] == int((logits > logits[ids[t + 1 + d]]).sum())


# ------------------------------------------------------------------------------ decoding on SmolLM2
@pytest.fixture(scope="module")
def references(smollm):
    baseline = build_decoder("baseline", smollm)
    prompts = [build_prompt(smollm, [{"role": "user", "content": p}]) for p in PROMPTS]
    return [(ids, baseline.generate(ids, 24).token_ids) for ids in prompts]


@pytest.fixture(scope="module")
def random_smollm_heads(smollm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hydra")
    heads = random_heads(smollm.model, "mlp", shared=True, K=4, scale=0.3)
    save_hydra_heads(heads, folder, base_model_name_or_path="smollm2-135m")
    return folder


@pytest.mark.parametrize("tree", SMALL_TREES)
def test_greedy_hydra_is_lossless(smollm, random_smollm_heads, references, tree):
    decoder = build_decoder("hydra", smollm, DecoderOptions(tree=tree, hydra_heads=str(random_smollm_heads)))
    for ids, expected in references:
        result = decoder.generate(ids, 24)
        assert result.token_ids == expected
        assert sum(result.accept_lengths) == len(result.token_ids) and result.steps == len(result.accept_lengths)


def test_typical_acceptance_runs(smollm, random_smollm_heads, references):
    options = DecoderOptions(tree="[[0],[1],[0,0]]", hydra_heads=str(random_smollm_heads), acceptance="typical")
    decoder = build_decoder("hydra", smollm, options)
    ids, expected = references[0]
    assert decoder.generate(ids, 12).token_ids == expected[:12]  # typical at temperature 0 is greedy
    sampled = decoder.generate(ids, 8, Sampling(temperature=0.7, seed=1))
    assert 1 <= len(sampled.token_ids) <= 8 and sum(sampled.accept_lengths) == len(sampled.token_ids)


def test_training_writes_heads_that_decode_losslessly(smollm, references, tmp_path):
    from medusa_bench.train.hydra import HydraFitConfig, train_hydra

    answers = [smollm.tokenizer.decode(expected) for _, expected in references]
    with open(tmp_path / "data.jsonl", "w") as handle:
        for prompt, answer in zip(PROMPTS * 3, answers * 3):
            handle.write(json.dumps({"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}) + "\n")
    config = HydraFitConfig(num_heads=2, arch="prefix-mlp", epochs=3, batch_size=40, heldout=0.2, patience=5,
                            hidden_cache="none", top_k=4)
    result = train_hydra(smollm, tmp_path / "data.jsonl", tmp_path / "heads", config)
    assert result.curve[-1]["train_loss"] < result.curve[0]["train_loss"]
    for name in ("hydra_lm_head.safetensors", "config.json", "calibration.json", "curve.csv", "draft_vocab.json"):
        assert (tmp_path / "heads" / name).is_file()
    calibration = json.loads((tmp_path / "heads" / "calibration.json").read_text())
    assert calibration["kind"] == "conditional" and calibration["top_k"] == 4

    decoder = build_decoder("hydra", smollm, DecoderOptions(tree="[[0],[1],[0,0]]", hydra_heads=str(tmp_path / "heads")))
    ids, expected = references[1]
    assert decoder.generate(ids, 16).token_ids == expected[:16]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "base_model_name_or_path": "vicuna-7b"}))
    with pytest.raises(UserError, match="already holds"):
        train_hydra(smollm, tmp_path / "data.jsonl", tmp_path / "other", config)


class OracleHydra(HydraProposer):
    """Real Hydra++ drafting with the known answer written onto the rank-1 branch, so steps accept.

    Records the prefix layer's state at every step to compare with a full recomputation.
    """

    branch = [2, 5, 8]  # nodes of the paths [1], [1, 0], [1, 0, 0] in ORACLE_TREE

    def __init__(self, *args, answer, **kwargs):
        super().__init__(*args, **kwargs)
        self.answer, self.states = answer, []

    def reset(self, prompt_ids):
        super().reset(prompt_ids)
        self.prompt_len, self.states = len(prompt_ids), []

    def propose(self, root, hidden, context):
        state = self.prefix.advance(context, hidden)
        self.states.append((len(context), state))
        tokens = draft_tree(self.heads, self.plan, state, root, self.tree.num_nodes)
        produced = len(context) - self.prompt_len + 1
        tokens[self.branch] = torch.tensor((self.answer + [0] * 8)[produced: produced + 3])
        return Draft(tokens, self.buffers)


ORACLE_TREE = "[[0],[1],[2],[0,0],[1,0],[2,0],[0,0,0],[1,0,0]]"


def test_prefix_layer_follows_the_accepted_path(smollm, references):
    """Hydra++'s prefix layer, fed incrementally along accepted paths, equals one pass over the whole text."""
    heads = random_heads(smollm.model, "prefix-mlp", shared=True, K=3, scale=0.3)
    for ids, expected in references:
        proposer = OracleHydra(heads, Tree.parse(ORACLE_TREE), smollm.device, answer=expected)
        result = SpeculativeDecoder("oracle", smollm, proposer).generate(ids, 24)
        assert result.token_ids == expected
        assert max(result.accept_lengths) == 4

        with torch.no_grad():
            hidden = smollm.model(torch.tensor([ids + expected]), output_hidden_states=True).hidden_states[-1]
            states = heads.prefix_states(hidden)[0]  # [T, H]
        for context_len, state in proposer.states:
            torch.testing.assert_close(state, states[context_len - 1], atol=2e-4, rtol=1e-4)


def test_default_heads_ship_and_decode_losslessly(smollm, references):
    from medusa_bench.heads.common import default_heads

    if default_heads(smollm, "hydra") is None:
        pytest.skip("no default Hydra heads in medusa_bench/data/heads")
    decoder = build_decoder("hydra", smollm, DecoderOptions(tree="tree-16"))
    assert decoder.proposer.heads.arch == "prefix-mlp" and decoder.proposer.heads.num_heads == 3  # the fourth is not shipped (train_default_heads.sh)
    ids, expected = references[0]
    result = decoder.generate(ids, 24)
    assert result.token_ids == expected
    assert result.steps < len(expected)  # trained heads draft something right on ordinary text


def test_profiler_times_prefix_heads_steps(smollm):
    """The tree optimiser's profiler decodes on from each context and rewinds to it every few steps:
    Hydra++'s prefix layer must follow both."""
    from medusa_bench.bench.calibrate import PROFILE_RUN, profile

    heads = random_heads(smollm.model, "prefix-mlp", shared=True, K=2, scale=0.3)
    trees = {1: Tree.parse("empty"), 3: Tree.parse("[[0],[0,0]]")}
    contexts = [list(range(100, 160)), list(range(200, 240))]
    latency = profile(smollm, lambda t: HydraProposer(heads, t, smollm.device), trees, contexts,
                      repeats=2 * PROFILE_RUN + 1, warmup=1)  # every state rewound at least once
    assert set(latency.step_time) == {1, 3} and all(t > 0 for t in latency.step_time.values())
    assert latency.meta["contexts"] == [60, 40] and set(latency.meta["ratio_ci"]) == {"3"}
