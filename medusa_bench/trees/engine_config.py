"""The optimiser's tree as a serving engine's speculative configuration (`medusa-bench tree --export`).

What each engine can take of a tree (their docs and sources at the versions named):
- vLLM (0.32, `--speculative-config`): Medusa, EAGLE and EAGLE-3 draft one chain, one candidate per
  head or per EAGLE step, so a tree becomes its depth: `num_speculative_tokens` (its top-1 chain).
- SGLang (`--speculative-algorithm EAGLE|EAGLE3`): EAGLE trees of `--speculative-num-steps` levels,
  `--speculative-eagle-topk` children per node and `--speculative-num-draft-tokens` verified nodes;
  no Medusa or Hydra.
- TensorRT-LLM: Medusa's `medusa_choices` and EAGLE-1's `eagle_choices` are this project's tree
  format (top-k rank paths), taken as they are.
The empty tree (the optimiser found no tree that pays) is written as speculation off, with why.
"""

from __future__ import annotations

from typing import Optional

from medusa_bench.errors import UserError
from medusa_bench.trees.tree import Tree

ENGINES = ("vllm", "sglang", "trtllm")
# decoder -> each engine's name for its method (None: the engine has no such method)
METHODS = {
    "medusa": {"vllm": "medusa", "sglang": None, "trtllm": "medusa"},
    "eagle": {"vllm": "eagle", "sglang": "EAGLE", "trtllm": "eagle"},
    "eagle2": {"vllm": "eagle", "sglang": "EAGLE", "trtllm": "eagle"},
    "eagle3": {"vllm": "eagle3", "sglang": "EAGLE3", "trtllm": None},
    "hydra": {"vllm": None, "sglang": None, "trtllm": None},
}


def engine_config(tree: Tree, engine: str, decoder: str, heads: Optional[str] = None) -> dict:
    """`{"engine", "decoder", "tree": {nodes, depth}, "config": …, "flags": [...], "note"}` for `engine`."""
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r} for --export; valid names are: {', '.join(ENGINES)}")
    base = decoder.split(":")[0]
    method = METHODS.get(base, {}).get(engine)
    if method is None:
        engines = [name for name, value in METHODS.get(base, {}).items() if value]
        also = f"; it can export to {', '.join(engines)}" if engines else ""
        raise UserError(f"{engine} has no speculative method for {base!r} heads{also}")
    out = {"engine": engine, "decoder": decoder, "tree": {"nodes": tree.num_nodes, "depth": tree.depth}}
    heads = heads or "<exported heads folder: medusa_bench/heads/export_vllm.py>"
    if tree.num_nodes == 1:
        return {**out, "config": None, "flags": [], "note": "the optimiser chose the empty tree on this machine: "
                "no tree pays here, so serve without speculation"}
    if engine == "vllm":
        config = {"method": method, "model": heads, "num_speculative_tokens": tree.depth}
        return {**out, "config": {"speculative_config": config},
                "flags": ["--speculative-config", _json(config)],
                "note": f"vLLM drafts a chain: the tree's depth {tree.depth} (its {tree.num_nodes} nodes do not carry over)"}
    if engine == "sglang":
        topk = max_children(tree)
        config = {"speculative_algorithm": method, "speculative_draft_model_path": heads,
                  "speculative_num_steps": tree.depth, "speculative_eagle_topk": topk,
                  "speculative_num_draft_tokens": tree.num_nodes}
        return {**out, "config": config, "flags": [f"--{key.replace('_', '-')}={value}" for key, value in config.items()],
                "note": f"EAGLE tree: {tree.depth} steps, top-{topk}, {tree.num_nodes} draft tokens (root included)"}
    key = "medusa_choices" if method == "medusa" else "eagle_choices"
    return {**out, "config": {key: [list(path) for path in tree.to_list()]}, "flags": [],
            "note": f"{key}: the tree's {tree.num_nodes - 1} paths as TensorRT-LLM takes them"}


def max_children(tree: Tree) -> int:
    """The most children any node has (SGLang's top-k per expanded node)."""
    counts: dict[tuple, int] = {}
    for path in tree.to_list():
        parent = tuple(path[:-1])
        counts[parent] = counts.get(parent, 0) + 1
    return max(counts.values(), default=1)


def _json(config: dict) -> str:
    import json

    return json.dumps(config, separators=(",", ":"))
