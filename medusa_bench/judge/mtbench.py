"""MT-Bench judging as FastChat does it: data files, judge prompts, and verdict parsing.

Prompts come from FastChat's `judge_prompts.jsonl`: `single-v1` (general), `single-math-v1`
(math, reasoning, coding: graded against GPT-4's reference answers), their `-multi-turn`
variants for turn 2, and the `pair-*` prompts for pairwise mode. Prompts are filled exactly
as `fastchat/llm_judge/common.py` fills them, so judgments compare with published ones.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from medusa_bench.errors import UserError
from medusa_bench.results.files import read_jsonl

# Categories graded against a reference answer (FastChat's NEED_REF_CATS).
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")

JUDGE_PROMPTS_FILE = "judge_prompts.jsonl"  # inside the mt_bench data folder, as FastChat ships it
REFERENCE_FILE = "reference_answer/gpt-4.jsonl"


# ------------------------------------------------------------------------------ data files
def resolve_data_file(bench: str, name: str, explicit: str | Path | None, option: str) -> Path:
    """A bench data file, resolved like the questions: `explicit` > $MEDUSA_BENCH_DATA/<bench>/name
    > user cache > download (online) > a clear error naming `option`."""
    from medusa_bench.inputs.questions import data_file  # the one resolver for bench files

    return data_file(bench, name, Path(explicit) if explicit else None, option)


def load_judge_prompts(path: Path) -> dict[str, dict]:
    """judge_prompts.jsonl → {name: prompt record}; checks the prompts this tool uses exist."""
    prompts = {record["name"]: record for record in read_jsonl(path) if "name" in record}
    needed = ["single-v1", "single-v1-multi-turn", "single-math-v1", "single-math-v1-multi-turn"]
    missing = [name for name in needed if name not in prompts]
    if missing:
        raise UserError(f"{path} lacks the judge prompts {', '.join(missing)}: is it FastChat's judge_prompts.jsonl?")
    return prompts


def load_reference_answers(path: Path) -> dict:
    """reference_answer/<model>.jsonl → {question_id: [turn texts]}."""
    return {record["question_id"]: record["choices"][0]["turns"] for record in read_jsonl(path)}


def load_questions(path: Path) -> dict:
    """A FastChat question.jsonl → {question_id: question record}."""
    return {record["question_id"]: record for record in read_jsonl(path)}


# ------------------------------------------------------------------------------ prompts
@dataclass(frozen=True)
class JudgePrompt:
    """A filled judge prompt: the messages to send and the name of the template used."""

    name: str
    system: str
    user: str

    def messages(self) -> list[dict]:
        # FastChat's gpt-4 conversation template: the system message, then the user prompt.
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.user}]


def prompt_name(mode: str, category: str, turn: int, has_reference: bool) -> str:
    """FastChat's choice: `single-v1`, `single-math-v1`, `pair-v2`, … with `-multi-turn` for turn 2.

    A reference-graded category without a reference answer (a bench other than MT-Bench) uses
    the general prompt.
    """
    math_like = category in NEED_REF_CATS and has_reference
    if mode == "single":
        base = "single-math-v1" if math_like else "single-v1"
    else:
        base = "pair-math-v1" if math_like else "pair-v2"
    return base + ("-multi-turn" if turn == 2 else "")


def _reference_kwargs(template: str, reference: list[str] | None, turn: int) -> dict:
    if "{ref_answer_1}" not in template:
        return {}
    if not reference:
        raise UserError("a reference-graded judge prompt needs a reference answer")
    kwargs = {"ref_answer_1": reference[0]}
    if turn == 2:
        kwargs["ref_answer_2"] = reference[1]
    return kwargs


def _template(kind: str, prompts: dict[str, dict], question: dict, turn: int, reference: list[str] | None):
    """(prompt name, its judge_prompts.jsonl record, the reference answers' format arguments)."""
    name = prompt_name(kind, question.get("category", ""), turn, reference is not None)
    record = prompts[name]
    return name, record, _reference_kwargs(record["prompt_template"], reference, turn)


def single_prompt(
    prompts: dict[str, dict], question: dict, answer_turns: list[str], turn: int, reference: list[str] | None = None
) -> JudgePrompt:
    """The single-answer grading prompt for `turn` (1 or 2) of one answer."""
    name, record, kwargs = _template("single", prompts, question, turn, reference)
    template = record["prompt_template"]
    if turn == 2:
        user = template.format(
            question_1=question["turns"][0], question_2=question["turns"][1],
            answer_1=answer_turns[0], answer_2=answer_turns[1], **kwargs,
        )
    else:
        user = template.format(question=question["turns"][0], answer=answer_turns[0], **kwargs)
    return JudgePrompt(name, record["system_prompt"], user)


def pair_prompt(
    prompts: dict[str, dict], question: dict, turns_a: list[str], turns_b: list[str], turn: int,
    reference: list[str] | None = None,
) -> JudgePrompt:
    """The pairwise prompt for `turn` with assistant A = `turns_a`, assistant B = `turns_b`."""
    name, record, kwargs = _template("pair", prompts, question, turn, reference)
    template = record["prompt_template"]
    if turn == 2:
        user = template.format(
            question_1=question["turns"][0], question_2=question["turns"][1],
            answer_a_1=turns_a[0], answer_b_1=turns_b[0], answer_a_2=turns_a[1], answer_b_2=turns_b[1], **kwargs,
        )
    else:
        user = template.format(question=question["turns"][0], answer_a=turns_a[0], answer_b=turns_b[0], **kwargs)
    return JudgePrompt(name, record["system_prompt"], user)


# ------------------------------------------------------------------------------ parsing
_DOUBLE = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_SINGLE = re.compile(r"(?<!\[)\[\s*(\d+(?:\.\d+)?)\s*\](?!\])")
UNPARSED = -1


def parse_rating(text: str) -> float:
    """The judge's 1–10 rating, or -1 when there is none.

    `[[n]]` is the format the prompts ask for; a bare `[n]` is accepted only when no `[[n]]`
    is present. Either way the value must lie in 1–10, and the last such rating wins: the
    verdict follows the explanation, and small judges sometimes quote the format's example
    ("Rating: [[5]]") before giving their own.
    """
    for pattern in (_DOUBLE, _SINGLE):
        values = [float(m) for m in pattern.findall(text or "")]
        values = [v for v in values if 1 <= v <= 10]
        if values:
            value = values[-1]
            return int(value) if value.is_integer() else value
    return UNPARSED


def parse_pair_verdict(text: str) -> str:
    """FastChat's pairwise parse: 'A', 'B', 'tie' ([[C]]) or 'error'."""
    text = text or ""
    if "[[A]]" in text:
        return "A"
    if "[[B]]" in text:
        return "B"
    if "[[C]]" in text:
        return "tie"
    return "error"


def expected_rating(tokens) -> float | None:
    """Σ p(r)·r over the rating tokens 1–10 at the rating's position, from token logprobs.

    `tokens` is a list of objects with `.token`, `.logprob`, `.top` [(token, logprob)]. The
    rating's position is the first digit token right after the last `[[` in the text. The
    probabilities are renormalised over the rating tokens found among the top alternatives.
    None when the text has no `[[digit` or no rating token is among the alternatives.
    (A tokenizer that splits "10" into "1", "0" counts it as 1: a known limit.)
    """
    text = ""
    position = None
    for index, token in enumerate(tokens or []):
        stripped = token.token.lstrip()
        if text.rstrip().endswith("[[") and stripped[:1].isdigit():
            position = index
        elif "[[" in token.token and token.token.split("[[")[-1].strip()[:1].isdigit():
            position = index  # "[[7" as one token
        text += token.token
    if position is None:
        return None
    mass = 0.0
    total = 0.0
    for alternative, logprob in tokens[position].top or [(tokens[position].token, tokens[position].logprob)]:
        digits = alternative.split("[[")[-1].strip()
        if digits.isdigit() and 1 <= int(digits) <= 10:
            p = math.exp(logprob)
            mass += p
            total += p * int(digits)
    return total / mass if mass > 0 else None
