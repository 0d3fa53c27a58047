"""The tree optimiser's calibration prompts, and the split of them that heads are never trained on.

The optimiser predicts τ from the heads' drafts on greedy answers to these prompts. Heads score
better on text they were trained on, so calibrating on training prompts over-predicts τ. Measured
(session 21, fp32, the shipped heads, 24 prompts × 2 turns × 64 tokens, the run's own trees): GSM8K
questions the heads trained on against GSM8K questions they never saw gave medusa τ 1.79 against 1.67
(+7%) and hydra 1.95 against 1.86 (+5%). So the default file keeps a fixed split, `HELD_OUT`
prompts spread evenly over it, for calibration only: `calibration_prompts` draws from it, and
`train/prompts.read_prompts` leaves it out of what heads are distilled on (`held_out_texts`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from medusa_bench.errors import UserError

DEFAULT_PROMPTS = ("self_instruct", "user_oriented_instructions.jsonl")  # people's instructions, not a benchmark
HELD_OUT = 64  # prompts of the default file kept for calibration: pick(prompts, 64); pick(those, 16 or 32) = pick(prompts, 16 or 32)


def default_prompt_file() -> Path:
    from medusa_bench.inputs.questions import data_file

    return data_file(*DEFAULT_PROMPTS, option="--calibration")


def is_default_file(path: Path) -> bool:
    path = Path(path)
    return (path.parent.name, path.name) == DEFAULT_PROMPTS


def calibration_prompts(path: Path, count: int) -> list[str]:
    """`count` prompts to calibrate on: from the default file, its held-out split only; else spread over the file."""
    prompts = read_prompts(path)
    if not is_default_file(path):
        return pick(prompts, count)
    if count > HELD_OUT:
        raise UserError(f"--prompts {count}: the default calibration file keeps {HELD_OUT} prompts out of training; "
                        f"pass --prompts {HELD_OUT} or fewer, or --calibration with a prompts file of your own")
    return pick(held_out(prompts), count)


def held_out(prompts: Sequence[str]) -> list[str]:
    """The default file's calibration split: `HELD_OUT` prompts spread evenly over it."""
    return pick(prompts, HELD_OUT)


def held_out_texts() -> frozenset[str]:
    """The calibration split's texts, for training to leave out; empty where the data folder is absent."""
    try:
        path = default_prompt_file()
    except UserError:
        return frozenset()
    return frozenset(held_out(read_prompts(path)))


def pick(prompts: Sequence[str], count: int) -> list[str]:
    """`count` prompts spread evenly over the file (a fixed slice: same prompts every time)."""
    if count < 1:
        raise UserError(f"calibration needs at least 1 prompt, got {count}")
    if count >= len(prompts):
        return list(prompts)
    return [prompts[i * len(prompts) // count] for i in range(count)]


def read_prompts(path: Path) -> list[str]:
    """Prompt texts from a .jsonl (self-instruct, FastChat questions, ShareGPT, {"prompt"}) or a text file, one per line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read calibration prompts {path}: {error}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix.lower() != ".jsonl":
            prompts.append(line.strip())
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {number}: not valid JSON ({error.msg}); use one JSON object per line") from None
        text = prompt_text(record)
        if text is None:
            raise UserError(f"{path} line {number}: no prompt found; give 'instruction', 'prompt', 'question', "
                            "'turns' or ShareGPT 'conversations'")
        prompts.append(text)
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


def instruction_text(record: dict) -> str:
    """A self-instruct (or Alpaca) record as the user's message: the instruction, then its first input."""
    instances = record.get("instances") or [{}]
    extra = instances[0].get("input") if isinstance(instances[0], dict) else None
    extra = extra or record.get("input")  # Alpaca keeps the input beside the instruction
    extra = extra.strip() if isinstance(extra, str) else ""
    return record["instruction"].strip() + (f"\n\n{extra}" if extra else "")


def prompt_text(record) -> Optional[str]:
    """The user's first message in one record of the common prompt formats."""
    if isinstance(record, str):
        return record.strip() or None
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("instruction"), str):
        return instruction_text(record)
    for key in ("prompt", "question", "text"):
        if isinstance(record.get(key), str) and record[key].strip():
            return record[key].strip()
    turns = record.get("turns")
    if isinstance(turns, list) and turns and isinstance(turns[0], str):
        return turns[0]
    for message in record.get("conversations") or []:
        if isinstance(message, dict) and message.get("from", message.get("role")) in ("human", "user"):
            return message.get("value", message.get("content"))
    return None
