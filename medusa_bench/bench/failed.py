"""failed.jsonl: answers that failed after their retries, never a silent zero, until a re-run fills them.

One line per failed request: {"question_id", "decoder", "error", "tstamp"}. When a later run
stores that answer, the line gains "resolved": true and "resolved_tstamp" (the file is
rewritten atomically), so the file says which answers are still missing. A run that ends with
any still missing exits with ANSWERS_MISSING_EXIT (`run --help` says so).
"""

from __future__ import annotations

import time
from pathlib import Path

from medusa_bench.results import files

FAILED_FILE = "failed.jsonl"
# `medusa-bench run`'s exit code when the run finished but answers are missing (listed in
# failed.jsonl; the same command retries them). 2 is a refused command, 130 an interrupted one.
ANSWERS_MISSING_EXIT = 3


class FailedLog:
    """The run folder's failed.jsonl."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / FAILED_FILE

    def add(self, question_id, decoder: str, error: str) -> None:
        files.append_jsonl(self.path, {"question_id": question_id, "decoder": decoder, "error": error, "tstamp": time.time()})

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        files.repair_jsonl(self.path)
        return files.read_jsonl(self.path)

    def unresolved(self) -> list[dict]:
        """The answers still missing, one record each (the latest, where runs failed it more than once)."""
        latest = {(str(r["question_id"]), r["decoder"]): r for r in self.records() if not r.get("resolved")}
        return list(latest.values())

    def resolve(self, done: dict) -> int:
        """Mark the failures whose answer is now stored (`done`: decoder → {question id: record}); how many."""
        records = self.records()
        now = time.time()
        marked = 0
        for record in records:
            if not record.get("resolved") and str(record["question_id"]) in done.get(record["decoder"], {}):
                record.update(resolved=True, resolved_tstamp=now)
                marked += 1
        if marked:
            files.rewrite_jsonl(self.path, records)
        return marked


def missing_answers(run_dir: Path) -> list[dict]:
    """The failed answers no run has filled yet (failed.jsonl lines without "resolved")."""
    return FailedLog(run_dir).unresolved()
