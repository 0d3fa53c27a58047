"""Trees: parsing, validation, presets, and the verify-step buffers."""

import hashlib
import json

import pytest
import torch

from medusa_bench.errors import UserError
from medusa_bench.trees.presets import MEDUSA_PRESETS, PRESETS, get_preset
from medusa_bench.trees.tree import Tree, TreeBuffers

SMALL = [[0], [1], [0, 0], [0, 1]]


def is_prefix_closed(paths) -> bool:
    s = {tuple(p) for p in paths}
    return all(len(p) == 1 or p[:-1] in s for p in s)


# --- Tree.parse: accepted forms -------------------------------------------------------------


def test_tree_sorts_paths_and_counts_nodes():
    tree = Tree([[0, 1], [1], [0], [0, 0]])
    assert tree.paths == ((0,), (1,), (0, 0), (0, 1))
    assert tree.num_nodes == 5
    assert tree.depth == 2
    assert tree.max_rank == 1
    assert tree.top_k == 2
    assert tree == Tree(SMALL)  # order does not matter


def test_hash_is_sha_of_canonical_json_and_ignores_name_and_order():
    tree = Tree(SMALL, name="a")
    expected = hashlib.sha256(b"[[0],[1],[0,0],[0,1]]").hexdigest()[:12]
    assert tree.hash == expected
    assert Tree(list(reversed(SMALL)), name="b").hash == expected
    assert Tree([[0]]).hash != expected


def test_empty_tree():
    for spec in ("empty", "chain-0", [], "[]"):
        tree = Tree.parse(spec)
        assert tree.paths == ()
        assert (tree.num_nodes, tree.depth, tree.top_k) == (1, 0, 0)


def test_parse_forms_agree(tmp_path):
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(SMALL))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"name": "mine", "tree": SMALL}))
    medusa = tmp_path / "medusa.json"
    medusa.write_text(json.dumps({"medusa_choices": SMALL}))
    specs = [SMALL, tuple(map(tuple, SMALL)), "[[0],[1],[0,0],[0,1]]", " [[0], [1], [0, 0], [0, 1]] ",
             str(bare), bare, str(wrapped), medusa, Tree(SMALL)]
    for spec in specs:
        assert Tree.parse(spec) == Tree(SMALL), spec
    assert Tree.parse(wrapped).name == "mine"
    assert Tree.parse(bare).name == "bare"


def test_chain_presets_and_generic_chain():
    assert Tree.parse("chain-3").paths == ((0,), (0, 0), (0, 0, 0))
    assert Tree.parse("chain-3").name == "chain-3"
    assert Tree.parse("chain-9").depth == 9  # any N, not only the listed chain-1..5
    assert Tree.chain(2).paths == ((0,), (0, 0))
    assert Tree.parse("CHAIN-2") == Tree.chain(2)


def test_round_trip_through_tree_json(tmp_path):
    tree = Tree.parse("mc_sim_7b_63")
    path = tree.save(tmp_path / "tree.json", search={"tau": 2.0})
    data = json.loads(path.read_text())
    assert data["hash"] == tree.hash and data["num_nodes"] == 64 and data["search"] == {"tau": 2.0}
    again = Tree.parse(str(path))
    assert again == tree and again.name == "mc_sim_7b_63" and again.hash == tree.hash


# --- Tree.parse: errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, words",
    [
        ("[1, 2]", ["not a list of integer ranks"]),
        ([[0], [0.5]], ["not a list of integer ranks"]),
        ([[0], [True]], ["not a list of integer ranks"]),
        ([[0], ["1"]], ["not a list of integer ranks"]),
        ([[0], [-1]], ["negative rank"]),
        ([[0], []], ["empty", "root is implicit"]),
        ([[0], [0, 1, 2], [0, 1, 2, 3]], ["[0, 1, 2] lacks its prefix [0, 1]", "prefix-closed"]),
        ([[1, 0]], ["[1, 0] lacks its prefix [1]"]),
        ([[0], [1], [0]], ["[0] appears twice"]),
        ("[[0], [1]", ["not valid JSON"]),
        (42, ["cannot make a tree from int"]),
        ({"tree": SMALL}, ["cannot make a tree from dict"]),
    ],
)
def test_invalid_trees_are_user_errors(spec, words):
    with pytest.raises(UserError) as err:
        Tree.parse(spec)
    for word in words:
        assert word in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_preset_lists_names_and_other_forms():
    with pytest.raises(UserError) as err:
        Tree.parse("mc_sim_7b_64")
    msg = str(err.value)
    assert "unknown tree 'mc_sim_7b_64'" in msg
    assert "mc_sim_7b_63" in msg and "chain-N" in msg and "tree-8" in msg
    assert "tree.json" in msg and "[[0],[1],[0,0]]" in msg


@pytest.mark.parametrize("name", ["chain-x", "chain--2", "chain-"])
def test_bad_chain_names(name):
    with pytest.raises(UserError, match="chain-N"):
        Tree.parse(name)


def test_depth_and_rank_limits():
    assert Tree.parse("chain-3", num_heads=3, top_k=1).depth == 3
    with pytest.raises(UserError, match="depth 4 but only 3 draft heads"):
        Tree.parse(get_preset("mc_sim_7b_63"), num_heads=3)  # written out: an error (a named preset is cut: below)
    with pytest.raises(UserError, match=r"rank 9 but heads propose only top-5"):
        Tree.parse("mc_sim_7b_63", num_heads=4, top_k=5)


def test_file_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(UserError, match=f"tree file {missing} does not exist"):
        Tree.parse(str(missing))
    broken = tmp_path / "broken.json"
    broken.write_text("[[0], [1]")
    with pytest.raises(UserError, match=f"tree file {broken} is not valid JSON"):
        Tree.parse(str(broken))
    nokey = tmp_path / "nokey.json"
    nokey.write_text(json.dumps({"choices": SMALL}))
    with pytest.raises(UserError, match="no 'tree' key"):
        Tree.parse(nokey)
    gap = tmp_path / "gap.json"
    gap.write_text(json.dumps([[0], [1, 1]]))
    with pytest.raises(UserError, match=f"tree file {gap}: tree path \\[1, 1\\] lacks its prefix \\[1\\]"):
        Tree.parse(gap)


# --- Presets --------------------------------------------------------------------------------


def test_mc_sim_7b_63_loads_as_published():
    raw = PRESETS["mc_sim_7b_63"]
    assert len(raw) == 63 and len({tuple(p) for p in raw}) == 63
    assert is_prefix_closed(raw)
    assert raw[:5] == [[0], [0, 0], [1], [0, 1], [2]] and raw[-1] == [0, 7, 0]
    tree = Tree.parse("mc_sim_7b_63")
    assert (tree.num_nodes, tree.depth, tree.top_k) == (64, 4, 10)


@pytest.mark.parametrize("name", sorted(MEDUSA_PRESETS))
def test_medusa_presets_load(name):
    tree = Tree.parse(name, num_heads=4, top_k=10)
    assert tree.num_nodes == 64
    assert is_prefix_closed(PRESETS[name])


@pytest.mark.parametrize("n", [4, 8, 16, 32])
def test_generic_tree_presets_have_n_nodes(n):
    tree = Tree.parse(f"tree-{n}")
    assert tree.num_nodes == n
    assert set(tree.paths) <= set(Tree.parse("mc_sim_7b_63").paths)


def test_get_preset_returns_a_copy():
    paths = get_preset("chain-2")
    paths.append([5])
    assert get_preset("chain-2") == [[0], [0, 0]]
    mc = get_preset("mc_sim_7b_63")
    mc[0].append(9)
    assert PRESETS["mc_sim_7b_63"][0] == [0]


# --- TreeBuffers ----------------------------------------------------------------------------


def test_buffers_on_a_hand_checked_tree():
    # nodes: 0 root, 1 [0], 2 [1], 3 [0,0], 4 [0,1]
    b = Tree(SMALL).buffers()
    assert b.parents.tolist() == [-1, 0, 0, 1, 1]
    assert b.depths.tolist() == [0, 1, 1, 2, 2]
    assert b.ranks.tolist() == [0, 0, 1, 0, 1]
    assert b.attn_mask.dtype == torch.bool
    assert b.attn_mask.int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 1, 0, 1, 0],
        [1, 1, 0, 0, 1],
    ]
    assert b.retrieve.tolist() == [[0, 2, -1], [0, 1, 3], [0, 1, 4]]
    assert b.draft_index.tolist() == [0, 1, 2, 3]  # top_k = 2: (depth-1)*2 + rank
    assert [lv.tolist() for lv in b.levels] == [[0], [1, 2], [3, 4]]
    assert (b.num_nodes, b.max_depth, b.top_k) == (5, 2, 2)
    for t in (b.parents, b.depths, b.ranks, b.retrieve, b.draft_index):
        assert t.dtype == torch.long


def test_buffers_draft_index_uses_the_heads_top_k():
    b = Tree(SMALL).buffers(top_k=10)
    assert b.draft_index.tolist() == [0, 1, 10, 11]
    with pytest.raises(UserError, match="top-1"):
        Tree(SMALL).buffers(top_k=1)


def test_buffers_are_cached_per_device_and_top_k():
    tree = Tree(SMALL)
    assert tree.buffers() is tree.buffers("cpu")
    assert tree.buffers(top_k=4) is not tree.buffers()


def test_empty_tree_buffers():
    b = Tree.parse("empty").buffers()
    assert b.parents.tolist() == [-1] and b.attn_mask.tolist() == [[True]]
    assert b.retrieve.tolist() == [[0]] and b.draft_index.shape == (0,)
    assert b.max_depth == 0 and b.additive_mask(3).shape == (1, 1, 1, 4)


def test_from_parents_default_ranks_are_sibling_order():
    # 0 -> 1, 2;  1 -> 3;  3 -> 4;  2 -> 5
    b = TreeBuffers.from_parents(torch.tensor([-1, 0, 0, 1, 3, 2]))
    assert b.ranks.tolist() == [0, 0, 1, 0, 0, 0]
    assert b.depths.tolist() == [0, 1, 1, 2, 3, 2]
    assert b.retrieve.tolist() == [[0, 1, 3, 4], [0, 2, 5, -1]]
    assert [lv.tolist() for lv in b.levels] == [[0], [1, 2], [3, 5], [4]]
    assert b.top_k == 2 and b.draft_index.tolist() == [0, 1, 2, 4, 2]  # (depth-1)*2 + rank
    assert b.attn_mask[4].tolist() == [True, True, False, True, True, False]


def test_from_parents_matches_tree_buffers():
    tree = Tree.parse("mc_sim_7b_63")
    b = tree.buffers()
    again = TreeBuffers.from_parents(b.parents, ranks=b.ranks, top_k=10)
    for name in ("parents", "depths", "ranks", "attn_mask", "retrieve", "draft_index"):
        assert torch.equal(getattr(b, name), getattr(again, name)), name


def test_from_parents_rejects_bad_parent_arrays():
    for parents in ([], [0, 0], [-1, 1], [-1, 0, 3, 0], [-1, -1]):
        with pytest.raises(ValueError):
            TreeBuffers.from_parents(parents)
    with pytest.raises(ValueError, match="ranks"):
        TreeBuffers.from_parents([-1, 0], ranks=[0, 3], top_k=2)


def test_mc_sim_buffers_are_consistent():
    tree = Tree.parse("mc_sim_7b_63")
    b = tree.buffers()
    node_of = {(): 0, **{p: i + 1 for i, p in enumerate(tree.paths)}}
    for i, path in enumerate(tree.paths, start=1):
        assert b.parents[i].item() == node_of[path[:-1]]
        assert b.ranks[i].item() == path[-1] and b.depths[i].item() == len(path)
        ancestors = {node_of[path[:k]] for k in range(len(path) + 1)}
        assert set(b.attn_mask[i].nonzero().flatten().tolist()) == ancestors
        assert b.draft_index[i - 1].item() == (len(path) - 1) * 10 + path[-1]
    leaves = [node_of[p] for p in tree.paths if not any(q[:-1] == p for q in tree.paths)]
    assert b.retrieve.shape == (len(leaves), 5)
    assert b.retrieve[:, -1].ge(-1).all() and sorted(b.retrieve.max(dim=1).values.tolist()) == leaves
    assert sum(len(lv) for lv in b.levels) == 64


def test_additive_mask():
    b = Tree(SMALL).buffers()
    mask = b.additive_mask(prefix_len=3, dtype=torch.float16)
    assert mask.shape == (1, 1, 5, 8) and mask.dtype == torch.float16
    assert (mask[..., :3] == 0).all()
    tree_part = mask[0, 0, :, 3:]
    assert torch.equal(tree_part == 0, b.attn_mask)
    assert (tree_part[~b.attn_mask] == torch.finfo(torch.float16).min).all()
    assert b.additive_mask(0).shape == (1, 1, 5, 5) and b.additive_mask(0).dtype == torch.float32
    cached = b._masks[torch.float16]
    b.additive_mask(10, torch.float16)
    assert b._masks[torch.float16] is cached


def test_preset_names_win_over_files_without_suffix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chain-2").write_text(json.dumps([[1]]))
    (tmp_path / "mytree").write_text(json.dumps(SMALL))
    assert Tree.parse("chain-2") == Tree.chain(2)
    assert Tree.parse("mytree") == Tree(SMALL)


def test_a_preset_deeper_than_the_heads_keeps_its_paths_within_their_depth():
    """Presets are generic shapes (the shipped Hydra drafts 3 deep; `hydra:sweep` has chain-4 and
    mc_sim_7b_63); a tree the user wrote out stays an error."""
    import warnings

    from medusa_bench.trees.presets import get_preset

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tree = Tree.parse("mc_sim_7b_63", num_heads=3)
    assert tree.depth == 3 and "depth 3" in str(caught[0].message)
    assert sorted(tree.to_list()) == sorted(p for p in get_preset("mc_sim_7b_63") if len(p) <= 3)
    assert Tree.parse("chain-4", num_heads=3).to_list() == [[0], [0, 0], [0, 0, 0]]
    with pytest.raises(UserError, match="depth 4"):
        Tree.parse("[[0],[0,0],[0,0,0],[0,0,0,0]]", num_heads=3)
