"""Our greedy baseline against `model.generate(do_sample=False)` on the same prompts, interleaved.

Every speedup in this tool is measured against our baseline; if it were slower than
transformers' own generate(), every speedup would be inflated. Prints tokens/s of both, the
ratio (target >= 1.00), and checks the tokens are identical.

    .venv/bin/python benchmarks/baseline_vs_generate.py --limit 10 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from medusa_bench.bench.prompts import build_prompt
from medusa_bench.bench.questions import load_questions
from medusa_bench.decoders.base import build_decoder
from medusa_bench.decoders.spec import sync
from medusa_bench.models import load_model


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bench", default="mt_bench")
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    loaded = load_model(args.model, args.device, args.dtype)
    decoder = build_decoder("baseline", loaded)
    _, questions = load_questions(args.bench, limit=args.limit)
    prompts = [build_prompt(loaded, [{"role": "user", "content": q.turns[0]}]) for q in questions]
    decoder.generate(prompts[0], 16)  # warm-up both paths
    hf_generate(loaded, prompts[0], 16)

    ours_tokens = ours_time = hf_tokens = hf_time = 0.0
    identical, ratios = 0, []
    for i, ids in enumerate(prompts):
        # Alternate which one goes first so drift hits both alike.
        runs = [("ours", lambda: decoder.generate(ids, args.max_new_tokens)), ("hf", lambda: hf_generate(loaded, ids, args.max_new_tokens))]
        results = dict((name, fn()) for name, fn in (runs if i % 2 == 0 else runs[::-1]))
        ours, (hf_ids, hf_wall) = results["ours"], results["hf"]
        ours_tokens += len(ours.token_ids)
        ours_time += ours.wall_time
        hf_tokens += len(hf_ids)
        hf_time += hf_wall
        identical += ours.token_ids == hf_ids
        ratios.append((len(ours.token_ids) / ours.wall_time) / (len(hf_ids) / hf_wall))
        print(f"q{questions[i].question_id}: ours {len(ours.token_ids) / ours.wall_time:6.1f} tok/s  generate {len(hf_ids) / hf_wall:6.1f} tok/s  same tokens: {ours.token_ids == hf_ids}")
    ours_rate, hf_rate = ours_tokens / ours_time, hf_tokens / hf_time
    print(f"\n{args.model} on {loaded.device.type}/{str(loaded.dtype).replace('torch.', '')}, {len(prompts)} prompts, max {args.max_new_tokens} new tokens")
    print(f"ours (baseline decoder): {ours_rate:.2f} tok/s")
    print(f"model.generate():        {hf_rate:.2f} tok/s")
    print(f"ratio ours/generate:     {ours_rate / hf_rate:.3f}  (median per prompt {statistics.median(ratios):.3f}; target >= 1.00)")
    print(f"identical tokens:        {identical}/{len(prompts)}")
    if identical != len(prompts):
        raise SystemExit("token mismatch between our baseline and generate()")


if __name__ == "__main__":
    main()
