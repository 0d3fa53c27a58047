"""`tree --export`: the optimiser's tree as vLLM's, SGLang's and TensorRT-LLM's speculative configuration."""

import json

import pytest

from medusa_bench.errors import UserError
from medusa_bench.trees.engine_config import engine_config, max_children
from medusa_bench.trees.tree import Tree

TREE = Tree([(0,), (1,), (0, 0), (0, 1), (0, 0, 0)])  # 6 nodes, depth 3, two children under the root and under (0,)


def test_vllm_takes_the_depth_as_its_chain():
    out = engine_config(TREE, "vllm", "medusa:auto", heads="/heads/medusa-vllm")
    assert out["config"] == {"speculative_config": {"method": "medusa", "model": "/heads/medusa-vllm", "num_speculative_tokens": 3}}
    assert out["flags"][0] == "--speculative-config" and json.loads(out["flags"][1]) == out["config"]["speculative_config"]
    assert engine_config(TREE, "vllm", "eagle3")["config"]["speculative_config"]["method"] == "eagle3"


def test_sglang_takes_steps_topk_and_draft_tokens():
    out = engine_config(TREE, "sglang", "eagle2")
    assert out["config"]["speculative_num_steps"] == 3 and out["config"]["speculative_eagle_topk"] == max_children(TREE) == 2
    assert out["config"]["speculative_num_draft_tokens"] == 6 and "--speculative-algorithm=EAGLE" in out["flags"]


def test_trtllm_takes_the_paths_as_they_are():
    assert engine_config(TREE, "trtllm", "medusa")["config"] == {"medusa_choices": [list(p) for p in TREE.to_list()]}
    assert "eagle_choices" in engine_config(TREE, "trtllm", "eagle")["config"]


def test_the_empty_tree_is_speculation_off_and_missing_methods_are_one_line():
    off = engine_config(Tree.empty(), "vllm", "medusa")
    assert off["config"] is None and "no tree pays" in off["note"]
    with pytest.raises(UserError, match="sglang has no speculative method for 'medusa'.*vllm, trtllm"):
        engine_config(TREE, "sglang", "medusa")
    with pytest.raises(UserError, match="valid names are: vllm, sglang, trtllm"):
        engine_config(TREE, "tgi", "medusa")
