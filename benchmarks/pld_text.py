"""How much does prompt lookup's τ depend on the text? Its drafting replayed (bench/pld_search.replay) on a
finished run's own baseline answers against the optimiser's calibration answers, in several sizes.

    MEDUSA_BENCH_DATA=../shared/data python benchmarks/pld_text.py RUN_DIR [--knobs ngram3-tokens10-branches1]

(about 4 minutes on 2 cores)

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

Could turn 2 be asked as people ask? The script also asks each calibration prompt's follow-up the way
`distill --follow-up model` does (the model writes the question: train/instructions.write_follow_ups)
and replays the run's chosen medusa and hydra trees on both texts. Session 25, same CPU, session 24's
run 2 (bf16), pld:auto's knobs ngram3-tokens15-branches2:

    text                                  pld τ  turn 1  turn 2   medusa n=12 turn 2   hydra n=12 turn 2
    MT-Bench run's baseline answers       1.885   1.437   2.901   1.728                1.881
    calibration 16 × 64, generic turn 2   2.446   1.895   3.641   1.825                1.866
    … the model's own follow-up           2.147   1.895   2.475   1.938                2.056

The model's follow-ups take prompt lookup's turn 2 from 26% above the benchmark's to 15% below it
(2.48 against 2.90; both turns 2.15 against 1.89, +14% instead of +30%), but lift the heads' turn 2
0.18–0.21 above the benchmark's (generic: −0.02 to +0.10): 4 of the 16 questions the 135M model
wrote echo the few-shot's haiku ("Can you write a haiku about rain?"), an easy text for heads that
the benchmark is not. One text calibrates every decoder of a run, and the generic follow-ups keep
the heads' τ within 0.1 of the benchmark's, so the calibration keeps them; prompt lookup's
prediction stays high by its turn 1 (1.90 against 1.44), which neither follow-up changes.
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


def model_follow_ups(loaded, prompts: list[str], tokens: int) -> list[tuple[list[int], int]]:
    """The calibration's text with the model's own follow-up question as turn 2 (what `distill --follow-up model`
    asks: train/instructions.write_follow_ups; a generic one where it wrote nothing usable), turn 1s first."""
    from medusa_bench.bench import calibrate as cal
    from medusa_bench.inputs.chat import build_prompt
    from medusa_bench.train.instructions import BenchmarkOverlap, write_follow_ups
    from medusa_bench.train.prompts import FOLLOW_UPS

    first = cal.greedy_sequences(loaded, prompts, tokens, 2)[: len(prompts)]  # the two-turn text's turn 1s (cached)
    answers = [loaded.tokenizer.decode(ids[start:], skip_special_tokens=True) for ids, start in first]
    questions = write_follow_ups(loaded, list(zip(prompts, answers)), BenchmarkOverlap())
    print(f"  the model's follow-ups ({sum(q is not None for q in questions)} of {len(prompts)} usable): "
          + "; ".join(repr(q) for q in questions[:6]) + " …")
    chats = [[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer},
              {"role": "user", "content": question or FOLLOW_UPS[i % len(FOLLOW_UPS)]}]
             for i, (prompt, answer, question) in enumerate(zip(prompts, answers, questions))]
    ids = [build_prompt(loaded, chat) for chat in chats]
    return first + [(prompt + answer, len(prompt)) for prompt, answer in zip(ids, cal.greedy_answers(loaded, ids, tokens))]


def chosen_trees(loaded, run_dir: Path) -> list[tuple[str, object, object]]:
    """(spec, tree, proposer) of each static auto tree the run chose (medusa, hydra): built once, replayed on every text."""
    from medusa_bench.bench.build import build_decoder
    from medusa_bench.results import files
    from medusa_bench.trees.tree import Tree

    out = []
    for spec, info in (files.load_run(run_dir).get("trees") or {}).items():
        name = spec.split(":")[0]
        if info.get("auto") and name in ("medusa", "hydra"):
            tree = Tree(tuple(tuple(path) for path in files.read_json(run_dir / info["files"]["tree"])["tree"]))
            out.append((spec, tree, build_decoder(f"{name}:tree-8", loaded).proposer))
    return out


def heads_lines(loaded, chosen: list[tuple[str, object, object]], texts: list[tuple[list[int], int]]) -> list[str]:
    """τ of each chosen tree, replayed on `texts` (turn 1s, then turn 2s) from its heads' ranks: both turns, turn 1, turn 2."""
    from medusa_bench.bench import calibrate as cal
    from medusa_bench.trees.replay import replayed_tau

    half = len(texts) // 2
    turns = [[text for text in part if len(text[0]) - text[1] >= 2] for part in (texts[:half], texts[half:])]  # rankable
    out = []
    for spec, tree, proposer in chosen:
        first, second = ([(cal.rank_table(loaded, proposer, [text], tree.depth, tree.top_k).tolist(), len(text[0]) - text[1])
                          for text in part] for part in turns)
        taus = [replayed_tau(part, tree, tree.top_k)[0] for part in (first + second, first, second)]
        out.append(f"  {spec} (n={tree.num_nodes}){'':18s} " + " ".join(f"{t:7.3f}" for t in taus))
    return out


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
    prompts, tokens = SIZES[0]
    chosen, first_size = chosen_trees(loaded, args.run_dir), calibration_prompts(default_prompt_file(), prompts)
    print("the heads' τ (both turns, turn 1, turn 2), the run's chosen trees: on the run's answers, then the calibration 16 × 64")
    for texts in (run_texts(loaded, args.run_dir), cal.greedy_sequences(loaded, first_size, tokens, 2)):  # the latter cached above
        print("\n".join(heads_lines(loaded, chosen, texts)), flush=True)
    texts = model_follow_ups(loaded, first_size, tokens)
    print(line("… its turn 2 the model's follow-up", texts, knobs, profile))
    print("\n".join(heads_lines(loaded, chosen, texts)), flush=True)


if __name__ == "__main__":
    main()
