"""The decoder interface: what a decoder takes (`Sampling`), returns (`Generation`) and declares.

A decoder turns prompt token ids into answer token ids and reports how it got there (steps,
tokens per step, wall time). Every decoder here is the one speculative loop in `spec.py` with
a different proposer: the baseline proposes nothing. The names, their factories and options
are in `registry.py` and `options.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol

from medusa_bench.errors import UserError


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_p and seed apply only when sampling."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """One answer: tokens cut at EOS (inclusive) and at the limit, and how they were made."""

    token_ids: list[int]
    steps: int  # decoding iterations after prefill (each emits >= 1 token)
    accept_lengths: list[int]  # tokens emitted per step; sums to len(token_ids)
    wall_time: float  # prefill + decode, seconds, device-synchronised
    finish_reason: str  # "stop" (EOS or on_step asked) | "length"
    logprobs: Optional[list] = None  # per token: (logprob, [(token_id, logprob), ...])
    drafts: int = 0  # steps that verified a draft (the last step and no-match steps verify none)
    draft_tokens: int = 0  # draft nodes those steps verified, the root not counted
    prefill_time: Optional[float] = None  # seconds of `wall_time` the prompt's forward took (the same work for every decoder)
    step_times: Optional[list[float]] = None  # seconds of each step (drafting + verify forward); 0.0: a last root without one


StepCallback = Callable[[list[int]], Optional[bool]]


class Decoder(Protocol):
    name: str
    lossless: bool  # greedy output must equal the baseline's
    draft_size: int  # nodes drafted per step beyond the root (0 for the baseline)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                 on_step: Optional[StepCallback] = None, logprobs: Optional[int] = None) -> Generation: ...


@dataclass(frozen=True)
class TreeSizing:
    """What `--tree auto` needs to size a tree for a decoder that drafts on one (bench/autotree.py).

    A factory registered with `tree=True` sets it as `decoder.sizing`: the optimiser calibrates
    and times proposers from `make_proposer(tree)` on the decoder's own heads, then the registry
    builds the decoder again with the tree it chose.
    """

    make_proposer: Callable[["Tree"], "Proposer"]  # noqa: F821 (trees.Tree -> spec.Proposer, any tree up to `depth`)
    depth: int  # the deepest tree it drafts (its heads)
    kind: str  # the optimiser's cache name: decoders drafting alike share tables (eagle, eagle2)
    heads_path: Optional[Path | str] = None  # heads folder: its shipped calibration.json, if any
    # Dynamic trees (EAGLE-2/3): a proposer drafting one of given knobs (trees/dynamic.DynamicKnobs); the
    # optimiser then searches nodes, depth and top-k (bench/dynamic_search.py) instead of a static tree.
    dynamic: Optional[Callable[["DynamicKnobs"], "Proposer"]] = None  # noqa: F821
