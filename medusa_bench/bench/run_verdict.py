"""Lossless up to rounding, for an ordinary run: `verdict.json`, one verdict per decoder compared with a reference.

A greedy lossless decoder verifies its drafts in a forward over several tokens on a cache; its
reference (the baseline) decodes one token per forward. In exact arithmetic both pick the same
argmax; in floating point the two shapes round differently, so where the reference's top two
logits are closer than that rounding moves them the argmax may flip, and the answers part from
there on. In fp32 that never shows (every answer identical); in bf16 most answers part somewhere
(SmolLM2 on MT-Bench: exact 22–25%). This module says, per decoder, whether every such parting
is a tie the rounding explains (bench/verdict.py, written for the batch sweep, does the measuring):

- per answer (question) whose tokens differ from the reference's: the first differing turn and
  token, and the reference's top-1 minus top-2 logit there (`verdict.margin_at`, run dtype);
- the rounding noise, on a few of the run's contexts (the decoder's first divergences, then whole
  first turns; `NOISE_CONTEXTS`): the verify shape's (each context's last `TAIL` positions in one
  whole forward against a verify step of `TAIL` tokens over a cache, `verdict.logits_split`: what
  `verdict.rounding_noise` measures at batch 1), and, for a bf16/fp16 run with the fp32 precision reference, the fp32-vs-run-dtype
  spread at the same positions. The larger of the two is the threshold (`noise.threshold_from`);
- a divergence at a margin below 2 × threshold is a tie flip (both logits moved, opposite ways).

A decoder whose answers are all identical costs no forward at all: fp32 runs stay as fast.
verdict.json is recomputed from the answer files (each entry keeps a digest of the tokens it
judged, so a resume that added no answers redoes nothing); it never writes an answer file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from medusa_bench.bench.run_folder import QUESTION_FILE, model_id
from medusa_bench.bench.verdict import divergence, logits_in_batch, logits_split, margin_at
from medusa_bench.inputs.chat import build_prompt, conversation
from medusa_bench.inputs.questions import read_questions
from medusa_bench.results import files
from medusa_bench.results.drift_table import VERDICT_FILE  # the report reads what this writes

TAIL = 8  # positions per context the noise is measured on: a verify step's few tokens
NOISE_CONTEXTS = 4  # contexts the noise is measured on per decoder (first divergences, then first turns; shared via Measurer)
EXACT = "lossless (100% exact)"


@dataclass(frozen=True)
class Turn:
    """One turn of one answer beside its reference's."""

    question_id: Any
    turn: int  # from 1
    prompt: list[int]  # the reference's prompt of this turn (turn 2 carries the reference's turn 1)
    tokens: list[int]  # the decoder's
    reference: list[int]  # the reference's


def first_divergence(answer: list[Turn]) -> Optional[tuple[Turn, int]]:
    """The first turn whose tokens part from the reference's, and the token where; None: identical.
    Later turns are left out: once a turn differs, the next one's prompt differs too."""
    for turn in answer:
        position = divergence(turn.tokens, turn.reference)
        if position is not None:
            return turn, position
    return None


# ------------------------------------------------------------------------------ margins and noise
class Measurer:
    """The reference's model reading margins and rounding noise, each once per run: decoders with one
    reference share them (their divergences are mostly the same near-ties). In bf16 on the project's
    2-core EPYC a whole forward costs ~60 ms per token (bf16 matmuls scale with the token count there,
    fp32 ~10 ms), so each one counts.

    `fp32`: returns the fp32 copy of the model (loaded on first use), or None: no spread to add."""

    def __init__(self, loaded, fp32: Optional[Callable[[], Any]] = None):
        self.loaded, self.fp32 = loaded, fp32
        self.margins: dict[tuple, Optional[float]] = {}
        self.spreads: dict[tuple, tuple[float, Optional[float]]] = {}

    def margin(self, turn: Turn, position: int) -> Optional[float]:
        """The reference's top-1 − top-2 logit at its token `position` (None: it ended there, no choice of its own to read)."""
        key = (turn.question_id, turn.turn, position)
        if key not in self.margins:
            self.margins[key] = margin_at(self.loaded, turn.prompt, turn.reference, position) if position < len(turn.reference) else None
        return self.margins[key]

    @torch.inference_mode()
    def context_noise(self, context: list[int]) -> tuple[float, Optional[float]]:
        """max |Δ logit| over `context`'s last TAIL positions: whole forward against a verify step of TAIL tokens over
        a cache (verdict.logits_split), and the run's dtype against fp32 (None without an fp32 model)."""
        key = tuple(context)
        if key not in self.spreads:
            (whole,) = logits_in_batch(self.loaded, [context])  # [P, V]
            shape = float((whole[-TAIL:] - logits_split(self.loaded, context, TAIL)).abs().max())
            spread = None
            if self.fp32 is not None:
                (exact,) = logits_in_batch(self.fp32(), [context])
                spread = float((whole[-TAIL:] - exact[-TAIL:]).abs().max())
            self.spreads[key] = (shape, spread)
        return self.spreads[key]

    def noise(self, contexts: list[list[int]]) -> dict:
        """Both noises over `contexts` (max of each); the larger is the threshold, `threshold_from` says which."""
        measured = [self.context_noise(context) for context in contexts if len(context) > TAIL]
        shape = max((m[0] for m in measured), default=0.0)
        spreads = [m[1] for m in measured if m[1] is not None]
        spread = max(spreads) if spreads else None
        noise = {"verify_shape": shape, "fp32_spread": spread, "threshold": shape, "threshold_from": "verify_shape",
                 "contexts": len(measured), "tail": TAIL, "dtype": str(self.loaded.dtype).replace("torch.", "")}
        if spread is not None and spread > shape:
            noise.update(threshold=spread, threshold_from="fp32_spread")
        return noise


# ------------------------------------------------------------------------------ one decoder
def judge(measurer: Measurer, answers: list[list[Turn]]) -> dict:
    """One decoder's entry of verdict.json from its answers beside the reference's (`measurer`: on the reference's model)."""
    parted = [found for found in map(first_divergence, answers) if found is not None]
    entry = {"answers": len(answers), "exact": len(answers) - len(parted), "divergences": [], "noise": None}
    if not parted:
        return {**entry, "verdict": EXACT}
    entry["divergences"] = [{"question_id": turn.question_id, "turn": turn.turn, "position": position,
                             "margin": measurer.margin(turn, position)} for turn, position in parted]
    entry["noise"] = measurer.noise(noise_contexts(answers, parted))
    return {**entry, "verdict": verdict_line(entry["divergences"], entry["noise"])}


def noise_contexts(answers: list[list[Turn]], parted: list[tuple[Turn, int]]) -> list[list[int]]:
    """Up to NOISE_CONTEXTS token sequences to measure the noise on: the first divergences' contexts (prompt +
    the reference up to the parting token), then whole first turns of the answers (prompt + reference)."""
    contexts = [turn.prompt + turn.reference[:position] for turn, position in parted]
    contexts += [answer[0].prompt + answer[0].reference for answer in answers if answer]
    unique = list({tuple(context): context for context in contexts}.values())
    return unique[:NOISE_CONTEXTS]


def verdict_line(divergences: list[dict], noise: dict) -> str:
    """'lossless (100% exact)', 'lossless up to rounding (…)' or 'NOT lossless: …' with the margins above the noise."""
    if not divergences:
        return EXACT
    bound = 2 * noise["threshold"]
    which = "fp32-vs-" + noise["dtype"] + " spread" if noise["threshold_from"] == "fp32_spread" else "verify-step shape"
    above = [d for d in divergences if d["margin"] is None or not d["margin"] < bound]  # None: the reference ended first, no tie to flip
    if not above:
        return f"lossless up to rounding ({plural(len(divergences), 'divergence')}, all at margins < 2×noise={bound:.3g}; noise: {which})"
    shown = ", ".join(f"q{d['question_id']} turn {d['turn']} token {d['position']}: "
                      + ("reference ended" if d["margin"] is None else f"{d['margin']:.3g}") for d in above)
    return (f"NOT lossless: {plural(len(above), 'divergence')} above the rounding noise (margins {shown}; 2×noise={bound:.3g}, {which})"
            + (f"; {plural(len(divergences) - len(above), 'tie flip')}" if len(above) < len(divergences) else ""))


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


# ------------------------------------------------------------------------------ the run folder
def paired_answers(loaded, questions: dict, records: dict, reference: dict) -> list[list[Turn]]:
    """Each greedy answer with token ids beside its reference's (questions both answered), turns paired."""
    answers = []
    for qid, record in records.items():
        mine, theirs, question = record["choices"][0], (reference.get(qid) or {"choices": [{}]})["choices"][0], questions.get(qid)
        if question is None or not mine.get("token_ids") or not theirs.get("token_ids"):
            continue
        if mine.get("temperature", 0) != 0 or theirs.get("temperature", 0) != 0:
            continue  # sampled: no verdict to give
        turns = []
        for index, (tokens, ref_tokens) in enumerate(zip(mine["token_ids"], theirs["token_ids"])):
            if tokens is None or ref_tokens is None:
                break
            prompt = build_prompt(loaded, conversation(question.turns[: index + 1], theirs["turns"][:index]))
            turns.append(Turn(record["question_id"], index + 1, prompt, list(tokens), list(ref_tokens)))
        answers.append(turns)
    return answers


def digest(records: dict, reference: dict) -> str:
    """What a verdict was computed from: both sides' token ids, question by question."""
    tokens = {qid: [record["choices"][0].get("token_ids"), (reference.get(qid) or {"choices": [{}]})["choices"][0].get("token_ids")]
              for qid, record in sorted(records.items())}
    return hashlib.sha256(json.dumps(tokens, sort_keys=True).encode()).hexdigest()


def compared(decoders: dict) -> dict[str, str]:
    """{decoder: its reference} for the in-process decoders the exactness column compares (lossless, not a reference)."""
    return {name: decoder.baseline_name for name, decoder in decoders.items()
            if getattr(decoder, "lossless", False) and decoder.baseline_name != name and decoder.baseline_name in decoders}


def write_run_verdict(run_dir: Path, decoders: dict, loaded, fp32=None, log: Callable[[str], None] = print) -> dict:
    """verdict.json for the run's in-process decoders, recomputed from their answer files; returns it.

    `loaded`: the run's model (it names the answer files). `fp32`: the run's precision reference
    (bench/reference.Float32Baseline, loaded on first use) or None; its spread is measured only for
    divergences from the plain baseline in a run that is not fp32."""
    run_dir = Path(run_dir)
    path = run_dir / VERDICT_FILE
    old = files.read_json(path) if path.is_file() else {}
    pairs = compared(decoders)
    if not pairs or not (run_dir / QUESTION_FILE).is_file():
        return old
    questions = {str(q.question_id): q for q in read_questions(run_dir / QUESTION_FILE)}

    def read(name: str) -> dict:
        return {str(r["question_id"]): r for r in files.read_jsonl(files.answer_path(run_dir, model_id(loaded, name)))}

    out, measurers = dict(old), {}
    for name, reference_name in pairs.items():
        records, reference = read(name), read(reference_name)
        stamp = digest(records, reference)
        if old.get(name, {}).get("answers_sha256") == stamp:
            continue
        model = decoders[reference_name].loaded  # the reference's own model (medusa2-baseline: its backbone)
        answers = paired_answers(model, questions, records, reference)
        if not answers:
            continue
        if reference_name not in measurers:
            spread = fp32 is not None and reference_name == "baseline" and model.dtype != torch.float32  # fp32 copies the run's model
            measurers[reference_name] = Measurer(model, (lambda: fp32.load().loaded) if spread else None)
        entry = judge(measurers[reference_name], answers)
        out[name] = {**entry, "reference": reference_name, "answers_sha256": stamp}
        log(f"verdict: {name}: {entry['verdict']}")
    if out != old:
        files.write_json(path, out)
    return out
