"""Run folders on disk: run.json and append-only JSONL files that survive a kill.

Every long job appends one whole line per finished unit of work (a question's answer, a
judgment) and re-reads the file on start to skip what is done. A line cut short by a kill is
dropped on the next open, so a file never holds a half-written record.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Iterable, Iterator

from medusa_bench.errors import UserError

RUN_FILE = "run.json"
ANSWER_DIR = "model_answer"
JUDGMENT_DIR = "model_judgment"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def ensure_writable_dir(path: Path) -> Path:
    """Create `path` (and parents) or fail with one line that names it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write to output folder {path}: {error.strerror or error}; pass --out to a writable folder") from None
    return path


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON (line {error.lineno}): fix or delete it") from None


def write_json(path: Path, data: Any) -> None:
    """Write atomically (temp file + rename) so a kill never leaves half a JSON file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def repair_jsonl(path: Path) -> None:
    """Drop a trailing partial line (no newline, or not JSON) left by a killed writer."""
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    if not data:
        return
    keep = len(data)
    if not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    else:
        last_start = data.rfind(b"\n", 0, len(data) - 1) + 1
        try:
            json.loads(data[last_start:])
        except ValueError:
            keep = last_start
    if keep != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(keep)


def read_jsonl(path: Path) -> list[dict]:
    """Read all records; a bad line other than a cut-off last one is a clear error."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if not line.endswith("\n"):
                    break  # a line cut short by a kill: ignored, repaired on the next append
                raise UserError(f"{path} line {number} is not valid JSON: fix or delete that line") from None
    return records


def append_jsonl(path: Path, record: dict) -> None:
    """Append one record as one write of one whole line, flushed to disk."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with open(path, "ab") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def rewrite_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Replace a JSONL file's contents atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        for record in records:
            handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def iter_answer_files(run_dir: Path) -> Iterator[Path]:
    yield from sorted((Path(run_dir) / ANSWER_DIR).glob("*.jsonl"))


def answer_path(run_dir: Path, model_id: str) -> Path:
    return Path(run_dir) / ANSWER_DIR / f"{model_id}.jsonl"


def load_run(run_dir: Path) -> dict:
    """run.json of a run folder, with a clear error when the folder is not a run."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if not path.exists():
        raise UserError(f"{run_dir} is not a medusa-bench run folder (no {RUN_FILE}); pass the folder given to `run --out`")
    return read_json(path)


def load_answers(run_dir: Path) -> dict[str, list[dict]]:
    """All answers of a run, keyed by model_id (one answer file per decoder)."""
    return {path.stem: read_jsonl(path) for path in iter_answer_files(run_dir)}


def git_hash(start: Path | None = None) -> str | None:
    """The medusa-bench checkout's commit (with '-dirty' when it has local changes), if any."""
    where = Path(start or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where, capture_output=True, text=True, timeout=5)
        return commit.stdout.strip() + ("-dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions(names: Iterable[str] = ("medusa-bench", "torch", "transformers", "accelerate", "fschat", "openai", "pandas", "numpy")) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version
    import platform

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions
