"""Named candidate trees (medusa_choices format: top-k rank paths, root implicit).

Presets are plain data so they can be printed, diffed and saved as tree.json. `get_preset`
also understands `chain-N` (N >= 0: the top-1 candidate of heads 1..N) and `empty` (the
baseline: root only).
"""

from __future__ import annotations

from medusa_bench.errors import UserError, unknown_name

# --- Medusa's published trees ------------------------------------------------------------
# Copied as data from FasterDecoding/Medusa, medusa/model/medusa_choices.py (Apache-2.0,
# Copyright the Medusa authors; the per-model trees as of commit 5e98053, also mirrored in
# xformers' tree-attention tests). Tuples there, lists here; order as published.
# `mc_sim_7b_63`: 63 paths (64 nodes with the root), depth 4, ranks 0..9.

MC_SIM_7B_63 = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4],
    [2, 0], [0, 5], [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8],
    [0, 0, 2], [3, 0], [0, 9], [8], [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0],
    [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0],
    [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2],
    [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0],
    [0, 6, 0], [0, 0, 0, 1], [1, 6], [0, 7, 0],
]

VICUNA_7B_STAGE2 = [
    [0], [0, 0], [1], [0, 1], [0, 0, 0], [1, 0], [2], [0, 2], [0, 0, 1], [0, 3], [3],
    [0, 1, 0], [2, 0], [4], [0, 0, 2], [0, 4], [1, 1], [1, 0, 0], [0, 0, 0, 0], [5],
    [0, 0, 3], [0, 5], [0, 2, 0], [3, 0], [0, 1, 1], [0, 6], [6], [0, 7], [0, 0, 4], [4, 0],
    [1, 2], [0, 8], [7], [0, 3, 0], [0, 0, 0, 1], [0, 0, 5], [2, 1], [0, 0, 6], [1, 0, 1],
    [0, 0, 1, 0], [2, 0, 0], [5, 0], [0, 9], [0, 1, 2], [8], [0, 4, 0], [0, 2, 1], [1, 3],
    [0, 0, 7], [0, 0, 0, 2], [0, 0, 8], [1, 1, 0], [0, 1, 0, 0], [6, 0], [9], [0, 1, 3],
    [0, 0, 0, 3], [1, 0, 2], [0, 5, 0], [3, 1], [0, 0, 2, 0], [7, 0], [1, 4],
]

VICUNA_7B_STAGE1_ABLATION = [
    [0], [0, 0], [1], [0, 0, 0], [0, 1], [1, 0], [2], [0, 2], [0, 0, 1], [3], [0, 3],
    [0, 1, 0], [2, 0], [0, 0, 2], [0, 4], [4], [0, 0, 0, 0], [1, 0, 0], [1, 1], [0, 0, 3],
    [0, 2, 0], [0, 5], [5], [3, 0], [0, 1, 1], [0, 6], [6], [0, 0, 4], [1, 2], [0, 0, 0, 1],
    [4, 0], [0, 0, 5], [0, 7], [0, 8], [0, 3, 0], [0, 0, 1, 0], [1, 0, 1], [7], [2, 0, 0],
    [0, 0, 6], [2, 1], [0, 1, 2], [5, 0], [0, 2, 1], [0, 9], [0, 0, 0, 2], [0, 4, 0], [8],
    [1, 3], [0, 0, 7], [0, 1, 0, 0], [1, 1, 0], [6, 0], [9], [0, 0, 8], [0, 0, 9],
    [0, 5, 0], [0, 0, 2, 0], [1, 0, 2], [0, 1, 3], [0, 0, 0, 3], [3, 0, 0], [3, 1],
]

VICUNA_7B_STAGE1 = [
    [0], [0, 0], [1], [2], [0, 1], [1, 0], [3], [0, 2], [4], [0, 0, 0], [0, 3], [5], [2, 0],
    [0, 4], [6], [0, 5], [1, 1], [0, 0, 1], [7], [3, 0], [0, 6], [8], [9], [0, 1, 0],
    [0, 7], [0, 8], [4, 0], [0, 0, 2], [1, 2], [0, 9], [2, 1], [5, 0], [1, 0, 0], [0, 0, 3],
    [1, 3], [0, 2, 0], [0, 1, 1], [0, 0, 4], [6, 0], [1, 4], [0, 0, 5], [2, 2], [0, 3, 0],
    [3, 1], [0, 0, 6], [7, 0], [1, 5], [1, 0, 1], [2, 0, 0], [0, 0, 7], [8, 0],
    [0, 0, 0, 0], [4, 1], [0, 1, 2], [0, 4, 0], [9, 0], [0, 2, 1], [2, 3], [1, 6],
    [0, 0, 8], [0, 5, 0], [3, 2], [5, 1],
]

VICUNA_13B_STAGE2 = [
    [0], [0, 0], [1], [0, 0, 0], [0, 1], [1, 0], [2], [0, 2], [0, 0, 1], [0, 1, 0], [3],
    [0, 3], [2, 0], [0, 0, 2], [0, 0, 0, 0], [0, 4], [1, 0, 0], [1, 1], [4], [0, 0, 3],
    [0, 5], [0, 2, 0], [5], [3, 0], [0, 1, 1], [0, 6], [0, 0, 4], [0, 0, 0, 1], [0, 7],
    [0, 0, 5], [1, 2], [0, 0, 1, 0], [0, 3, 0], [1, 0, 1], [4, 0], [0, 0, 6], [0, 8],
    [2, 0, 0], [0, 9], [6], [7], [2, 1], [5, 0], [0, 1, 2], [0, 0, 0, 2], [8], [0, 4, 0],
    [0, 1, 0, 0], [0, 2, 1], [0, 0, 7], [1, 1, 0], [1, 3], [0, 0, 2, 0], [9], [0, 0, 8],
    [0, 5, 0], [0, 0, 0, 3], [0, 0, 9], [0, 1, 3], [1, 0, 2], [0, 0, 1, 1], [3, 0, 0],
    [1, 0, 0, 0],
]

VICUNA_13B_STAGE1 = [
    [0], [0, 0], [1], [0, 1], [2], [1, 0], [0, 0, 0], [0, 2], [3], [0, 3], [4], [2, 0],
    [0, 4], [0, 0, 1], [0, 5], [5], [1, 1], [0, 1, 0], [6], [0, 6], [0, 0, 2], [7], [3, 0],
    [8], [0, 7], [0, 8], [1, 0, 0], [0, 0, 3], [4, 0], [1, 2], [9], [0, 9], [2, 1],
    [0, 2, 0], [0, 0, 4], [1, 3], [0, 1, 1], [0, 0, 5], [5, 0], [0, 3, 0], [0, 0, 0, 0],
    [0, 0, 6], [6, 0], [1, 4], [2, 0, 0], [0, 1, 2], [3, 1], [0, 4, 0], [1, 0, 1], [2, 2],
    [0, 0, 7], [1, 5], [7, 0], [0, 0, 8], [8, 0], [0, 5, 0], [0, 0, 9], [0, 2, 1],
    [1, 1, 0], [0, 1, 3], [4, 1], [2, 3], [1, 6],
]

VICUNA_33B_STAGE2 = [
    [0], [0, 0], [1], [0, 1], [0, 0, 0], [1, 0], [2], [0, 2], [0, 0, 1], [0, 3], [3],
    [0, 1, 0], [2, 0], [0, 4], [4], [0, 0, 2], [1, 1], [1, 0, 0], [0, 5], [5], [0, 0, 0, 0],
    [0, 0, 3], [3, 0], [0, 2, 0], [0, 6], [0, 1, 1], [6], [0, 0, 4], [0, 7], [7], [1, 2],
    [4, 0], [8], [0, 3, 0], [0, 0, 5], [0, 0, 0, 1], [0, 8], [2, 1], [0, 9], [1, 0, 1],
    [2, 0, 0], [0, 0, 6], [5, 0], [0, 0, 1, 0], [1, 3], [0, 1, 2], [0, 4, 0], [0, 0, 7],
    [0, 2, 1], [9], [1, 1, 0], [0, 0, 0, 2], [6, 0], [0, 0, 8], [0, 1, 0, 0], [7, 0],
    [0, 1, 3], [0, 5, 0], [1, 4], [0, 0, 9], [3, 1], [1, 0, 2], [2, 2],
]

VICUNA_33B_STAGE1 = [
    [0], [1], [0, 0], [2], [0, 1], [3], [1, 0], [4], [0, 2], [5], [0, 3], [0, 0, 0], [6],
    [0, 4], [2, 0], [7], [1, 1], [0, 5], [3, 0], [8], [9], [0, 6], [0, 7], [0, 0, 1],
    [1, 2], [4, 0], [0, 1, 0], [0, 8], [0, 9], [2, 1], [0, 0, 2], [5, 0], [1, 3], [0, 0, 3],
    [1, 0, 0], [1, 4], [6, 0], [0, 2, 0], [3, 1], [2, 2], [0, 0, 4], [7, 0], [0, 1, 1],
    [1, 5], [4, 1], [0, 0, 5], [0, 3, 0], [9, 0], [8, 0], [1, 6], [0, 0, 6], [2, 3],
    [0, 1, 2], [3, 2], [0, 4, 0], [2, 0, 0], [1, 7], [1, 0, 1], [0, 0, 7], [5, 1], [2, 4],
    [0, 0, 8], [0, 2, 1],
]

ZEPHYR_STAGE2 = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [2, 0],
    [0, 0, 1], [0, 4], [5], [0, 5], [0, 1, 0], [1, 1], [6], [0, 0, 2], [3, 0], [0, 6], [7],
    [0, 7], [0, 8], [0, 0, 3], [1, 0, 0], [0, 9], [0, 2, 0], [1, 2], [4, 0], [8], [9],
    [2, 1], [0, 1, 1], [0, 0, 4], [0, 0, 0, 0], [5, 0], [0, 3, 0], [1, 3], [0, 0, 5],
    [0, 0, 6], [6, 0], [2, 0, 0], [1, 0, 1], [0, 1, 2], [0, 4, 0], [1, 4], [3, 1], [2, 2],
    [0, 0, 7], [7, 0], [0, 2, 1], [0, 0, 8], [0, 1, 3], [0, 5, 0], [1, 5], [0, 0, 9],
    [1, 1, 0], [0, 0, 0, 1], [0, 0, 1, 0], [4, 1], [2, 3],
]

MEDUSA_PRESETS: dict[str, list[list[int]]] = {
    "mc_sim_7b_63": MC_SIM_7B_63,
    "vicuna_7b_stage2": VICUNA_7B_STAGE2,
    "vicuna_7b_stage1_ablation": VICUNA_7B_STAGE1_ABLATION,
    "vicuna_7b_stage1": VICUNA_7B_STAGE1,
    "vicuna_13b_stage2": VICUNA_13B_STAGE2,
    "vicuna_13b_stage1": VICUNA_13B_STAGE1,
    "vicuna_33b_stage2": VICUNA_33B_STAGE2,
    "vicuna_33b_stage1": VICUNA_33B_STAGE1,
    "zephyr_stage2": ZEPHYR_STAGE2,
}


# --- Small generic trees for CPUs ---------------------------------------------------------
# On a CPU every extra tree token costs time (see design.md: 1 token 33 ms, 16 tokens 71 ms),
# so small trees matter. `tree-N` has N nodes *including the root*, i.e. N tokens per verify
# forward, the same n as TreeBuffers.num_nodes and the latency table's keys. Its paths are
# the first N-1 of mc_sim_7b_63, which is ordered by estimated path probability, so every
# prefix of it is prefix-closed (tested).
def _mc_sim_prefix(num_nodes: int) -> list[list[int]]:
    return [list(p) for p in MC_SIM_7B_63[: num_nodes - 1]]


def chain(depth: int) -> list[list[int]]:
    """The top-1 candidate of each of `depth` heads: [[0], [0, 0], ...]."""
    return [[0] * d for d in range(1, depth + 1)]


GENERIC_PRESETS: dict[str, list[list[int]]] = {
    "empty": [],
    **{f"chain-{d}": chain(d) for d in range(1, 6)},
    **{f"tree-{n}": _mc_sim_prefix(n) for n in (4, 8, 16, 32)},
}

PRESETS: dict[str, list[list[int]]] = {**GENERIC_PRESETS, **MEDUSA_PRESETS}


def preset_names() -> list[str]:
    """Every accepted name, with the open-ended chain family shown as `chain-N`."""
    return sorted(PRESETS) + ["chain-N"]


def get_preset(name: str) -> list[list[int]]:
    """The paths of a named tree (a fresh copy, safe to mutate)."""
    key = name.strip().lower()
    if key in PRESETS:
        return [list(p) for p in PRESETS[key]]
    depth = _chain_depth(key)
    if depth is not None:
        return chain(depth)
    hint = "or pass a tree.json file or an inline list such as '[[0],[1],[0,0]]'"
    raise UserError(f"{unknown_name('tree', name, preset_names())}; {hint}")


def _chain_depth(name: str) -> int | None:
    """N for 'chain-N' (N >= 0), else None; a negative or non-integer N is a UserError."""
    if not name.startswith("chain-"):
        return None
    tail = name[len("chain-"):]
    if not tail.lstrip("-").isdigit() or int(tail) < 0:
        raise UserError(f"bad tree name {name!r}: use chain-N with an integer N >= 0, e.g. chain-3")
    return int(tail)
