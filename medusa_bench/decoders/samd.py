"""SAM decoding (`samd`): draft the continuation of the longest suffix match in suffix automata.

Hu et al., 2024, "SAM Decoding: Speculative Decoding via Suffix Automaton" (arXiv 2411.10666).
A suffix automaton over the context (prompt + answer so far), extended as tokens are emitted,
and optionally a static one over a corpus (`--samd-corpus`); each keeps a matching state, the
longest suffix of the context that occurred before (amortised O(1) per token). The draft is
what followed the match: a state's `endpos` (the end of its first occurrence, the paper's
`min_endpos`) says where that is. The draft's length grows with the match, as in the paper:
`min(samd_tokens, alpha * match length)` drafted tokens (`samd_tokens` 40 is the paper's
`max_predicts` minus the root, alpha 4). The static automaton's draft is used when its match is
longer than the dynamic one's by more than `len_bias` (5), as the paper's draft model chooses.

What differs from the paper:
- no corpus by default: the paper's static automaton is built from its SFT data (ShareGPT /
  Alpaca); here `--samd-corpus FILE` (ShareGPT jsonl, e.g. `medusa-bench distill`'s output, or
  plain text) builds it from the model's own answers; never benchmark questions (a file of
  MT-Bench-style `turns` records is refused);
- the static automaton drafts a chain (its match's continuation), not the top-K tree of the
  paper's later version; of the auxiliary-drafter combinations, SAM + EAGLE-2 is `samd-eagle2`
  (decoders/samd_eagle.py), SAM + Token Recycling is not built;
- on a CPU a 40-token chain costs more than it saves, so by default the drafted prefix is
  chosen by prompt lookup's step-time policy (decoders/pld.py `choose_nodes`: acceptance
  statistics per match length against a measured step-time profile, possibly no draft);
  `DecoderOptions(extra={"samd_adaptive": False})` drafts the whole continuation as the paper
  does;
- a match whose continuation runs into the context's end repeats with its period (as prompt
  lookup does) instead of the paper's walk to a shorter ancestor state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from medusa_bench.decoders.options import DecoderOptions, Option, declare, within
from medusa_bench.decoders.pld import STRENGTH_CAP, Match, PromptLookupProposer
from medusa_bench.decoders.registry import DraftsWhatPays, register
from medusa_bench.decoders.spec import SpeculativeDecoder
from medusa_bench.errors import UserError

SEPARATOR = -1  # between corpus documents: no token equals it, so no match crosses it


# ------------------------------------------------------------------------------ the automaton
class SuffixAutomaton:
    """The suffix automaton of a growing token list (Blumer et al.): states of equal end-position
    sets, `next` transitions, suffix `link`s, `length` (longest string of the state) and `endpos`
    (0-based index of the last token of its first occurrence)."""

    def __init__(self, tokens=()):
        self.tokens: list[int] = []
        self.next: list[dict[int, int]] = [{}]
        self.link: list[int] = [-1]
        self.length: list[int] = [0]
        self.endpos: list[int] = [-1]
        self.last = 0
        self.extend(tokens)

    def extend(self, tokens) -> None:
        for token in tokens:
            self.add(token)

    def add(self, token: int) -> Optional[tuple[int, int]]:
        """Append one token; returns (q, clone) when a state was split (matchers in q may move), else None."""
        self.tokens.append(token)
        cur = self._new({}, -1, self.length[self.last] + 1, len(self.tokens) - 1)
        p = self.last
        while p != -1 and token not in self.next[p]:
            self.next[p][token] = cur
            p = self.link[p]
        split = None
        if p == -1:
            self.link[cur] = 0
        else:
            q = self.next[p][token]
            if self.length[p] + 1 == self.length[q]:
                self.link[cur] = q
            else:
                clone = self._new(dict(self.next[q]), self.link[q], self.length[p] + 1, self.endpos[q])
                while p != -1 and self.next[p].get(token) == q:
                    self.next[p][token] = clone
                    p = self.link[p]
                self.link[q] = self.link[cur] = clone
                split = (q, clone)
        self.last = cur
        return split

    def _new(self, nxt: dict, link: int, length: int, endpos: int) -> int:
        self.next.append(nxt)
        self.link.append(link)
        self.length.append(length)
        self.endpos.append(endpos)
        return len(self.next) - 1

    def transfer(self, state: int, length: int, token: int) -> tuple[int, int]:
        """The matching state after `token`: the longest suffix of (match + token) that is a substring."""
        while state != 0 and token not in self.next[state]:
            state = self.link[state]
            length = self.length[state]
        if token in self.next[state]:
            return self.next[state][token], length + 1
        return 0, 0

    def match(self, text) -> tuple[int, int]:
        """(state, length) of the longest suffix of `text` that occurs in the automaton's tokens."""
        state = length = 0
        for token in text:
            state, length = self.transfer(state, length, token)
        return state, length

    def continuation(self, state: int, max_tokens: int) -> list[int]:
        """The tokens after the first occurrence of `state`'s strings (stops at a document's end)."""
        start = self.endpos[state] + 1
        out = self.tokens[start:start + max_tokens]
        return out[:out.index(SEPARATOR)] if SEPARATOR in out else out


class SamIndex:
    """The context's automaton with its matching state, and a static corpus automaton's matcher.

    The prompt lookup proposer's index interface: `tokens`, `extend`, `matches`. After `extend`,
    the dynamic match is the longest suffix of the context that occurred before its last token
    (the paper's order: move the matcher with a token, then add the token).
    """

    def __init__(self, tokens, static: Optional[SuffixAutomaton], alpha: float, len_bias: int):
        self.automaton = SuffixAutomaton()
        self.static, self.alpha, self.len_bias = static, alpha, len_bias
        self.state = self.length = 0  # dynamic match
        self.static_state = self.static_length = 0
        self.extend(tokens)

    @property
    def tokens(self) -> list[int]:
        return self.automaton.tokens

    def extend(self, tokens) -> None:
        sam = self.automaton
        for token in tokens:
            self.state, self.length = sam.transfer(self.state, self.length, token)
            split = sam.add(token)
            if split is not None and split[0] == self.state and self.length <= sam.length[split[1]]:
                self.state = split[1]  # the matched strings moved to the clone
            if self.static is not None:
                self.static_state, self.static_length = self.static.transfer(self.static_state, self.static_length, token)

    def length_after(self, token: int) -> int:
        """The match length `extend([token])` would give, without adding it: the dynamic match, or the
        static one less `len_bias` when that is longer (what `samd-eagle2` compares with its threshold)."""
        length = self.automaton.transfer(self.state, self.length, token)[1]
        if self.static is not None:
            length = max(length, self.static.transfer(self.static_state, self.static_length, token)[1] - self.len_bias)
        return length

    def matches(self, max_tokens: int, branches: int = 1) -> list[Match]:
        """At most one match (the paper drafts one sequence): the dynamic automaton's, or the static
        one's when its match is longer by more than `len_bias`; `alpha` tokens per matched token."""
        if self.static is not None and self.static_length - self.len_bias > self.length:
            sam, state, length, periodic = self.static, self.static_state, self.static_length, False
        else:
            sam, state, length, periodic = self.automaton, self.state, self.length, True
        if length == 0:
            return []
        n = min(max_tokens, max(1, int(length * self.alpha)))
        tokens = sam.continuation(state, n)
        if periodic and tokens:  # a match running into the context's end repeats with its period
            period = len(self.tokens) - 1 - sam.endpos[state]
            while len(tokens) < n:
                tokens.append(tokens[len(tokens) - period])
        if not tokens:
            return []
        return [Match(tokens, length, min(length, STRENGTH_CAP))]


# ------------------------------------------------------------------------------ the corpus
_CORPORA: dict[tuple, SuffixAutomaton] = {}  # (path, size, mtime, tokenizer) -> automaton: built once per process


def corpus_texts(path: Path) -> list[str]:
    """Assistant answers of a ShareGPT .jsonl/.json file (`medusa-bench distill` writes one), else the
    whole file as one text. MT-Bench-style question files are refused: never benchmark questions."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--samd-corpus {path}: file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix not in (".jsonl", ".json"):
        return [text]
    stripped = text.lstrip()
    try:
        records = json.loads(stripped) if stripped.startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    except json.JSONDecodeError as error:
        raise UserError(f"--samd-corpus {path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    texts = []
    for record in records:
        if not isinstance(record, dict):
            continue
        if "turns" in record and "conversations" not in record:
            raise UserError(f"--samd-corpus {path} looks like benchmark questions ('turns' records): "
                            "build the corpus from training answers, e.g. `medusa-bench distill`'s output")
        for turn in record.get("conversations") or record.get("messages") or []:
            role = turn.get("from", turn.get("role"))
            value = turn.get("value", turn.get("content"))
            if role in ("gpt", "assistant", "chatgpt", "bard", "model") and isinstance(value, str):
                texts.append(value)
    if not texts:
        raise UserError(f"--samd-corpus {path} has no assistant turns: expected ShareGPT records "
                        '{"conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}')
    return texts


def corpus_automaton(path: str, tokenizer) -> SuffixAutomaton:
    """The static automaton over a corpus file's texts, documents separated; built once per process."""
    stat = os.stat(Path(path).expanduser())
    key = (str(Path(path).expanduser().resolve()), stat.st_size, stat.st_mtime_ns, getattr(tokenizer, "name_or_path", ""))
    if key not in _CORPORA:
        sam = SuffixAutomaton()
        for text in corpus_texts(Path(path)):
            sam.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            sam.add(SEPARATOR)
        _CORPORA[key] = sam
    return _CORPORA[key]


# ------------------------------------------------------------------------------ the proposer
class SamProposer(PromptLookupProposer):
    """Prompt lookup's proposer (draft policy, learning, rewind) on suffix automata instead of n-grams."""

    def __init__(self, max_tokens: int = 40, alpha: float = 4.0, len_bias: int = 5,
                 static: Optional[SuffixAutomaton] = None, adaptive: bool = True,
                 device: torch.device = torch.device("cpu"), profile: Optional[dict] = None):
        self.alpha, self.len_bias, self.static = alpha, len_bias, static
        super().__init__(max_ngram=1, max_tokens=max_tokens, branches=1, adaptive=adaptive, device=device,
                         profile=profile)

    def new_index(self, tokens: list[int]) -> SamIndex:
        return SamIndex(tokens, self.static, self.alpha, self.len_bias)

    def match_length(self, root: int, context: list[int]) -> int:
        """The index brought up to `context`; the match length once `root` follows it (`root` not added:
        `propose` adds it). What SAM decoding's combination with an auxiliary drafter decides by."""
        if len(context) < len(self.index.tokens):  # a context we did not see grow: start over
            self.index = self.new_index(context)
        self.index.extend(context[len(self.index.tokens):])
        return self.index.length_after(root)


declare(
    Option("samd_tokens", 40, "SAM decoding: most tokens drafted (the paper's max_predicts 40, root not counted).",
           check=within(1, 128, integer=True)),
    Option("samd_alpha", 4.0, "SAM decoding: tokens drafted per matched token (draft = min(samd_tokens, alpha * match)).",
           check=within(0.1, 64)),
    Option("samd_corpus", None, "SAM decoding: a static automaton over this corpus (ShareGPT jsonl of training "
           "answers, e.g. from `medusa-bench distill`, or plain text); default none: the context's automaton only.",
           kind=str),
    Option("samd_len_bias", 5, "SAM decoding: the corpus match is drafted when longer than the context's by more than this.",
           check=within(0, 64, integer=True)),
)


uses_step_profile = DraftsWhatPays("samd")


def sam_proposer(loaded, options: DecoderOptions) -> SamProposer:
    """The `samd_*` options' proposer; adaptive unless `extra={"samd_adaptive": False}` (samd, samd-eagle2)."""
    static = corpus_automaton(options.samd_corpus, loaded.tokenizer) if options.samd_corpus else None
    adaptive = uses_step_profile(options)
    profile = options.extra.get("step_profile") if adaptive else None
    return SamProposer(options.samd_tokens, options.samd_alpha, options.samd_len_bias, static, adaptive=adaptive,
                       device=loaded.device, profile=profile)


@register("samd", step_profile=uses_step_profile)
def build_samd(loaded, options: DecoderOptions):
    """SAM decoding; drafts only what pays by `options.extra["step_profile"]` (as prompt lookup)."""
    proposer = sam_proposer(loaded, options)
    decoder = SpeculativeDecoder("samd", loaded, proposer)
    decoder.step_profile = proposer.costs.profile
    return decoder
