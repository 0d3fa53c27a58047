"""Do heads promise more on text they were trained on? τ of one tree, calibrated on prompts the heads saw in
training against prompts of the same kind they never saw.

    MEDUSA_BENCH_DATA=../shared/data python benchmarks/calibration_overlap.py --kinds medusa,hydra --prompts 24 \
        --tree-dir RUN_DIR

GSM8K's training questions make the clean pair: the shipped heads were distilled on its first 400
(training.json `data_recipe.sources` "train.jsonl": 400 conversations; `distill --limit` keeps a
file's first N), so rows 0-399 are seen and rows 400 on are the same kind of text, unseen. The
default calibration file (self-instruct's user-oriented instructions) is printed beside: the
shipped heads were trained on all of it (inputs/calibration.py now holds a split out of training).
Each set: `--prompts` prompts spread evenly, greedy answers in the run's way (2 turns × 64 tokens),
the heads' ranks of the true tokens, decoding replayed over them on the tree (trees/replay.py).
The tree: `--tree-dir`'s tree.json (medusa) / tree-<kind>-auto.json, else `--tree` for every kind.

Zen 4 EPYC, 2 cores, fp32 (oneDNN linears), 24 prompts, the session 20 run's trees (n = 6), session 21:
medusa τ 1.789 seen, 1.669 unseen (+7.2%), user-oriented 1.657; hydra 1.945 seen, 1.856 unseen
(+4.8%), user-oriented 1.680. MT-Bench measured 1.45 (medusa) and 1.60 (hydra) on those trees.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TRAINED_GSM8K_ROWS = 400  # the shipped heads' distillation took GSM8K train's first 400 questions


def tree_for(kind: str, tree_dir: Path | None, spec: str):
    from medusa_bench.trees.tree import Tree

    if tree_dir is not None:
        path = tree_dir / ("tree.json" if kind == "medusa" else f"tree-{kind}-auto.json")
        if path.is_file():
            return Tree([tuple(p) for p in json.loads(path.read_text())["tree"]]), path.name
    return Tree.parse(spec), spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="medusa,hydra")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tree-dir", type=Path, help="a run folder whose auto trees to replay")
    parser.add_argument("--tree", default="tree-8", help="the tree where --tree-dir has none")
    args = parser.parse_args()

    from medusa_bench.bench import calibrate as cal
    from medusa_bench.decoders.options import DecoderOptions
    from medusa_bench.decoders.registry import build_decoder
    from medusa_bench.inputs.calibration import default_prompt_file, pick, read_prompts
    from medusa_bench.inputs.questions import data_file
    from medusa_bench.models import load_model
    from medusa_bench.trees.replay import replayed_tau
    from medusa_bench.trees.tree import Tree

    gsm8k = read_prompts(data_file("gsm8k", "train.jsonl"))
    sets = {"GSM8K, trained on": pick(gsm8k[:TRAINED_GSM8K_ROWS], args.prompts),
            "GSM8K, never seen": pick(gsm8k[TRAINED_GSM8K_ROWS:], args.prompts),
            "user-oriented (trained on)": pick(read_prompts(default_prompt_file()), args.prompts)}
    loaded = load_model("smollm2-135m", "cpu", args.dtype)
    print(f"{args.dtype}, linears: {(loaded.linear_kernel or {}).get('kernel', 'torch')}; {args.prompts} prompts × 2 turns × {args.tokens} tokens")
    for kind in args.kinds.split(","):
        tree, name = tree_for(kind, args.tree_dir, args.tree)
        sizing = build_decoder(kind, loaded, DecoderOptions(tree=Tree.empty())).sizing
        probe = sizing.make_proposer(Tree([(0,) * d for d in range(1, sizing.depth + 1)]))
        taus = {}
        for label, prompts in sets.items():
            calibration = cal.calibrate(loaded, probe, prompts, sizing.depth, 10, args.tokens, turns=2)
            taus[label] = replayed_tau(calibration.answers, tree, 10)[0]
            top1 = " / ".join(f"{x:.2f}" for x in calibration.meta["top1"])
            print(f"{kind} ({name}): {label:28s} τ {taus[label]:.3f}   top-1 per depth {top1}", flush=True)
        seen, unseen = taus["GSM8K, trained on"], taus["GSM8K, never seen"]
        print(f"{kind}: trained-on text reads {seen / unseen - 1:+.1%} against unseen text of the same kind")


if __name__ == "__main__":
    main()
