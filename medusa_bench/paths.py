"""Where medusa-bench keeps things on the user's machine (no heavy imports: the judge uses it)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """User cache folder: $MEDUSA_BENCH_CACHE, else $XDG_CACHE_HOME/medusa-bench, else ~/.cache/medusa-bench."""
    root = os.environ.get("MEDUSA_BENCH_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medusa-bench"
