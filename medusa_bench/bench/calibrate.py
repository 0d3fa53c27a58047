"""Measure what the tree search needs: how often drafts are right, and what a step costs.

- **Calibrate.** Greedy answers (the run loop's own baseline) to calibration prompts and their
  generic follow-ups, never benchmark questions; one base forward over prompt + answer gives every hidden state; then
  the proposer ranks the true future tokens at all answer positions in one batched call.
  A position t drafts from hidden[t] (which predicted the root tokens[t + 1]); its depth-d
  draft is right when it equals tokens[t + 1 + d]. We count the rank sequences, so the
  table is the joint, path-conditional one (`kind: conditional`): exact for Medusa's heads
  (whose depths are correlated: easy text is easy for every head) and what Hydra needs.
- **Profile.** The run loop's own verify step (`SpeculativeDecoder.step`: root, drafting, the
  tree forward, acceptance, cache update) as decoding meets it: contexts the model answered, cut
  inside an answer at three lengths; each state decodes on for `PROFILE_RUN` steps, then is
  rewound to its context; sizes interleaved round by round and each tree step paired with the
  baseline step of its round, so machine drift cancels; warm-up, device sync, mean paired ratio.

The proposer contract for calibration (`spec.Proposer.true_ranks`, which refuses by default):
    true_ranks(hidden [S, H], tokens [S], positions [T], depth, top_k) -> LongTensor [T, depth]
the rank of tokens[t + 1 + d] among its depth-d candidates at position t, given that the
root and the drafts above it are the true tokens (teacher forcing: the path above was
accepted), or -1 where t + 1 + d is past the sequence; any rank >= top_k is a miss. Medusa's
proposer answers with `MedusaHeads.true_ranks`, ranking by the heads' own `draft_topk`, the
very call that drafts; Hydra's with `HydraHeads.true_ranks`.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import weakref
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from medusa_bench.inputs.calibration import calibration_prompts, default_prompt_file, pick, read_prompts  # noqa: F401 (cal.*)
from medusa_bench.inputs.chat import build_prompt
from medusa_bench.decoders.spec import Draft, Proposer, SpeculativeDecoder
from medusa_bench.errors import UserError
from medusa_bench.runtime.forward import body_and_layers, sync
from medusa_bench.trees.ranks import statistics_of
from medusa_bench.trees.tables import Calibration, Latency
from medusa_bench.trees.tree import Tree

PROFILE_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# After the screen (every size or knob set, `repeats` rounds), the few best are timed again on fresh rounds that
# alone choose among them and predict (trees/search.confirmed_ratios: the winner's curse).
CONFIRM_TOP = 3  # the screen's fastest profiled sizes (knob sets: + 1) timed again
CONFIRM_ROUNDS = 3  # × repeats: 30 rounds of 5 steps cost about 8 s (Zen 4 EPYC, bf16)

MakeProposer = Callable[[Tree], Proposer]


# ------------------------------------------------------------------------------ prompts
def profiling_prompt_file() -> Path:
    """Text for the profiled step's context only (timing, not accuracy): the self-distillation
    prompts when the data folder is there, else the package's own quick questions, so that
    `--tree auto` with shipped tables (and prompt lookup's profile) works without any data set."""
    try:
        return default_prompt_file()
    except UserError:
        from importlib import resources

        return Path(str(resources.files("medusa_bench") / "data" / "quick_question.jsonl"))


# ------------------------------------------------------------------------------ calibrate
_TEXTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {key: sequences or contexts}: one text per run
GREEDY_BATCH = 16  # prompts answered together: 49.7 against 12.0 tok/s at batch 1 on the Zen 2 EPYC (fp32)


def greedy_sequences(loaded, prompts: Sequence[str], max_new_tokens: int, turns: int = 1) -> list[tuple[list[int], int]]:
    """(prompt + greedy answer ids, prompt length) per prompt and turn, from the run loop's baseline:
    turn 1 answers each prompt; turn 2 asks a generic follow-up (train/prompts.FOLLOW_UPS) after the
    model's own first answer, as a benchmark's second turn does. Measured once per process, model,
    dtype and settings: every auto decoder of a run calibrates on the same text."""
    from medusa_bench.train.prompts import FOLLOW_UPS

    key = (str(loaded.dtype), tuple(prompts), max_new_tokens, turns)
    cached = _TEXTS.setdefault(loaded.model, {})
    if key in cached:
        return cached[key]
    chats = [[{"role": "user", "content": text}] for text in prompts]
    out: list[tuple[list[int], int]] = []
    for turn in range(turns):
        if turn:
            for i, (chat, (ids, prompt_len)) in enumerate(zip(chats, out[-len(chats):])):
                answer = loaded.tokenizer.decode(ids[prompt_len:], skip_special_tokens=True)
                chat += [{"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UPS[i % len(FOLLOW_UPS)]}]
        prompt_ids = [build_prompt(loaded, chat) for chat in chats]
        answers = greedy_answers(loaded, prompt_ids, max_new_tokens)
        out += [(ids + answer, len(ids)) for ids, answer in zip(prompt_ids, answers)]
    cached[key] = out
    return out


def greedy_answers(loaded, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The baseline's greedy answer to each prompt, up to GREEDY_BATCH rows decoded together (more
    prompts stream through them) where the model allows it (decoders/batched.py: in fp32 each row
    is the batch-1 answer), else one by one."""
    from medusa_bench.decoders.batched import BatchedDecoder, batch_refusal

    decoders = [SpeculativeDecoder("baseline", loaded, Proposer()) for _ in range(min(GREEDY_BATCH, len(prompt_ids)))]
    if not decoders:
        return []
    if batch_refusal(decoders[0]) is not None or len(decoders) == 1:
        return [decoders[0].generate(ids, max_new_tokens).token_ids for ids in prompt_ids]
    return [g.token_ids for g in BatchedDecoder(decoders).generate(prompt_ids, max_new_tokens)]


@torch.inference_mode()
def last_hidden(loaded, ids: list[int], layers: tuple[int, ...] = ()) -> torch.Tensor:
    """Post-norm last hidden states [S, H] of one sequence, one forward, no logits; or, for
    `layers` (transformers' hidden_states indices, `Proposer.feature_layers`), those rows
    concatenated [S, k * H]."""
    tokens = torch.tensor([ids], device=loaded.device)  # [1, S]
    body, _ = body_and_layers(loaded.model)  # the decoder body: its output is the final normed state
    if not layers or tuple(layers) == (-1,):
        return body(input_ids=tokens, use_cache=False)[0][0]  # [S, H]
    states = body(input_ids=tokens, use_cache=False, output_hidden_states=True).hidden_states
    return torch.cat([states[i][0] for i in layers], dim=-1)  # [S, k * H]


def medusa_true_ranks(heads, hidden: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, depth: int,
                      top_k: int) -> torch.Tensor:
    """Medusa heads' ranks (heads/medusa.MedusaHeads.true_ranks)."""
    return heads.true_ranks(hidden, tokens, positions, depth, top_k)


def true_ranks(proposer, hidden, tokens, positions, depth: int, top_k: int) -> torch.Tensor:
    """The proposer's `true_ranks` (spec.Proposer declares it and refuses by default; see the module docstring)."""
    if not isinstance(proposer, Proposer):
        raise UserError(f"{type(proposer).__name__} cannot be calibrated: it is no Proposer with a method "
                        "true_ranks(hidden, tokens, positions, depth, top_k); pass a fixed --tree instead of auto")
    return proposer.true_ranks(hidden, tokens, positions, depth, top_k)


def rank_table(loaded, proposer, sequences: list[tuple[list[int], int]], depth: int, top_k: int) -> torch.Tensor:
    """True-token ranks [N, depth] at every answer position of every sequence (-1: past the end)."""
    rows = []
    for ids, prompt_len in sequences:
        if len(ids) - prompt_len < 2:  # an answer of one token leaves nothing to draft
            continue
        hidden = last_hidden(loaded, ids, proposer.feature_layers)  # [S, H] (or [S, k * H])
        tokens = torch.tensor(ids, device=loaded.device)  # [S]
        positions = torch.arange(prompt_len - 1, len(ids) - 2, device=loaded.device)  # [T]: a depth-1 target exists
        rows.append(true_ranks(proposer, hidden, tokens, positions, depth, top_k).cpu())
    if not rows:
        raise UserError("calibration produced no answer tokens to score; use other prompts or more --tokens")
    return torch.cat(rows)


def calibrate(loaded, proposer, prompts: Sequence[str], depth: int, top_k: int = 10, max_new_tokens: int = 64,
              meta: Optional[dict] = None, turns: int = 1) -> Calibration:
    """Greedy answers to `prompts`, then the proposer's acceptance table up to `depth` and `top_k`;
    each answer's rank rows are kept too (`Calibration.answers`), so the search replays decoding
    on them (trees/replay.py) instead of averaging over positions."""
    sequences = [(ids, p) for ids, p in greedy_sequences(loaded, prompts, max_new_tokens, turns) if len(ids) - p >= 2]
    if not sequences:
        raise UserError("calibration produced no answer tokens to score; use other prompts or more --tokens")
    per_answer = [rank_table(loaded, proposer, [sequence], depth, top_k) for sequence in sequences]
    info = {"prompts": len(prompts), "turns": turns, "max_new_tokens": max_new_tokens,
            "answer_tokens": sum(len(s) - p for s, p in sequences)}
    calibration = statistics_of(torch.cat(per_answer), top_k, {**info, **(meta or {})})
    calibration.answers = [(rows.tolist(), len(ids) - p) for rows, (ids, p) in zip(per_answer, sequences)]
    return calibration


# ------------------------------------------------------------------------------ profile
PROFILE_RUN = 4  # steps a profiled state decodes on before it goes back to its context
CONTEXT_SPREAD = (0.5, 1.0, 1.5)  # profiled context lengths, × the settings' context_len: the run's
# contexts run from a first turn's prompt to a second turn's prompt plus its answer


def context_ids(loaded, prompts: Sequence[str], length: int) -> list[int]:
    """A real-text context of exactly `length` tokens (prompts' chat ids, concatenated and cut)."""
    length = max(2, length)
    ids: list[int] = []
    for text in prompts:
        ids += build_prompt(loaded, [{"role": "user", "content": text}])
        if len(ids) >= length:
            break
    while len(ids) < length:  # few short prompts: repeat them
        ids += ids
    return ids[:length]


def chat_contexts(loaded, prompts: Sequence[str], lengths: Sequence[int], answer_tokens: int) -> list[list[int]]:
    """Contexts as decoding meets them: one conversation of `prompts`, each answered greedily by the
    model, cut inside an answer near each of `lengths` (so a profiled step continues the model's own
    answer and its drafts are accepted as on real text; a context cut inside a user's prompt accepts
    almost nothing, and then no gather, prefix update or catch-up is ever timed). Generated once per
    process, model and settings, like `greedy_sequences`: every auto decoder of a run profiles on them."""
    key = ("contexts", str(loaded.dtype), tuple(prompts), tuple(lengths), answer_tokens)
    cached = _TEXTS.setdefault(loaded.model, {})
    if key not in cached:
        cached[key] = _chat_contexts(loaded, prompts, lengths, answer_tokens)
    return cached[key]


def _chat_contexts(loaded, prompts: Sequence[str], lengths: Sequence[int], answer_tokens: int) -> list[list[int]]:
    decoder = SpeculativeDecoder("baseline", loaded, Proposer())
    messages: list[dict] = []
    turns: list[tuple[int, list[int]]] = []  # (prompt length, prompt + answer ids) per exchange
    texts = list(prompts) or ["Tell me about yourself."]
    room = getattr(loaded, "context_length", 1 << 30)
    while not turns or (len(turns[-1][1]) < max(lengths) and len(turns) < 8 * len(texts)):
        messages.append({"role": "user", "content": texts[len(turns) % len(texts)]})
        prompt = build_prompt(loaded, messages)
        if len(prompt) + answer_tokens >= room:
            break
        answer = decoder.generate(prompt, max(2, answer_tokens)).token_ids
        turns.append((len(prompt), prompt + answer))
        messages.append({"role": "assistant", "content": loaded.tokenizer.decode(answer, skip_special_tokens=True)})
    contexts = []
    for length in lengths:
        prompt_len, ids = next(((p, ids) for p, ids in turns if len(ids) > length), turns[-1])
        cut = min(max(length, prompt_len + 1), len(ids) - 1)  # inside the answer: at least its first token
        contexts.append(ids[:max(2, cut)])
    return contexts


def profile_contexts(loaded, prompts: Sequence[str], length: int, answer_tokens: int, room: int) -> list[list[int]]:
    """The profile's contexts: chat contexts spread around `length` (CONTEXT_SPREAD), none longer
    than `room`; for a model without a tokenizer, fixed ids of those lengths."""
    lengths = sorted({max(8, min(room, round(length * f))) for f in CONTEXT_SPREAD})
    if getattr(loaded, "tokenizer", None) is None:
        vocab = loaded.model.config.get_text_config().vocab_size
        return [[(i * 7919) % (vocab - 1) + 1 for i in range(n)] for n in lengths]
    contexts = chat_contexts(loaded, prompts, lengths, answer_tokens)
    return [c for i, c in enumerate(contexts) if c not in contexts[:i]]  # short answers: one cut may serve all


def time_steps(loaded, decoders: dict[int, list[SpeculativeDecoder]], contexts: list[list[int]], repeats: int,
               warmup: int, run: int = PROFILE_RUN) -> dict[int, list[float]]:
    """Seconds of `step` per size and round. `decoders[n][c]` decodes on context c (a decoder of its
    own: a proposer follows one generation). Round r steps every size once on context r mod K, in
    turn (machine drift hits all alike, and round r's baseline step pairs with its tree steps); each
    state decodes on, accepting what the text accepts, and goes back to its context (`rewind`) after
    `run` steps, so the rounds visit several positions of real decoding."""
    device = loaded.device
    states = {n: [decoder.prefill(context) for decoder, context in zip(per, contexts)] for n, per in decoders.items()}
    marks = {n: [state.checkpoint() for state in per] for n, per in states.items()}
    for n, per in decoders.items():  # untimed: a first step catches a draft layer up on the whole context
        for c, decoder in enumerate(per):  # (EAGLE, Hydra++: 10x a step at 450 tokens), every later one a row or two
            decoder.step(states[n][c])
            decoder.rewind(states[n][c], marks[n][c])
    taken = {n: [0] * len(contexts) for n in decoders}
    times: dict[int, list[float]] = {n: [] for n in decoders}
    for round_ in range(warmup + repeats):
        c = round_ % len(contexts)
        for n, per in decoders.items():
            if taken[n][c] == run:  # back to the context: the same positions again
                per[c].rewind(states[n][c], marks[n][c])
                taken[n][c] = 0
            sync(device)
            start = time.perf_counter()
            per[c].step(states[n][c])
            sync(device)
            elapsed = time.perf_counter() - start
            taken[n][c] += 1
            if round_ >= warmup:
                times[n].append(elapsed)
    return times


def profile(loaded, make_proposer: MakeProposer, trees: dict[int, Tree], contexts, repeats: int = 10,
            warmup: int = 3, meta: Optional[dict] = None) -> Latency:
    """Step time per tree size n (nodes incl. the root; n = 1 is the baseline's plain step).

    t(n) = median t(1) × the mean over rounds of t(n) / t(1) in that round: each tree step is
    paired with the baseline step timed beside it, so a machine that slows down for a while moves
    both. The mean, not the median: a run's cost is a sum of steps, and the median of the paired
    ratios put hydra's 6-node step 4.2% below what a run then measured (1.73× against 1.81×, Zen 2
    EPYC, fp32), the 2-node step 1.4% below. `meta["ratio_ci"]`: per n the 95% bootstrap interval of
    that mean ratio over rounds, the profile's own noise (the margin a tree must beat, trees/noise.py)."""
    if repeats < 1 or warmup < 0:
        raise UserError(f"profiling needs repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if contexts and isinstance(contexts[0], int):  # one context
        contexts = [contexts]
    decoders = {}
    for n, tree in sorted({1: Tree.empty(), **trees}.items()):
        make = (lambda: Proposer()) if tree.num_nodes == 1 else (lambda: make_proposer(tree))  # noqa: E731
        decoders[n] = [SpeculativeDecoder(f"n{n}", loaded, make()) for _ in contexts]
    times = time_steps(loaded, decoders, contexts, repeats, warmup)
    base = statistics.median(times[1])
    ratios = {n: [t / b for t, b in zip(ts, times[1])] for n, ts in times.items()}
    step_time = {n: base * statistics.fmean(ratios[n]) for n in trees}  # n = 1 timed for pairing either way
    quartiles = {str(n): [_quantile(ts, 0.25), _quantile(ts, 0.75)] for n, ts in times.items()}
    ratio_ci = {str(n): list(bootstrap_interval(rs, statistics.fmean)) for n, rs in ratios.items() if n > 1}
    info = {"repeats": repeats, "warmup": warmup, "statistic": "median t(1) x mean paired ratio t(n)/t(1)",
            "quartiles": quartiles, "ratio_ci": ratio_ci,
            "ratios": {str(n): [round(r, 5) for r in rs] for n, rs in ratios.items() if n > 1},  # per round (bench/pld_search.cost_draws)
            "contexts": [len(c) for c in contexts], "run": PROFILE_RUN,
            "threads": torch.get_num_threads(), "trees": {str(n): tree.to_list() for n, tree in trees.items()}}
    return Latency(step_time, device=device_name(loaded), dtype=str(loaded.dtype).replace("torch.", ""),
                   context_len=round(statistics.mean(len(c) for c in contexts)), baseline_step_time=step_time.get(1),
                   meta={**info, **(meta or {})})


def bootstrap_interval(values: Sequence[float], statistic: Callable[[Sequence[float]], float] = statistics.median,
                       resamples: int = 400, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of `statistic` over `values` (one value: its statistic twice)."""
    import random

    if len(values) < 2:
        return (statistic(values),) * 2 if values else (math.nan, math.nan)
    rng = random.Random(seed)
    stats = sorted(statistic(rng.choices(values, k=len(values))) for _ in range(resamples))
    return stats[int(0.025 * resamples)], stats[min(resamples - 1, int(0.975 * resamples))]


def device_name(loaded) -> str:
    from medusa_bench.bench.device import device_key  # the one device identity (run.json, Ray plans, this cache)

    return device_key(loaded)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ------------------------------------------------------------------------------ step-shape profile (prompt lookup)
class ShapeProposer(Proposer):
    """Drafts one fixed shape of placeholder tokens: what a verify step of that shape costs."""

    def __init__(self, tree: Tree, device: torch.device):
        self.tree = tree
        self.buffers = tree.buffers(device)
        self.draft_size = tree.num_nodes - 1
        self.tokens = torch.zeros(tree.num_nodes, dtype=torch.long, device=device)  # [n]

    def propose(self, root, hidden, context):
        return Draft(self.tokens.clone(), self.buffers)  # the loop writes the root into it


def branched(n: int, branches: int = 2) -> Tree:
    """`branches` chains of near-equal length under the root, n nodes in all (prompt lookup's trees)."""
    lengths = [(n - 1) // branches + (b < (n - 1) % branches) for b in range(branches)]
    return Tree([(b,) + (0,) * (d - 1) for b, length in enumerate(lengths) for d in range(1, length + 1)])


def shape_profile(loaded, context: list[int], sizes: Sequence[int], repeats: int = 10, warmup: int = 2) -> dict:
    """Seconds of a verify step per size, for chains and for two-branch trees (pld-profile.json), each
    `profile`'s median one-token step × the mean of its paired ratios; "ratios" keeps those per round
    (round r of every size paired with one baseline step), so a search can resample the profile's noise
    (bench/pld_search.py).

    {"device", "dtype", "threads", "context_len", "repeats", "warmup", "chain": {n: s}, "tree": {n: s},
     "ratios": {"chain": {n: [t(n) / t(1) per round]}, "tree": {n: [...]}}}
    """
    chains = {n: Tree.chain(n - 1) for n in sizes}
    trees = {n: branched(n) for n in sizes if n >= 3}
    make = lambda tree: ShapeProposer(tree, loaded.device)  # noqa: E731
    chain = profile(loaded, make, chains, context, repeats, warmup)
    tree = profile(loaded, make, trees, context, repeats, warmup)
    return {"device": device_name(loaded), "dtype": str(loaded.dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "context_len": len(context), "repeats": repeats, "warmup": warmup,
            "chain": {str(n): t for n, t in sorted(chain.step_time.items())},
            "tree": {str(n): t for n, t in sorted(tree.step_time.items())},
            "ratios": {"chain": chain.meta["ratios"], "tree": tree.meta["ratios"]}}


STEP_PROFILE_SIZES = (1, 2, 4, 8, 16)  # prompt lookup's steps: between, interpolated; larger, the prior scaled
STEP_PROFILE_CONTEXT = 300  # cached tokens, as `--tree auto` profiles


def profile_context(loaded) -> list[int]:
    """Real text (the tree optimiser's profiling prompts) where there is a tokenizer, else fixed ids."""
    room = getattr(loaded, "context_length", STEP_PROFILE_CONTEXT + 64) - max(STEP_PROFILE_SIZES)
    length = min(STEP_PROFILE_CONTEXT, room)
    if getattr(loaded, "tokenizer", None) is None:
        vocab = loaded.model.config.get_text_config().vocab_size
        return [(i * 7919) % (vocab - 1) + 1 for i in range(length)]
    return context_ids(loaded, read_prompts(profiling_prompt_file()), length)
