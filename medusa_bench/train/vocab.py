"""Token frequencies of the training answers → the draft vocabulary heads draft among.

Drafting cost is dominated by the heads' vocab projection; drafting only among frequent
tokens (FR-Spec, Zhao et al. 2025) makes it several times cheaper, and verification keeps
decoding lossless. The file lists the tokens seen in the answers, most frequent first; a
reader wanting more goes on with the unseen ids in id order (heads/common.with_unlisted_ids),
so any prefix is a valid draft vocabulary. Listing only the seen ones keeps the file ~70 KB
instead of 333 KB for SmolLM2's 49,152 tokens.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from medusa_bench.heads.common import DRAFT_VOCAB_FILE, with_unlisted_ids
from medusa_bench.train.data import messages_of, read_records


def count_answer_tokens(data_path: Path, tokenizer) -> Counter:
    """Counts of the tokens in every assistant turn of the training data (what `--data` takes:
    ShareGPT/FastChat jsonl, a JSON list, or a distillation pack folder)."""
    counts: Counter = Counter()
    for record in read_records(Path(data_path)):
        for turn in messages_of(record):
            if turn["role"] == "assistant":
                counts.update(tokenizer(turn["content"], add_special_tokens=False)["input_ids"])
    return counts


def ranked_tokens(data_path: Path, tokenizer, vocab_size: int, eos_token_ids=()) -> tuple[list[int], Counter]:
    """(every token id, most frequent in the answers first, EOS first of all; the counts)."""
    counts = count_answer_tokens(data_path, tokenizer)
    for token in eos_token_ids:  # answers always end with EOS: keep it draftable
        counts[token] += 1 + max(counts.values(), default=0)
    seen = [token for token, _ in counts.most_common()]
    return with_unlisted_ids(seen, vocab_size), counts


def write_draft_vocab(data_path: Path, tokenizer, folder: Path, vocab_size: int, eos_token_ids=()) -> Path:
    """Write `draft_vocab.json` (the ids seen in the answers, most frequent first) into a heads folder."""
    ids, counts = ranked_tokens(data_path, tokenizer, vocab_size, eos_token_ids)
    ids = ids[: len(counts)]
    path = Path(folder) / DRAFT_VOCAB_FILE
    path.write_text(json.dumps({"source": str(data_path), "distinct_tokens_seen": len(counts),
                                "answer_tokens": sum(counts.values()), "token_ids": ids}) + "\n")
    return path
