"""The report's figures as PNG bytes, drawn with matplotlib's object API (Agg, no display).

`matplotlib.figure.Figure` is used directly instead of pyplot: no global figure state, no
backend switch that could disturb another part of the program, and nothing left open.
Every function returns None when its data is missing, so a partial run simply has fewer
figures; `all_plots` collects the ones that exist, in reading order.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from medusa_bench.results import drift
from medusa_bench.results.acceptance import predicted, tree_files
from medusa_bench.results.runs import RunData
from medusa_bench.results.speed import by_device, noise_band
from medusa_bench.results.stats import MIN_QUESTIONS_FOR_CI
from medusa_bench.results.tables import ReportTables

COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD"]


@dataclass
class Plot:
    key: str
    title: str
    caption: str
    png: bytes


def to_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def text(value) -> str:
    """Text from a file, made literal for matplotlib: a '$' would otherwise start mathtext."""
    return str(value).replace("$", r"\$")


def legend_below(ax, offset: float = -0.14) -> None:
    """Legend under the axes, so it never hides a bar or a point, however many series there are."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        longest = max(len(label) for label in labels)
        ncol = 3 if longest <= 22 else 2 if longest <= 36 else 1  # keep the figure about as wide as its axes
        ax.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, offset),
                  ncol=min(ncol, len(labels)), frameon=False)


def series_label(run: str, decoder: str, several_runs: bool) -> str:
    return text(f"{run} · {decoder}" if several_runs else decoder)


# ------------------------------------------------------------------------------- speed plots


def speedup_by_category(report: ReportTables) -> bytes | None:
    """Grouped bars: one group per category (plus 'all'), one bar per run × decoder, 95% CI whiskers."""
    speed, categories = report.tables["speed"], report.tables["categories"]
    overall = report.drafting_rows(speed)
    overall = overall[overall.speedup.notna()].assign(category="all")
    per_cat = report.drafting_rows(categories)
    per_cat = per_cat[per_cat.speedup.notna()] if not per_cat.empty else per_cat
    data = pd.concat([overall, per_cat], ignore_index=True) if not per_cat.empty else overall
    if data.empty:
        return None
    groups = ["all"] + [c for c in dict.fromkeys(per_cat.category) if c != "all"] if not per_cat.empty else ["all"]
    several = data.run.nunique() > 1
    devices = data.device if "device" in data.columns else pd.Series([None] * len(data), index=data.index)  # runs on several device types
    series = list(dict.fromkeys(zip(data.run, data.decoder, devices)))
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(6.0, 1.1 * len(groups) + 2), 4.2))
    ax = fig.subplots()
    for i, (run, decoder, device) in enumerate(series):
        rows = data[(data.run == run) & (data.decoder == decoder) & ((devices == device) if isinstance(device, str) else True)].set_index("category")
        x = [g for g in range(len(groups)) if groups[g] in rows.index]
        values = [rows.loc[groups[g], "speedup"] for g in x]
        low = [_gap(v, rows.loc[groups[g], "speedup_ci_low"]) for v, g in zip(values, x)]
        high = [_gap(rows.loc[groups[g], "speedup_ci_high"], v) for v, g in zip(values, x)]
        ax.bar(np.array(x) + (i - (len(series) - 1) / 2) * width, values, width, yerr=[low, high], capsize=3,
               color=COLORS[i % len(COLORS)], label=series_label(run, decoder + (f" @ {device}" if isinstance(device, str) else ""), several))
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
    for run in report.runs:  # the A/A control's interval: bars whose whiskers reach into it are noise
        for device, rows in by_device(speed[speed.run == run.label]):
            band = noise_band(rows)
            name = "A/A noise band" + (f" @ {device}" if device else "")
            if band:
                ax.axhspan(*band, color="#999999", alpha=0.25, zorder=0,
                           label=series_label(run.label, name, several) if several or device else "A/A noise band (control's 95% CI)")
    ax.set_xticks(range(len(groups)), [text(g) for g in groups], rotation=30 if len(groups) > 5 else 0, ha="right" if len(groups) > 5 else "center")
    ax.set_ylabel("speedup over baseline (×)")
    ax.set_title(f"Speedup by category (dashed line: baseline; whiskers: 95% bootstrap CI,\nnone under {MIN_QUESTIONS_FOR_CI} questions)", fontsize=10)
    legend_below(ax, -0.3 if len(groups) > 5 else -0.12)
    return to_png(fig)


def _gap(a: float, b: float) -> float:
    """Error-bar half-length; NaN where there is no interval (fewer than MIN_QUESTIONS_FOR_CI
    questions): matplotlib draws no whisker there, where 0 would draw a cap, a zero-width interval."""
    return math.nan if a is None or b is None or math.isnan(a) or math.isnan(b) else max(0.0, a - b)


def tokens_per_step(report: ReportTables) -> bytes | None:
    """Share of steps that emitted k tokens, per decoder: what τ is an average of."""
    hist = report.tables["tokens_per_step"]
    if hist.empty:
        return None
    hist = report.drafting_rows(hist)
    hist = hist[hist.logged_steps > 0]
    if hist.empty:
        return None
    columns = [c for c in hist.columns if c.startswith("tokens_")]
    ks = [int(c.split("_")[1]) for c in columns]
    several = hist.run.nunique() > 1
    width = 0.8 / len(hist)
    fig = Figure(figsize=(max(6.0, 0.7 * len(ks) + 3), 3.8))
    ax = fig.subplots()
    for i, (_, row) in enumerate(hist.iterrows()):
        ax.bar(np.array(ks) + (i - (len(hist) - 1) / 2) * width, [100 * row[c] for c in columns], width,
               color=COLORS[i % len(COLORS)], label=series_label(row.run, row.decoder, several))
    ax.set_xticks(ks)
    ax.set_xlabel("tokens emitted in one step (1 = no draft accepted)")
    ax.set_ylabel("% of steps")
    ax.set_title("Tokens per step", fontsize=10)
    legend_below(ax, -0.2)
    return to_png(fig)


def speed_vs_quality(report: ReportTables) -> bytes | None:
    """One point per decoder: further right is faster, higher is better graded."""
    summary = report.tables["summary"]
    if "score" not in summary.columns or summary.score.notna().sum() == 0:
        return None
    data = summary[summary.score.notna()]
    use_speedup = data.speedup.notna().all()
    x_column = "speedup" if use_speedup else "tokens_per_s"
    several = data.run.nunique() > 1
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.subplots()
    for i, (_, row) in enumerate(data.iterrows()):
        xerr = None
        if use_speedup and not (math.isnan(row.speedup_ci_low) or math.isnan(row.speedup_ci_high)):
            xerr = [[_gap(row.speedup, row.speedup_ci_low)], [_gap(row.speedup_ci_high, row.speedup)]]
        ax.errorbar([row[x_column]], [row.score], xerr=xerr, fmt="o", capsize=3, color=COLORS[i % len(COLORS)],
                    label=series_label(row.run, row.decoder, several))
    ax.set_xlabel("speedup over baseline (×)" if use_speedup else "tokens/s")
    ax.set_ylabel("MT-Bench score (1–10)")
    low, high = data.score.min(), data.score.max()  # a ±1 window at least, so 0.05 never looks like a cliff
    ax.set_ylim(max(0.5, min(low - 1, (low + high) / 2 - 1)), min(10.5, max(high + 1, (low + high) / 2 + 1)))
    ax.set_title("Speed against quality", fontsize=10)
    legend_below(ax, -0.2)
    ax.margins(x=0.2)
    return to_png(fig)


# ------------------------------------------------------------------------------------- drift


def first_divergence_strip(report: ReportTables) -> bytes | None:
    """Where decoders part from their baseline: one row of points (a token position per diverging
    turn) per decoder, a box over them, and, where the run has an fp32 reference, the baseline's own
    divergence from fp32 as a grey reference row: the same spread there means the precision did it."""
    several = len(report.runs) > 1
    series: list[tuple[str, list[int], bool]] = []  # (label, positions, is the precision reference row)
    for run in report.runs:
        base = report.drift.get((run.label, "baseline"))
        if base and base["baseline_vs_fp32"]:
            label = f"baseline vs {run.precision_dtype or 'float32'} ({run.dtype or '?'} baseline)"
            series.append((series_label(run.label, label, several), drift.divergence_positions(base["baseline_vs_fp32"]), True))
        for (label, decoder), summary in report.drift.items():
            if label == run.label and decoder != "baseline" and summary["vs_baseline"]:
                series.append((series_label(run.label, decoder, several), drift.divergence_positions(summary["vs_baseline"]), False))
    if not any(positions for _, positions, _ in series):
        return None  # every compared turn is token-identical: nothing parted anywhere
    fig = Figure(figsize=(6.8, max(2.4, 0.55 * len(series) + 1.4)))
    ax = fig.subplots()
    rng = np.random.default_rng(0)  # fixed jitter: the same report draws the same picture
    for y, (label, positions, reference) in enumerate(series):
        color = "#8C8C8C" if reference else COLORS[y % len(COLORS)]
        if positions:
            ax.scatter(positions, y + rng.uniform(-0.18, 0.18, len(positions)), s=14, alpha=0.7, color=color, zorder=2)
            # The middle half as a bar and the median as a tick (drawn by hand: boxplot's orientation API changed in 3.10).
            q1, median, q3 = np.percentile(positions, [25, 50, 75])
            ax.plot([q1, q3], [y, y], linewidth=7, alpha=0.3, color=color, solid_capstyle="butt", zorder=1)
            ax.plot([median], [y], marker="|", markersize=18, markeredgewidth=2, color="black", zorder=3)
        else:
            ax.text(0, y, "  no turn diverged", va="center", fontsize=8, color="#5f6670")
    ax.set_yticks(range(len(series)), [label for label, _, _ in series], fontsize=8)
    ax.set_ylim(len(series) - 0.5, -0.5)  # first series on top, with room around the outer rows
    ax.set_xlim(left=-1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("first differing token (index in the turn's answer)")
    ax.set_title("First divergence from the baseline per diverging turn (bar: middle half, tick: median;\n"
                 "grey: the baseline against its fp32 decoding)", fontsize=9)
    return to_png(fig)


# ------------------------------------------------------------------------------------- trees


def tree_paths(run: RunData) -> list[list[int]] | None:
    """The run's tree as medusa_choices paths: tree.json's "tree", else an inline list in settings."""
    return tree_paths_of(run.extras.get("tree")) or tree_paths_of(run.settings.get("tree"))


def tree_paths_of(tree: Any) -> list[list[int]] | None:
    """medusa_choices paths from a tree.json object ({"tree": paths, …}) or a bare list of paths."""
    candidate = tree.get("tree") if isinstance(tree, dict) else tree
    if isinstance(candidate, list) and all(isinstance(p, list) and all(isinstance(r, int) for r in p) for p in candidate):
        return [list(p) for p in candidate if p]
    return None


def tree_layout(paths: list[list[int]]) -> dict[tuple, tuple[float, float]]:
    """(depth, y) per node: leaves on consecutive rows in rank order, parents centred on children."""
    nodes = {tuple(p[:i]) for p in paths for i in range(len(p) + 1)}  # ancestors too, if a file omits them
    children: dict[tuple, list[tuple]] = {}
    for node in nodes:
        if node:
            children.setdefault(node[:-1], []).append(node)
    position: dict[tuple, tuple[float, float]] = {}
    next_row = [0]

    def place(node: tuple) -> float:
        kids = sorted(children.get(node, []))
        if not kids:
            y = float(next_row[0])
            next_row[0] += 1
        else:
            y = float(np.mean([place(kid) for kid in kids]))
        position[node] = (len(node), y)
        return y

    place(())
    return position


def tree_diagram(paths: list[list[int]], title: str) -> bytes:
    """The candidate tree drawn as a tree: root left, one column per depth, label = top-k rank."""
    position = tree_layout(paths)
    rows = max(y for _, y in position.values()) + 1
    depth = max(d for d, _ in position.values())
    fig = Figure(figsize=(max(4.0, 1.3 * depth + 2), min(12.0, max(2.5, 0.24 * rows + 1))))
    ax = fig.subplots()
    for node, (x, y) in position.items():
        if node:
            px, py = position[node[:-1]]
            ax.plot([px, x], [py, y], color="#999999", linewidth=0.8, zorder=1)
    for node, (x, y) in position.items():
        rank = node[-1] if node else None
        color = "#333333" if rank is None else COLORS[rank % len(COLORS)]
        ax.scatter([x], [y], s=160, color=color, zorder=2, edgecolors="white")
        if rank is not None:
            ax.text(x, y, str(rank), ha="center", va="center", fontsize=7, color="white", zorder=3)
    ax.set_xticks(range(depth + 1), ["root"] + [f"depth {d}" for d in range(1, depth + 1)])
    ax.set_yticks([])
    ax.invert_yaxis()
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"{title}: {len(paths)} draft nodes (label = top-k rank of the drafted token)", fontsize=10)
    return to_png(fig)


# ------------------------------------------------------------------------ predicted vs measured

SIZE_KEYS = ("n", "num_nodes", "nodes", "n_nodes", "size", "tree_size", "budget")  # nodes incl. the root
TAU_KEYS = ("tau", "predicted_tau", "expected_tau", "acceptance_length")
CURVE_KEYS = ("per_budget", "budgets", "by_budget", "frontier", "search", "table", "candidates")


def _number(mapping: dict, keys: tuple) -> float | None:
    for key in keys:
        value = mapping.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, dict):  # e.g. {"predicted": {"tau": …}}
            inner = _number(value, ("tau",))
            if inner is not None:
                return inner
    return None


def predicted_curve(files: dict) -> list[tuple[float, float]]:
    """(nodes incl. root, predicted τ) pairs from a per-budget table, in whatever shape it was saved.

    `medusa-bench tree` writes {"candidates": [{"n", "tau", "step_time", …}]} with n counting the
    root (the tokens of one verify forward, as in latency.json); other shapes are accepted too.
    """
    points = []
    for source in (files.get("tree"), files.get("calibration")):
        if not isinstance(source, dict):
            continue
        for key in CURVE_KEYS:
            table = source.get(key)
            items: list[tuple[Any, Any]] = []
            if isinstance(table, list):
                items = [(None, item) for item in table]
            elif isinstance(table, dict):
                items = list(table.items())
            for size_key, item in items:
                size = _number(item, SIZE_KEYS) if isinstance(item, dict) else None
                if size is None and size_key is not None:
                    try:
                        size = float(size_key)
                    except ValueError:
                        size = None
                tau = _number(item, TAU_KEYS) if isinstance(item, dict) else (float(item) if isinstance(item, (int, float)) else None)
                if size is not None and tau is not None:
                    points.append((size, tau))
    return sorted(set(points))


def tau_predicted_vs_measured(report: ReportTables) -> bytes | None:
    """The tree optimiser's predicted τ (curve over tree sizes, and the chosen tree) against measured τ."""
    speed = report.tables["speed"]
    several = len(report.runs) > 1
    fig = Figure(figsize=(6.2, 4.0))
    ax = fig.subplots()
    drawn = False
    k = 0
    for run in report.runs:
        measured = report.drafting_rows(speed[speed.run == run.label])
        for _, row in measured[measured.tau.notna()].iterrows():
            files = tree_files(run, row.decoder)
            paths = tree_paths_of(files.get("tree"))
            curve = predicted_curve(files)
            tau = predicted(files, "tau")
            if paths is None or (math.isnan(tau) and not curve):
                continue  # a fixed tree: the optimiser predicted nothing for it
            color = COLORS[k % len(COLORS)]
            k += 1
            decoder = row.decoder + (f" @ {row.device}" if isinstance(row.get("device"), str) else "")  # runs on several device types
            label = text(f"{run.label}: {decoder}" if several else decoder)
            if curve:
                ax.plot(*zip(*curve), "-", color=color, alpha=0.6, label=f"{label}: predicted τ by tree size")
            if not math.isnan(tau):
                ax.scatter([len(paths) + 1], [tau], marker="s", s=60, facecolors="none", edgecolors=color, label=f"{label}: predicted τ, chosen tree")
            ax.scatter([len(paths) + 1], [row.tau], marker="o", s=50, color=color, label=f"{label}: measured τ")
            drawn = True
    if not drawn:
        return None
    ax.set_xlim(left=0, right=ax.get_xlim()[1] + 1)
    ax.set_ylim(bottom=1.0 if ax.get_ylim()[0] >= 1.0 else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("tree size n (tokens per verify forward: root + draft nodes)")
    ax.set_ylabel("acceptance length τ (tokens per step)")
    ax.set_title("Predicted against measured acceptance length", fontsize=10)
    legend_below(ax, -0.2)
    return to_png(fig)


def step_times(run: RunData) -> list[tuple[int, float]]:
    """latency.json's profiled step time (ms) by number of tokens per forward."""
    latency = run.extras.get("latency")
    table = latency.get("step_time") if isinstance(latency, dict) else None
    points = []
    if isinstance(table, dict):
        for size, seconds in table.items():
            try:
                points.append((int(size), 1000 * float(seconds)))
            except (TypeError, ValueError):
                continue
    return sorted(points)


def step_time_vs_tree_size(report: ReportTables) -> bytes | None:
    """Why a big tree is not free: the profiled cost of one verify step against its token count."""
    series = [(run, step_times(run)) for run in report.runs]
    series = [(run, points) for run, points in series if points]
    if not series:
        return None
    fig = Figure(figsize=(6.2, 4.0))
    ax = fig.subplots()
    for i, (run, points) in enumerate(series):
        latency = run.extras["latency"]
        where = ", ".join(str(latency[k]) for k in ("device", "dtype") if latency.get(k))
        color = COLORS[i % len(COLORS)]
        ax.plot(*zip(*points), "o-", color=color, label=text(f"{run.label} ({where})" if where else run.label))
        paths = tree_paths(run)
        if paths:
            ax.axvline(len(paths) + 1, color=color, linestyle=":", label=text(f"{run.label}: chosen tree ({len(paths) + 1} tokens)"))
    ax.set_xscale("log", base=2)
    sizes = sorted({size for _, points in series for size, _ in points})
    ax.set_xticks(sizes, [str(size) for size in sizes])
    ax.minorticks_off()
    ax.set_xlabel("tokens per verify forward (root + draft nodes)")
    ax.set_ylabel("step time (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title("Profiled step time against tree size", fontsize=10)
    legend_below(ax, -0.2)
    return to_png(fig)


def sweep_speedup(report: ReportTables) -> bytes | None:
    """Speedup over the reference endpoint against requests in flight: where speculation stops paying."""
    table = report.tables.get("sweep")
    if table is None or table.empty:
        return None
    rows = table[table.speedup.notna()]
    references = {(run.label, run.info.get("reference")) for run in report.runs}
    rows = rows[[(r, d) not in references for r, d in zip(rows.run, rows.decoder)]]
    if rows.empty:
        return None
    several = rows.run.nunique() > 1
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    for i, ((run, decoder), group) in enumerate(rows.groupby(["run", "decoder"], sort=False)):
        group = group.sort_values("concurrency")
        ax.plot(group.concurrency, group.speedup, marker="o", color=COLORS[i % len(COLORS)], label=series_label(run, decoder, several))
    ax.axhline(1.0, color="#888888", linewidth=1, linestyle="--")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(rows.concurrency.unique()), [str(c) for c in sorted(rows.concurrency.unique())])
    ax.set_xlabel("requests in flight")
    ax.set_ylabel("server tokens/s ÷ reference's")
    legend_below(ax, offset=-0.2)
    return to_png(fig)


def batch_curves(report: ReportTables) -> bytes | None:
    """Speedup over the same-B baseline and throughput against batch size, one line per decoder."""
    table = report.tables.get("batch")
    if table is None or table.empty:
        return None
    several = table.run.nunique() > 1
    fig = Figure(figsize=(9.6, 3.6))
    speed_ax, rate_ax = fig.subplots(1, 2)
    for i, ((run, decoder), group) in enumerate(table.groupby(["run", "decoder"], sort=False)):
        group = group.sort_values("batch_size")
        style = dict(marker="o", color=COLORS[i % len(COLORS)], label=series_label(run, decoder, several))
        speed_ax.plot(group.batch_size, group.speedup, **style)
        rate_ax.plot(group.batch_size, group.tok_s, **style)
    sizes = sorted(table.batch_size.unique())
    for ax, label in ((speed_ax, "tokens/s ÷ same-B baseline's"), (rate_ax, "tokens/s over all rows")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(int(b)) for b in sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
    speed_ax.axhline(1.0, color="#888888", linewidth=1, linestyle="--")
    legend_below(rate_ax, offset=-0.2)
    return to_png(fig)


# -------------------------------------------------------------------------------- collection


def all_plots(report: ReportTables) -> list[Plot]:
    """Every figure the data allows, in the order a reader needs them."""
    plots = []
    makers = [
        ("speedup", "Speedup by category", "Ratio of summed tokens/s against the baseline on the same questions; whiskers are 95% bootstrap intervals over questions "
         f"(none where fewer than {MIN_QUESTIONS_FOR_CI} questions were compared: too few for an interval).", speedup_by_category),
        ("quality", "Speed against quality", "One point per decoder: MT-Bench score (mean of graded turns) against speedup.", speed_vs_quality),
        ("divergence", "First divergence",
         "Token index where each non-identical turn first parts from the baseline's; grey: where the baseline itself parts from "
         "its float32 decoding. Similar distributions mean the drift comes from the precision, not from the decoder.", first_divergence_strip),
        ("tokens_per_step", "Tokens per step", "Each step emits the base model's own token plus the accepted drafts; τ is the mean of this distribution.", tokens_per_step),
        ("tau", "Predicted against measured τ", "The tree optimiser's prediction from calibrated head accuracies, against what the run measured.", tau_predicted_vs_measured),
        ("sweep", "Speedup against concurrency", "Endpoints: output tokens/s of the server with that many requests in flight, over the reference endpoint's at the same level; below the dashed line speculation no longer pays.", sweep_speedup),
        ("batch", "Speedup and throughput against batch size", "Left: each decoder's tokens/s over the baseline's at the same batch size "
         "(below the dashed line speculation does not pay); right: tokens/s over all rows of the batch.", batch_curves),
        ("step_time", "Step time against tree size", "Profiled cost of one verify forward; a tree pays off only if τ grows faster than this.", step_time_vs_tree_size),
    ]
    for key, title, caption, maker in makers:
        png = maker(report)
        if png:
            plots.append(Plot(key, title, caption, png))
    for run in report.runs:
        paths = tree_paths(run)
        if paths:
            label = text(run.label) if len(report.runs) > 1 else "Candidate tree"
            plots.append(Plot(f"tree-{run.label}", f"Candidate tree ({run.label})", "Each column is a draft depth; each node is the top-k candidate of that rank from its head; the longest accepted root→leaf path is kept per step.", tree_diagram(paths, label)))
    return plots
