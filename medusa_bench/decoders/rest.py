"""REST (`rest`): retrieval-based speculative decoding from a datastore of token ids and a suffix array.

He et al., 2023, "REST: Retrieval-Based Speculative Decoding" (arXiv 2311.08252). The datastore
(`medusa-bench datastore build --from FILE --out PATH`, `build_datastore`) is a corpus tokenized
with the model's tokenizer (documents separated) and its suffix array. Each step the longest
suffix of the context (root included, at most `rest_max_suffix` = 16 tokens, the paper's longest
query) that occurs in the corpus is looked up; the tokens that followed its occurrences (at most
`rest_candidates` = 5000, each `rest_tokens` = 10 long) are merged into a trie with counts, and
the draft tree is its best-first top by frequency (count / retrieved, the paper's trie selection),
at most `rest_nodes` = 64 nodes (the paper's draft budget), verified by the shared loop.

What differs from the paper:
- the suffix array is sorted on the first `rest_max_suffix` tokens of each suffix only (all a
  query of that length needs), with numpy's lexsort, instead of a full suffix array (DraftRetriever);
- the corpus: `medusa-bench datastore build` reads a ShareGPT jsonl (assistant answers, e.g.
  `medusa-bench distill`'s output) or plain text, and refuses benchmark-question files; the
  paper's datastores are UltraChat / The Stack;
- on a CPU a 64-node verify costs several one-token steps, so by default the drafted nodes are the
  best-scoring prefix that pays against prompt lookup's step-time profile (as `suffix`,
  decoders/suffix.py `choose_prefix`), possibly none; `DecoderOptions(extra={"rest_adaptive":
  False})` drafts the whole tree as the paper does.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from medusa_bench.decoders.options import DecoderOptions, Option, declare, within
from medusa_bench.decoders.pld import StepCosts
from medusa_bench.decoders.registry import DraftsWhatPays, entry, register
from medusa_bench.decoders.samd import SEPARATOR, corpus_texts
from medusa_bench.decoders.spec import Draft, Proposer, SpeculativeDecoder
from medusa_bench.decoders.suffix import SuffixTrie, draft_under, grow
from medusa_bench.errors import UserError

SORT_DEPTH = 16  # suffixes are sorted on this many tokens: the longest query


# ------------------------------------------------------------------------------ the datastore
@dataclass
class Datastore:
    tokens: np.ndarray  # [N] int64 token ids, documents separated by SEPARATOR
    suffixes: np.ndarray  # [N] int64 start positions, sorted by the SORT_DEPTH tokens from there
    tokenizer: str = ""
    vocab_size: int = 0

    def __post_init__(self):
        self._list = self.tokens.tolist()  # slices of a list compare fast in bisect
        self._order = self.suffixes.tolist()

    def occurrences(self, query: list[int]) -> tuple[int, int]:
        """[lo, hi) of the suffix array whose suffixes start with `query` (len ≤ SORT_DEPTH)."""
        n = len(query)
        key = lambda i: self._list[i:i + n]  # noqa: E731
        order = self._order
        lo = bisect_left(order, query, key=key)
        hi = bisect_right(order, query, lo=lo, key=key)
        return lo, hi

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, tokens=self.tokens, suffixes=self.suffixes,
                     meta=np.array(json.dumps({"tokenizer": self.tokenizer, "vocab_size": self.vocab_size,
                                               "sort_depth": SORT_DEPTH})))

    @classmethod
    def load(cls, path: Path) -> "Datastore":
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"--rest-datastore {path}: file not found; build one with `medusa-bench datastore build`")
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            return cls(data["tokens"].astype(np.int64), data["suffixes"].astype(np.int64), meta.get("tokenizer", ""),
                       int(meta.get("vocab_size", 0)))


def suffix_array(tokens: np.ndarray, depth: int = SORT_DEPTH) -> np.ndarray:
    """Start positions sorted by the `depth` tokens from each (shorter ones, at the end, padded low)."""
    n = len(tokens)
    padded = np.concatenate([tokens, np.full(depth, -2, dtype=np.int64)])
    keys = [padded[j:j + n] for j in range(depth - 1, -1, -1)]  # lexsort: the last key is the primary
    return np.lexsort(keys).astype(np.int64)


def build_datastore(tokenizer, source: Path, out: Path) -> Datastore:
    """Tokenize `source`'s texts (samd.corpus_texts: ShareGPT answers or plain text), index, save to `out`."""
    ids: list[int] = []
    for text in corpus_texts(Path(source)):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(SEPARATOR)
    tokens = np.array(ids, dtype=np.int64)
    store = Datastore(tokens, suffix_array(tokens), getattr(tokenizer, "name_or_path", ""), len(tokenizer))
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    store.save(out)
    return store


_LOADED: dict[tuple, Datastore] = {}


def load_datastore(path: str) -> Datastore:
    """One copy per file per process."""
    resolved = Path(path).expanduser().resolve()
    stat = os.stat(resolved) if resolved.is_file() else None
    key = (str(resolved), stat.st_size if stat else 0, stat.st_mtime_ns if stat else 0)
    if key not in _LOADED:
        _LOADED[key] = Datastore.load(resolved)
    return _LOADED[key]


# ------------------------------------------------------------------------------ retrieval
def retrieve(store: Datastore, context: list[int], max_suffix: int, candidates: int, length: int) -> tuple[SuffixTrie, int]:
    """The trie (with counts) of what followed the longest context suffix found, and that suffix's length (0: none)."""
    trie = SuffixTrie(length)
    for n in range(min(max_suffix, SORT_DEPTH, len(context)), 0, -1):
        lo, hi = store.occurrences(context[-n:])
        if lo == hi:
            continue
        tokens = store._list
        for start in store._order[lo:min(hi, lo + candidates)]:
            continuation = tokens[start + n:start + n + length]
            if SEPARATOR in continuation:
                continuation = continuation[:continuation.index(SEPARATOR)]
            if continuation:
                _insert(trie, continuation)
        return trie, n
    return trie, 0


def _insert(trie: SuffixTrie, tokens: list[int]) -> None:
    """One retrieved continuation: counts along its path (the root counts continuations)."""
    node = 0
    trie.count[0] += 1
    for token in tokens:
        child = trie.children[node].get(token)
        if child is None:
            child = len(trie.children)
            trie.children.append({})
            trie.count.append(0)
            trie.children[node][token] = child
        trie.count[child] += 1
        node = child


# ------------------------------------------------------------------------------ the proposer
class RestProposer(Proposer):
    def __init__(self, store: Datastore, max_suffix: int = 16, candidates: int = 5000, length: int = 10,
                 nodes: int = 64, adaptive: bool = True, device: torch.device = torch.device("cpu"),
                 profile: Optional[dict] = None):
        self.store, self.max_suffix, self.candidates, self.length, self.nodes = store, max_suffix, candidates, length, nodes
        self.adaptive, self.device = adaptive, device
        self.draft_size = nodes
        self.costs = StepCosts(profile)

    def propose(self, root: int, hidden: Optional[torch.Tensor], context: list[int]) -> Optional[Draft]:
        trie, matched = retrieve(self.store, context + [root], self.max_suffix, self.candidates, self.length)
        if not matched:
            return None
        tree = grow(trie, 0, self.nodes, 0.0)
        return draft_under(root, tree, self.costs if self.adaptive else None, self.device)


# ------------------------------------------------------------------------------ the decoder
declare(
    Option("rest_datastore", None, "REST: the datastore file (`medusa-bench datastore build --from FILE --out PATH`).",
           kind=str),
    Option("rest_max_suffix", 16, "REST: longest context suffix looked up.", check=within(1, SORT_DEPTH, integer=True)),
    Option("rest_candidates", 5000, "REST: most retrieved continuations merged into the trie.",
           check=within(1, 1_000_000, integer=True)),
    Option("rest_tokens", 10, "REST: tokens per retrieved continuation (the tree's depth).", check=within(1, 64, integer=True)),
    Option("rest_nodes", 64, "REST: most nodes in the draft tree.", check=within(1, 256, integer=True)),
)


uses_step_profile = DraftsWhatPays("rest")


@register("rest", step_profile=uses_step_profile, requires=(
    ("rest_datastore", "build one with `medusa-bench datastore build --from FILE --out PATH` (a corpus of training answers)"),))
def build_rest(loaded, options: DecoderOptions):
    """REST over `--rest-datastore`; drafts only what pays by `options.extra["step_profile"]`."""
    entry("rest").check_required(options)
    store = load_datastore(options.rest_datastore)
    vocab = len(loaded.tokenizer)
    if store.vocab_size and store.vocab_size != vocab:
        raise UserError(f"--rest-datastore {options.rest_datastore} was built with another tokenizer "
                        f"({store.tokenizer!r}, {store.vocab_size} tokens; this model's has {vocab}); build it again")
    adaptive = uses_step_profile(options)
    profile = options.extra.get("step_profile") if adaptive else None
    proposer = RestProposer(store, options.rest_max_suffix, options.rest_candidates, options.rest_tokens,
                            options.rest_nodes, adaptive=adaptive, device=loaded.device, profile=profile)
    decoder = SpeculativeDecoder("rest", loaded, proposer)
    decoder.step_profile = profile
    return decoder
