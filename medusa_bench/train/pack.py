"""Distillation packs: self-distilled training data that outlives the machine that made it.

A pack is a folder of sealed part files, part-00000.jsonl.xz, part-00001.jsonl.xz, …: lzma
compressed JSONL, each written once (temp file, then a link that refuses an existing name) and
never modified, so a pack committed to git only ever gains files. Reading it is reading the
sorted parts; there is no manifest to keep in step.

A part's first line is its header (format, model, tokenizer, vocabulary size), so a pack of
another model is refused. Each further line is one `distill` record with its messages stored
compactly, in order (user, assistant, user, …):

- an answer: the token ids the model generated, {"ids": [...]};
- a user turn from a file under the shared data folder: a reference, {"ref": k}, turn k of the
  record `origin` = [path relative to the data folder, record index]. The data sets (licensed,
  megabytes) are never copied into the repo;
- a user turn the model wrote (follow-up questions, bootstrapped tasks): its token ids;
- {"text": ...} only for a turn whose ids would not decode back to the same text.

Reading resolves the references and decodes the ids with the model's tokenizer, giving back the
records `distill` wrote (text), so every trainer reads a pack like a JSONL file.
"""

from __future__ import annotations

import json
import lzma
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

from medusa_bench.errors import UserError
from medusa_bench.paths import cache_dir

# Conversations per part. A part is sealed only when full (or on `pack seal --final`), so a lost
# machine loses at most PART_SIZE - 1 conversations (about 25k answer tokens at 400 a
# conversation). Bigger parts compress better, slowly: 0.97 bytes per token at 64 on GSM8K text
# tokenised by SmolLM2, 0.93 at 128, 0.89 at 256 (xz -9e).
PART_SIZE = 64
FORMAT = 1
PART_GLOB = "part-*.jsonl.xz"
USER_ROLES = ("human", "user")
# Reads a data file: the user turns of each of its records (train/data.py knows the formats).
TurnsIn = Callable[[Path], list[list[str]]]


# ------------------------------------------------------------------------------ the shared data folder


def data_roots() -> list[Path]:
    """Where shared data sets are found, as for the benchmark files (inputs/questions.py):
    $MEDUSA_BENCH_DATA, then the user cache."""
    env = os.environ.get("MEDUSA_BENCH_DATA")
    return ([Path(env).expanduser()] if env else []) + [cache_dir() / "data"]


def data_reference(path: Path) -> Optional[str]:
    """`path` relative to the data folder holding it (a posix path), or None for a file outside."""
    resolved = Path(path).expanduser().resolve()
    for root in data_roots():
        if resolved.is_relative_to(root.resolve()):
            return resolved.relative_to(root.resolve()).as_posix()
    return None


class DataFiles:
    """The user turns of records in shared data files, each file read once."""

    def __init__(self, turns_in: TurnsIn):
        self.turns_in = turns_in
        self.files: dict[str, list[list[str]]] = {}

    def turn(self, origin: list, k: int) -> Optional[str]:
        """User turn k of record `origin` = [file, index]; None where the record has no such turn."""
        name, index = origin
        if name not in self.files:
            self.files[name] = self.turns_in(self.locate(name))
        turns = self.files[name]
        return turns[index][k] if index < len(turns) and k < len(turns[index]) else None

    @staticmethod
    def locate(name: str) -> Path:
        roots = data_roots()
        for root in roots:
            if (root / name).is_file():
                return root / name
        raise UserError(f"the pack refers to {name}, not found under {' or '.join(map(str, roots))}: "
                        "set MEDUSA_BENCH_DATA to the shared data folder (the one holding self_instruct/ and gsm8k/)")


# ------------------------------------------------------------------------------ messages ↔ compact turns


def decode_answer(tokenizer, ids: list[int]) -> str:
    """Generated ids → the answer text `distill` stores (the one rule, shared by writing and reading)."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


class Codec:
    """Encodes a record's messages as ids and references, and decodes them back to text."""

    def __init__(self, tokenizer, data: DataFiles):
        self.tokenizer, self.data = tokenizer, data

    def encode(self, text: str, ids: Optional[list[int]] = None, origin: Optional[list] = None, k: int = 0) -> dict:
        if origin is not None and self.data.turn(origin, k) == text:
            return {"ref": k}
        if ids is None or decode_answer(self.tokenizer, ids) != text:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        return {"ids": ids} if decode_answer(self.tokenizer, ids) == text else {"text": text}

    def decode(self, turn: dict, origin: Optional[list]) -> str:
        if "ids" in turn:
            return decode_answer(self.tokenizer, turn["ids"])
        if "ref" in turn:
            text = self.data.turn(origin, turn["ref"])
            if text is None:
                raise UserError(f"{origin[0]} has no record {origin[1]} with user turn {turn['ref']}: the data file "
                                "changed since the pack was sealed; point MEDUSA_BENCH_DATA at the original data sets")
            return text
        return turn["text"]


def pack_record(record: dict, codec: Codec) -> dict:
    """A `distill` record (ShareGPT text, answer_ids, origin) → its compact line."""
    messages = record["conversations"]
    if [m["from"] in USER_ROLES for m in messages] != [i % 2 == 0 for i in range(len(messages))]:
        raise UserError(f"record {record.get('id')} does not alternate user and assistant turns: only `distill` output packs")
    answer_ids = record.get("answer_ids") or []
    turns = []
    for i, message in enumerate(messages):
        if i % 2 == 0:
            turns.append(codec.encode(message["value"], origin=record.get("origin"), k=i // 2))
        else:
            ids = answer_ids[i // 2] if i // 2 < len(answer_ids) else None
            turns.append(codec.encode(message["value"], ids=ids))
    return {**{k: v for k, v in record.items() if k not in ("conversations", "answer_ids")}, "turns": turns}


def unpack_record(line: dict, codec: Codec) -> dict:
    """A compact line → the `distill` record it was sealed from (answer_ids where every answer is ids)."""
    turns = line["turns"]
    texts = [codec.decode(turn, line.get("origin")) for turn in turns]
    messages = [{"from": "human" if i % 2 == 0 else "gpt", "value": text} for i, text in enumerate(texts)]
    record = {**{k: v for k, v in line.items() if k != "turns"}, "conversations": messages}
    answers = turns[1::2]
    if answers and all("ids" in t for t in answers):
        record["answer_ids"] = [t["ids"] for t in answers]
    return record


# ------------------------------------------------------------------------------ parts on disk


def parts(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob(PART_GLOB))


def read_part(path: Path) -> tuple[dict, list[dict]]:
    """(header, compact lines) of one sealed part."""
    header = read_header(path)
    try:
        with lzma.open(path, "rt", encoding="utf-8") as handle:
            lines = [json.loads(line) for line in handle if line.strip()]
    except (lzma.LZMAError, EOFError, json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is damaged: restore it from git (sealed parts never change)") from None
    return header, lines[1:]


def read_header(path: Path) -> dict:
    """A part's first line only (cheap: lzma streams)."""
    try:
        with lzma.open(path, "rt", encoding="utf-8") as handle:
            header = json.loads(handle.readline())
    except (lzma.LZMAError, EOFError, json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is damaged: restore it from git (sealed parts never change)") from None
    if not isinstance(header, dict) or header.get("pack") != FORMAT:
        raise UserError(f"{path} is not a medusa-bench distillation pack part (format {FORMAT})")
    return header


def pack_model(folder: Path, model: Optional[str] = None) -> Optional[dict]:
    """The header every part shares (None for an empty pack); refuses parts of two models, or not of `model`."""
    headers = [(path, read_header(path)) for path in parts(folder)]
    for path, header in headers:
        if header["model"] != (model or headers[0][1]["model"]):
            raise UserError(f"{path} holds {header['model']}'s conversations, not {model or headers[0][1]['model']}'s: "
                            "one pack per model; pass another pack folder")
    return headers[0][1] if headers else None


def sealed_ids(folder: Path, model: str) -> set[str]:
    """Ids of the conversations already sealed in the pack (`distill --pack` skips them)."""
    pack_model(folder, model)
    return {str(line["id"]) for path in parts(folder) for line in read_part(path)[1]}


def write_part(folder: Path, header: dict, lines: list[dict]) -> Path:
    """Seal one part: the next free number, written to a temp file, then linked in (never over a part)."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = parts(folder)
    number = int(existing[-1].name.split("-")[1].split(".")[0]) + 1 if existing else 0
    target = folder / f"part-{number:05d}.jsonl.xz"
    tmp = folder / f".{target.name}.{os.getpid()}.tmp"
    text = "".join(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n" for line in [header, *lines])
    with open(tmp, "wb") as handle:
        handle.write(lzma.compress(text.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, target)  # fails if another seal took the number: a part is never replaced
    except FileExistsError:
        raise UserError(f"{target} appeared while sealing (two seals at once?): re-run to seal the rest") from None
    finally:
        tmp.unlink()
    return target


def seal(records: list[dict], folder: Path, tokenizer, model: str, spec: str, turns_in: TurnsIn,
         final: bool = False) -> list[Path]:
    """Seal the records not yet in the pack, PART_SIZE a part; `final` also seals a last, partial part.

    `records`: `distill`'s output in file order. Returns the new parts (sealed ones are never touched).
    """
    folder = Path(folder)
    done = sealed_ids(folder, model)
    pending = [r for r in records if str(r["id"]) not in done]
    others = {r.get("model") for r in pending} - {model, None}
    if others:
        raise UserError(f"the records hold {sorted(others)[0]}'s answers, not {model}'s: one pack per model")
    codec = Codec(tokenizer, DataFiles(turns_in))
    header = {"pack": FORMAT, "model": model, "tokenizer": spec, "vocab": len(tokenizer)}
    full = len(pending) - len(pending) % PART_SIZE if not final else len(pending)
    return [write_part(folder, header, [pack_record(r, codec) for r in pending[begin: begin + PART_SIZE]])
            for begin in range(0, full, PART_SIZE)]


# ------------------------------------------------------------------------------ reading


def read_pack(folder: Path, turns_in: TurnsIn, tokenizer=None) -> list[dict]:
    """Every sealed conversation as the `distill` record it was (ShareGPT text), in part order.

    `tokenizer`: the model's, where the caller has it loaded; else loaded from the parts' header.
    """
    folder = Path(folder).expanduser()
    header = pack_model(folder)
    if header is None:
        raise UserError(f"{folder} holds no {PART_GLOB} parts: pass a distillation pack folder or a ShareGPT jsonl")
    codec = Codec(tokenizer or pack_tokenizer(header["tokenizer"], header["vocab"]), DataFiles(turns_in))
    return [unpack_record(line, codec) for path in parts(folder) for line in read_part(path)[1]]


@lru_cache(maxsize=4)
def pack_tokenizer(spec: str, vocab: int):
    """The tokenizer a pack was sealed with (its header's model spec), checked by vocabulary size."""
    from transformers import AutoTokenizer

    from medusa_bench.models import resolve_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_source(spec)[0])
    if len(tokenizer) != vocab:
        raise UserError(f"{spec}'s tokenizer has {len(tokenizer)} tokens, the pack was sealed with {vocab}: not the same tokenizer")
    return tokenizer


def pack_info(folder: Path) -> dict:
    """Conversations, answer tokens, parts and bytes on disk (read without a tokenizer)."""
    paths = parts(folder)
    header = pack_model(folder)
    lines = [line for path in paths for line in read_part(path)[1]]
    return {"model": header["model"] if header else None, "conversations": len(lines),
            "answer_tokens": sum(sum(line.get("new_tokens", [])) for line in lines), "parts": len(paths),
            "bytes": sum(path.stat().st_size for path in paths)}
