"""What a speculative step costs beyond the forward it cannot avoid, per tree size.

For tree sizes 1 … 64 nodes: our whole decoding step (drafting + verify forward + acceptance +
KV-cache compaction, `SpeculativeDecoder.step`, the code `run` uses) against a bare base-model
forward of the same number of tokens over the same cache, interleaved, median of repeats.
Also drafting alone against a one-token forward. Targets on CPU: step/forward <= 1.05 for every
size; drafting <= 10% of a one-token forward. Each engine (runtime/engine.py: dynamic or static KV cache,
eager or CUDA-graph captured) is measured on its own, then their step times side by side.

    .venv/bin/python benchmarks/verify_overhead.py --context 300 --repeats 20
    .venv/bin/python benchmarks/verify_overhead.py --context 1500 --engines dynamic/off,static/off
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace

import torch

from medusa_bench.bench.build import build_decoder
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.heads.common import default_heads
from medusa_bench.heads.medusa import MedusaHeads, save_heads
from medusa_bench.models import load_model
from medusa_bench.runtime.cache import crop_cache
from medusa_bench.runtime.engine import use_engine
from medusa_bench.runtime.forward import sync
from medusa_bench.trees.presets import get_preset
from medusa_bench.trees.tree import Tree

SIZES = (1, 2, 4, 8, 16, 32, 64)


def tree_of(n: int) -> Tree:
    """n nodes (root included): the first n-1 paths of mc_sim_7b_63, extended by rank-0 chains."""
    paths = get_preset("mc_sim_7b_63")[: n - 1]
    return Tree.parse(paths if paths else "empty")


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--medusa-heads", default=None,
                        help="heads folder (default: the heads shipped for the model, drafting as `run` does; else random heads)")
    parser.add_argument("--heads", type=int, default=4, help="number of random heads when the model has no heads")
    parser.add_argument("--draft-vocab", type=int, default=-1, help="as in `run`: -1 the heads' default, 0 all tokens")
    parser.add_argument("--engines", default=None,
                        help="comma-separated CACHE/COMPILE pairs (runtime/engine.py), e.g. dynamic/off,static/off,static/on "
                             "(default: dynamic/off,static/off, and static/on on CUDA)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    base = load_model(args.model, args.device, args.dtype)
    device = base.device
    engines = args.engines or ("dynamic/off,static/off" + (",static/on" if device.type == "cuda" else ""))
    folder = args.medusa_heads or default_heads(base, "medusa")
    if folder is None:
        heads = MedusaHeads(num_heads=args.heads, hidden_size=base.hidden_size, vocab_size=None)
        folder = tempfile.mkdtemp()
        save_heads(heads, folder, format="v2")
    options = DecoderOptions(medusa_heads=str(folder), draft_vocab=args.draft_vocab)
    context = torch.randint(100, 20000, (args.context,)).tolist()
    probe = build_decoder("medusa", base, options.replace(tree="chain-1")).proposer.heads
    drafted = probe.draft_vocab_size or base.vocab_size
    print(f"{args.model} on {device.type}/{str(base.dtype).replace('torch.', '')}, context {args.context}, "
          f"{probe.num_heads} heads from {folder}, drafting among {drafted} tokens, median of {args.repeats}")
    print("forward = the model alone over n tokens on the same engine; step = SpeculativeDecoder.step (draft + verify + accept + cache)")
    rows = {}
    for spec in engines.split(","):
        cache_kind, compile_mode = spec.strip().split("/")
        loaded = replace(base)  # the same model, its own engine
        engine = use_engine(loaded, cache_kind, compile_mode)
        print(f"\nengine {spec}: {engine.describe()}")
        print(f"{'nodes':>5} {'forward ms':>11} {'step ms':>9} {'step/forward':>13} {'draft ms':>9}")
        rows[spec] = measure(loaded, options, context, args.repeats)
    if len(rows) > 1:
        first = next(iter(rows))
        print(f"\nstep time against engine {first} (same n):")
        print(f"{'nodes':>5} " + " ".join(f"{spec:>14}" for spec in rows))
        for n in SIZES:
            print(f"{n:>5} " + " ".join(f"{rows[spec][n][1] / rows[first][n][1]:>14.3f}" for spec in rows))


def measure(loaded, options, context: list[int], repeats: int) -> dict:
    """{n: (forward s, step s, draft s)} on this handle's engine, printed as measured."""
    device, result, one_token_forward, d = loaded.device, {}, None, 0.0
    with torch.inference_mode():
        for n in SIZES:
            tree = tree_of(n)
            decoder = build_decoder("medusa" if n > 1 else "baseline", loaded,
                                    options.replace(tree=str(tree.to_list()) if n > 1 else "empty"))
            state = decoder.prefill(context, max_new_tokens=8)  # each decoder's own prefilled state; `rewind` returns to it
            mark, cache = state.checkpoint(), state.cache
            root, last_hidden = int(state.logits.argmax()), state.hidden
            ids = torch.randint(100, 20000, (1, n), device=device)
            bare_positions = (len(context) + torch.arange(n, device=device))[None]

            def bare():
                decoder.engine.forward(ids, cache, bare_positions, None, ())

            def step():
                decoder.step(state, root)

            def draft():
                decoder.proposer.propose(root, last_hidden, context)

            for _ in range(3):  # warm-up (and, captured, the recording)
                bare(); crop_cache(cache, len(context))
                step(); decoder.rewind(state, mark)
            bare_t, step_t, draft_t = [], [], []
            for _ in range(repeats):
                bare_t.append(timed(bare, device)); crop_cache(cache, len(context))
                step_t.append(timed(step, device)); decoder.rewind(state, mark)
                if n > 1:
                    draft_t.append(timed(draft, device))
            b, s = statistics.median(bare_t), statistics.median(step_t)
            d = statistics.median(draft_t) if draft_t else 0.0
            one_token_forward = one_token_forward or b
            result[n] = (b, s, d)
            print(f"{n:>5} {b * 1e3:>11.2f} {s * 1e3:>9.2f} {s / b:>13.3f} {d * 1e3:>9.2f}", flush=True)
    print(f"drafting / one-token forward: {d / one_token_forward:.3f} (target <= 0.10)")
    return result


if __name__ == "__main__":
    main()
