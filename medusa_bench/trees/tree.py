"""Candidate trees: validated rank paths (`Tree`) and the tensors a verify step needs (`TreeBuffers`).

A tree is Medusa's `medusa_choices` format: a prefix-closed list of paths of top-k ranks,
`[[0], [1], [0, 0]]` = "the top-1 and top-2 candidates of head 1, and the top-1 of head 2
after head 1's top-1". The root, the base model's own next token, is implicit.

Node order everywhere: root first (node 0), then the paths sorted by `(len(p), p)`, so a
parent always precedes its children and node i of the tree is `paths[i - 1]`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from medusa_bench.errors import UserError
from medusa_bench.trees.presets import PRESETS, get_preset

Path_ = tuple[int, ...]

# --- Tree ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    """A validated, prefix-closed set of rank paths, stored sorted by (len(p), p).

    `Tree(paths)` validates and sorts; `Tree.parse(spec)` also resolves names and files.
    Equality and `hash` depend on the paths only, never on the `name` label.
    """

    paths: tuple[Path_, ...]
    name: str | None = field(default=None, compare=False)
    _buffers: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        paths = _validate_paths(self.paths)
        object.__setattr__(self, "paths", tuple(sorted(paths, key=lambda p: (len(p), p))))

    # - shape -

    @property
    def num_nodes(self) -> int:
        """Tokens per verify forward: the drafted paths plus the root."""
        return len(self.paths) + 1

    @property
    def depth(self) -> int:
        """Longest path = number of draft heads the tree needs (0 for the empty tree)."""
        return max((len(p) for p in self.paths), default=0)

    @property
    def max_rank(self) -> int:
        """Largest rank used (-1 for the empty tree)."""
        return max((r for p in self.paths for r in p), default=-1)

    @property
    def top_k(self) -> int:
        """Candidates per head the tree needs: max rank + 1 (0 for the empty tree)."""
        return self.max_rank + 1

    # - identity and files -

    def to_list(self) -> list[list[int]]:
        return [list(p) for p in self.paths]

    @cached_property
    def hash(self) -> str:
        """Short stable id of the paths (sha256 of the canonical JSON), recorded in run.json."""
        canonical = json.dumps(self.to_list(), separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def to_json(self, **extra) -> dict:
        """The tree.json object; `Tree.parse` reads it back. `extra` adds metadata (e.g. search results)."""
        return {
            "name": self.name,
            "hash": self.hash,
            "num_nodes": self.num_nodes,
            "depth": self.depth,
            "top_k": self.top_k,
            **extra,
            "tree": self.to_list(),
        }

    def save(self, path: str | Path, **extra) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(**extra), indent=1) + "\n")
        return path

    def __str__(self) -> str:
        label = self.name or "tree"
        return f"{label} ({self.num_nodes} nodes, depth {self.depth}, top-{self.top_k}, {self.hash})"

    # - constructors -

    @classmethod
    def chain(cls, depth: int) -> Tree:
        return cls.parse(f"chain-{depth}")

    @classmethod
    def empty(cls) -> Tree:
        return cls((), name="empty")

    @classmethod
    def parse(cls, spec, num_heads: int | None = None, top_k: int | None = None) -> Tree:
        """A tree from a preset name, a JSON file, an inline JSON list, a list, or a Tree.

        `num_heads` / `top_k`, when given, are what the proposer can draft: a deeper tree or a
        higher rank is a UserError rather than an index error mid-run. A *preset* deeper than the
        heads is a generic shape: its paths within their depth are used, with a warning (the
        shipped Hydra has 3 heads; `hydra:sweep` includes chain-4 and mc_sim_7b_63).
        """
        tree = _resolve(spec)
        if num_heads is not None and tree.depth > num_heads and _is_preset(tree.name):
            kept = [p for p in tree.paths if len(p) <= num_heads]
            warnings.warn(f"tree {tree.name} has depth {tree.depth} and these heads draft {num_heads} deep: "
                          f"its {len(kept) + 1} nodes within depth {num_heads} are used", stacklevel=2)
            tree = cls(kept, name=f"{tree.name}@depth{num_heads}")
        tree.check_fits(num_heads=num_heads, top_k=top_k)
        return tree

    def check_fits(self, num_heads: int | None = None, top_k: int | None = None) -> None:
        """UserError if the tree needs more heads or more candidates per head than available."""
        if num_heads is not None and self.depth > num_heads:
            raise UserError(
                f"tree {self.name or self.hash} has depth {self.depth} but only {num_heads} draft "
                f"heads are available; use a tree of depth <= {num_heads} (e.g. chain-{num_heads})"
            )
        if top_k is not None and self.top_k > top_k:
            path = next(p for p in self.paths if max(p) == self.max_rank)
            raise UserError(
                f"tree {self.name or self.hash} path {list(path)} uses rank {self.max_rank} but heads "
                f"propose only top-{top_k} candidates; raise top_k to {self.top_k} or use a narrower tree"
            )

    # - tensors -

    def buffers(self, device="cpu", top_k: int | None = None) -> TreeBuffers:
        """The verify-step tensors on `device` (cached per device and top_k)."""
        top_k = max(self.top_k, 1) if top_k is None else top_k
        self.check_fits(top_k=top_k)
        key = (str(torch.device(device)), top_k)
        if key not in self._buffers:
            index = {p: i + 1 for i, p in enumerate(self.paths)}
            parents = [-1] + [index.get(p[:-1], 0) for p in self.paths]
            ranks = [0] + [p[-1] for p in self.paths]
            self._buffers[key] = TreeBuffers.from_parents(parents, ranks=ranks, top_k=top_k, device=device)
        return self._buffers[key]


def _is_preset(name: str | None) -> bool:
    return bool(name) and (name in PRESETS or name.startswith("chain-"))


def _resolve(spec) -> Tree:
    if isinstance(spec, Tree):
        return spec
    if isinstance(spec, Path):
        return _load_file(spec)
    if isinstance(spec, (list, tuple)):
        return Tree(spec)
    if not isinstance(spec, str):
        raise UserError(
            f"cannot make a tree from {type(spec).__name__}; pass a preset name, a tree.json path "
            f"or an inline list such as '[[0],[1],[0,0]]'"
        )
    text = spec.strip()
    if text.startswith("["):
        try:
            return Tree(json.loads(text))
        except json.JSONDecodeError as e:
            raise UserError(f"inline tree {_short(text)} is not valid JSON ({e.msg}); write it like '[[0],[1],[0,0]]'")
    path = Path(text).expanduser()
    if path.suffix.lower() == ".json" or "/" in text or "\\" in text:
        return _load_file(path)
    try:
        return Tree(get_preset(text), name=text.lower())
    except UserError:
        if path.is_file():  # a JSON file without the .json suffix
            return _load_file(path)
        raise


def _load_file(path: Path) -> Tree:
    if not path.is_file():
        raise UserError(f"tree file {path} does not exist; check the path, or use a preset name or an inline list")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read tree file {path}: {e}")
    except json.JSONDecodeError as e:
        raise UserError(f"tree file {path} is not valid JSON ({e.msg} at line {e.lineno}); fix or regenerate it")
    name = path.stem
    if isinstance(data, dict):
        key = next((k for k in ("tree", "medusa_choices", "paths") if k in data), None)
        if key is None:
            example = '{"tree": [[0], [1], [0, 0]]}'
            raise UserError(f"tree file {path} has no 'tree' key; write {example} or a bare list")
        name = data.get("name") or name
        data = data[key]
    try:
        return Tree(data, name=name)
    except UserError as e:
        raise UserError(f"tree file {path}: {e}") from None


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _validate_paths(paths) -> list[Path_]:
    """Checks the medusa_choices rules; returns the paths as int tuples."""
    if not isinstance(paths, (list, tuple)):
        raise UserError(f"a tree must be a list of paths like [[0], [1], [0, 0]], got {type(paths).__name__}")
    out = [_as_path(p) for p in paths]
    seen: set[Path_] = set()
    for p in out:
        if p in seen:
            raise UserError(f"tree path {list(p)} appears twice; list each path once")
        seen.add(p)
    for p in out:
        if len(p) > 1 and p[:-1] not in seen:
            raise UserError(
                f"tree path {list(p)} lacks its prefix {list(p[:-1])}; trees must be prefix-closed, add the prefix"
            )
    return out


def _as_path(p) -> Path_:
    ok = isinstance(p, (list, tuple)) and all(isinstance(r, int) and not isinstance(r, bool) for r in p)
    if not ok:
        raise UserError(f"tree path {p!r} is not a list of integer ranks; write paths like [0, 1]")
    if len(p) == 0:
        raise UserError("tree path [] is empty; the root is implicit, leave it out")
    if min(p) < 0:
        raise UserError(f"tree path {list(p)} has a negative rank; ranks count from 0 (the top-1 candidate)")
    return tuple(p)


# --- TreeBuffers --------------------------------------------------------------------------


@dataclass(eq=False)
class TreeBuffers:
    """Index tensors for one verify step over a tree of n nodes (node 0 = root).

    Built once per static tree (`Tree.buffers`) or per step for dynamic proposers
    (`TreeBuffers.from_parents`). All tensors live on `device`.
    """

    parents: Tensor  # [n] long, -1 for the root
    depths: Tensor  # [n] long, root 0; position_ids = prefix_len + depths
    ranks: Tensor  # [n] long, top-k rank of each node's token among its head's candidates; root 0
    attn_mask: Tensor  # [n, n] bool, [i, j] True iff j is an ancestor of i or i itself
    retrieve: Tensor  # [num_leaves, max_depth + 1] long, root->leaf node indices, -1 padded
    draft_index: Tensor  # [n - 1] long, (depth - 1) * top_k + rank into a flat [num_heads * top_k] table
    levels: list[Tensor]  # levels[d]: [nodes at depth d] long; levels[0] = [0] (Hydra drafts level by level)
    top_k: int
    _masks: dict = field(default_factory=dict, repr=False)

    @property
    def num_nodes(self) -> int:
        return self.parents.shape[0]

    @property
    def max_depth(self) -> int:
        return len(self.levels) - 1

    @property
    def device(self) -> torch.device:
        return self.parents.device

    @classmethod
    def from_parents(
        cls,
        parents: Sequence[int] | Tensor,
        ranks: Sequence[int] | Tensor | None = None,
        top_k: int | None = None,
        device="cpu",
    ) -> TreeBuffers:
        """Buffers from a parent array: parents[0] == -1 (root), 0 <= parents[i] < i otherwise.

        `ranks` default to sibling order (0, 1, ... among each parent's children); `top_k`
        defaults to the largest rank + 1 (at least 1).
        """
        parents = _to_list(parents)
        _check_parents(parents)
        ranks = _sibling_ranks(parents) if ranks is None else _to_list(ranks)
        if len(ranks) != len(parents):
            raise ValueError(f"ranks has {len(ranks)} entries for {len(parents)} nodes")
        low, high = min(ranks[1:], default=0), max(ranks[1:], default=0)
        top_k = high + 1 if top_k is None else top_k
        if low < 0 or high >= top_k:
            raise ValueError(f"ranks must lie in [0, top_k={top_k}), got {ranks[1:]}")
        depths = _depths(parents)
        max_depth = max(depths)
        long = dict(dtype=torch.long, device=device)

        parents_t = torch.tensor(parents, **long)  # [n]
        depths_t = torch.tensor(depths, **long)  # [n]
        ranks_t = torch.tensor(ranks, **long)  # [n]
        return cls(
            parents=parents_t,
            depths=depths_t,
            ranks=ranks_t,
            attn_mask=_ancestor_mask(parents_t, max_depth),
            retrieve=torch.tensor(_leaf_paths(parents, max_depth), **long),
            draft_index=(depths_t[1:] - 1) * top_k + ranks_t[1:],
            levels=[torch.tensor(level, **long) for level in _levels(depths, max_depth)],
            top_k=top_k,
        )

    def additive_mask(self, prefix_len: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """The 4-D mask for one verify forward: [1, 1, n, prefix_len + n].

        0 where a tree token may attend (every cached prefix token, its ancestors, itself),
        dtype's min elsewhere. The tree part is cached per dtype; only the prefix zeros are new.
        """
        tree_part = self._masks.get(dtype)
        if tree_part is None:
            tree_part = torch.zeros(self.attn_mask.shape, dtype=dtype, device=self.device)  # [n, n]
            tree_part.masked_fill_(~self.attn_mask, torch.finfo(dtype).min)
            self._masks[dtype] = tree_part
        n = self.num_nodes
        mask = tree_part.new_zeros(1, 1, n, prefix_len + n)  # [1, 1, n, prefix_len + n]
        mask[0, 0, :, prefix_len:] = tree_part
        return mask

    def local_mask(self, prefix_len: int, dtype: torch.dtype = torch.float32, window: int | None = None,
                   chunk: int | None = None) -> Tensor:
        """`additive_mask` as a sliding-window or chunked attention layer sees it: [1, 1, n, prefix_len + n].

        Node i stands at position q = prefix_len + depth[i]; a key stands at its cache slot (prefix)
        or at prefix_len + depth[j] (tree ancestor j). Like transformers' overlays, a sliding layer
        sees key k iff k > q - window, a chunked one iff k // chunk == q // chunk; the ancestor
        structure is unchanged. Built per step: only models with such layers pay for it.
        """
        n, device = self.num_nodes, self.device
        query = prefix_len + self.depths  # [n]
        key = torch.cat([torch.arange(prefix_len, device=device), query])  # [prefix_len + n]
        seen = torch.cat([torch.ones(n, prefix_len, dtype=torch.bool, device=device), self.attn_mask], dim=1)  # [n, P + n]
        if window is not None:
            seen &= key[None] > query[:, None] - window
        if chunk is not None:
            seen &= key[None] // chunk == query[:, None] // chunk
        mask = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, torch.finfo(dtype).min)
        return mask[None, None]  # [1, 1, n, prefix_len + n]


def _to_list(x) -> list[int]:
    return x.tolist() if isinstance(x, Tensor) else [int(v) for v in x]


def _check_parents(parents: list[int]) -> None:
    if not parents or parents[0] != -1:
        raise ValueError("parents[0] must be -1: node 0 is the root")
    for i, p in enumerate(parents[1:], start=1):
        if not 0 <= p < i:
            raise ValueError(f"parents[{i}] = {p}: every parent must precede its child (0 <= parent < index)")


def _sibling_ranks(parents: list[int]) -> list[int]:
    seen: dict[int, int] = {}
    ranks = [0]
    for p in parents[1:]:
        ranks.append(seen.get(p, 0))
        seen[p] = ranks[-1] + 1
    return ranks


def _depths(parents: list[int]) -> list[int]:
    depths = [0]
    for p in parents[1:]:
        depths.append(depths[p] + 1)
    return depths


def _levels(depths: list[int], max_depth: int) -> list[list[int]]:
    levels: list[list[int]] = [[] for _ in range(max_depth + 1)]
    for i, d in enumerate(depths):
        levels[d].append(i)
    return levels


def _ancestor_mask(parents: Tensor, max_depth: int) -> Tensor:
    """[n, n] bool: each row ORs in its parent's row; max_depth rounds reach the root."""
    n = parents.shape[0]
    up = parents.clamp(min=0)  # [n], root points at itself
    mask = torch.eye(n, dtype=torch.bool, device=parents.device)  # [n, n]
    for _ in range(max_depth):
        mask = mask | mask[up]
    return mask


def _leaf_paths(parents: list[int], max_depth: int) -> list[list[int]]:
    """Root->leaf node indices for each leaf (in node order), padded with -1 to max_depth + 1."""
    has_child = set(parents[1:])
    rows = []
    for leaf in (i for i in range(len(parents)) if i not in has_child):
        path = [leaf]
        while parents[path[-1]] != -1:
            path.append(parents[path[-1]])
        rows.append(path[::-1] + [-1] * (max_depth + 1 - len(path)))
    return rows
