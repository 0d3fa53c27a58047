"""Run folders on disk: run.json and append-only JSONL files that survive a kill.

Every long job appends one whole line per finished unit of work (a question's answer, a
judgment) and re-reads the file on start to skip what is done. `append_jsonl` is the one
writer: before each append it drops a line cut short by a kill (or terminates a complete one
saved without a newline), so a file never holds a half-written or glued record.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import uuid
import weakref
from pathlib import Path
from typing import Any, Iterable, Iterator

from medusa_bench.errors import UserError

RUN_FILE = "run.json"
ANSWER_DIR = "model_answer"
JUDGMENT_DIR = "model_judgment"


_BASE57 = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def answer_id() -> str:
    """A FastChat-style answer id (shortuuid's alphabet and 22 characters), without the dependency."""
    number, letters = uuid.uuid4().int, []
    for _ in range(22):
        number, digit = divmod(number, 57)
        letters.append(_BASE57[digit])
    return "".join(letters)


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
    """Make the file end on a whole record before anything is appended to it.

    Only the last line can be torn: every record is written as one `write` of a whole line, so
    a kill leaves a prefix of that line. An unterminated last line that is a complete JSON
    object (a hand edit saved without a final newline) gets its newline; one that is not is
    dropped. A newline-terminated bad line was not torn by a kill (the newline is the last byte
    written), so it is reported with its line number instead of silently dropped.
    """
    path = Path(path)
    try:
        handle = open(path, "r+b")
    except FileNotFoundError:
        return
    with handle:
        size = handle.seek(0, os.SEEK_END)
        start, line = _last_line(handle, size)
        if not line.strip():
            return
        complete = _is_record(line)
        if line.endswith(b"\n"):
            if not complete:
                handle.seek(0)
                number = handle.read(start).count(b"\n") + 1
                raise UserError(f"{path} line {number} is not valid JSON: fix or delete that line")
        elif complete:
            handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        else:
            handle.truncate(start)
            handle.flush()
            os.fsync(handle.fileno())


def _last_line(handle, size: int, chunk: int = 1 << 16) -> tuple[int, bytes]:
    """(offset, bytes) of the file's last line, newline included; read backwards, not whole."""
    end = size - 1 if size else 0  # a final newline belongs to the last line
    pos, tail = end, b""
    while pos > 0:
        step = min(chunk, pos)
        pos -= step
        handle.seek(pos)
        tail = handle.read(step) + tail
        cut = tail.rfind(b"\n")
        if cut >= 0:
            start = pos + cut + 1
            break
    else:
        start = 0
    handle.seek(start)
    line = handle.read(size - start)
    handle.seek(0, os.SEEK_END)
    return start, line


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # includes UnicodeDecodeError: a multi-byte character cut in half
        return False


def read_jsonl(path: Path) -> list[dict]:
    """Read all records; a bad line other than a cut-off last one is a clear error."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, "rb") as handle:  # bytes: a torn last line may end inside a UTF-8 character
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                if not line.endswith(b"\n"):
                    break  # a line cut short by a kill: ignored, repaired on the next append
                raise UserError(f"{path} line {number} is not valid JSON: fix or delete that line") from None
    return records


def append_jsonl(path: Path, record: dict) -> None:
    """The one append-only writer: repair the tail, then one write of one whole line, fsynced.

    Repairing on every append (it reads only the last line) means no caller can glue a record
    onto a torn or unterminated line, whatever left it there.
    """
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    repair_jsonl(path)
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
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX: the directory entry lives in the folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ run folder lock
LOCK_FILE = ".lock"
_held: "weakref.WeakValueDictionary[str, RunLock]" = weakref.WeakValueDictionary()


class RunLock:
    """An exclusive `flock` on RUN/.lock, held while this object lives (the OS drops it when the
    process dies, even by SIGKILL, so a crash never leaves a stale lock behind)."""

    def __init__(self, handle):
        self.handle = handle

    def release(self) -> None:
        if not self.handle.closed:
            self.handle.close()  # closing the descriptor releases the flock

    def __del__(self):
        self.release()


def lock_run_dir(run_dir: Path) -> RunLock:
    """Take the run folder's lock, or fail at once naming the process that holds it.

    Keep the returned object alive while writing; it releases when dropped. Re-entrant within
    one process (a flock is per open file, so a second open here would block on ourselves).
    """
    import fcntl

    path = (Path(run_dir) / LOCK_FILE).resolve()
    held = _held.get(str(path))
    if held is not None and not held.handle.closed:
        return held
    handle = open(path, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        pid = handle.read().strip() or "unknown"
        handle.close()
        raise UserError(f"{Path(run_dir)} is in use by another medusa-bench process (PID {pid}); "
                        "wait for it to finish or stop it, or use another folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    lock = RunLock(handle)
    _held[str(path)] = lock
    return lock


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
