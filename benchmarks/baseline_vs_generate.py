"""Our greedy baseline against `model.generate(do_sample=False)` on the same prompts, interleaved.

Every speedup in this tool is measured against our baseline; if it were slower than
transformers' own generate(), every speedup would be inflated. Prints tokens/s of our baseline
on each engine (runtime/engine.py: static or dynamic KV cache, eager or captured) and of generate(), the
ratios, and checks the eager tokens are identical. Targets on CPU: ours (static cache) >= 1.05x
generate() at 128 new tokens, >= 1.15x at a 1,500-token context.

    .venv/bin/python benchmarks/baseline_vs_generate.py --limit 10 --max-new-tokens 128
    .venv/bin/python benchmarks/baseline_vs_generate.py --limit 6 --max-new-tokens 64 --context 1500
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from medusa_bench.inputs.chat import build_prompt
from medusa_bench.inputs.questions import load_questions
from medusa_bench.bench.build import build_decoder
from medusa_bench.models import load_model
from medusa_bench.runtime.engine import use_engine
from medusa_bench.runtime.forward import sync


def hf_generate(loaded, ids: list[int], max_new_tokens: int, **generate_kwargs) -> tuple[list[int], float]:
    """transformers' greedy generate(), cut at EOS like ours, timed the same way.

    `generate_kwargs` go to generate() as they are (benchmarks/gpu_check.py: `cache_implementation="static"`
    for the compiled path, `disable_compile=True` for the eager one)."""
    model = loaded.model
    sync(loaded.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids], device=loaded.device), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=loaded.device),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=loaded.eos_token_ids,
                             pad_token_id=loaded.eos_token_ids[0], top_p=None, top_k=None, temperature=None, **generate_kwargs)
    sync(loaded.device)
    wall = time.perf_counter() - start
    tokens = out[0, len(ids):].tolist()
    eos = set(loaded.eos_token_ids)
    cut = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
    return tokens[:cut], wall


def long_prompt(loaded, questions, question, tokens: int) -> list[int]:
    """A chat prompt of about `tokens` tokens: other questions' text as notes, then the question."""
    notes, ids = [], []
    for other in questions * 20:
        notes.append(other.turns[0])
        ids = build_prompt(loaded, [{"role": "user", "content": "Notes:\n" + "\n".join(notes) + "\n\nNow: " + question.turns[0]}])
        if len(ids) >= tokens:
            break
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bench", default="mt_bench")
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--context", type=int, default=0, help="pad each prompt to about this many tokens (0: the question alone)")
    parser.add_argument("--engines", default=None,
                        help="our baseline on these CACHE/COMPILE engines (runtime/engine.py); default dynamic/off,static/off "
                             "(+ static/on on CUDA). The first is the one the ratio line uses.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    base = load_model(args.model, args.device, args.dtype)
    engines = (args.engines or ("static/off,dynamic/off" + (",static/on" if base.device.type == "cuda" else ""))).split(",")
    ours = {}
    for spec in engines:
        loaded = replace(base)  # the same model with its own engine
        use_engine(loaded, *spec.strip().split("/"))
        ours[spec] = build_decoder("baseline", loaded)
    _, questions = load_questions(args.bench, limit=args.limit)
    prompts = [long_prompt(base, questions, q, args.context) if args.context else build_prompt(base, [{"role": "user", "content": q.turns[0]}])
               for q in questions]
    for decoder in ours.values():  # warm-up every path
        decoder.generate(prompts[0], 16)
    hf_generate(base, prompts[0], 16)

    names = list(ours) + ["generate"]
    tokens, seconds, same = {n: 0 for n in names}, {n: 0.0 for n in names}, {n: 0 for n in ours}
    for i, ids in enumerate(prompts):
        order = names[i % len(names):] + names[: i % len(names)]  # rotate who goes first: drift hits all alike
        out = {}
        for name in order:
            if name == "generate":
                out[name] = hf_generate(base, ids, args.max_new_tokens)
            else:
                result = ours[name].generate(ids, args.max_new_tokens)
                out[name] = (result.token_ids, result.wall_time)
        for name, (ids_out, wall) in out.items():
            tokens[name] += len(ids_out)
            seconds[name] += wall
        for name in ours:
            same[name] += out[name][0] == out["generate"][0]
        print(f"q{questions[i].question_id} ({len(ids)} prompt tokens): " + "  ".join(
            f"{name} {len(out[name][0]) / out[name][1]:6.1f}" for name in names) + " tok/s", flush=True)
    rate = {name: tokens[name] / seconds[name] for name in names}
    print(f"\n{args.model} on {base.device.type}/{str(base.dtype).replace('torch.', '')}, {len(prompts)} prompts "
          f"(median {statistics.median(len(p) for p in prompts)} tokens), max {args.max_new_tokens} new tokens")
    for name in names:
        label = f"ours, engine {name}" if name in ours else "model.generate()"
        extra = f"  ratio to generate {rate[name] / rate['generate']:.3f}  identical tokens {same[name]}/{len(prompts)}" if name in ours else ""
        print(f"{label:<26} {rate[name]:8.2f} tok/s{extra}")
    target = 1.15 if args.context >= 1000 else 1.05
    first = engines[0].strip()
    print(f"target on CPU: ours ({first}) >= {target:.2f} x generate(): {rate[first] / rate['generate']:.3f}")
    if any(same[name] != len(prompts) for name in ours if name.endswith("/off")):
        raise SystemExit("token mismatch between an eager baseline and generate()")


if __name__ == "__main__":
    main()
