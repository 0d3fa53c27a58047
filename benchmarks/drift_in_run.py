"""When did the machine move? A run's baseline step on each question over another run's on the same question.

    python benchmarks/drift_in_run.py RUN REFERENCE_RUN [--first 4]

Both runs must hold baseline answers to the same questions (the same command twice). Each question's
baseline step is the mean of its timed decoding steps, both turns; a question's context sets its step,
so each is divided by the reference run's on that question, and the ratios are printed in the order
the run answered. A shift already there at the first questions is one a re-time just before the
answers would catch; one that comes later is not (docs/results/cpu-repeat-xeon-amx-16q.md). Reads
answer files only: no model, seconds.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path


def baseline_steps(run: Path) -> list[tuple[str, float]]:
    """(question id, mean baseline decoding step in ms) in the order the run answered."""
    from medusa_bench.results import files

    answers = next(run.glob("model_answer/*-baseline.jsonl"), None)
    if answers is None:
        raise SystemExit(f"{run}: no model_answer/*-baseline.jsonl; pass a run folder with baseline answers")
    rows = sorted(files.read_jsonl(answers), key=lambda r: r["tstamp"])
    return [(str(r["question_id"]), 1000 * statistics.fmean(s for turn in r["choices"][0]["step_times"] for s in turn))
            for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("reference", type=Path)
    parser.add_argument("--first", type=int, default=4, help="questions counted as the run's start")
    args = parser.parse_args()
    run, reference = baseline_steps(args.run), dict(baseline_steps(args.reference))
    run = [(q, ms) for q, ms in run if q in reference]
    if len(run) <= args.first:
        raise SystemExit(f"only {len(run)} questions in both runs; pass a smaller --first")
    ratios = [ms / reference[q] for q, ms in run]
    print(f"{args.run} over {args.reference}, per question in answer order:")
    print(" ".join(f"{r:.2f}" for r in ratios))
    for name, part in (("first", slice(None, args.first)), ("rest", slice(args.first, None))):
        mine, theirs = [ms for _, ms in run[part]], [reference[q] for q, _ in run[part]]
        print(f"{name} {len(mine):2d}: {statistics.fmean(mine):.1f} / {statistics.fmean(theirs):.1f} ms "
              f"({statistics.fmean(ratios[part]) - 1:+.1%})")


if __name__ == "__main__":
    main()
