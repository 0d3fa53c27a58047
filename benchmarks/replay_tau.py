"""τ of heads folders on a finished greedy run's answers, without decoding again.

    python benchmarks/replay_tau.py RUN_DIR medusa=FOLDER hydra=FOLDER eagle3=FOLDER ... [--tree tree-16]

Greedy decoding is lossless, so a greedy run's answers are the answers every set of heads would
give. For each KIND=FOLDER the decoder `KIND:TREE` is built on those heads, the true tokens' ranks
under them are computed at every answer position (one forward of the base per answer: bench/audit
text_ranks) and decoding is replayed over them in order (trees/replay.py): the τ a static tree
would measure, in seconds instead of minutes of decoding. Dynamic trees (eagle2, eagle3's default)
draft a new tree each step and are not replayed; `eagle:TREE` and `eagle3` with `--eagle3-tree
static` are. Two folders of one kind compare their heads on the same text exactly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Each kind's heads option (decoders/options.py).
OPTION = {"medusa": "medusa_heads", "medusa2": "medusa2_model", "hydra": "hydra_heads", "eagle": "eagle_heads",
          "eagle3": "eagle3_heads"}


class Replay:
    """A greedy run's answers, ready to score any heads on."""

    def __init__(self, run: Path):
        from medusa_bench.bench.audit import answer_texts
        from medusa_bench.inputs.questions import read_questions
        from medusa_bench.models import load_model
        from medusa_bench.results import files

        settings = files.load_run(run).get("settings") or {}
        self.loaded = load_model(settings.get("model", "smollm2-135m"), "cpu", settings.get("dtype", "float32"))
        answers = sorted((run / "model_answer").glob("*.jsonl"))[0]  # any decoder's: greedy answers are the same
        choices = {}
        for line in answers.read_text().splitlines():
            record = json.loads(line)
            choices[str(record["question_id"])] = record["choices"][0]
        self.sequences = answer_texts(self.loaded, read_questions(run / "question.jsonl"), choices)
        self.tokens = sum(len(ids) - prompt for ids, prompt in self.sequences)

    def tau(self, kind: str, folder: Path, tree: str = "tree-16") -> float:
        """τ of `kind:tree` with the heads in `folder`, replayed over the answers."""
        from medusa_bench.bench.audit import text_ranks
        from medusa_bench.decoders.options import DecoderOptions
        from medusa_bench.decoders.registry import build_decoder
        from medusa_bench.trees.replay import replayed_tau
        from medusa_bench.trees.tree import Tree

        extra = {"eagle3_tree": "static"} if kind == "eagle3" else {}
        options = DecoderOptions(tree=tree, **{OPTION[kind]: str(folder)}, **extra)
        decoder = build_decoder(f"{kind}:{tree}", self.loaded, options)
        shape = Tree.parse(tree, num_heads=decoder.sizing.depth)
        probe = decoder.sizing.make_proposer(Tree([(0,) * d for d in range(1, shape.depth + 1)]))
        top_k = 1 + max(rank for path in shape.to_list() for rank in path)
        # Medusa-2 drafts from its own (LoRA-merged) backbone's hidden states.
        ranked = text_ranks(decoder.loaded, probe, self.sequences, shape.depth, top_k)
        return replayed_tau(ranked, shape, top_k)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("heads", nargs="+", help="KIND=FOLDER, KIND one of " + ", ".join(OPTION))
    parser.add_argument("--tree", default="tree-16")
    args = parser.parse_args()
    replay = Replay(args.run)
    print(f"{len(replay.sequences)} answers, {replay.tokens} tokens from {args.run}")
    print(f"\n| heads | folder | τ replayed ({args.tree}) |\n|---|---|---|")
    for item in args.heads:
        kind, _, folder = item.partition("=")
        print(f"| {kind} | {folder} | {replay.tau(kind, Path(folder), args.tree):.3f} |", flush=True)


if __name__ == "__main__":
    main()
