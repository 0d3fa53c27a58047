"""The report in a terminal: rich tables fitted to the console's width without breaking a word,
the banner and notes above them, each table's footer (display.FOOTERS) under it."""

from __future__ import annotations

import pandas as pd

from medusa_bench.results.display import FOOTERS, column_label, display_frame
from medusa_bench.results.spec_bench import LEADERBOARD_OVERALL, LEADERBOARD_TAU
from medusa_bench.results.tables import TABLE_TITLES, ReportTables

KEY_COLUMNS = ("run", "decoder", "device", "category", "judge", "in flight", "batch")  # "in flight": the sweep's concurrency level; "device": Ray runs on several device types

# The terminal's shorter view (markdown, HTML and CSV keep every column under its full name):
# columns a reader at 80 columns can do without, and shorter headers for the rest.
TERMINAL_DROP = {
    "summary": ("reference", "n_questions", "tokens_per_s"),
    "speed": ("new_tokens", "wall_time_s", "speedup_specbench", "exact_match_turns"),
    "precision": ("dtype", "divergence_vs_fp32"),
    "quality": ("reused", "expected", "graded", "coverage_turn*"),
    "categories": ("n_questions",),
    "spec_bench": ("n_compared",),
    "prediction": ("tau", "n_compared"),
    "batch": ("requests", "latency_p90_ms"),
}
SHORT_LABELS = {
    "questions": "qs", "compared": "cmp", "tokens/s": "tok/s", "exact match": "exact", "coverage": "cov",
    "Δ score vs baseline": "Δ score", "shared-CPU turns": "shared CPU", "exact vs baseline": "exact",
    "median first divergence": "1st diff", "exact vs fp32": "exact fp32", "median divergence vs fp32": "1st diff fp32",
    "baseline exact vs fp32": "base fp32", "steps logged": "steps", "τ predicted": "τ pred", "speedup predicted": "pred ×",
    "grades reused": "reused", "turns compared": "turns", "speedup (Spec-Bench)": "× (Spec-Bench)",
    "step × baseline predicted": "step pred", "step × baseline measured": "step", "step × baseline timed": "step timed", "τ on this text": "τ text",
    "hindsight nodes": "best n", "hindsight knobs": "best knobs", "hindsight speedup": "best ×",
    "speedup on this text": "× on text", "speedup error": "× err", "tree nodes": "n",
    "latency p50 (ms)": "p50 ms", "= same-B baseline": "= base B",
    LEADERBOARD_OVERALL: "leaderboard", LEADERBOARD_TAU: "leaderboard τ",
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
    # Dropped after formatting: the interval's cell reads the reference and question count beside it.
    labels = {column_label(c) for c in table.columns if c in dropped or (prefixes and c.startswith(prefixes))}
    shown = display_frame(table)
    return shown.drop(columns=[c for c in shown.columns if c in labels]).rename(columns=lambda c: SHORT_LABELS.get(c, c))


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


def table_layouts(name: str, table: pd.DataFrame, console) -> list[tuple[str, pd.DataFrame, bool]]:
    """(title, table as shown, wrap?) for one non-empty table, chosen to fit `console.width`
    without breaking a word: the full table, transposed, the compact view, compact transposed,
    then the compact view split into column groups; wrapping inside cells only if nothing fits."""
    from rich.measure import Measurement

    def width(title: str, shown: pd.DataFrame) -> int:
        return Measurement.get(console, console.options.update_width(10_000), _rich_table(title, shown)).maximum

    title = TABLE_TITLES.get(name, name)
    shown = display_frame(table)
    if name == "config":  # settings × runs: values (paths, reasons) may need wrapping, names never
        return [(title, shown, width(title, shown) > console.width)]
    short = compact(name, table)
    candidates = [shown, transpose(shown), short, transpose(short)]
    fitting = next((s for s in candidates if width(title, s) <= console.width), None)
    if fitting is not None:
        return [(title, fitting, False)]
    chunks = column_chunks(short, lambda s: width(title, s) <= console.width)
    if chunks:
        return [(f"{title} ({i}/{len(chunks)})", chunk, False) for i, chunk in enumerate(chunks, 1)]
    narrowest = min(candidates, key=lambda s: width(title, s))  # nothing fits: wrap inside cells rather than cut numbers off
    return [(title, narrowest, True)]


def render_terminal(report: ReportTables, console) -> None:
    """The banner (noise floor, shared-CPU turns) and notes first, then every table fitted to the
    terminal, each followed by its footer (what τ is, when there is no interval)."""
    from rich.text import Text

    # Wrapped by rich at spaces, to the console's width (a terminal's own wrap would cut words).
    for line in report.banner:
        console.print(Text(line, style="bold"))
    for note in report.notes:
        console.print(Text.assemble(("note: ", "yellow"), note))
    for name, table in report.tables.items():
        if table.empty:
            continue
        for title, shown, wrap in table_layouts(name, table, console):
            console.print(_rich_table(title, shown, wrap=wrap))
        for line in FOOTERS.get(name, ()):
            console.print(Text(line, style="dim"))
