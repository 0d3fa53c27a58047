"""Tree search: acceptance statistics and step latencies in, the tree to use out.

Model. A drafted path p = (r_1, ..., r_d) is accepted when, at every depth i, the base
model's true token is the head's rank-r_i candidate. Its probability P(p) is a product along
the path: P(p) = P(p[:-1]) * q(p), where q(p) is the probability of the last rank given that
the prefix was accepted.
  - independent (Medusa's assumption): q(p) = acc[len(p) - 1][p[-1]]
  - conditional (Hydra: a head sees the tokens above it): q(p) looked up per path.
Ranks at one depth are mutually exclusive events, so the expected tokens per step are
    tau(T) = 1 + sum over paths p in T of P(p)        (the root, the base's own token, is 1).

Budgets. Throughout, a budget n is the number of tree nodes *including the root* -- the
tokens in one verify forward, the same n as TreeBuffers.num_nodes and latency.json's keys.
n = 1 is the empty tree (the baseline step) with tau = 1.

Because P(child) <= P(parent), the n - 1 most probable paths form a prefix-closed set, so
greedy best-first expansion is optimal for any such path probability (independent or
conditional) under node, depth and top-k limits. `sequoia_tree` is a dynamic programme over
(depth, subtree size) for independent tables, in the style of Sequoia (Chen et al., 2024);
it reaches the same optimum by a different route and serves as a cross-check.

Files:
  calibration.json, independent:
      {"kind": "independent", "top_k": K, "accuracy": [[p_rank0, ..., p_rank{K-1}], ...one row per depth],
       "samples": N, ...}     acc[d][r] = P(true token at depth d+1 is rank r); each row sums to <= 1
  calibration.json, conditional:
      {"kind": "conditional", "top_k": K, "paths": {"0": p, "1": p, "0,1": p, ...}, "samples": N, ...}
      "a,b,c" -> P(true token at depth 3 is rank c | the path a,b was accepted); missing paths are 0
  latency.json:
      {"device": str, "dtype": str, "context_len": int, "step_time": {"1": sec, "2": sec, ...},
       "baseline_step_time": sec (optional: the plain decoding step, default step_time at n = 1)}
Other keys are kept as metadata.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

from medusa_bench.errors import UserError
from medusa_bench.trees.noise import prediction_noise
from medusa_bench.trees.replay import replayed_tau
from medusa_bench.trees.tree import Tree

Path_ = tuple[int, ...]
ProbFn = Callable[[Path_], float]  # P(path accepted), non-increasing along a path

_NEG = float("-inf")


class Candidate(NamedTuple):
    """The best tree found for one budget."""

    n: int  # nodes including the root
    tree: Tree
    tau: float  # expected tokens per step


# --- Path probabilities -------------------------------------------------------------------


def independent_prob(accuracy: Sequence[Sequence[float]]) -> ProbFn:
    """P(path) = prod_i acc[i][r_i]; 0 beyond the table's depth or top-k."""
    acc = [list(map(float, row)) for row in _as_rows(accuracy)]

    def prob(path: Path_) -> float:
        p = 1.0
        for depth, rank in enumerate(path):
            if depth >= len(acc) or rank >= len(acc[depth]):
                return 0.0
            p *= acc[depth][rank]
        return p

    return prob


def conditional_prob(table: Mapping[Path_, float]) -> ProbFn:
    """P(path) = prod over its prefixes q of table[q] (q = P(last rank | prefix accepted)); missing = 0."""
    table = {tuple(k): float(v) for k, v in table.items()}

    def prob(path: Path_) -> float:
        p = 1.0
        for i in range(1, len(path) + 1):
            p *= table.get(tuple(path[:i]), 0.0)
            if p == 0.0:
                break
        return p

    return prob


def expected_length(tree: Tree, prob: ProbFn) -> float:
    """tau = 1 + sum of path probabilities: expected tokens emitted per verify step."""
    return 1.0 + sum(prob(p) for p in tree.paths)


# --- Search -------------------------------------------------------------------------------


def greedy_tree(prob: ProbFn, max_nodes: int, max_depth: int, top_k: int) -> list[Candidate]:
    """Best tree for every budget n = 1..max_nodes, by best-first expansion on P(path).

    Returns one Candidate per n (fewer when the depth x top-k space has fewer paths);
    candidates[n - 1].n == n, and each tree extends the previous one by one path.
    """
    _check_limits(max_nodes, max_depth, top_k)
    frontier: list[tuple[float, int, Path_]] = []  # (-P, len, path): most probable first, then shallow

    def push_children(parent: Path_) -> None:
        if len(parent) < max_depth:
            for rank in range(top_k):
                child = parent + (rank,)
                heapq.heappush(frontier, (-prob(child), len(child), child))

    push_children(())
    paths: list[Path_] = []
    tau = 1.0
    out = [Candidate(1, Tree(()), tau)]
    while frontier and len(out) < max_nodes:
        neg_p, _, path = heapq.heappop(frontier)
        paths.append(path)
        tau -= neg_p
        out.append(Candidate(len(paths) + 1, Tree(paths), tau))
        push_children(path)
    return out


def sequoia_tree(
    accuracy: Sequence[Sequence[float]] | Sequence[float],
    max_nodes: int,
    max_depth: int | None = None,
    top_k: int | None = None,
) -> list[Candidate]:
    """Best tree for every budget n = 1..max_nodes by dynamic programming (independent tables).

    `accuracy` is [depth][rank], or one positional vector [rank] used at every depth
    (Sequoia's positional acceptance; then max_depth defaults to max_nodes - 1).
    best[d][m] = the largest expected accepted length of a subtree of m nodes whose root sits
    at depth d; its children (depth d + 1) split m - 1 nodes among ranks as a knapsack.
    """
    rows = _as_rows(accuracy)
    if rows and not isinstance(rows[0], (list, tuple)):
        rows = [list(rows)] * (max_depth if max_depth is not None else max(max_nodes - 1, 0))
    max_depth = len(rows) if max_depth is None else min(max_depth, len(rows))
    top_k = max((len(r) for r in rows), default=0) if top_k is None else top_k
    _check_limits(max_nodes, max_depth, top_k)
    acc = [[float(row[r]) if r < len(row) else 0.0 for r in range(top_k)] for row in rows[:max_depth]]

    best, split = _subtree_table(acc, max_nodes)
    out = []
    for n in range(1, max_nodes + 1):
        if best[0][n] == _NEG:
            break
        paths: list[Path_] = []
        _rebuild(split, 0, n, (), paths)
        out.append(Candidate(n, Tree(paths), best[0][n]))
    return out


def _subtree_table(acc: list[list[float]], max_nodes: int):
    """best[d][m] for d = 0..D, m = 0..max_nodes; split[d][r][m] = nodes given to rank r's subtree."""
    depth = len(acc)
    leaf_only = [_NEG, 1.0] + [_NEG] * (max_nodes - 1)
    best = [None] * depth + [leaf_only]
    split = [None] * depth
    for d in reversed(range(depth)):
        below = best[d + 1]
        h = [0.0] + [_NEG] * (max_nodes - 1)  # h[m]: best children value with m nodes, ranks r..K-1
        split[d] = [None] * len(acc[d])
        for r in reversed(range(len(acc[d]))):
            h, split[d][r] = _add_child(h, below, acc[d][r])
        best[d] = [_NEG] + [1.0 + v for v in h]
    return best, split


def _add_child(h: list[float], below: list[float], q: float) -> tuple[list[float], list[int]]:
    """Knapsack step: optionally give the rank with acceptance q a subtree of j >= 1 nodes."""
    new_h, take = list(h), [0] * len(h)
    for m in range(1, len(h)):
        for j in range(1, m + 1):
            if below[j] == _NEG or h[m - j] == _NEG:
                continue
            v = q * below[j] + h[m - j]
            if v > new_h[m]:
                new_h[m], take[m] = v, j
    return new_h, take


def _rebuild(split, depth: int, m: int, prefix: Path_, out: list[Path_]) -> None:
    """Append the paths of the best m-node subtree rooted at `prefix` (depth `depth`)."""
    left = m - 1
    for rank, take in enumerate(split[depth] if depth < len(split) else []):
        j = take[left]
        if j:
            child = prefix + (rank,)
            out.append(child)
            _rebuild(split, depth + 1, j, child, out)
            left -= j


def _check_limits(max_nodes: int, max_depth: int, top_k: int) -> None:
    for name, value, low in (("max_nodes", max_nodes, 1), ("max_depth", max_depth, 0), ("top_k", top_k, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UserError(f"tree search {name} must be an integer >= {low}, got {value!r}")


def _as_rows(accuracy) -> list:
    return accuracy.tolist() if hasattr(accuracy, "tolist") else list(accuracy)


# --- Budget choice ------------------------------------------------------------------------


@dataclass
class BudgetChoice:
    """The chosen budget with the numbers behind it (rows of `table` are per budget n)."""

    n: int
    tau: float
    step_time: float  # seconds per verify step at n nodes
    throughput: float  # predicted tokens/s = tau / step_time
    baseline_throughput: float  # 1 / baseline_step_time
    speedup: float  # throughput / baseline_throughput
    beats_baseline: bool
    reason: str
    table: list[dict] = field(default_factory=list)
    tau_statistic: str = "per-position mean"  # or "replayed in decode order over N answers" (best_tree)
    margin: float | None = None  # the speedup a tree had to beat (best_tree: from the measured noise)
    noise: dict | None = None  # relative 95% half-widths of the best tree's τ and step ratio, and whence


def interpolate_step_time(step_time: Mapping[int, float], n: int) -> float:
    """Step time at n nodes: linear between profiled sizes, linear extrapolation outside them."""
    if not step_time:
        raise UserError("latency table is empty; profile at least one tree size")
    if n in step_time:
        return float(step_time[n])
    sizes = sorted(step_time)
    if len(sizes) == 1:
        return float(step_time[sizes[0]])
    lo_i = max(0, min(len(sizes) - 2, sum(s < n for s in sizes) - 1))
    a, b = sizes[lo_i], sizes[lo_i + 1]
    ta, tb = step_time[a], step_time[b]
    return float(ta + (tb - ta) * (n - a) / (b - a))


def choose_budget(
    taus: Mapping[int, float],
    step_time: Mapping[int, float],
    baseline_step_time: float | None = None,
    min_speedup: float = 1.0,
) -> BudgetChoice:
    """The budget n maximising predicted throughput tau(n) / t(n).

    A tree is chosen only if it predicts more than `min_speedup` x the baseline's one-token
    step (baseline_step_time, default t(1)); otherwise the result is the empty tree (n = 1)
    with beats_baseline False and a reason that names the best tree that lost.
    """
    if not taus:
        raise UserError("no candidate trees to choose from")
    base_t = interpolate_step_time(step_time, 1) if baseline_step_time is None else float(baseline_step_time)
    if not base_t > 0:
        raise UserError(f"baseline step time must be > 0 seconds, got {base_t}")
    base_tput = 1.0 / base_t
    table = [_row(n, float(taus[n]), interpolate_step_time(step_time, n), base_tput) for n in sorted(taus)]
    trees = [row for row in table if row["n"] > 1]
    best = max(trees, key=lambda row: (row["throughput"], -row["n"]), default=None)
    if best is not None and best["speedup"] > min_speedup:
        reason = (
            f"tree n={best['n']} predicts {best['speedup']:.2f}x the baseline: tau {best['tau']:.2f} "
            f"per {best['step_time'] * 1e3:.1f} ms step = {best['throughput']:.1f} tok/s vs {base_tput:.1f}"
        )
        return _choice(best, base_tput, True, reason, table)
    empty = _row(1, 1.0, interpolate_step_time(step_time, 1), base_tput)
    if best is None:
        reason = "only the empty tree was offered; using it (n=1)"
    else:
        reason = (
            f"no tree beats the baseline by more than {min_speedup:.2f}x (best: n={best['n']} at "
            f"{best['speedup']:.2f}x, tau {best['tau']:.2f} per {best['step_time'] * 1e3:.1f} ms step); "
            f"using the empty tree (n=1)"
        )
    return _choice(empty, base_tput, False, reason, table)


def _row(n: int, tau: float, t: float, base_tput: float) -> dict:
    if not t > 0:
        raise UserError(f"step time at n={n} is {t} s (extrapolated?); profile sizes around it")
    return {"n": n, "tau": tau, "step_time": t, "throughput": tau / t, "speedup": tau / t / base_tput}


def _choice(row: dict, base_tput: float, beats: bool, reason: str, table: list[dict]) -> BudgetChoice:
    return BudgetChoice(
        n=row["n"],
        tau=row["tau"],
        step_time=row["step_time"],
        throughput=row["throughput"],
        baseline_throughput=base_tput,
        speedup=row["speedup"],
        beats_baseline=beats,
        reason=reason,
        table=table,
    )


# --- Calibration and latency files --------------------------------------------------------


@dataclass
class Calibration:
    """Acceptance statistics of a proposer: `accuracy` (independent) or `paths` (conditional)."""

    kind: str  # "independent" | "conditional"
    top_k: int
    accuracy: list[list[float]] | None = None  # [depth][rank]
    paths: dict[Path_, float] | None = None  # path -> P(last rank | prefix accepted)
    samples: int | None = None
    meta: dict = field(default_factory=dict)
    # The rank rows it came from, per answer, in order (trees/replay.RankedAnswer), where kept: then
    # the search replays decoding on them for each candidate's τ instead of the per-position mean.
    answers: list | None = None

    @property
    def max_depth(self) -> int:
        if self.kind == "independent":
            return len(self.accuracy)
        return max((len(p) for p in self.paths), default=0)

    def prob_fn(self) -> ProbFn:
        if self.kind == "independent":
            return independent_prob(self.accuracy)
        return conditional_prob(self.paths)

    def to_json(self) -> dict:
        data = {**self.meta, "kind": self.kind, "top_k": self.top_k, "samples": self.samples}
        if self.kind == "independent":
            data["accuracy"] = self.accuracy
        else:
            data["paths"] = {",".join(map(str, p)): q for p, q in sorted(self.paths.items())}
        if self.answers:
            data["answers"] = [{"tokens": tokens, "ranks": [list(row) for row in rows]} for rows, tokens in self.answers]
        return data


@dataclass
class Latency:
    """Measured seconds per verify step by tree size n (nodes including the root)."""

    step_time: dict[int, float]
    device: str | None = None
    dtype: str | None = None
    context_len: int | None = None
    baseline_step_time: float | None = None
    meta: dict = field(default_factory=dict)

    def at(self, n: int) -> float:
        return interpolate_step_time(self.step_time, n)

    def to_json(self) -> dict:
        data = {**self.meta, "device": self.device, "dtype": self.dtype, "context_len": self.context_len}
        data["step_time"] = {str(n): t for n, t in sorted(self.step_time.items())}
        if self.baseline_step_time is not None:
            data["baseline_step_time"] = self.baseline_step_time
        return data


def load_calibration(path: str | Path) -> Calibration:
    """Read calibration.json (format in the module docstring); UserError naming the file if malformed."""
    return calibration_from_json(_read_json(path, "calibration"), source=str(path))


def save_calibration(calibration: Calibration, path: str | Path) -> Path:
    return _write_json(calibration.to_json(), path)


def load_latency(path: str | Path) -> Latency:
    """Read latency.json (format in the module docstring); UserError naming the file if malformed."""
    return latency_from_json(_read_json(path, "latency"), source=str(path))


def save_latency(latency: Latency, path: str | Path) -> Path:
    return _write_json(latency.to_json(), path)


def calibration_from_json(data, source: str = "calibration") -> Calibration:
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object with 'kind', 'top_k' and 'accuracy' or 'paths'")
    kind = data.get("kind", "conditional" if "paths" in data else "independent")
    if kind not in ("independent", "conditional"):
        raise UserError(f"{source}: 'kind' must be 'independent' or 'conditional', got {kind!r}")
    top_k = data.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise UserError(f"{source}: 'top_k' must be an integer >= 1, got {top_k!r}")
    samples = data.get("samples")
    if samples is not None and (not isinstance(samples, int) or isinstance(samples, bool) or samples < 0):
        raise UserError(f"{source}: 'samples' must be a non-negative integer, got {samples!r}")
    meta = {k: v for k, v in data.items() if k not in ("kind", "top_k", "accuracy", "paths", "samples", "answers")}
    answers = _parse_answers(data.get("answers"), source)
    if kind == "independent":
        accuracy, top_k = _parse_accuracy(data, top_k, source)
        return Calibration(kind, top_k, accuracy=accuracy, samples=samples, meta=meta, answers=answers)
    paths, top_k = _parse_paths(data, top_k, source)
    return Calibration(kind, top_k, paths=paths, samples=samples, meta=meta, answers=answers)


def _parse_answers(value, source: str) -> list | None:
    """calibration.json's optional "answers": [{"tokens": A, "ranks": [[r_1 … r_d], …]}, …]."""
    if value is None:
        return None
    problem = f"{source}: 'answers' must be a list of {{\"tokens\": int, \"ranks\": [[int, …], …]}}; remove it to use the table alone"
    if not isinstance(value, list):
        raise UserError(problem)
    answers = []
    for item in value:
        rows = item.get("ranks") if isinstance(item, dict) else None
        tokens = item.get("tokens") if isinstance(item, dict) else None
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0 or not isinstance(rows, list) \
                or not all(isinstance(row, list) and all(isinstance(r, int) for r in row) for row in rows):
            raise UserError(problem)
        answers.append((rows, tokens))
    return answers


def _parse_accuracy(data: dict, top_k: int | None, source: str) -> tuple[list[list[float]], int]:
    rows = data.get("accuracy")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise UserError(f"{source}: 'accuracy' must be a non-empty list of per-depth lists of per-rank probabilities")
    top_k = len(rows[0]) if top_k is None else top_k
    out = []
    for d, row in enumerate(rows):
        if len(row) != top_k:
            raise UserError(f"{source}: accuracy row for depth {d + 1} has {len(row)} ranks, expected top_k={top_k}")
        out.append([_probability(x, f"{source}: accuracy[{d}][{r}]") for r, x in enumerate(row)])
        _check_sum(out[-1], f"{source}: accuracy for depth {d + 1}")
    return out, top_k


def _parse_paths(data: dict, top_k: int | None, source: str) -> tuple[dict[Path_, float], int]:
    raw = data.get("paths")
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{source}: 'paths' must be a non-empty object like {{\"0\": 0.6, \"0,1\": 0.2}}")
    paths: dict[Path_, float] = {}
    for key, value in raw.items():
        path = _path_key(key, source)
        paths[path] = _probability(value, f"{source}: paths[{key!r}]")
    need_k = 1 + max(p[-1] for p in paths)
    top_k = need_k if top_k is None else top_k
    if need_k > top_k:
        raise UserError(f"{source}: a path uses rank {need_k - 1} but top_k is {top_k}; fix 'top_k' or the paths")
    for path in paths:
        if len(path) > 1 and path[:-1] not in paths:
            raise UserError(f"{source}: path {_key(path)!r} lacks its prefix {_key(path[:-1])!r}; add the prefix")
    siblings: dict[Path_, list[float]] = {}
    for path, q in paths.items():
        siblings.setdefault(path[:-1], []).append(q)
    for parent, qs in siblings.items():
        _check_sum(qs, f"{source}: children of {_key(parent) or 'the root'!r}")
    return paths, top_k


def latency_from_json(data, source: str = "latency") -> Latency:
    if not isinstance(data, dict) or not isinstance(data.get("step_time"), dict) or not data["step_time"]:
        raise UserError(f"{source}: expected a JSON object with 'step_time': {{\"1\": seconds, \"2\": seconds, ...}}")
    step_time = {}
    for key, value in data["step_time"].items():
        try:
            n = int(key)
        except ValueError:
            n = 0
        if n < 1 or str(n) != str(key).strip():
            raise UserError(f"{source}: step_time key {key!r} must be a tree size (integer >= 1 nodes)")
        step_time[n] = _seconds(value, f"{source}: step_time[{key!r}]")
    baseline = data.get("baseline_step_time")
    if baseline is not None:
        baseline = _seconds(baseline, f"{source}: baseline_step_time")
    context_len = data.get("context_len")
    if context_len is not None and (not isinstance(context_len, int) or isinstance(context_len, bool)):
        raise UserError(f"{source}: 'context_len' must be an integer, got {context_len!r}")
    known = ("step_time", "device", "dtype", "context_len", "baseline_step_time")
    meta = {k: v for k, v in data.items() if k not in known}
    return Latency(step_time, data.get("device"), data.get("dtype"), context_len, baseline, meta)


def _number(x, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise UserError(f"{where} must be a finite number, got {x!r}")
    return float(x)


def _probability(x, where: str) -> float:
    x = _number(x, where)
    if not 0.0 <= x <= 1.0:
        raise UserError(f"{where} = {x} is not a probability in [0, 1]")
    return x


def _seconds(x, where: str) -> float:
    x = _number(x, where)
    if x <= 0:
        raise UserError(f"{where} = {x} must be a positive time in seconds")
    return x


def _check_sum(qs: list[float], where: str) -> None:
    total = sum(qs)
    if total > 1.0 + 1e-6:
        raise UserError(
            f"{where} sums to {total:.3f} > 1; ranks are mutually exclusive, so store per-rank "
            f"probabilities, not cumulative top-k accuracy"
        )


def _path_key(key: str, source: str) -> Path_:
    try:
        path = tuple(int(part) for part in key.split(","))
    except ValueError:
        path = ()
    if not path or min(path) < 0:
        raise UserError(f"{source}: path key {key!r} must be comma-separated ranks like \"0,1\"")
    return path


def _key(path: Path_) -> str:
    return ",".join(map(str, path))


def _read_json(path: str | Path, what: str):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist; run `medusa-bench tree` to measure it or check the path")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} file {path}: {e}")
    except json.JSONDecodeError as e:
        raise UserError(f"{what} file {path} is not valid JSON ({e.msg} at line {e.lineno}); fix or regenerate it")


def _write_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


# --- End to end ---------------------------------------------------------------------------


@dataclass
class SearchResult:
    tree: Tree  # the chosen tree, named "search-n<N>"
    choice: BudgetChoice
    candidates: list[Candidate]  # best tree per budget

    def tree_json(self) -> dict:
        """tree.json content: the tree plus why it was chosen."""
        summary = {k: v for k, v in vars(self.choice).items() if k != "table"}
        return self.tree.to_json(search=summary, candidates=self.choice.table)


def best_tree(
    calibration: Calibration,
    latency: Latency,
    max_nodes: int | None = None,
    max_depth: int | None = None,
    num_heads: int | None = None,
    min_speedup: float | None = 1.0,
) -> SearchResult:
    """Search trees up to `max_nodes` (default: the largest profiled size) and pick the fastest.

    Depth is limited by the calibration's depth, `num_heads` and `max_depth`, whichever is least.
    A tree must predict more than `min_speedup` × the baseline; None: more than 1 + the 95%
    half-width of its own prediction (`prediction_noise`), so a speedup inside the noise of the
    tables it comes from is no reason to draft.
    """
    max_nodes = max(latency.step_time) if max_nodes is None else max_nodes
    depth = min(d for d in (calibration.max_depth, num_heads, max_depth) if d is not None)
    candidates = greedy_tree(calibration.prob_fn(), max_nodes, depth, calibration.top_k)
    taus = {c.n: c.tau for c in candidates}
    statistic = "per-position mean"
    if calibration.answers:  # decoding replayed on the calibration's answers (trees/replay.py)
        taus = {c.n: replayed_tau(calibration.answers, c.tree, calibration.top_k)[0] for c in candidates}
        statistic = f"replayed in decode order over {len(calibration.answers)} answers"
    noise = None
    if min_speedup is None:  # the margin is the prediction's own measured noise
        best = choose_budget(taus, latency.step_time, latency.baseline_step_time, 1.0)
        noise = prediction_noise(calibration, latency, candidates[best.n - 1].tree, best.n) if best.n > 1 else None
        min_speedup = 1.0 + (noise["speedup"] if noise else 0.0)
    choice = choose_budget(taus, latency.step_time, latency.baseline_step_time, min_speedup)
    choice.tau_statistic, choice.margin, choice.noise = statistic, min_speedup, noise
    if noise:
        choice.reason += (f" (margin {min_speedup:.3f}x: 1 + the 95% noise of n={best.n}'s prediction, "
                          f"τ ±{noise['tau']:.1%}, step ratio ±{noise['step_ratio']:.1%})")
    if calibration.answers:
        for row in choice.table:
            row["tau_per_position"] = candidates[row["n"] - 1].tau
    tree = Tree(candidates[choice.n - 1].tree.paths, name=f"search-n{choice.n}")
    return SearchResult(tree, choice, candidates)
