"""τ against training-data size: Medusa-1 heads trained to convergence on nested subsets of a pack.

    python benchmarks/heads_data_curve.py --pack data/distill/smollm2-135m --out /tmp/curve \
        --reference shipped=medusa_bench/data/heads/smollm2-135m-medusa

For each fraction (default 1/8, 1/4, 1/2, 1) the pack's conversations, shuffled once with a
fixed seed, are cut to their first share (so every subset holds the smaller ones), heads are
trained with the shipped recipe (`scripts/train_default_heads.sh`: 4 heads of 2 ResBlocks, shared
lm_head; training stops on held-out top-1, not on time) on the fp32 base.

τ is that of `medusa:tree-16` on MT-Bench (the first 16 questions, both turns, 128 tokens, fp32,
greedy). One real run decodes it with the first --reference heads; every heads folder's τ is then
*replayed* on that run's answers (trees/replay.py: the true tokens' ranks under the heads at every
answer position, walked in decode order). Greedy fp32 decoding is lossless, so the answers are the
same for every set of heads, and replay gives the τ a run would measure without its ~9 minutes of
decoding per folder on 2 cores; the script prints replayed beside measured for the run it made.
Every step is skipped when its output exists, so a killed run resumes. The script ends with fits
of τ against answer tokens and the size each fit says a τ target needs (`--target`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

from replay_tau import Replay  # benchmarks/replay_tau.py, beside this file

from medusa_bench.results.runs import load_run_data, question_frame
from medusa_bench.results.stats import tau_of
from medusa_bench.train.data import read_records

CLI = [sys.executable, "-m", "medusa_bench.cli"]
TRAIN = ["train", "medusa", "--heads", "4", "--layers", "2", "--lm-head", "shared", "--lr", "1e-3", "--batch-size", "256",
         "--dtype", "float32"]  # the fp32 base's hidden states, as τ is measured in fp32
RUN = ["run", "--bench", "mt_bench", "--limit", "16", "--max-new-tokens", "128", "--dtype", "float32", "--tree", "tree-16",
       "--decoders", "medusa", "--precision-reference", "none"]


def subsets(pack: Path, fractions: list[float], out: Path) -> list[tuple[int, Path]]:
    """(conversations, jsonl) per fraction: nested prefixes of one shuffle."""
    records = read_records(pack)
    random.Random(0).shuffle(records)
    made = []
    for fraction in sorted(fractions):
        n = max(1, round(len(records) * fraction))
        path = out / f"data-{n}.jsonl"
        if not path.exists():
            path.write_text("".join(json.dumps(r) + "\n" for r in records[:n]), encoding="utf-8")
        made.append((n, path))
    return made


def sh(args: list[str], log: Path) -> None:
    with open(log, "a", encoding="utf-8") as handle:
        subprocess.run(args, check=True, stdout=handle, stderr=subprocess.STDOUT)


def train(data: Path, heads: Path, log: Path) -> dict:
    if not (heads / "training.json").exists():
        sh(CLI + TRAIN + ["--data", str(data), "--out", str(heads)], log)
    return json.loads((heads / "training.json").read_text())


def measured_tau(heads: Path, run: Path, log: Path) -> float:
    """τ of a real run of `medusa:tree-16` with these heads (resumes a killed run)."""
    sh(CLI + RUN + ["--medusa-heads", str(heads), "--out", str(run)], log)
    data = load_run_data(run)
    frame = question_frame(data)
    (model_id,) = data.model_ids()
    return float(tau_of(frame[frame.model_id == model_id]))


def fits(sizes: np.ndarray, taus: np.ndarray, target: float) -> list[str]:
    """Two fits of τ against answer tokens N, and the N each says `target` needs."""
    lines = []
    b, a = np.polyfit(np.log(sizes), taus, 1)  # τ = a + b ln N
    need = math.exp((target - a) / b) if b > 0 else math.inf
    lines.append(f"log fit: τ = {a:.3f} + {b:.4f} ln N  (τ +{b * math.log(2):.3f} per doubling); τ {target} at N ≈ {need / 1e6:.2f}M tokens")
    # τ = τ∞ - c N^-p: a saturating power law, p searched on a grid, τ∞ and c by least squares.
    best = None
    for p in np.linspace(0.05, 1.5, 146):
        x = sizes ** -p
        design = np.stack([np.ones_like(x), -x], axis=1)
        (t_inf, c), *_ = np.linalg.lstsq(design, taus, rcond=None)
        err = float(((design @ np.array([t_inf, c]) - taus) ** 2).sum())
        if c > 0 and (best is None or err < best[0]):
            best = (err, p, t_inf, c)
    if best:
        _, p, t_inf, c = best
        need = (c / (t_inf - target)) ** (1 / p) if t_inf > target else math.inf
        reach = f"τ {target} at N ≈ {need / 1e6:.2f}M tokens" if math.isfinite(need) else f"never reaches τ {target}"
        lines.append(f"power fit: τ = {t_inf:.3f} - {c:.3g} N^-{p:.2f}; {reach}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fractions", default="0.125,0.25,0.5,1")
    parser.add_argument("--reference", action="append", default=[], help="NAME=FOLDER: heads measured beside the curve")
    parser.add_argument("--target", type=float, default=1.9)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "log.txt"
    rows = []
    references = [(name, Path(folder)) for name, _, folder in (r.partition("=") for r in args.reference)]
    measured = {}
    if references:  # the one real run, whose answers every replay reads
        name, folder = references[0]
        measured[name] = measured_tau(folder, args.out / f"run-{name}", log)
    trained = []
    for n, data in subsets(args.pack, [float(f) for f in args.fractions.split(",")], args.out):
        heads = args.out / f"heads-{n}"
        trained.append((n, heads, train(data, heads, log)))
        print(f"trained {heads}: {trained[-1][2].get('stopping')}", flush=True)
    replay = Replay(args.out / f"run-{references[0][0]}")
    for name, folder in references:
        rows.append({"heads": name, "tau": replay.tau("medusa", folder), "tau_measured": measured.get(name)})
        print(json.dumps(rows[-1]), flush=True)
    for n, heads, info in trained:
        row = {"heads": f"{n} conversations", "conversations": n, "answer_tokens": info["assistant_tokens"], "tau": replay.tau("medusa", heads),
               "stopping": info.get("stopping"), "train_minutes": info.get("train_seconds", math.nan) / 60,
               "heldout_top1": [round(info["heldout"][f"top1_head{k}"], 3) for k in range(4)]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.out / "curve.json").write_text(json.dumps(rows, indent=1) + "\n")
    curve = [r for r in rows if "answer_tokens" in r]
    print("\n| heads | answer tokens | τ replayed (measured) | held-out top-1 | stopped | train minutes |\n|---|---|---|---|---|---|")
    for r in rows:
        tau = f"{r['tau']:.3f}" + (f" ({r['tau_measured']:.3f})" if r.get("tau_measured") else "")
        stop = r.get("stopping") or {}
        print(f"| {r['heads']} | {r.get('answer_tokens', '')} | {tau} | {r.get('heldout_top1', '')} | "
              f"{stop.get('stopped', '')}, {stop.get('epochs', '')} epochs | {r.get('train_minutes', math.nan):.1f} |")
    if len(curve) >= 3:
        for line in fits(np.array([r["answer_tokens"] for r in curve], float), np.array([r["tau"] for r in curve]), args.target):
            print(line)


if __name__ == "__main__":
    main()
