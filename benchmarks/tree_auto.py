"""`--tree auto` against fixed trees, interleaved in one run: tokens/s, τ and predicted τ per tree.

Fixed trees: chain-1 … chain-4, mc_sim_7b_63, and the search's own best trees of 4, 8, 16 and
32 nodes from the same calibration (so the budget choice is what is tested). All decoders
take turns question by question in one `run_benchmark`, so machine drift hits all alike.
Checks the targets: auto ≥ 0.97 × the best fixed tree's tokens/s; |predicted τ − measured τ|
≤ 10% of measured τ for auto's tree; auto ≥ 0.98 × the baseline's tokens/s.

    .venv/bin/python benchmarks/tree_auto.py                                # all 80 MT-Bench questions, 256 tokens
    .venv/bin/python benchmarks/tree_auto.py --limit 4 --max-new-tokens 64  # a quick look

Resumes like `run` (same --out, same settings). Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medusa_bench.bench.autotree import AutoTreeSettings, size_tree
from medusa_bench.bench.loop import RunConfig, run_benchmark
from medusa_bench.bench.run_folder import model_id
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.models import load_model
from medusa_bench.results import files
from medusa_bench.trees.search import expected_length
from medusa_bench.trees.tree import Tree

PRESETS = ("chain-1", "chain-2", "chain-3", "chain-4", "mc_sim_7b_63")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--medusa-heads", default=None, help="default: the heads shipped for the model")
    parser.add_argument("--bench", default="mt_bench")
    parser.add_argument("--limit", type=int, default=None, help="first N questions (default all)")
    parser.add_argument("--question-ids", default=None, help="comma-separated ids, e.g. two per MT-Bench category")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--greedy-sizes", default="4,8,16,32", help="nodes (root included) of the search's fixed trees")
    parser.add_argument("--max-nodes", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=16, help="calibration prompts")
    parser.add_argument("--tokens", type=int, default=64, help="calibration answer tokens per prompt")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="run folder (default results/tree-auto-<model>-<bench>)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    return parser.parse_args()


def fixed_trees(auto, num_heads: int, sizes: list[int], folder: Path) -> dict[str, Tree]:
    """label → tree: the presets the heads can draft, then the search's trees of the given sizes (as files)."""
    trees = {}
    for name in PRESETS:
        tree = Tree.parse(name)
        if tree.depth <= num_heads:
            trees[name] = tree
        else:
            print(f"skipping {name}: depth {tree.depth} > {num_heads} heads")
    folder.mkdir(parents=True, exist_ok=True)
    for n in sizes:
        if n <= len(auto.result.candidates):
            tree = auto.result.candidates[n - 1].tree
            trees[f"greedy-{n}"] = tree
            tree.save(folder / f"greedy-{n}.json")
    return trees


def totals(run_dir: Path, loaded, decoder: str) -> dict:
    """Σ new tokens, Σ wall time, Σ steps over every answered turn of one decoder."""
    tokens = wall = steps = 0
    for record in files.read_jsonl(files.answer_path(run_dir, model_id(loaded, decoder))):
        choice = record["choices"][0]
        tokens += sum(choice["new_tokens"])
        wall += sum(choice["wall_time"])
        steps += sum(choice["decoding_steps"])
    return {"tok_s": tokens / wall if wall else float("nan"), "tau": tokens / steps if steps else float("nan"), "tokens": tokens}


def top1(calibration) -> list[float]:
    """P(the top-1 draft is right) per depth, given the path above it was right."""
    if calibration.kind == "independent":
        return [round(row[0], 3) for row in calibration.accuracy]
    return [round(calibration.paths.get((0,) * d, 0.0), 3) for d in range(1, calibration.max_depth + 1)]


def main() -> None:
    args = parse_args()
    loaded = load_model(args.model, args.device, args.dtype)
    settings = AutoTreeSettings(max_nodes=args.max_nodes, prompts=args.prompts, tokens=args.tokens)
    options = DecoderOptions(medusa_heads=args.medusa_heads, extra={"autotree": settings})
    auto = size_tree("medusa", loaded, options)
    out = args.out or Path("results") / f"tree-auto-{loaded.name}-{args.bench}"
    trees = fixed_trees(auto, auto.info["depth"], [int(n) for n in args.greedy_sizes.split(",") if n.strip()], out / "trees")
    specs = {label: f"medusa:{out / 'trees' / (label + '.json')}" if label.startswith("greedy-") else f"medusa:{label}"
             for label in trees}
    specs["auto"] = "medusa:auto"
    trees["auto"] = auto.tree
    ids = [q.strip() for q in args.question_ids.split(",") if q.strip()] if args.question_ids else None
    config = RunConfig(model=args.model, decoders=["baseline", *specs.values()], bench=args.bench, limit=args.limit, question_ids=ids,
                       max_new_tokens=args.max_new_tokens, warmup=args.warmup, out=out, device=args.device,
                       dtype=args.dtype, options=options)
    run_dir = run_benchmark(config, loaded=loaded)

    prob, latency = auto.calibration.prob_fn(), auto.latency
    base = totals(run_dir, loaded, "baseline")
    rows = {}
    for label, spec in specs.items():
        measured = totals(run_dir, loaded, spec)
        tree = trees[label]
        tau = expected_length(tree, prob)
        rows[label] = {**measured, "nodes": tree.num_nodes, "pred_tau": tau,
                       "pred_speedup": tau / latency.at(tree.num_nodes) * latency.at(1)}

    print(f"\n{loaded.name} on {latency.device}/{latency.dtype}, {args.bench}, {len(ids) if ids else (args.limit or 'all')} questions, "
          f"max {args.max_new_tokens} new tokens; calibration top-1 per depth {top1(auto.calibration)}")
    print(f"auto: {auto.result.choice.reason}")
    print(f"{'decoder':<14}{'nodes':>6}{'tok/s':>9}{'× base':>8}{'τ':>7}{'pred τ':>8}{'pred ×':>8}")
    print(f"{'baseline':<14}{1:>6}{base['tok_s']:>9.2f}{1:>8.3f}{base['tau']:>7.3f}{1:>8.3f}{1:>8.3f}")
    for label, row in rows.items():
        print(f"{label:<14}{row['nodes']:>6}{row['tok_s']:>9.2f}{row['tok_s'] / base['tok_s']:>8.3f}{row['tau']:>7.3f}"
              f"{row['pred_tau']:>8.3f}{row['pred_speedup']:>8.3f}")

    errors = {label: abs(row["pred_tau"] - row["tau"]) / row["tau"] for label, row in rows.items()}
    print("τ prediction error |pred τ − τ| / τ: " + ", ".join(f"{label} {e:.1%}" for label, e in errors.items()))
    a = rows["auto"]
    best_label = max((label for label in rows if label != "auto"), key=lambda label: rows[label]["tok_s"])
    checks = [
        (f"auto tok/s ≥ 0.97 × best fixed ({best_label})", a["tok_s"] / rows[best_label]["tok_s"], 0.97, True),
        ("|pred τ − τ| / τ ≤ 0.10 (auto)", abs(a["pred_tau"] - a["tau"]) / a["tau"], 0.10, False),
        ("auto tok/s ≥ 0.98 × baseline", a["tok_s"] / base["tok_s"], 0.98, True),
    ]
    failed = False
    for text, value, bound, at_least in checks:
        ok = value >= bound if at_least else value <= bound
        failed |= not ok
        print(f"{'PASS' if ok else 'FAIL'}  {text}: {value:.3f}")
    print(f"run folder: {run_dir}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
