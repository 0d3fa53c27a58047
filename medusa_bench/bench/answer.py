"""Answering one question: the run's decoders built, each decoder's answer record, exact match, storing.

The unit of work is a question (`answer_one_question`): every wanted decoder answers it in this
question's turn order, so each per-question speedup is timed on one device; the in-process
loop (bench/loop.py) and each Ray worker (bench/distributed.py) call it. A decoder is either
in-process (decoders/base.Decoder: this module times its `generate`) or a `RemoteDecoder`
(bench/remote.py: a server answers and times itself).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from medusa_bench.bench.build import build_decoders
from medusa_bench.bench.config import RunConfig
from medusa_bench.bench.contention import cpu_meter
from medusa_bench.inputs.chat import build_prompt, conversation
from medusa_bench.inputs.questions import Question
from medusa_bench.bench.remote import RemoteDecoder
from medusa_bench.bench.run_folder import model_id
from medusa_bench.decoders.base import Decoder, Sampling
from medusa_bench.results import files
from medusa_bench.runtime.engine import use_engine


# ------------------------------------------------------------------------------ the run's decoders
def build_run_decoders(names: list[str], loaded, config: RunConfig, plan: Optional[dict] = None) -> dict[str, Decoder]:
    """Every in-process decoder of the run on `loaded`, in the run's order; they share one engine
    (built first). The one place a run (in-process or a Ray worker) builds its decoders: `--tree auto`
    and prompt lookup's profile measured, or taken from `plan` (bench/build.py)."""
    use_engine(loaded, config.cache, config.compile)  # before any decoder: they all share it
    return build_decoders(names, loaded, config.options, plan)


def references_first(decoders: dict) -> list[str]:
    """The decoders' names, reference decoders first: within a question an answer whose reference
    has not answered yet waits for it (but control and baseline swap every other question:
    question_order)."""
    references = {decoder.baseline_name for decoder in decoders.values()}
    return sorted(decoders, key=lambda name: name not in references)


def question_order(names: list[str], index: int) -> list[str]:
    """The decoders' turn order for the question at `index`: control (the A/A pair's second half)
    runs right after the baseline, or right before it every other question, so neither of the
    two is always the one that runs first."""
    if "baseline" not in names or "control" not in names:
        return names
    order = [name for name in names if name != "control"]
    order.insert(order.index("baseline") + (index + 1) % 2, "control")
    return order


def warm_up(decoders: dict, loaded, questions: list[Question], config: RunConfig) -> None:
    """Untimed generations so lazy initialisation, allocator growth and caches don't hit timing."""
    prompt = build_prompt(loaded, conversation(questions[0].turns[:1], [])) if loaded is not None else None
    for decoder in decoders.values():
        for _ in range(config.warmup):
            if isinstance(decoder, RemoteDecoder):  # one untimed request to its server
                decoder.warm_up(questions[0], config)
            else:
                decoder.generate(prompt, min(config.max_new_tokens, 32), Sampling())


# ------------------------------------------------------------------------------ one question
def answer_question(decoder: Decoder, loaded, question: Question, config: RunConfig, on_step=None) -> dict:
    """Both turns of one question by an in-process decoder; turn 2 sees its own turn-1 answer."""
    sampling = config.sampling_for(question)
    turns, new_tokens, wall, prefill, step_times, steps, accepts, token_ids = [], [], [], [], [], [], [], []
    usages = []  # per turn: cpu_share, load_avg, contended (bench/contention.py)
    for turn in range(len(question.turns)):
        prompt_ids = build_prompt(loaded, conversation(question.turns[: turn + 1], turns))
        with cpu_meter(loaded.device) as usage:
            result = decoder.generate(prompt_ids, config.max_new_tokens, sampling, on_step=on_step)
        usages.append(usage)
        text = loaded.tokenizer.decode(result.token_ids, skip_special_tokens=True).strip()
        turns.append(text)
        new_tokens.append(len(result.token_ids))
        wall.append(round(result.wall_time, 6))
        prefill.append(None if result.prefill_time is None else round(result.prefill_time, 6))
        step_times.append(None if result.step_times is None else [round(t, 6) for t in result.step_times])
        steps.append(result.steps)
        accepts.append(result.accept_lengths)
        token_ids.append(result.token_ids)
    return {"index": 0, "turns": turns, "new_tokens": new_tokens, "wall_time": wall, "prefill_time": prefill, "step_times": step_times, "decoding_steps": steps,
            "accept_lengths": accepts, "token_ids": token_ids, "temperature": sampling.temperature,
            **{key: [usage[key] for usage in usages] for key in ("cpu_share", "load_avg", "contended")}}


def answer_record(question: Question, name: str, decoder: Decoder, loaded, choice: dict) -> dict:
    return {
        "question_id": question.question_id, "answer_id": files.answer_id(), "model_id": model_id(loaded, name),
        "decoder": name, "baseline": decoder.baseline_name, "category": question.category, "tstamp": time.time(), "choices": [choice],
    }


def answer_one_question(question: Question, index: int, decoders: dict, loaded, config: RunConfig,
                        wanted: Optional[Iterable[str]] = None, on_step=None) -> Iterator[dict]:
    """The unit of work: one question answered by each wanted decoder, interleaved in this
    question's turn order (`question_order`), so every per-question speedup is timed on one
    device. Yields each answer record as it is finished; writes nothing (the caller stores them:
    run_benchmark in-process, the driver for Ray workers).

    `decoders`: name → Decoder or RemoteDecoder, references first; `wanted`: the names still
    missing for this question (default all); `on_step(name)` returns that answer's step callback.
    """
    wanted = set(decoders if wanted is None else wanted)
    for name in question_order(list(decoders), index):
        if name not in wanted:
            continue
        decoder = decoders[name]
        if isinstance(decoder, RemoteDecoder):  # both turns over HTTP, its own record
            record = decoder.answer(question, config)
            if record is not None:  # None: failed after retries, in failed.jsonl; the same command retries it
                yield record
            continue
        choice = answer_question(decoder, loaded, question, config, on_step=on_step(name) if on_step else None)
        yield answer_record(question, name, decoder, loaded, choice)


# ------------------------------------------------------------------------------ exact match and storing
@dataclass(frozen=True)
class DecoderFacts:
    """What storing an answer needs of its decoder (`store_ready`, `exact_match`): a Ray driver holds no decoders."""

    name: str
    baseline_name: str
    lossless: bool

    @classmethod
    def of(cls, decoder) -> "DecoderFacts":
        return cls(decoder.name, decoder.baseline_name, decoder.lossless)


def exact_match(choice: dict, decoder, reference: Optional[dict], name: str) -> Optional[list[bool]]:
    """Per turn: does a greedy lossless decoder reproduce its reference's answer? None if n/a
    (sampled, no reference, or the decoder is its own reference). Token ids where both answers
    have them, else text (servers that return no ids); a remote decoder's choice records which
    in `exact_match_by`."""
    matches, by = None, None
    if reference is not None and name != decoder.baseline_name and decoder.lossless and choice["temperature"] == 0:
        matches, by = compare_turns(choice, reference["choices"][0])
    if isinstance(decoder, RemoteDecoder):
        choice["exact_match_by"] = by
    return matches


def compare_turns(choice: dict, reference: dict) -> tuple[list[bool], str]:
    """(per-turn equality, "token_ids" | "text") of two answers' choices."""
    ids, reference_ids = choice.get("token_ids") or [], reference.get("token_ids") or []
    if ids and reference_ids and all(turn is not None for turn in ids + reference_ids):
        return [i < len(reference_ids) and turn == reference_ids[i] for i, turn in enumerate(ids)], "token_ids"
    texts = reference.get("turns") or []
    return [i < len(texts) and text == texts[i] for i, text in enumerate(choice["turns"])], "text"


def store_ready(pending: list, references: dict, names: list[str], paths: dict) -> list:
    """Append the pending (record, decoder) pairs whose reference has answered this question (or
    is not in this run), exact match filled in; return those still waiting. Control may run
    before the baseline, so its answer waits for the baseline's."""
    def waits(record: dict) -> bool:
        ref = record["baseline"]
        return ref in names and ref != record["decoder"] and str(record["question_id"]) not in references[ref]

    while True:
        ready = [(record, decoder) for record, decoder in pending if not waits(record)]
        if not ready:
            return pending
        pending = [(record, decoder) for record, decoder in pending if waits(record)]  # before storing changes `waits`
        for record, decoder in ready:
            qid, choice = str(record["question_id"]), record["choices"][0]
            choice["exact_match"] = exact_match(choice, decoder, references[record["baseline"]].get(qid), record["decoder"])
            files.append_jsonl(paths[record["decoder"]], record)
            if record["decoder"] in references:
                references[record["decoder"]][qid] = record
