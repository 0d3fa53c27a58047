"""Captured (CUDA-graph) steps on a GPU give eager decoding's tokens. Skipped without CUDA.

A small random Llama (no weights to download), fp32: the dynamic cache eager, the static cache
eager and the static cache with recorded graphs must emit the same tokens, for plain steps and
for 16-node trees drafted at random (most drafts are rejected: the verify step, the path gather
and the next root are what is checked).
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return LlamaForCausalLM(config).to("cuda", torch.float32).eval()


def loaded_for(model, cache: str, compile: str):
    from medusa_bench.runtime.engine import use_engine
    from medusa_bench.models import LoadedModel

    loaded = LoadedModel(model=model, tokenizer=None, name="tiny", spec="tiny", device=torch.device("cuda"),
                         dtype=torch.float32, eos_token_ids=[], context_length=2048)
    use_engine(loaded, cache, compile)
    return loaded


class RandomTree:
    """Drafts mc_sim_7b_63's first 15 paths with random tokens (seeded: the same drafts for every engine)."""

    def __new__(cls, device):
        from medusa_bench.decoders.spec import Draft, Proposer
        from medusa_bench.trees.presets import get_preset
        from medusa_bench.trees.tree import Tree

        class _RandomTree(Proposer):
            draft_size = 15

            def __init__(self):
                self.tree = Tree.parse(get_preset("mc_sim_7b_63")[:15])
                self.buffers = self.tree.buffers(device)
                self.generator = torch.Generator().manual_seed(0)

            def reset(self, prompt_ids):
                self.generator.manual_seed(0)

            def propose(self, root, hidden, context):
                tokens = torch.randint(0, 512, (self.tree.num_nodes,), generator=self.generator)
                tokens[1:4] = torch.tensor(context[-3:])  # some drafts the model may accept (repetition)
                return Draft(tokens.to(device), self.buffers)

        return _RandomTree()


@pytest.mark.parametrize("drafting", [False, True])
def test_captured_steps_give_eager_tokens(drafting):
    from medusa_bench.decoders.spec import Proposer, SpeculativeDecoder

    model = tiny_llama()
    prompt = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    results = {}
    for cache, compile in (("dynamic", "off"), ("static", "off"), ("static", "on")):
        loaded = loaded_for(model, cache, compile)
        proposer = RandomTree(loaded.device) if drafting else Proposer()
        decoder = SpeculativeDecoder("t", loaded, proposer)
        runs = [decoder.generate(prompt, 40) for _ in range(2)]  # the second replays recorded graphs
        assert runs[0].token_ids == runs[1].token_ids
        results[(cache, compile)] = runs[1]
        if compile == "on":
            assert loaded.engine.describe()["compile"] == "cuda-graphs"
            assert any(cache.graphs for cache in loaded.engine.caches)
    reference = results[("dynamic", "off")]
    for key, result in results.items():
        assert result.token_ids == reference.token_ids, key
        assert result.accept_lengths == reference.accept_lengths, key


@pytest.mark.parametrize("variant, dynamic", [("eagle", False), ("eagle", True), ("eagle3", True)])
def test_eagle_drafting_on_captured_steps_is_lossless(variant, dynamic):
    """EAGLE reads the verify step's features (EAGLE-3: three layers) and keeps its own eager draft
    cache: on recorded graphs its tokens must still be the plain greedy baseline's."""
    from medusa_bench.decoders.eagle import EagleProposer
    from medusa_bench.decoders.spec import Proposer, SpeculativeDecoder
    from medusa_bench.heads.eagle import new_eagle_heads
    from medusa_bench.trees.presets import get_preset
    from medusa_bench.trees.tree import Tree

    model = tiny_llama()
    prompt = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = SpeculativeDecoder("b", loaded_for(model, "dynamic", "off"), Proposer()).generate(prompt, 40).token_ids
    heads = new_eagle_heads(model, variant, torch.arange(256) if variant == "eagle3" else None).to("cuda")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    heads.requires_grad_(False).eval()
    tree = Tree.parse(get_preset("mc_sim_7b_63")[:15])
    for cache, compile in (("dynamic", "off"), ("static", "on")):
        loaded = loaded_for(model, cache, compile)
        decoder = SpeculativeDecoder("e", loaded, EagleProposer(heads, tree, loaded.device, dynamic=dynamic, top_k=3))
        for _ in range(2):  # the second replays recorded graphs
            result = decoder.generate(prompt, 40)
            assert result.token_ids == expected, (cache, compile)
            assert sum(result.accept_lengths) == len(result.token_ids)
