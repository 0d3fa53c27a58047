"""`build_report`: run folders in, a report out (HTML page, markdown, CSV files or terminal tables).

The Python API behind `medusa-bench report`. It reads whatever the run folders hold, so it
works on partial runs (no judgments, a decoder cut short, no baseline) and grows as more
files appear. Where it writes by default: beside the run (`<run>/report.html`) for one run,
the current folder for several.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

from medusa_bench.errors import UserError, unknown_name
from medusa_bench.results.display import tables_to_markdown, write_csvs
from medusa_bench.results.files import ensure_writable_dir
from medusa_bench.results.runs import load_runs
from medusa_bench.results.tables import ReportTables, build_tables, glance_tables
from medusa_bench.results.terminal import render_terminal

FORMATS = ("html", "markdown", "csv", "table")
DEFAULT_NAMES = {"html": "report.html", "markdown": "report.md", "csv": "report_csv", "table": "report.txt"}


def collect(run_dirs: Iterable[Path | str]) -> ReportTables:
    """Load the runs and compute every table (no files written)."""
    return build_tables(load_runs([Path(p) for p in run_dirs]))


def _default_out(run_dirs: list[Path], fmt: str) -> Path:
    base = run_dirs[0] if len(run_dirs) == 1 else Path.cwd()
    return base / DEFAULT_NAMES[fmt]


def _file_target(out: Path, fmt: str) -> Path:
    """`-o` may name a file or an existing folder; make sure the folder is writable."""
    out = Path(out)
    if out.is_dir():
        out = out / DEFAULT_NAMES[fmt]
    ensure_writable_dir(out.parent)
    return out


def build_report(run_dirs: Iterable[Path | str], out: Path | str | None = None, fmt: str = "html", *, console=None) -> Path | str:
    """Build a report of one or more run folders.

    - "html": writes one self-contained page; returns its path.
    - "markdown": returns the markdown text, or writes it to `out` and returns the path.
    - "csv": writes one CSV per table into the folder `out`; returns the folder.
    - "table": prints rich tables to `console` (returns ""), or returns them as plain text.
    """
    if fmt not in FORMATS:
        raise unknown_name("report format", fmt, FORMATS)
    dirs = [Path(p) for p in run_dirs]
    report = collect(dirs)
    if fmt == "html":
        from medusa_bench.results.html import render_html
        from medusa_bench.results.plots import all_plots

        path = _file_target(Path(out) if out else _default_out(dirs, fmt), fmt)
        path.write_text(render_html(report, all_plots(report)), encoding="utf-8")
        return path
    if fmt == "markdown":
        text = tables_to_markdown(report)
        if out is None:
            return text
        path = _file_target(Path(out), fmt)
        path.write_text(text, encoding="utf-8")
        return path
    if fmt == "csv":
        folder = Path(out) if out else _default_out(dirs, fmt)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{folder} is a file; --format csv writes one CSV per table into a folder")
        write_csvs(report, ensure_writable_dir(folder))
        return folder
    text = _terminal_text(report, console if out is None else None)
    if out is None:
        return text
    path = _file_target(Path(out), "table")
    path.write_text(text, encoding="utf-8")
    return path


def at_a_glance(run_dirs: Iterable[Path | str], console=None) -> str:
    """The report's at-a-glance view of run folders: the banner (noise floor, engine, shared-CPU
    turns), the summary table (speedup with its 95% CI or "n=…, no CI", vs noise, τ, exact
    match, score) and its footer explaining τ: the top of `medusa-bench report DIR --format table`.
    Printed to `console` (a rich Console; returns ""), or returned as plain text 160 columns wide.
    """
    return _terminal_text(glance_tables(load_runs([Path(p) for p in run_dirs])), console)


def _terminal_text(report: ReportTables, console) -> str:
    """Rich tables printed to `console` (returns ""), or rendered into plain text without one."""
    from rich.console import Console

    if console is not None:
        render_terminal(report, console)
        return ""
    buffer = io.StringIO()
    render_terminal(report, Console(file=buffer, width=160, color_system=None, force_terminal=False))
    return buffer.getvalue()
