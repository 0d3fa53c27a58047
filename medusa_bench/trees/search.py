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

The tables it reads (calibration.json, latency.json) and their path probabilities: trees/tables.py.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Sequence

from medusa_bench.errors import UserError
from medusa_bench.trees.noise import prediction_noise
from medusa_bench.trees.replay import replayed_tau
from medusa_bench.trees.tables import Calibration, Latency, Path_, ProbFn, as_rows, interpolate_step_time
from medusa_bench.trees.tree import Tree

_NEG = float("-inf")


class Candidate(NamedTuple):
    """The best tree found for one budget."""

    n: int  # nodes including the root
    tree: Tree
    tau: float  # expected tokens per step


def expected_length(tree: Tree, prob: ProbFn) -> float:
    """tau = 1 + sum of path probabilities: expected tokens emitted per verify step."""
    return 1.0 + sum(prob(p) for p in tree.paths)


# --- Search -------------------------------------------------------------------------------


def shallower_candidate(calibration: Calibration, tree: Tree) -> "Candidate | None":
    """The best tree of `tree`'s size one level shallower, or None where that size does not fit.

    Why: each level of a tree is one more draft head to run every step, a cost the search's step
    profile prices only for the tree it timed at that size. On the Xeon with AMX (bf16, 16 MT-Bench
    questions, session 23) medusa's 8-node search tree of depth 4 stepped at 1.219× the baseline's
    and `tree-8` (depth 3) at 1.173×, for τ 1.553 and 1.566: the deeper one ran 4.4% slower."""
    if tree.depth <= 1:
        return None
    n = tree.num_nodes
    found = greedy_tree(calibration.prob_fn(), n, tree.depth - 1, calibration.top_k)
    return found[n - 1] if len(found) >= n else None


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
    rows = as_rows(accuracy)
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
    tables it comes from is no reason to draft. Where the latency holds sizes timed again after the
    screen (`confirmed_ratios`), only those compete, priced and margined by their fresh rounds.
    """
    max_nodes = max(latency.step_time) if max_nodes is None else max_nodes
    depth = min(d for d in (calibration.max_depth, num_heads, max_depth) if d is not None)
    candidates = greedy_tree(calibration.prob_fn(), max_nodes, depth, calibration.top_k)
    taus = {c.n: c.tau for c in candidates}
    statistic = "per-position mean"
    if calibration.answers:  # decoding replayed on the calibration's answers (trees/replay.py)
        taus = {c.n: replayed_tau(calibration.answers, c.tree, calibration.top_k)[0] for c in candidates}
        statistic = f"replayed in decode order over {len(calibration.answers)} answers"
    screened, confirmed = latency, confirmed_ratios(latency, taus)
    shallower = []  # sizes whose one-level-shallower tree, timed again beside them, steps cheaper for its τ
    for n, (tree, ratio) in shallower_ratios(latency, confirmed).items():
        mean = expected_length(tree, calibration.prob_fn())  # the per-position τ, as every candidate keeps
        tau = replayed_tau(calibration.answers, tree, calibration.top_k)[0] if calibration.answers else mean
        if tau / ratio[0] > taus[n] / confirmed[n][0]:
            candidates[n - 1] = Candidate(n, tree, mean)
            taus[n], confirmed[n] = tau, ratio
            shallower.append(n)
    chosen_from = taus
    if confirmed:  # the screen's best few sizes, timed again on fresh rounds: those rounds decide, and predict
        base = latency.baseline_step_time or latency.at(1)
        latency = Latency({1: base, **{n: base * ratio for n, (ratio, _, _) in confirmed.items()}}, latency.device,
                          latency.dtype, latency.context_len, base,
                          {"ratio_ci": {str(n): [low, high] for n, (_, low, high) in confirmed.items()}})
        chosen_from = {1: 1.0, **{n: taus[n] for n in confirmed}}
    noise = None
    if min_speedup is None:  # the margin is the prediction's own measured noise
        best = choose_budget(chosen_from, latency.step_time, latency.baseline_step_time, 1.0)
        noise = prediction_noise(calibration, latency, candidates[best.n - 1].tree, best.n) if best.n > 1 else None
        min_speedup = 1.0 + (noise["speedup"] if noise else 0.0)
    choice = choose_budget(chosen_from, latency.step_time, latency.baseline_step_time, min_speedup)
    choice.tau_statistic, choice.margin, choice.noise = statistic, min_speedup, noise
    if noise:
        choice.reason += (f" (margin {min_speedup:.3f}x: 1 + the 95% noise of n={best.n}'s prediction, "
                          f"τ ±{noise['tau']:.1%}, step ratio ±{noise['step_ratio']:.1%})")
    if confirmed:  # the table keeps every size: the screen's figures, the confirmed ones where they were timed again
        again = {row["n"]: row for row in choice.table}
        choice.table = [{**again[row["n"]], "screen_speedup": row["speedup"], "confirmed": True} if row["n"] in confirmed else row
                        for row in choose_budget(taus, screened.step_time, screened.baseline_step_time, 1.0).table]
        choice.reason += (f"; sizes {', '.join(map(str, sorted(confirmed)))} (the screen's best) timed again on "
                          f"{screened.meta['confirmed'].get('repeats')} fresh rounds chose and predicted")
        for row in choice.table:
            if row["n"] in shallower:
                row["shallower"] = candidates[row["n"] - 1].tree.depth
        if shallower:
            choice.reason += (f"; at n={', '.join(map(str, shallower))} the tree one level shallower (a draft head fewer) "
                              "stepped cheaper for its τ than the deeper one and replaced it")
    if calibration.answers:
        for row in choice.table:
            row["tau_per_position"] = candidates[row["n"] - 1].tau
    tree = Tree(candidates[choice.n - 1].tree.paths, name=f"search-n{choice.n}")
    return SearchResult(tree, choice, candidates)


def shallower_ratios(latency: Latency, confirmed: Mapping[int, tuple]) -> dict[int, tuple[Tree, tuple[float, float, float]]]:
    """{n: (the tree one level shallower, (mean step ratio, 95% low, high))} timed again beside the confirmed
    sizes (latency.json "confirmed" "shallower", bench/autotree.confirm_sizes; `shallower_candidate` says why)."""
    found = ((latency.meta.get("confirmed") or {}).get("shallower") or {})
    return {int(n): (Tree([tuple(p) for p in record["tree"]]), tuple(record["ratio"]))
            for n, record in found.items() if int(n) in confirmed}


def confirmed_ratios(latency: Latency, taus: Mapping[int, float]) -> dict[int, tuple[float, float, float]]:
    """{n: (mean step ratio t(n)/t(1), 95% low, high)} of the sizes timed again after the screen
    (latency.json "confirmed", bench/autotree.confirm_sizes), those the search offers; {} if none.

    Why: the screen takes the fastest of a dozen noisy estimates, so its best was often timed cheap by
    chance (the winner's curse: medusa's step came out 5% dearer in the run than profiled, eagle3's 9%,
    Zen 4 EPYC, bf16). Fresh rounds of the few best, never seen by the screen, price them without it."""
    ratios = (latency.meta.get("confirmed") or {}).get("ratios") or {}
    return {int(n): tuple(r) for n, r in ratios.items() if int(n) in taus and int(n) > 1}
