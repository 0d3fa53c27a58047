"""Distillation packs (train/pack.py): sealed parts read back as the exact records `distill` wrote,
shared-data prompts stored as references (never copied), parts never rewritten, another model's
pack refused, `distill --pack` resuming from the pack alone, and the repo's pack within 20 MB."""

import json
import lzma
import os
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from medusa_bench.errors import UserError
from medusa_bench.results import files
from medusa_bench.train import distill as distill_module
from medusa_bench.train import pack
from medusa_bench.train.data import read_records, record_turns, user_turns_in
from medusa_bench.train.distill import describe_data, distill
from medusa_bench.train.prompts import FOLLOW_UPS, distilled_in

REPO_PACKS = REPO / "data" / "distill"
MAX_REPO_PACK_BYTES = 20_000_000  # issue #36: what the repo keeps of distilled data, in all


@pytest.fixture
def parts_of_two(monkeypatch):
    """Parts of 2 conversations, so a few records make several parts (64 in real packs)."""
    monkeypatch.setattr(pack, "PART_SIZE", 2)
    monkeypatch.setattr(distill_module, "PART_SIZE", 2)


@pytest.fixture(scope="module")
def gsm8k() -> Path:
    path = Path(os.environ.get("MEDUSA_BENCH_DATA", "")) / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip("gsm8k/train.jsonl not found under MEDUSA_BENCH_DATA")
    return path


def answer(tokenizer, text):
    """What distill stores for an answer the model generated as these ids."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return pack.decode_answer(tokenizer, ids), ids


def records_like_distills(tokenizer, gsm8k, n=3):
    """distill-shaped records: gsm8k questions by reference (+ a generic follow-up), a model-written task by ids."""
    questions = [record_turns(r)[0] for r in files.read_jsonl(gsm8k)[:n]]
    records = []
    for i, question in enumerate(questions):
        first, first_ids = answer(tokenizer, f" She sold {i + 48} clips in all.\n\n#### {i}  ")
        second, second_ids = answer(tokenizer, "In short: 72 clips — 48 in April, 24 in May. ✓")
        records.append({"id": f"train:{i}", "source": "train.jsonl", "model": "smollm2-135m", "dtype": "float32",
                        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": first},
                                          {"from": "human", "value": FOLLOW_UPS[i]}, {"from": "gpt", "value": second}],
                        "finish": ["stop", "length"], "new_tokens": [len(first_ids), len(second_ids)],
                        "answer_ids": [first_ids, second_ids], "follow_up": "generic", "origin": ["gsm8k/train.jsonl", i]})
    text, ids = answer(tokenizer, "Tea is warm; the kettle hums softly.")
    records.append({"id": "bootstrap:0", "source": "bootstrap.jsonl", "model": "smollm2-135m", "dtype": "float32",
                    "conversations": [{"from": "human", "value": "Write a haiku about tea."}, {"from": "gpt", "value": text}],
                    "finish": ["stop"], "new_tokens": [len(ids)], "answer_ids": [ids]})
    return records


def seal_records(smollm, records, folder, final=False, model="smollm2-135m"):
    return pack.seal(records, folder, smollm.tokenizer, model, "smollm2-135m", user_turns_in, final=final)


def part_lines(path):
    with lzma.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


# ------------------------------------------------------------------------------ format


def test_a_pack_reads_back_the_records_distill_wrote(smollm, gsm8k, tmp_path, parts_of_two):
    records = records_like_distills(smollm.tokenizer, gsm8k)
    folder = tmp_path / "pack"
    sealed = seal_records(smollm, records, folder, final=True)
    assert [p.name for p in sealed] == ["part-00000.jsonl.xz", "part-00001.jsonl.xz"]
    assert read_records(folder) == records  # the trainers' reader, tokenizer from the parts' header
    header, *lines = part_lines(sealed[0])
    assert header == {"pack": 1, "model": "smollm2-135m", "tokenizer": "smollm2-135m", "vocab": len(smollm.tokenizer)}
    assert lines[0]["turns"][0] == {"ref": 0} and "ids" in lines[0]["turns"][1]  # the data set is referred to, not copied
    assert "ids" in lines[0]["turns"][2]  # a follow-up not in the data file: its token ids
    assert records[0]["conversations"][0]["value"][:30] not in lzma.decompress(sealed[0].read_bytes()).decode()
    assert "ids" in part_lines(sealed[1])[-1]["turns"][0]  # a prompt from outside the data folder: ids
    assert [p.answer_ids for p in distilled_in(folder)] == [r["answer_ids"] for r in records]  # --extend reads a pack
    info = pack.pack_info(folder)
    assert info["conversations"] == 4 and info["parts"] == 2 and info["answer_tokens"] == sum(sum(r["new_tokens"]) for r in records)
    assert info["bytes"] == sum(p.stat().st_size for p in sealed)


def test_a_missing_data_file_says_set_medusa_bench_data(smollm, gsm8k, tmp_path, monkeypatch):
    folder = tmp_path / "pack"
    seal_records(smollm, records_like_distills(smollm.tokenizer, gsm8k, n=1), folder, final=True)
    monkeypatch.setenv("MEDUSA_BENCH_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv("MEDUSA_BENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="gsm8k/train.jsonl, not found .* set MEDUSA_BENCH_DATA"):
        pack.read_pack(folder, user_turns_in, tokenizer=smollm.tokenizer)


def test_a_pack_of_another_model_is_refused(smollm, gsm8k, tmp_path):
    records = [{**r, "model": "other-1b"} for r in records_like_distills(smollm.tokenizer, gsm8k, n=1)]
    folder = tmp_path / "pack"
    seal_records(smollm, records, folder, final=True, model="other-1b")
    with pytest.raises(UserError, match="holds other-1b's conversations, not smollm2-135m's"):
        seal_records(smollm, records_like_distills(smollm.tokenizer, gsm8k, n=1), folder)
    with pytest.raises(UserError, match="holds other-1b's conversations, not smollm2-135m's"):
        distill(smollm, [gsm8k], tmp_path / "out.jsonl", limit=1, max_new_tokens=1, pack=folder)
    with pytest.raises(UserError, match="other-1b's answers, not smollm2-135m's"):
        seal_records(smollm, records, tmp_path / "fresh")


def test_sealing_again_never_rewrites_a_part(smollm, gsm8k, tmp_path, parts_of_two):
    records = records_like_distills(smollm.tokenizer, gsm8k, n=4)  # 5 records
    folder = tmp_path / "pack"
    assert len(seal_records(smollm, records[:3], folder)) == 1  # the third waits for a full part
    first = folder / "part-00000.jsonl.xz"
    before = (first.stat().st_mtime_ns, first.read_bytes())
    assert [p.name for p in seal_records(smollm, records[:4], folder)] == ["part-00001.jsonl.xz"]
    assert seal_records(smollm, records[:4], folder) == []  # nothing new: nothing written
    assert [p.name for p in seal_records(smollm, records, folder, final=True)] == ["part-00002.jsonl.xz"]
    assert seal_records(smollm, records, folder, final=True) == []
    assert (first.stat().st_mtime_ns, first.read_bytes()) == before
    assert [r["id"] for r in read_records(folder)] == [r["id"] for r in records]
    assert not [p for p in folder.iterdir() if not p.name.startswith("part-")]  # no temp files left


# ------------------------------------------------------------------------------ distill --pack


def test_distill_into_a_pack_resumes_on_a_new_machine(smollm, gsm8k, tmp_path, parts_of_two, capsys, monkeypatch):
    tasks = tmp_path / "bootstrap.jsonl"  # outside the data folder, like `instructions`' output
    tasks.write_text(json.dumps({"id": "t", "instruction": "Name a colour.", "instances": []}) + "\n")
    folder, out = tmp_path / "pack", tmp_path / "machine1.jsonl"
    first = distill(smollm, [gsm8k, tasks], out, limit=2, max_new_tokens=2, batch_size=3, pack=folder)
    assert first.written == 3 and [p.name for p in first.sealed] == ["part-00000.jsonl.xz"]
    written = {r["id"]: r for r in files.read_jsonl(out)}
    assert written["train:0"]["origin"] == ["gsm8k/train.jsonl", 0] and "origin" not in written["bootstrap:t"]
    assert all(len(r["answer_ids"][0]) == r["new_tokens"][0] for r in written.values())
    out.unlink()  # the machine is replaced: only the pack survives
    second = distill(smollm, [gsm8k, tasks], tmp_path / "machine2.jsonl", limit=2, max_new_tokens=2, batch_size=3, pack=folder)
    assert second.skipped == 2 and second.written == 1 and second.sealed == []  # only the unsealed one again
    code, stdout, stderr = run_cli(capsys, monkeypatch, "pack", "seal", "--out", tmp_path / "machine2.jsonl", "--pack", folder, "--final")
    stderr = " ".join(stderr.split())  # rich wraps long lines
    assert code == 0 and "1 parts sealed now" in stderr and "3 conversations of smollm2-135m" in stderr
    assert {r["id"]: r for r in read_records(folder)} == {**written, **{r["id"]: r for r in files.read_jsonl(tmp_path / "machine2.jsonl")}}
    assert describe_data(folder)["conversations"] == 3
    code, _, stderr = run_cli(capsys, monkeypatch, "pack", "info", folder)
    assert code == 0 and "2 parts" in stderr


# ------------------------------------------------------------------------------ the repo's pack


def test_the_repo_pack_stays_within_20_mb():
    """Sealed parts are committed once and kept: the budget is for all of them, every model."""
    found = [p for p in REPO_PACKS.rglob("*") if p.is_file()] if REPO_PACKS.is_dir() else []
    assert sum(p.stat().st_size for p in found) <= MAX_REPO_PACK_BYTES
    assert all(p.name.startswith("part-") and p.name.endswith(".jsonl.xz") for p in found)
