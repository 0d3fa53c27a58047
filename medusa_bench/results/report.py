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

import pandas as pd

from medusa_bench.errors import UserError, unknown_name
from medusa_bench.results.files import ensure_writable_dir
from medusa_bench.results.tables import TABLE_TITLES, ReportTables, build_tables, display_frame, load_runs, tables_to_markdown, write_csvs

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


KEY_COLUMNS = ("run", "decoder", "device", "category", "judge", "in flight")  # "in flight": the sweep's concurrency level; "device": Ray runs on several device types

# The terminal's shorter view (markdown, HTML and CSV keep every column under its full name):
# columns a reader at 80 columns can do without, and shorter headers for the rest.
TERMINAL_DROP = {
    "summary": ("reference", "n_questions", "tokens_per_s"),
    "speed": ("new_tokens", "wall_time_s", "speedup_specbench", "exact_match_turns"),
    "precision": ("dtype", "divergence_vs_fp32"),
    "quality": ("reused", "expected", "graded", "coverage_turn*"),
    "categories": ("n_questions",),
}
SHORT_LABELS = {
    "questions": "qs", "compared": "cmp", "tokens/s": "tok/s", "exact match": "exact", "coverage": "cov",
    "Δ score vs baseline": "Δ score", "shared-CPU turns": "shared CPU", "exact vs baseline": "exact",
    "median first divergence": "1st diff", "exact vs fp32": "exact fp32", "median divergence vs fp32": "1st diff fp32",
    "baseline exact vs fp32": "base fp32", "steps logged": "steps", "τ predicted": "τ pred", "speedup predicted": "pred ×",
    "grades reused": "reused", "turns compared": "turns", "speedup (Spec-Bench)": "× (Spec-Bench)",
}


def _rich_table(title: str, shown: pd.DataFrame, wrap: bool = False):
    from rich.table import Table
    from rich.text import Text

    # Text objects, not strings: a "[...]" inside a model or decoder name is not rich markup.
    table = Table(title=title, title_justify="left")
    for column in shown.columns:
        # Names (decoders, settings, metric labels in the first column) are never wrapped, values only as a last resort.
        keep_whole = not wrap or column in KEY_COLUMNS or column in ("setting", "")
        table.add_column(Text(str(column)), no_wrap=keep_whole, overflow="fold")
    for row in shown.itertuples(index=False):
        table.add_row(*(Text(str(v)) for v in row))
    return table


def transpose(shown: pd.DataFrame) -> pd.DataFrame:
    """One column per row of `shown` (headed 'run · decoder'), one row per metric: fits a terminal."""
    keys = [c for c in shown.columns if c in KEY_COLUMNS and not (c == "run" and shown[c].nunique() == 1)]
    headers = [" · ".join(str(row[c]) for c in keys) or str(i) for i, (_, row) in enumerate(shown.iterrows())]
    body = shown.drop(columns=[c for c in shown.columns if c in KEY_COLUMNS])
    data = {"": list(body.columns)}
    data.update({header: [str(v) for v in body.iloc[i]] for i, header in enumerate(headers)})
    return pd.DataFrame(data)


def compact(name: str, table: pd.DataFrame) -> pd.DataFrame:
    """The terminal's shorter view of a table: less important columns dropped, headers abbreviated."""
    dropped = TERMINAL_DROP.get(name, ())
    prefixes = tuple(d[:-1] for d in dropped if d.endswith("*"))  # "coverage_turn*": one column per turn
    table = table.drop(columns=[c for c in table.columns if c in dropped or (prefixes and c.startswith(prefixes))])
    return display_frame(table).rename(columns=lambda c: SHORT_LABELS.get(c, c))


def column_chunks(shown: pd.DataFrame, fits) -> list[pd.DataFrame] | None:
    """Split a wide table into several, each repeating the key columns, so every one fits;
    None when even the keys and one more column are too wide."""
    keys = [c for c in shown.columns if c in KEY_COLUMNS]
    chunks: list[list[str]] = []
    for column in (c for c in shown.columns if c not in keys):
        if chunks and fits(shown[keys + chunks[-1] + [column]]):
            chunks[-1].append(column)
        elif fits(shown[keys + [column]]):
            chunks.append([column])
        else:
            return None
    return [shown[keys + chunk] for chunk in chunks]


def terminal_layouts(report: ReportTables, console) -> list[tuple[str, pd.DataFrame, bool]]:
    """(title, table as shown, wrap?) for every non-empty table, chosen to fit `console.width`
    without breaking a word: the full table, transposed, the compact view, compact transposed,
    then the compact view split into column groups; wrapping inside cells only if nothing fits."""
    from rich.measure import Measurement

    def width(title: str, shown: pd.DataFrame) -> int:
        return Measurement.get(console, console.options.update_width(10_000), _rich_table(title, shown)).maximum

    layouts = []
    for name, table in report.tables.items():
        if table.empty:
            continue
        title = TABLE_TITLES.get(name, name)
        shown = display_frame(table)
        if name == "config":  # settings × runs: values (paths, reasons) may need wrapping, names never
            fits_whole = width(title, shown) <= console.width
            layouts.append((title, shown, not fits_whole))
            continue
        short = compact(name, table)
        candidates = [shown, transpose(shown), short, transpose(short)]
        fitting = next((s for s in candidates if width(title, s) <= console.width), None)
        if fitting is not None:
            layouts.append((title, fitting, False))
            continue
        chunks = column_chunks(short, lambda s: width(title, s) <= console.width)
        if chunks:
            layouts += [(f"{title} ({i}/{len(chunks)})", chunk, False) for i, chunk in enumerate(chunks, 1)]
        else:  # nothing fits: the narrower one, wrapping inside cells rather than cutting numbers off
            narrowest = min(candidates, key=lambda s: width(title, s))
            layouts.append((title, narrowest, True))
    return layouts


def render_terminal(report: ReportTables, console) -> None:
    """The banner (noise floor, shared-CPU turns) and notes first, then every table fitted to the terminal."""
    from rich.text import Text

    # Wrapped by rich at spaces, to the console's width (a terminal's own wrap would cut words).
    for line in report.banner:
        console.print(Text(line, style="bold"))
    for note in report.notes:
        console.print(Text.assemble(("note: ", "yellow"), note))
    for title, shown, wrap in terminal_layouts(report, console):
        console.print(_rich_table(title, shown, wrap=wrap))


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
    return _table_text(report, console, out)


def _table_text(report: ReportTables, console, out) -> Path | str:
    from rich.console import Console

    if console is not None and out is None:
        render_terminal(report, console)
        return ""
    buffer = io.StringIO()
    render_terminal(report, Console(file=buffer, width=160, color_system=None, force_terminal=False))
    if out is None:
        return buffer.getvalue()
    path = _file_target(Path(out), "table")
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return path
