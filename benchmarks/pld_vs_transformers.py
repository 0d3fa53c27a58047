"""Our `pld` against transformers' prompt lookup (`generate(prompt_lookup_num_tokens=10)`) and our baseline.

Per category (MT-Bench, Spec-Bench's summarization, rag and translation): tokens/s, acceptance
length τ (tokens per forward after prefill) and speedup over our greedy baseline for each
method, all greedy, interleaved question by question (categories round-robin, method order
rotating) so that drift of the shared machine hits every method alike; checks that all
methods produce identical tokens. First turn only for every method (transformers' side has no
multi-turn harness here). Targets: pld >= 1.10 x transformers' prompt lookup and >= 0.98 x our
baseline in every category.

    .venv/bin/python benchmarks/pld_vs_transformers.py                      # 20 per category, 256 tokens
    .venv/bin/python benchmarks/pld_vs_transformers.py --per-category 5 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from medusa_bench.inputs.chat import build_prompt
from medusa_bench.inputs.questions import load_questions
from medusa_bench.bench.build import build_decoder
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.models import load_model
from medusa_bench.runtime.forward import sync

SPEC_BENCH = ("summarization", "rag", "translation")


@dataclass
class Tally:
    tokens: int = 0
    steps: int = 0
    wall: float = 0.0
    rates: list = field(default_factory=list)  # per-question tokens/s (Spec-Bench's convention)

    def add(self, tokens: int, steps: int, wall: float) -> None:
        self.tokens, self.steps, self.wall = self.tokens + tokens, self.steps + steps, self.wall + wall
        self.rates.append(tokens / wall)

    @property
    def rate(self) -> float:
        return self.tokens / self.wall

    @property
    def tau(self) -> float:
        return self.tokens / max(self.steps, 1)


def hf_prompt_lookup(loaded, ids: list[int], max_new_tokens: int, lookup_tokens: int) -> tuple[list[int], int, float]:
    """transformers' prompt lookup: tokens cut at EOS like ours, forwards after prefill, wall time."""
    model, calls = loaded.model, [0]
    hook = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        sync(loaded.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids], device=loaded.device),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=loaded.device),
                                 max_new_tokens=max_new_tokens, do_sample=False, prompt_lookup_num_tokens=lookup_tokens,
                                 eos_token_id=loaded.eos_token_ids, pad_token_id=loaded.eos_token_ids[0],
                                 top_p=None, top_k=None, temperature=None)
        sync(loaded.device)
        wall = time.perf_counter() - start
    finally:
        hook.remove()
    tokens = out[0, len(ids):].tolist()
    eos = set(loaded.eos_token_ids)
    cut = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
    return tokens[:cut], calls[0] - 1, wall


def pick_questions(per_category: int) -> dict[str, list]:
    """MT-Bench: evenly spaced over its 8 categories; Spec-Bench: the first N of each category."""
    _, mt = load_questions("mt_bench")
    step = max(len(mt) // per_category, 1)
    chosen = {"mt_bench": mt[::step][:per_category]}
    for category in SPEC_BENCH:
        _, questions = load_questions("spec_bench", categories=[category])
        chosen[category] = questions[:per_category]
    return chosen


def warm_up(methods: dict, loaded, chosen: dict, max_new_tokens: int) -> None:
    """One unmeasured answer per category and method: kernels, caches, and pld's step timings."""
    for category, questions in chosen.items():
        _, pool = load_questions("mt_bench" if category == "mt_bench" else "spec_bench",
                                 categories=None if category == "mt_bench" else [category])
        used = {q.question_id for q in questions}
        spare = next(q for q in reversed(pool) if q.question_id not in used)
        ids = build_prompt(loaded, [{"role": "user", "content": spare.turns[0]}])
        for run in methods.values():
            run(ids, min(max_new_tokens, 64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--per-category", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--pld-max-ngram", type=int, default=3)
    parser.add_argument("--pld-tokens", type=int, default=10)
    parser.add_argument("--pld-branches", type=int, default=1)
    parser.add_argument("--lookup-tokens", type=int, default=10, help="transformers' prompt_lookup_num_tokens")
    parser.add_argument("--also-fixed", action="store_true", help="also run pld drafting every match in full (no adaptation)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 suffers less on a crowded machine")
    parser.add_argument("--repeats", type=int, default=1, help="time each answer this many times and keep the fastest (noisy machines)")
    parser.add_argument("--json", help="write per-question records here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, args.device, args.dtype)
    options = DecoderOptions(pld_max_ngram=args.pld_max_ngram, pld_tokens=args.pld_tokens, pld_branches=args.pld_branches)
    decoders = {"baseline": build_decoder("baseline", loaded), "pld": build_decoder("pld", loaded, options)}
    if args.also_fixed:
        decoders["pld-fixed"] = build_decoder("pld", loaded, options.replace(extra={"pld_adaptive": False}))

    shapes = StepShapes(decoders["pld"].proposer)

    def ours(decoder):
        def run(ids, limit):
            result = decoder.generate(ids, limit)
            return result.token_ids, result.steps, result.wall_time
        return run

    methods = {name: ours(decoder) for name, decoder in decoders.items()}
    methods["hf-lookup"] = lambda ids, limit: hf_prompt_lookup(loaded, ids, limit, args.lookup_tokens)

    chosen = pick_questions(args.per_category)
    warm_up(methods, loaded, chosen, args.max_new_tokens)

    tallies = {c: {m: Tally() for m in methods} for c in chosen}
    mismatches, records = defaultdict(list), []
    rounds = max(len(qs) for qs in chosen.values())
    turn = 0
    for i in range(rounds):
        for category, questions in chosen.items():
            if i >= len(questions):
                continue
            question = questions[i]
            ids = build_prompt(loaded, [{"role": "user", "content": question.turns[0]}])
            names = list(methods)
            names = names[turn % len(names):] + names[:turn % len(names)]  # rotate who goes first
            turn += 1
            outputs = {}
            for name in names:
                outputs[name] = fastest(methods[name], ids, args.max_new_tokens, args.repeats, decoders.get(name))
                tallies[category][name].add(len(outputs[name][0]), *outputs[name][1:])
            shapes.finish(category, outputs["baseline"][1])
            reference = outputs["baseline"][0]
            for name, (tokens, _, _) in outputs.items():
                if tokens != reference:
                    first = next((j for j, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
                    mismatches[name].append((question.question_id, first))
            records.append({"category": category, "question_id": question.question_id, "prompt_tokens": len(ids),
                            **{f"{n}_{k}": v for n, o in outputs.items() for k, v in zip(("tokens", "steps", "wall"), (len(o[0]), o[1], o[2]))}})
            line = "  ".join(f"{n} {len(o[0]) / o[2]:6.1f} tok/s τ {len(o[0]) / max(o[1], 1):4.2f}" for n, o in outputs.items())
            print(f"{category:>13} q{question.question_id:<4} {line}", flush=True)

    report(args, loaded, chosen, tallies, mismatches)
    learned(decoders["pld"].proposer, shapes)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "records": records}, handle, indent=1)


def fastest(run, ids: list[int], limit: int, repeats: int, decoder=None):
    """The fastest of `repeats` timings; a pld decoder starts each repeat with the same learned state."""
    proposer = getattr(decoder, "proposer", None)
    state = copy.deepcopy(proposer.__dict__) if hasattr(proposer, "stats") else None
    best = None
    for _ in range(repeats):
        if state is not None:
            proposer.__dict__.update(copy.deepcopy(state))
        result = run(ids, limit)
        best = result if best is None or result[2] < best[2] else best
    return best


class StepShapes:
    """Tokens per forward of each pld step in the timed run, for a noise-free cross-check of the speedup."""

    def __init__(self, proposer):
        self.proposer, self.current = proposer, []  # current: sizes of the latest pld generation
        self.sizes, self.baseline = defaultdict(list), defaultdict(int)
        propose, reset = proposer.propose, proposer.reset

        def logged_propose(*args):
            draft = propose(*args)
            self.current.append(1 if draft is None else draft.buffers.num_nodes)
            return draft

        def logged_reset(prompt_ids):
            self.current = []
            reset(prompt_ids)

        proposer.propose, proposer.reset = logged_propose, logged_reset

    def finish(self, category: str, baseline_steps: int) -> None:
        """Count the question's pld steps (its last repeat) and the baseline's forwards."""
        self.sizes[category].extend(self.current)
        self.baseline[category] += baseline_steps - 1  # the final step needs no forward

    def modeled(self, category: str) -> float:
        """Baseline forwards / pld's forwards weighted by pld's measured cost of each size."""
        cost = sum(self.proposer.costs.relative(k) for k in self.sizes[category])
        return self.baseline[category] / cost if cost else float("nan")


def report(args, loaded, chosen, tallies, mismatches) -> None:
    device = f"{loaded.device.type}/{str(loaded.dtype).replace('torch.', '')}, {torch.get_num_threads()} threads"
    print(f"\n{args.model} on {device}; {args.per_category} questions per category (first turn), max {args.max_new_tokens} new tokens,")
    print(f"greedy; ours pld: max n-gram {args.pld_max_ngram}, {args.pld_tokens} tokens, {args.pld_branches} branch(es); "
          f"transformers: prompt_lookup_num_tokens={args.lookup_tokens}")
    print("speedup = tokens/s over our baseline's on the same questions; (mean per-question ratio, Spec-Bench's convention)\n")
    header = f"{'category':>13} {'method':>10} {'tok/s':>7} {'τ':>5} {'speedup':>8} {'(mean)':>7}"
    print(header)
    print("-" * len(header))
    verdicts = []
    for category in chosen:
        base = tallies[category]["baseline"]
        for name, tally in tallies[category].items():
            per_question = sum(r / b for r, b in zip(tally.rates, base.rates)) / len(base.rates)
            print(f"{category:>13} {name:>10} {tally.rate:7.2f} {tally.tau:5.2f} {tally.rate / base.rate:7.3f}x {per_question:6.3f}x")
        pld, hf = tallies[category]["pld"], tallies[category]["hf-lookup"]
        vs_hf, vs_base = pld.rate / hf.rate, pld.rate / base.rate
        verdicts.append(f"{category:>13}: pld / transformers {vs_hf:.3f}x ({'ok' if vs_hf >= 1.10 else 'MISSED'}, target 1.10); "
                        f"pld / baseline {vs_base:.3f}x ({'ok' if vs_base >= 0.98 else 'MISSED'}, target 0.98)")
    print("\n" + "\n".join(verdicts))
    total = sum(len(qs) for qs in chosen.values())
    for name in tallies[next(iter(chosen))]:
        bad = mismatches.get(name, [])
        detail = f"; differ at (question, token): {bad[:8]}" if bad else ""
        print(f"identical tokens to baseline, {name}: {total - len(bad)}/{total}{detail}")


def learned(proposer, shapes: StepShapes) -> None:
    """What pld's draft policy measured on this machine: step costs, acceptance by match strength."""
    costs = proposer.costs
    sizes = sorted(k for k, chain in costs.seconds if chain and k > 1)
    measured = ", ".join(f"{k}: {costs.relative(k):.2f}x (n={costs.seconds[(k, True)][1]})" for k in sizes)
    print(f"\npld measured step cost vs a 1-token step: {measured or 'none'}")
    rates = ", ".join(f"{strength}: {proposer.stats.p((False, strength)):.2f}" for strength in range(1, 13))
    print(f"pld acceptance estimate by match strength (tokens matched): {rates}")
    modeled = ", ".join(f"{category} {shapes.modeled(category):.3f}x" for category in shapes.sizes)
    print(f"pld speedup modeled from its draft sizes and measured step costs (no timing noise): {modeled}")


if __name__ == "__main__":
    main()
