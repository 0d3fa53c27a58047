"""Where a decoding step's time goes, per decoder and dtype: the diagnostic behind a slow captured run.

For each dtype it loads the model once (captured steps on CUDA: `--compile on`), builds the decoders,
and generates the same prompts with each, interleaved prompt by prompt, while counting and timing
(device-synchronised) what a step is made of: the proposer's drafting, the base forward (eager or
a replayed graph), the rest (acceptance, cache keep, bookkeeping), plus how many CUDA graphs were
recorded and how many new caches were made during each generation. Then one generation of
`--profile` runs under torch.profiler and its top operators are printed.

    python3 benchmarks/step_trace.py --questions .gpu/a/question.jsonl --out "$OUT"
    .venv/bin/python benchmarks/step_trace.py --device cpu --dtypes float32 --prompts 1 --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Tally:
    """Sums of synchronised time (s) and counts, by what; `reset` between generations."""

    def __init__(self, device):
        self.device, self.time, self.count = device, defaultdict(float), defaultdict(int)

    def reset(self):
        self.time.clear()
        self.count.clear()

    def wrap(self, owner, attr: str, what: str):
        original = getattr(owner, attr)
        tally = self

        def timed(*args, **kwargs):
            sync(tally.device)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sync(tally.device)
                tally.time[what] += time.perf_counter() - t0
                tally.count[what] += 1

        setattr(owner, attr, timed)
        return original


def prompts_from(loaded, questions: str | None, n: int) -> list[list[int]]:
    from medusa_bench.inputs.chat import build_prompt, conversation
    from medusa_bench.inputs.questions import load_questions

    _, items = load_questions("mt_bench" if questions else "quick", questions, n)
    return [build_prompt(loaded, conversation(q.turns[:1], [])) for q in items]


def trace_dtype(args, dtype: str, out: Path, lines: list[str], records: list[dict]) -> None:
    from medusa_bench.bench.build import build_decoder
    from medusa_bench.decoders.options import DecoderOptions
    from medusa_bench.models import load_model
    from medusa_bench.runtime.cache import SlotCache
    from medusa_bench.runtime.engine import CapturedStep, use_engine

    say = lambda text: (print(text, flush=True), lines.append(text))  # noqa: E731
    loaded = load_model(args.model, args.device, dtype)
    if args.cudnn_attention:  # load_model turned it off on CUDA (models.avoid_cudnn_attention): the A/B
        torch.backends.cuda.enable_cudnn_sdp(True)
    engine = use_engine(loaded, "auto", args.compile)
    device = loaded.device
    cudnn = torch.backends.cuda.cudnn_sdp_enabled() if device.type == "cuda" else "n/a"
    say(f"## {dtype} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"engine {engine.describe()}, cuDNN attention {cudnn}, torch {torch.__version__}")
    tally = Tally(device)
    tally.wrap(CapturedStep, "__init__", "capture")
    tally.wrap(SlotCache, "__init__", "new cache")
    tally.wrap(engine, "forward", "forward")
    decoders = {}
    for spec in args.decoders.split(","):
        decoder = build_decoder(spec, loaded, DecoderOptions(tree=args.tree))
        if decoder.draft_size:
            tally.wrap(decoder.proposer, "propose", "propose")
        decoders[spec] = decoder
    prompts = prompts_from(loaded, args.questions, args.prompts)
    for decoder in decoders.values():  # warm-up, as the run loop does
        decoder.generate(prompts[0], 16)
    say("| round | prompt | decoder | tokens | steps | ms/step | propose ms/step | forward ms/step | rest ms/step | captures (ms) | new caches | caches held |")
    say("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for round_ in range(args.rounds):
        for p, ids in enumerate(prompts):
            for spec, decoder in decoders.items():
                tally.reset()
                g = decoder.generate(ids, args.max_new_tokens)
                steps = max(1, g.steps)
                forward = tally.time["forward"] - tally.time["capture"]  # forward includes any recording
                rest = g.wall_time - tally.time["propose"] - tally.time["forward"]
                row = {"dtype": dtype, "round": round_, "prompt": p, "decoder": spec, "tokens": len(g.token_ids), "steps": g.steps,
                       "wall_s": g.wall_time, "propose_s": tally.time["propose"], "forward_s": forward,
                       "capture_s": tally.time["capture"], "captures": tally.count["capture"],
                       "new_caches": tally.count["new cache"], "caches_held": len(engine.caches)}
                records.append(row)
                say(f"| {round_} | {p} | {spec} | {len(g.token_ids)} | {g.steps} | {1e3 * g.wall_time / steps:.2f} | "
                    f"{1e3 * tally.time['propose'] / steps:.2f} | {1e3 * forward / steps:.2f} | {1e3 * rest / steps:.2f} | "
                    f"{tally.count['capture']} ({1e3 * tally.time['capture']:.0f}) | {tally.count['new cache']} | {len(engine.caches)} |")
    if args.profile and args.profile in decoders:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        decoder = decoders[args.profile]
        with profile(activities=activities) as prof:
            decoder.generate(prompts[-1], args.max_new_tokens)
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        for key in ("cpu_time_total", sort) if sort != "cpu_time_total" else (sort,):
            table = prof.key_averages().table(sort_by=key, row_limit=25)
            (out / f"profile-{dtype}-{key}.txt").write_text(table)
            say(f"\nprofile of {args.profile}, {dtype}, by {key}:\n```\n{table}\n```")
    del decoders, loaded, engine
    torch.cuda.empty_cache() if device.type == "cuda" else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--compile", default="on", choices=("on", "auto", "off"))
    parser.add_argument("--decoders", default="baseline,hydra:empty,hydra:tree-16,eagle:tree-16,medusa:tree-16")
    parser.add_argument("--tree", default="tree-16", help="the tree of decoders named without one")
    parser.add_argument("--questions", default=None, help="an MT-Bench question.jsonl (default: the quick bench)")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--profile", default="eagle:tree-16", help="a decoder to run once under torch.profiler ('' for none)")
    parser.add_argument("--cudnn-attention", action="store_true", help="let SDPA use cuDNN's attention (the default before the fix)")
    parser.add_argument("--out", default="/tmp/step-trace")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    records: list[dict] = []
    for dtype in args.dtypes.split(","):
        try:
            trace_dtype(args, dtype, out, lines, records)
        except Exception as error:  # noqa: BLE001 — keep the other dtype's figures
            lines.append(f"{dtype}: FAILED {type(error).__name__}: {error}")
            print(lines[-1], flush=True)
        (out / "step-trace.md").write_text("\n".join(lines) + "\n")
        (out / "step-trace.json").write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
