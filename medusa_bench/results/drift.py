"""Where two decodings part ways: exact match and first-divergence positions from token ids.

Greedy speculative decoding is lossless in exact arithmetic, but in bfloat16 a verify forward
over n tokens rounds differently from n one-token forwards, so a decoder drifts from the
baseline at some token and never comes back. An fp32 decoding of the baseline parts from the
bf16 baseline the same way: that is the precision, not the decoder. These helpers compare
per turn, from the answers' `token_ids` only (one source of truth, never the `exact_match`
field), so the report can show both distributions side by side.

Pure: answer records in, plain rows out; nothing here reads files.
"""

from __future__ import annotations

import statistics
from typing import Any, Iterable, Optional

TurnKey = tuple[Any, int]  # (question_id, turn number from 1)


def first_divergence(a: list[int], b: list[int]) -> Optional[int]:
    """Index of the first token where `a` and `b` differ; the shorter length where one is a
    prefix of the other (they part where one stops); None when identical."""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def turn_token_ids(records: Iterable[dict]) -> dict[TurnKey, list[int]]:
    """(question_id, turn) -> token ids, from choices[0].token_ids; turns without ids are left out
    (an older run, or a turn cut before any token), so they are never counted as matches."""
    turns: dict[TurnKey, list[int]] = {}
    for record in records:
        choices = record.get("choices") or [{}]
        ids = choices[0].get("token_ids") if isinstance(choices[0], dict) else None
        if not isinstance(ids, list):
            continue
        for turn, tokens in enumerate(ids, 1):
            if isinstance(tokens, list):
                turns[(record.get("question_id"), turn)] = [int(t) for t in tokens]
    return turns


def compare_turns(decoder: dict[TurnKey, list[int]], reference: dict[TurnKey, list[int]]) -> dict[TurnKey, Optional[int]]:
    """First-divergence position (None = identical) per turn both have token ids for."""
    return {key: first_divergence(tokens, reference[key]) for key, tokens in decoder.items() if key in reference}


def match_rate(divergences: dict[TurnKey, Optional[int]]) -> float:
    """Share of compared turns that are token-identical; NaN when nothing was compared."""
    if not divergences:
        return float("nan")
    return sum(d is None for d in divergences.values()) / len(divergences)


def divergence_positions(divergences: dict[TurnKey, Optional[int]]) -> list[int]:
    """The positions where diverging turns parted (identical turns have none)."""
    return sorted(d for d in divergences.values() if d is not None)


def median_position(divergences: dict[TurnKey, Optional[int]]) -> float:
    positions = divergence_positions(divergences)
    return float(statistics.median(positions)) if positions else float("nan")


def drift_summary(decoder: dict[TurnKey, list[int]], baseline: dict[TurnKey, list[int]] | None,
                  fp32: dict[TurnKey, list[int]] | None) -> dict[str, Any]:
    """One decoder's drift: against its own-precision baseline and against the fp32 reference,
    plus the baseline's own drift from fp32 on the same turns (the floor the precision sets).

    Keys: turns, exact_match, first_divergence_median, exact_match_fp32,
    first_divergence_fp32_median, baseline_exact_match_fp32, and the raw per-turn comparisons
    (`vs_baseline`, `vs_fp32`, `baseline_vs_fp32`) for plots.
    """
    vs_baseline = compare_turns(decoder, baseline) if baseline is not None else {}
    vs_fp32 = compare_turns(decoder, fp32) if fp32 is not None else {}
    # The baseline's drift on exactly the turns this decoder was compared on, so the two rates
    # describe the same questions (a decoder cut short answered fewer).
    baseline_vs_fp32 = ({key: d for key, d in compare_turns(baseline, fp32).items() if key in vs_fp32}
                        if baseline is not None and fp32 is not None else {})
    return {
        "turns": len(vs_baseline) if baseline is not None else len(vs_fp32),
        "exact_match": match_rate(vs_baseline),
        "first_divergence_median": median_position(vs_baseline),
        "exact_match_fp32": match_rate(vs_fp32),
        "first_divergence_fp32_median": median_position(vs_fp32),
        "baseline_exact_match_fp32": match_rate(baseline_vs_fp32),
        "vs_baseline": vs_baseline,
        "vs_fp32": vs_fp32,
        "baseline_vs_fp32": baseline_vs_fp32,
    }
