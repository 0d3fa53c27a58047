"""Tree search: optimality against brute force, budget choice, calibration/latency files."""

import json
import math
import random

import pytest

from medusa_bench.errors import UserError
from medusa_bench.trees.search import best_tree, choose_budget, expected_length, greedy_tree, sequoia_tree
from medusa_bench.trees.tables import (
    Calibration, Latency, calibration_from_json, conditional_prob, independent_prob, interpolate_step_time,
    latency_from_json, load_calibration, load_latency, save_calibration, save_latency,
)
from medusa_bench.trees.tree import Tree

# --- Brute force ----------------------------------------------------------------------------


def all_trees(max_paths: int, max_depth: int, top_k: int) -> dict[int, list[frozenset]]:
    """Every prefix-closed path set, by number of paths (0..max_paths)."""
    by_size = {0: [frozenset()]}
    for size in range(1, max_paths + 1):
        grown = set()
        for tree in by_size[size - 1]:
            for parent in [()] + list(tree):
                if len(parent) < max_depth:
                    for r in range(top_k):
                        child = parent + (r,)
                        if child not in tree:
                            grown.add(tree | {child})
        by_size[size] = list(grown)
    return by_size


def brute_best(prob, max_nodes, max_depth, top_k) -> dict[int, float]:
    """n -> the best tau over all prefix-closed trees of n nodes (including the root)."""
    trees = all_trees(max_nodes - 1, max_depth, top_k)
    return {k + 1: max(1 + sum(prob(p) for p in t) for t in ts) for k, ts in trees.items() if ts}


def random_accuracy(rng, depth, top_k):
    """Per-depth rank probabilities summing to < 1, deliberately not sorted by rank."""
    rows = []
    for _ in range(depth):
        raw = [rng.random() for _ in range(top_k + 1)]  # +1: mass on "no candidate matched"
        rows.append([x / sum(raw) for x in raw[:top_k]])
    return rows


def random_conditional(rng, depth, top_k):
    table = {}

    def fill(prefix):
        if len(prefix) == depth:
            return
        raw = [rng.random() for _ in range(top_k + 1)]
        for r in range(top_k):
            table[prefix + (r,)] = raw[r] / sum(raw)
            fill(prefix + (r,))

    fill(())
    return table


def assert_candidates(cands, prob, max_depth, top_k):
    for n, c in enumerate(cands, start=1):
        assert c.n == n and c.tree.num_nodes == n
        assert c.tree.depth <= max_depth and c.tree.top_k <= top_k
        assert c.tau == pytest.approx(expected_length(c.tree, prob), abs=1e-12)


# --- Optimality -----------------------------------------------------------------------------

CASES = [(d, k, seed) for d in (1, 2, 3) for k in (1, 2, 3) for seed in range(3)]


@pytest.mark.parametrize("depth, top_k, seed", CASES)
def test_greedy_and_dp_match_brute_force_on_independent_tables(depth, top_k, seed):
    rng = random.Random(1000 * depth + 10 * top_k + seed)
    acc = random_accuracy(rng, depth, top_k)
    prob = independent_prob(acc)
    best = brute_best(prob, 6, depth, top_k)
    greedy = greedy_tree(prob, 6, depth, top_k)
    dp = sequoia_tree(acc, 6)
    assert [c.n for c in greedy] == [c.n for c in dp] == sorted(best)
    for g, s in zip(greedy, dp):
        assert g.tau == pytest.approx(best[g.n], abs=1e-12)
        assert s.tau == pytest.approx(best[s.n], abs=1e-12)
    assert_candidates(greedy, prob, depth, top_k)
    assert_candidates(dp, prob, depth, top_k)


@pytest.mark.parametrize("seed", range(5))
def test_depth_limit_dp_equals_greedy_and_brute_force(seed):
    rng = random.Random(seed)
    acc = random_accuracy(rng, 3, 3)
    prob = independent_prob(acc)
    for limit in (1, 2):
        best = brute_best(prob, 6, limit, 3)
        dp = sequoia_tree(acc, 6, max_depth=limit)
        greedy = greedy_tree(prob, 6, limit, 3)
        for g, s in zip(greedy, dp):
            assert s.tau >= g.tau - 1e-12
            assert s.tau == pytest.approx(best[s.n], abs=1e-12)
            assert s.tree.depth <= limit


@pytest.mark.parametrize("seed", range(6))
def test_greedy_is_optimal_for_conditional_statistics(seed):
    rng = random.Random(seed)
    table = random_conditional(rng, 3, 3)
    prob = conditional_prob(table)
    best = brute_best(prob, 6, 3, 3)
    greedy = greedy_tree(prob, 6, 3, 3)
    assert [c.n for c in greedy] == list(range(1, 7))
    for c in greedy:
        assert c.tau == pytest.approx(best[c.n], abs=1e-12)
    assert_candidates(greedy, prob, 3, 3)


def test_conditional_prob_is_a_product_of_the_prefix_table():
    prob = conditional_prob({(0,): 0.5, (0, 1): 0.4, (1,): 0.2})
    assert prob((0, 1)) == pytest.approx(0.2)
    assert prob((1, 0)) == 0.0  # not calibrated
    assert independent_prob([[0.5, 0.2], [0.3, 0.4]])((1, 1)) == pytest.approx(0.08)
    assert independent_prob([[0.5]])((0, 0)) == 0.0  # beyond the table


def test_greedy_prefers_the_most_probable_paths():
    acc = [[0.6, 0.2], [0.5, 0.1]]
    cands = greedy_tree(independent_prob(acc), 5, 2, 2)
    assert cands[0].tree.paths == () and cands[0].tau == 1.0
    assert cands[1].tree.paths == ((0,),)
    assert cands[2].tree.paths == ((0,), (0, 0))  # 0.30 beats [1] at 0.20
    assert cands[3].tree.paths == ((0,), (1,), (0, 0))
    assert cands[4].tau == pytest.approx(1 + 0.6 + 0.3 + 0.2 + 0.1)


def test_search_stops_when_the_space_is_exhausted():
    acc = [[0.5], [0.5]]
    assert len(greedy_tree(independent_prob(acc), 10, 2, 1)) == 3
    assert len(sequoia_tree(acc, 10)) == 3
    assert sequoia_tree(acc, 10)[-1].tree == Tree.chain(2)
    assert [c.n for c in greedy_tree(independent_prob(acc), 10, 0, 1)] == [1]


def test_sequoia_positional_vector_is_used_at_every_depth():
    vec = [0.5, 0.3]
    dp = sequoia_tree(vec, 6, max_depth=3)
    greedy = greedy_tree(independent_prob([vec] * 3), 6, 3, 2)
    assert [c.tau for c in dp] == pytest.approx([c.tau for c in greedy], abs=1e-12)


def test_dp_matches_greedy_on_a_realistic_budget():
    # Medusa-like accuracies, 4 heads, top-10, up to 64 nodes: far beyond brute force.
    acc = [[0.6 * 0.55 ** r for r in range(10)] for _ in range(4)]
    acc = [[q * (0.8 ** d) / (sum(row) * 1.2) for q in row] for d, row in enumerate(acc)]
    greedy = greedy_tree(independent_prob(acc), 64, 4, 10)
    dp = sequoia_tree(acc, 64)
    assert len(greedy) == len(dp) == 64
    for g, s in zip(greedy, dp):
        assert s.tau == pytest.approx(g.tau, abs=1e-9)
    taus = [c.tau for c in greedy]
    assert all(b >= a for a, b in zip(taus, taus[1:]))  # more nodes never hurt tau


def test_search_limits_are_user_errors():
    with pytest.raises(UserError, match="max_nodes"):
        greedy_tree(independent_prob([[0.5]]), 0, 1, 1)
    with pytest.raises(UserError, match="top_k"):
        greedy_tree(independent_prob([[0.5]]), 3, 1, -1)


# --- Budget choice --------------------------------------------------------------------------


def test_interpolation_is_linear_and_extrapolates():
    t = {1: 0.033, 4: 0.052, 8: 0.064, 16: 0.071}
    assert interpolate_step_time(t, 4) == 0.052
    assert interpolate_step_time(t, 6) == pytest.approx(0.058)
    assert interpolate_step_time(t, 12) == pytest.approx(0.0675)
    assert interpolate_step_time(t, 24) == pytest.approx(0.078)  # last segment's slope
    assert interpolate_step_time({8: 0.05}, 3) == 0.05


def test_choose_budget_maximises_predicted_throughput():
    taus = {1: 1.0, 2: 1.5, 4: 2.0, 8: 2.4}
    flat = {1: 0.010, 8: 0.011}
    choice = choose_budget(taus, flat)
    assert choice.n == 8 and choice.beats_baseline
    assert choice.throughput == pytest.approx(2.4 / 0.011)
    assert choice.speedup == pytest.approx(2.4 / 0.011 * 0.010)
    assert "n=8" in choice.reason and len(choice.table) == 4


def test_budget_moves_to_smaller_trees_when_step_time_grows_faster():
    taus = {1: 1.0, 2: 1.5, 4: 2.0, 8: 2.4}
    chosen = []
    for slope in (0.0001, 0.002, 0.006):
        steep = {n: 0.010 + slope * (n - 1) for n in (1, 2, 4, 8)}
        chosen.append(choose_budget(taus, steep).n)
    assert chosen == sorted(chosen, reverse=True) and chosen[0] > chosen[-1]


def test_never_picks_a_tree_slower_than_the_baseline():
    # design.md's CPU: measured step times and a weak tree
    step = {1: 0.033, 4: 0.052, 8: 0.064, 16: 0.071}
    taus = {1: 1.0, 2: 1.18, 4: 1.30, 8: 1.45, 16: 1.62}
    choice = choose_budget(taus, step)
    assert choice.n == 1 and not choice.beats_baseline and choice.tau == 1.0
    assert "no tree beats the baseline" in choice.reason and "empty tree" in choice.reason
    assert all(row["speedup"] < 1 for row in choice.table if row["n"] > 1)


def test_explicit_baseline_and_margin():
    taus = {1: 1.0, 4: 1.6}
    step = {1: 0.010, 4: 0.015}
    assert choose_budget(taus, step).n == 4  # 1.07x over t(1)
    slow_loop = choose_budget(taus, step, baseline_step_time=0.009)  # plain decoding is faster
    assert slow_loop.n == 1 and not slow_loop.beats_baseline
    assert choose_budget(taus, step, min_speedup=1.1).n == 1
    assert choose_budget({1: 1.0}, step).reason.startswith("only the empty tree")


# --- Files ----------------------------------------------------------------------------------


def test_calibration_round_trip(tmp_path):
    ind = Calibration("independent", 2, accuracy=[[0.5, 0.2], [0.3, 0.1]], samples=100, meta={"heads": "x"})
    path = save_calibration(ind, tmp_path / "calibration.json")
    back = load_calibration(path)
    assert back == ind and back.max_depth == 2
    cond = Calibration("conditional", 3, paths={(0,): 0.5, (2,): 0.1, (0, 1): 0.25}, samples=7)
    back = load_calibration(save_calibration(cond, tmp_path / "c2.json"))
    assert back == cond and back.max_depth == 2
    assert json.loads((tmp_path / "c2.json").read_text())["paths"]["0,1"] == 0.25


def test_latency_round_trip(tmp_path):
    lat = Latency({1: 0.033, 16: 0.071}, device="cpu", dtype="float32", context_len=300, baseline_step_time=0.03)
    back = load_latency(save_latency(lat, tmp_path / "latency.json"))
    assert back == lat and back.at(8) == pytest.approx(0.033 + 7 * 0.038 / 15)


@pytest.mark.parametrize(
    "data, words",
    [
        ([], "expected a JSON object"),
        ({"kind": "magic", "accuracy": [[0.5]]}, "'kind' must be"),
        ({"kind": "independent"}, "'accuracy' must be"),
        ({"accuracy": []}, "'accuracy' must be"),
        ({"accuracy": [0.5, 0.2]}, "'accuracy' must be"),
        ({"accuracy": [[0.5, 0.2], [0.3]]}, "depth 2 has 1 ranks, expected top_k=2"),
        ({"top_k": 3, "accuracy": [[0.5, 0.2]]}, "expected top_k=3"),
        ({"accuracy": [[0.5, "x"]]}, "accuracy[0][1] must be a finite number"),
        ({"accuracy": [[0.5, True]]}, "must be a finite number"),
        ({"accuracy": [[0.5, float("nan")]]}, "must be a finite number"),
        ({"accuracy": [[1.5]]}, "not a probability in [0, 1]"),
        ({"accuracy": [[-0.1]]}, "not a probability"),
        ({"accuracy": [[0.6, 0.8, 0.9]]}, "cumulative top-k"),
        ({"top_k": 0, "accuracy": [[0.5]]}, "'top_k' must be an integer >= 1"),
        ({"samples": -3, "accuracy": [[0.5]]}, "'samples' must be"),
        ({"kind": "conditional", "paths": {}}, "'paths' must be a non-empty object"),
        ({"kind": "conditional", "paths": {"a": 0.5}}, "path key 'a'"),
        ({"kind": "conditional", "paths": {"0,-1": 0.5}}, "path key '0,-1'"),
        ({"kind": "conditional", "paths": {"0,1": 0.5}}, "'0,1' lacks its prefix '0'"),
        ({"kind": "conditional", "top_k": 2, "paths": {"0": 0.5, "2": 0.1}}, "uses rank 2 but top_k is 2"),
        ({"kind": "conditional", "paths": {"0": 0.7, "1": 0.6}}, "children of 'the root' sums to 1.300"),
    ],
)
def test_malformed_calibration_is_a_user_error(tmp_path, data, words):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as err:
        load_calibration(path)
    assert words in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "data, words",
    [
        ({}, "'step_time'"),
        ({"step_time": {}}, "'step_time'"),
        ({"step_time": [0.1, 0.2]}, "'step_time'"),
        ({"step_time": {"a": 0.1}}, "key 'a' must be a tree size"),
        ({"step_time": {"0": 0.1}}, "key '0' must be a tree size"),
        ({"step_time": {"1": "fast"}}, "step_time['1'] must be a finite number"),
        ({"step_time": {"1": -0.1}}, "must be a positive time"),
        ({"step_time": {"1": 0.1}, "baseline_step_time": 0}, "baseline_step_time = 0.0 must be a positive"),
        ({"step_time": {"1": 0.1}, "context_len": "long"}, "'context_len' must be an integer"),
    ],
)
def test_malformed_latency_is_a_user_error(tmp_path, data, words):
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as err:
        load_latency(path)
    assert words in str(err.value) and str(path) in str(err.value)


def test_unreadable_files_name_the_path(tmp_path):
    with pytest.raises(UserError, match="calibration file .*nope.json does not exist"):
        load_calibration(tmp_path / "nope.json")
    bad = tmp_path / "latency.json"
    bad.write_text('{"step_time": {"1": 0.1}')
    with pytest.raises(UserError, match=f"latency file {bad} is not valid JSON"):
        load_latency(bad)


def test_from_json_defaults():
    cal = calibration_from_json({"accuracy": [[0.5, 0.25]]})
    assert cal.kind == "independent" and cal.top_k == 2 and cal.samples is None
    cal = calibration_from_json({"paths": {"0": 0.5, "0,3": 0.1}})
    assert cal.kind == "conditional" and cal.top_k == 4
    assert latency_from_json({"step_time": {"4": 0.05}, "note": "x"}).meta == {"note": "x"}


# --- End to end -----------------------------------------------------------------------------


def test_best_tree_picks_and_explains():
    cal = Calibration("independent", 3, accuracy=[[0.7, 0.1, 0.05], [0.6, 0.1, 0.05], [0.5, 0.1, 0.05]])
    lat = Latency({1: 0.010, 4: 0.0105, 8: 0.012, 16: 0.020})
    result = best_tree(cal, lat)
    assert result.choice.beats_baseline
    assert result.tree.num_nodes == result.choice.n <= 16 and result.tree.depth <= 3
    assert result.tree.name == f"search-n{result.choice.n}"
    data = result.tree_json()
    assert data["tree"] == result.tree.to_list() and data["search"]["n"] == result.choice.n
    assert Tree.parse(json.loads(json.dumps(data))["tree"]) == result.tree
    assert len(result.candidates) == 16
    assert best_tree(cal, lat, num_heads=1).tree.depth <= 1


def test_sizes_timed_again_choose_and_predict():
    """The screen's best sizes timed again on fresh rounds (latency.json "confirmed"): only they compete, their
    ratios predict and set the noise, and the table keeps every size with the screen's figure beside."""
    cal = Calibration("independent", 3, accuracy=[[0.7, 0.1, 0.05], [0.6, 0.1, 0.05], [0.5, 0.1, 0.05]])
    screen = {1: 0.010, 2: 0.0102, 4: 0.0104, 8: 0.012, 16: 0.020}
    lat = Latency(screen, baseline_step_time=0.010)
    lucky = best_tree(cal, lat, max_nodes=16, min_speedup=1.0).choice.n
    assert lucky == 5  # the screen: beside n = 4, timed cheap
    lat.meta["confirmed"] = {"ratios": {"2": [1.02, 1.01, 1.03], "4": [1.25, 1.2, 1.3], "8": [1.21, 1.2, 1.22]}, "repeats": 30}
    result = best_tree(cal, lat, max_nodes=16, min_speedup=None)
    rows = {row["n"]: row for row in result.choice.table}
    assert result.choice.n in (2, 8) and result.choice.n == max((2, 4, 8), key=lambda n: rows[n]["speedup"])
    chosen = rows[result.choice.n]
    assert result.choice.step_time == pytest.approx(0.010 * {2: 1.02, 8: 1.21}[result.choice.n])
    assert chosen["confirmed"] and chosen["screen_speedup"] == pytest.approx(chosen["tau"] * 0.010 / screen[result.choice.n])
    assert len(rows) == 16 and "confirmed" not in rows[3] and rows[3]["step_time"] == pytest.approx(0.0103)
    assert result.choice.noise["step_ratio"] == pytest.approx(0.01 / {2: 1.02, 8: 1.21}[result.choice.n], abs=1e-4)
    assert "sizes 2, 4, 8 (the screen's best) timed again on 30 fresh rounds" in result.choice.reason


def test_best_tree_with_conditional_calibration_falls_back_to_baseline():
    cal = calibration_from_json({"kind": "conditional", "paths": {"0": 0.2, "0,0": 0.1}})
    lat = Latency({1: 0.033, 2: 0.040, 3: 0.045})
    result = best_tree(cal, lat)
    assert result.tree.paths == () and not result.choice.beats_baseline
    assert math.isclose(result.choice.throughput, 1 / 0.033)


def test_kept_answers_make_the_search_replay_decoding(tmp_path):
    """With the calibration's answers kept, each candidate's τ is decoding replayed on them (trees/replay.py):
    an easy answer is skipped through in few steps, so the realised τ is below the per-position mean."""
    easy = [[0, 0]] * 5 + [[0, -1]]  # 7 tokens: two drafts right everywhere
    hard = [[5, 5]] * 3  # 4 tokens: nothing right
    ranks = [tuple(row) for row in easy + hard]
    from medusa_bench.trees.ranks import statistics_of
    import torch

    cal = statistics_of(torch.tensor(ranks), 10)
    cal.answers = [(easy, 7), (hard, 4)]
    lat = Latency({1: 0.010, 2: 0.0105, 3: 0.011})
    result = best_tree(cal, lat, max_nodes=3)
    chain2 = {row["n"]: row for row in result.choice.table}[3]
    assert chain2["tau"] == pytest.approx(11 / 7)  # 3 steps over the easy answer, 4 over the hard one
    assert chain2["tau_per_position"] == pytest.approx(1 + 6 / 9 + 6 / 9)  # the table's: P(rank 0) + P(0 then 0)
    assert result.choice.tau_statistic == "replayed in decode order over 2 answers"
    assert result.tree_json()["search"]["tau_statistic"] == result.choice.tau_statistic
    back = load_calibration(save_calibration(cal, tmp_path / "calibration.json"))
    assert back.answers == [([list(r) for r in easy], 7), ([list(r) for r in hard], 4)]
    assert best_tree(back, lat, max_nodes=3).choice.table == result.choice.table
    with pytest.raises(UserError, match="'answers' must be a list"):
        calibration_from_json({"kind": "conditional", "paths": {"0": 0.2}, "answers": [{"tokens": 3, "ranks": "x"}]})


def test_a_size_one_level_shallower_replaces_the_deeper_tree_where_it_steps_cheaper_for_its_tau():
    """Each level is a draft head to run: the confirm step also times each confirmed size one level shallower
    (latency.json "confirmed" "shallower"), and that tree takes the size where τ / step ratio is higher."""
    from medusa_bench.trees.search import shallower_candidate

    cal = Calibration("independent", 3, accuracy=[[0.7, 0.1, 0.05], [0.6, 0.1, 0.05], [0.5, 0.1, 0.05]])
    lat = Latency({1: 0.010, 2: 0.0102, 4: 0.0104, 8: 0.012, 16: 0.020}, baseline_step_time=0.010)
    deep = best_tree(cal, lat, max_nodes=16, min_speedup=1.0).candidates[7]
    shallow = shallower_candidate(cal, deep.tree)
    assert deep.tree.depth == 3 and shallow.tree.depth == 2 and shallow.n == 8 and shallow.tau < deep.tau
    assert shallower_candidate(cal, Tree.chain(1)) is None  # nothing shallower than one level
    confirmed = {"ratios": {"4": [1.25, 1.2, 1.3], "8": [1.30, 1.28, 1.32]}, "repeats": 30}
    for ratio, swapped in ((1.29, False), (1.10, True)):  # barely cheaper: its lower τ loses; much cheaper: it wins
        lat.meta["confirmed"] = {**confirmed, "shallower": {"8": {"ratio": [ratio, ratio - 0.01, ratio + 0.01],
                                                                  "tree": shallow.tree.to_list()}}}
        result = best_tree(cal, lat, max_nodes=16, min_speedup=1.0)
        rows = {row["n"]: row for row in result.choice.table}
        assert (result.candidates[7].tree.paths == shallow.tree.paths) is swapped
        assert ("shallower" in rows[8]) is swapped and ("one level shallower" in result.choice.reason) is swapped
        if swapped:
            assert result.choice.n == 8 and rows[8]["tau"] == pytest.approx(shallow.tau) and rows[8]["shallower"] == 2
            assert result.choice.step_time == pytest.approx(0.010 * 1.10) and result.tree.paths == shallow.tree.paths
