"""Training data for heads: ShareGPT conversations → token ids, assistant masks, cached hidden states.

A conversation is rendered with the model's own chat template (the one decoding uses), so the
heads see the same token sequences at training and at decoding time. Loss is on assistant
tokens only (plus the end-of-turn token the model emits after them). The base model is frozen
for Medusa-1, so its hidden states are computed once per sequence and kept on disk: every
epoch, and the next command on the same data (Medusa-2's teacher), reuses them.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from medusa_bench.errors import UserError
from medusa_bench.heads import io
from medusa_bench.inputs.calibration import instruction_text

IGNORE = -100
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant", "chatgpt", "bard", "model")


@dataclass
class Sequence:
    """One tokenised conversation: ids [T] and a mask [T] that is True on assistant tokens."""

    ids: torch.Tensor  # LongTensor [T]
    mask: torch.Tensor  # BoolTensor [T]

    def __len__(self) -> int:
        return self.ids.numel()


@dataclass
class Positions:
    """Cached training examples for the heads: one row per position with any valid target.

    hidden [N, H] is the base model's last (post-norm) hidden state at position t;
    targets [N, K] holds the token at t + k + 2 for head k, IGNORE where it is no assistant token.
    """

    hidden: torch.Tensor  # [N, H]
    targets: torch.Tensor  # LongTensor [N, K]

    def __len__(self) -> int:
        return self.targets.shape[0]

    @property
    def tokens(self) -> int:
        """Valid targets of head 0 (the assistant tokens that train it)."""
        return int((self.targets[:, 0] != IGNORE).sum())


# ------------------------------------------------------------------------------ reading


def read_records(path: Path) -> list[dict]:
    """Records of a .jsonl file, a .json list (ShareGPT dumps are often one JSON array), or a
    distillation pack folder (train/pack.py: read back as the ShareGPT records `distill` wrote)."""
    path = Path(path).expanduser()
    if path.is_dir():
        from medusa_bench.train.pack import read_pack

        return read_pack(path, user_turns_in)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} is not valid JSON (line {error.lineno})") from None
        return [r for r in data if isinstance(r, dict)]
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(text.splitlines()) and not text.endswith("\n"):
                    break  # a last line cut short by a killed writer
                raise UserError(f"{path} line {number} is not valid JSON: fix or delete that line") from None
    return records


def messages_of(record: dict) -> list[dict]:
    """ShareGPT ({from, value}) or OpenAI-style ({role, content}) turns → [{role, content}]."""
    out = []
    for turn in record.get("conversations") or record.get("messages") or []:
        if not isinstance(turn, dict):
            continue
        role = str(turn.get("from", turn.get("role", ""))).lower()
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str):
            continue
        if role in USER_ROLES:
            out.append({"role": "user", "content": text})
        elif role in ASSISTANT_ROLES:
            out.append({"role": "assistant", "content": text})
        elif role == "system":
            out.append({"role": "system", "content": text})
    return out


def record_turns(record: dict) -> list[str]:
    """The user turns of one record: self_instruct, GSM8K, ShareGPT or OpenAI-style messages."""
    if "instruction" in record:  # self_instruct: instruction + the first instance's input, if any
        return [instruction_text(record)]
    if "question" in record:  # GSM8K
        return [str(record["question"]).strip()]
    return [m["content"].strip() for m in messages_of(record) if m["role"] == "user" and m["content"].strip()]


def user_turns_in(path: Path) -> list[list[str]]:
    """The user turns of every record of a prompt file (what a pack's references point into)."""
    return [record_turns(record) for record in read_records(path)]


def load_conversations(path: Path) -> list[list[dict]]:
    """Conversations with at least one assistant turn; a file with none is a UserError."""
    conversations = [m for m in map(messages_of, read_records(path)) if any(t["role"] == "assistant" for t in m)]
    if not conversations:
        raise UserError(f"{path} has no assistant turns: expected ShareGPT records like "
                        '{"conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}; make one with `medusa-bench distill`')
    return conversations


# ------------------------------------------------------------------------------ tokenising


def render(loaded, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text in the model's chat template (FastChat's when it has none)."""
    tokenizer = loaded.tokenizer
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    from fastchat.model import get_conversation_template

    conv = get_conversation_template(loaded.spec)
    for message in messages:
        if message["role"] == "system":
            conv.set_system_message(message["content"])
        else:
            conv.append_message(conv.roles[0 if message["role"] == "user" else 1], message["content"])
    if add_generation_prompt:
        conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def tokenize(loaded, messages: list[dict]) -> Sequence:
    """Token ids of the whole conversation and the mask of the assistant's tokens.

    Each assistant answer is located by character offsets in the rendered text; the
    end-of-turn token right after an answer is in the mask too (the model emits it).
    """
    tokenizer = loaded.tokenizer
    text = render(loaded, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or not message["content"].strip():
            continue
        prefix = render(loaded, messages[:i], add_generation_prompt=True)
        content = message["content"].strip()
        start = text.find(content, len(prefix) if text.startswith(prefix) else 0)
        if start >= 0:
            spans.append((start, start + len(content)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    mask = [any(s <= a < e for s, e in spans) for a, _ in offsets]
    eos = set(loaded.eos_token_ids)
    for t in range(1, len(ids)):
        if mask[t - 1] and not mask[t] and ids[t] in eos:
            mask[t] = True
    if not getattr(tokenizer, "chat_template", None) and tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids, mask = [tokenizer.bos_token_id] + ids, [False] + mask
    return Sequence(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool))


def load_sequences(loaded, path: Path, max_length: Optional[int] = None) -> list[Sequence]:
    """Tokenised conversations of a ShareGPT file, cut to `max_length` (default: the model's context).

    Longer sequences are truncated with one warning; sequences left without assistant tokens
    are dropped.
    """
    limit = min(max_length or loaded.context_length, loaded.context_length)
    conversations = load_conversations(path)
    sequences, cut = [], 0
    for messages in conversations:
        seq = tokenize(loaded, messages)
        if len(seq) > limit:
            cut += 1
            seq = Sequence(seq.ids[:limit], seq.mask[:limit])
        if seq.mask.any():
            sequences.append(seq)
    if cut:
        warnings.warn(f"{path}: {cut} of {len(conversations)} sequences are longer than {limit} tokens; truncated to {limit}",
                      stacklevel=2)
    if not sequences:
        raise UserError(f"{path}: no assistant tokens left after tokenising (are the answers empty?)")
    return sequences


def split_heldout(sequences: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, held-out) by whole sequences, shuffled with `seed`; at least one of each when possible."""
    if not 0 <= fraction < 1:
        raise UserError(f"--heldout must be in [0, 1), got {fraction}")
    order = list(range(len(sequences)))
    random.Random(seed).shuffle(order)
    n_held = min(max(round(len(sequences) * fraction), 1 if fraction > 0 else 0), len(sequences) - 1)
    held = [sequences[i] for i in sorted(order[:n_held])]
    train = [sequences[i] for i in sorted(order[n_held:])]
    return train, held


# ------------------------------------------------------------------------------ head targets


def head_targets(seq: Sequence, num_heads: int) -> torch.Tensor:
    """targets [T, K]: token at t + k + 2 for head k where that token is an assistant token, else IGNORE."""
    T = len(seq)
    targets = torch.full((T, num_heads), IGNORE, dtype=torch.long)
    for k in range(num_heads):
        shift = k + 2
        if T > shift:
            future = seq.ids[shift:]  # [T - shift]
            targets[: T - shift, k] = torch.where(seq.mask[shift:], future, torch.full_like(future, IGNORE))
    return targets


@torch.no_grad()  # not inference_mode: the result feeds autograd (head training) later
def last_hidden(model, ids: torch.Tensor, layers: tuple[int, ...] = ()) -> torch.Tensor:
    """ids [T] → the base model's last hidden state [T, H] (post-norm: lm_head(h) are the logits),
    or the hidden states of `layers` (transformers' hidden_states indices) concatenated [T, k * H]."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if not layers:
        return inner(input_ids=ids.unsqueeze(0).to(model.device)).last_hidden_state[0]
    states = inner(input_ids=ids.unsqueeze(0).to(model.device), output_hidden_states=True).hidden_states
    return torch.cat([states[i][0] for i in layers], dim=-1)


def base_hidden_states(loaded, sequences: list[Sequence], cache_folder=None,
                       on_sequence: Optional[Callable[[int], None]] = None,
                       layers: tuple[int, ...] = ()) -> list[torch.Tensor]:
    """The frozen base model's last hidden state [T, H] (fp32, CPU) of every sequence; with
    `layers`, those layers' hidden states concatenated [T, k * H] (EAGLE-3's features).

    One forward per sequence, each kept on disk under a hash of its token ids in a folder per
    model (default: the user cache; pass cache_folder=False for none). So a killed run resumes,
    and the next command on the same data (Medusa-2 after Medusa-1, a retrain) skips the forwards.
    `on_sequence(tokens)` is called for every sequence that needed a forward.
    """
    folder = None if cache_folder is False else hidden_cache_folder(loaded, cache_folder)
    hidden = []
    for seq in sequences:
        tag = "" if not layers else "-layers" + "_".join(map(str, layers))
        path = folder / f"{hashlib.sha256(seq.ids.numpy().tobytes()).hexdigest()[:32]}{tag}.safetensors" if folder else None
        h = _read_cached(path, len(seq))
        if h is None:
            h = last_hidden(loaded.model, seq.ids, tuple(layers)).float().cpu()
            if path is not None:
                partial = path.with_name(path.stem + ".partial.safetensors")
                io.save_tensors(partial, {"hidden": h})
                partial.replace(path)
            if on_sequence is not None:
                on_sequence(len(seq))
        hidden.append(h)
    return hidden


def hidden_cache_folder(loaded, cache_folder=None) -> Path:
    """<cache>/hidden/<model>-<hash of weights source, dtype, device>/"""
    from medusa_bench.models import cache_dir

    key = hashlib.sha256(f"{loaded.source}|{loaded.dtype}|{loaded.device.type}".encode()).hexdigest()[:12]
    folder = (Path(cache_folder) if cache_folder else cache_dir() / "hidden") / f"{loaded.name}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _read_cached(path: Optional[Path], length: int) -> Optional[torch.Tensor]:
    if path is None or not path.is_file():
        return None
    try:
        h = io.load_tensors(path).get("hidden")
    except UserError:  # a damaged cache file is recomputed
        return None
    return h if h is not None and h.shape[0] == length else None


def positions_of(sequences: list[Sequence], hidden: list[torch.Tensor], num_heads: int) -> Positions:
    """The rows of the cached hidden states that train at least one head, with their targets."""
    rows, targets = [], []
    for seq, h in zip(sequences, hidden):
        tgt = head_targets(seq, num_heads)  # [T, K]
        keep = (tgt != IGNORE).any(dim=1)  # [T]
        rows.append(h[keep])
        targets.append(tgt[keep])
    if not rows:
        return Positions(torch.empty(0, 0), torch.empty(0, num_heads, dtype=torch.long))
    return Positions(torch.cat(rows), torch.cat(targets))
