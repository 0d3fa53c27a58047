"""How much does prompt lookup's τ depend on the text? Its drafting replayed (bench/pld_search.replay) on a
finished run's own baseline answers against the optimiser's calibration answers, in several sizes.

    MEDUSA_BENCH_DATA=../shared/data python benchmarks/pld_text.py RUN_DIR [--knobs ngram3-tokens10-branches1]

Prompt lookup has no heads: what it drafts depends on the tokens and, through its draft policy (it
drafts what pays), on the step profile, here the run's own pld-profile.json. So a replay on a text gives
the τ a greedy run measures on it (16 MT-Bench questions below: 1.72 replayed on the baseline's answers,
1.79 measured by plain `pld` on its own, whose bf16 answers differ a little). The calibration answers
are the tree optimiser's: self-instruct's held-out prompts, each answered and then asked a generic
follow-up (bench/calibrate.greedy_sequences), in the `SIZES` below (prompts × tokens). Turn 1 and turn 2
apart: a follow-up such as "Please summarize your answer" is answered by copying turn 1.

Xeon with AMX (family 6 model 207, 2 cores), bf16, session 22's run 3 (16 MT-Bench questions, 128 tokens),
the defaults ngram3-tokens10-branches1, session 23:

    text                               τ      turn 1  turn 2
    MT-Bench run's baseline answers    1.723  1.343   2.527
    calibration 16 prompts × 64        2.295  1.841   3.178   (what pld:auto calibrates on)
    calibration 16 prompts × 128       2.454  2.003   3.354
    calibration 64 prompts × 64        2.133  1.758   2.773
    calibration 64 prompts × 128       2.487  2.125   3.070

Every calibration size reads 24–44% above the benchmark: self-instruct's inputs (a table, a product
name, a text to paraphrase) are copied into the answers, and longer answers repeat themselves more.
The heads' τ does not move this way (their calibration is within 6% of the same run's text).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SIZES = ((16, 64), (16, 128), (64, 64), (64, 128))


def run_texts(loaded, run_dir: Path) -> list[tuple[list[int], int]]:
    """The run's baseline answers, every turn, prompts built as the run built them; turn 1s first, then turn 2s."""
    from medusa_bench.bench.audit import answer_texts
    from medusa_bench.bench.run_folder import model_id
    from medusa_bench.inputs.questions import read_questions
    from medusa_bench.results import files

    path = files.answer_path(run_dir, model_id(loaded, "baseline"))
    choices = {str(r["question_id"]): r["choices"][0] for r in files.read_jsonl(path)}
    texts = answer_texts(loaded, read_questions(run_dir / "question.jsonl"), choices)
    return texts[0::2] + texts[1::2]  # answer_texts gives each question's turns in order


def line(name: str, texts: list[tuple[list[int], int]], knobs: dict, profile) -> str:
    from medusa_bench.bench.pld_search import replay

    whole, half = replay(texts, knobs, profile), len(texts) // 2  # one proposer over every answer, as in a run
    first, second = (sum(whole.tokens[part]) / sum(whole.steps[part]) for part in (slice(None, half), slice(half, None)))
    return f"{name:36s} {whole.tau:6.3f} {first:7.3f} {second:7.3f}   ({sum(whole.tokens)} tokens)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run folder with baseline answers")
    parser.add_argument("--knobs", default="ngram3-tokens10-branches1", help="prompt lookup's knobs, as in pld:<knobs>")
    args = parser.parse_args()

    from medusa_bench.bench import calibrate as cal
    from medusa_bench.decoders.registry import spec_options
    from medusa_bench.inputs.calibration import calibration_prompts, default_prompt_file
    from medusa_bench.models import load_model
    from medusa_bench.results import files

    settings = files.load_run(args.run_dir).get("settings") or {}
    loaded = load_model(settings.get("model", "smollm2-135m"), "cpu", settings.get("dtype", "auto"))
    _, options = spec_options(f"pld:{args.knobs}")
    knobs = {name: getattr(options, name) for name in ("pld_max_ngram", "pld_tokens", "pld_branches")}
    profile = files.read_json(args.run_dir / "pld-profile.json")  # the run's; None: the prior curve
    print(f"{loaded.spec} {loaded.dtype}, knobs {knobs}\n{'text':36s} {'τ':>6s} {'turn 1':>7s} {'turn 2':>7s}")
    print(line("the run's baseline answers", run_texts(loaded, args.run_dir), knobs, profile), flush=True)
    for prompts, tokens in SIZES:
        began = time.perf_counter()
        texts = cal.greedy_sequences(loaded, calibration_prompts(default_prompt_file(), prompts), tokens, 2)  # turn 1s, then 2s
        print(line(f"calibration {prompts} × {tokens} ({time.perf_counter() - began:.0f} s)", texts, knobs, profile), flush=True)


if __name__ == "__main__":
    main()
