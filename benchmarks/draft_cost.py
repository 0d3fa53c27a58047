"""What drafting a tree costs, per decoder, against a one-token step of the base model, side by side.

For each decoder (default: the shipped heads' medusa, hydra, eagle, eagle2, eagle3 on the same
tree): the proposer's `propose` (everything it does per step: EAGLE's catch-up forward over the
new context row, its level forwards, the draft cache's roll-back) timed inside the run loop's own
step on a fixed context, and a baseline step (one base forward over one token) on the same
context, interleaved round by round, median of repeats. Target for EAGLE: a 16-node tree costs
<= 15% of a one-token base step.

    .venv/bin/python benchmarks/draft_cost.py --context 300 --repeats 30 --tree tree-16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from medusa_bench.bench.calibrate import context_ids, default_prompt_file, read_prompts
from medusa_bench.bench.build import build_decoder
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.models import load_model
from medusa_bench.runtime.forward import sync


class Timed:
    """Wraps a proposer's `propose`, keeping the last call's seconds."""

    def __init__(self, proposer, device):
        self.proposer, self.device, self.seconds = proposer, device, 0.0
        self.inner = proposer.propose
        proposer.propose = self

    def __call__(self, *args):
        sync(self.device)
        start = time.perf_counter()
        out = self.inner(*args)
        sync(self.device)
        self.seconds = time.perf_counter() - start
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--decoders", default="medusa,hydra,eagle,eagle2,eagle3")
    parser.add_argument("--tree", default="tree-16")
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    loaded = load_model(args.model, args.device, args.dtype)
    context = context_ids(loaded, read_prompts(default_prompt_file())[:8], args.context)
    decoders = {"baseline": build_decoder("baseline", loaded)}
    for name in args.decoders.split(","):
        decoders[name] = build_decoder(name, loaded, DecoderOptions(tree=args.tree))
    timers = {name: Timed(d.proposer, loaded.device) for name, d in decoders.items() if name != "baseline"}
    states = {name: d.prefill(context) for name, d in decoders.items()}
    checkpoints = {name: s.checkpoint() for name, s in states.items()}
    steps: dict[str, list[float]] = {name: [] for name in decoders}
    drafts: dict[str, list[float]] = {name: [] for name in timers}
    for round_ in range(args.repeats + 2):  # two warm-up rounds
        for name, decoder in decoders.items():
            sync(loaded.device)
            start = time.perf_counter()
            decoder.step(states[name])
            sync(loaded.device)
            elapsed = time.perf_counter() - start
            decoder.rewind(states[name], checkpoints[name])
            if round_ >= 2:
                steps[name].append(elapsed)
                if name in timers:
                    drafts[name].append(timers[name].seconds)

    base = statistics.median(steps["baseline"])
    print(f"{args.model} {loaded.dtype} on {loaded.device}, {args.context} cached tokens, tree {args.tree}, "
          f"median of {args.repeats} interleaved rounds; one-token baseline step {base * 1e3:.2f} ms")
    print("| decoder | nodes | drafting ms | drafting / one-token step | whole step ms | step / one-token step |")
    print("|---|---|---|---|---|---|")
    for name in timers:
        draft = statistics.median(drafts[name])
        step = statistics.median(steps[name])
        nodes = decoders[name].proposer.draft_size + 1
        print(f"| {name} | {nodes} | {draft * 1e3:.2f} | {draft / base:.3f} | {step * 1e3:.2f} | {step / base:.2f} |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
