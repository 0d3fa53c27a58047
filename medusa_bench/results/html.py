"""One self-contained HTML page: inline CSS, PNGs as data URIs, no script, no network.

Safety rule: every string that came from a file (answers, judgments, questions, decoder and
model names, settings, notes that quote them) goes through `esc` exactly once, at the point
where it is written into markup. The page has no <script> of its own, so a reader's browser
never runs anything, and a model's `</table>` or `<script>` shows up as text.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from typing import Any, Iterable

import pandas as pd

from medusa_bench.results.configuration import engine_words
from medusa_bench.results.display import FOOTERS, display_frame, format_value
from medusa_bench.results.plots import Plot
from medusa_bench.results.quality import primary_judge
from medusa_bench.results.runs import RunData
from medusa_bench.results.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, MIN_QUESTIONS_FOR_CI, too_few_for_ci
from medusa_bench.results.tables import TABLE_TITLES, ReportTables

TEXT_COLUMNS = {"run", "decoder", "category", "judge", "setting", "answer file", "vs noise", "dtype"}
SAMPLES_PER_RUN = 3

CSS = """
:root { --fg:#1d1f23; --muted:#5f6670; --line:#dde1e6; --accent:#3a5f9e; --bg-alt:#f5f7fa; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color:var(--fg); background:#fff; }
main { max-width:1120px; margin:0 auto; padding:24px 28px 64px; }
h1 { font-size:26px; margin:0 0 4px; } h2 { font-size:20px; margin:36px 0 8px; border-bottom:2px solid var(--line); padding-bottom:4px; }
h3 { font-size:16px; margin:20px 0 6px; }
p.meta, .caption, .muted { color:var(--muted); font-size:13px; }
nav a { margin-right:14px; color:var(--accent); text-decoration:none; font-size:14px; }
.scroll { overflow-x:auto; margin:8px 0 4px; }
table { border-collapse:collapse; font-size:13.5px; font-variant-numeric:tabular-nums; }
th, td { padding:5px 8px; border-bottom:1px solid var(--line); text-align:left; white-space:nowrap; vertical-align:top; }
th { background:var(--bg-alt); font-weight:600; }
td.num { text-align:right; } tr:hover td { background:#fafbfc; }
ul.headline { padding-left:20px; } ul.headline li { margin:4px 0; }
.banner { background:#eef3fb; border-left:4px solid var(--accent); padding:8px 14px; margin:12px 0; font-size:14.5px; font-weight:600; }
.banner p { margin:3px 0; }
.notes { background:#fff8e6; border-left:4px solid #e0a800; padding:8px 14px; margin:12px 0; font-size:14px; }
.figs { display:grid; grid-template-columns:repeat(auto-fit, minmax(460px, 1fr)); gap:8px 24px; align-items:start; }
figure { margin:18px 0; } figure img { max-width:100%; height:auto; border:1px solid var(--line); }
figcaption { color:var(--muted); font-size:13px; margin-top:4px; }
.sample { border:1px solid var(--line); border-radius:6px; padding:8px 14px; margin:12px 0; }
.answers { display:grid; grid-template-columns:repeat(auto-fit, minmax(300px, 1fr)); gap:12px; }
.answer h4 { margin:8px 0 2px; font-size:14px; }
.sample pre { max-height:340px; overflow:auto; }
.question { white-space:pre-wrap; background:#eef3fb; border-left:3px solid var(--accent); padding:6px 10px; margin:6px 0; font-size:14px; }
.sample pre { white-space:pre-wrap; word-wrap:break-word; font:13px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background:var(--bg-alt); padding:8px 10px; border-radius:4px; margin:6px 0; }
.badge { display:inline-block; font-size:11.5px; padding:1px 7px; border-radius:10px; background:#e8edf5; color:#274472; margin-left:6px; font-weight:500; }
.badge.bad { background:#fde8e8; color:#8a1c1c; }
section.method li { margin:5px 0; }
"""


def esc(value: Any) -> str:
    """Escape text for HTML content and attribute values (quotes too)."""
    return html.escape("" if value is None else str(value), quote=True)


# ------------------------------------------------------------------------------------ pieces


def table_html(table: pd.DataFrame, empty: str = "no data", footer: Iterable[str] = ()) -> str:
    """A DataFrame as an HTML table: formatted like the markdown export, every cell escaped, its
    footer lines (display.FOOTERS) under it."""
    if table.empty:
        return f'<p class="muted">{esc(empty)}</p>'
    shown = display_frame(table)
    header = "".join(f"<th>{esc(c)}</th>" for c in shown.columns)
    body = []
    for row in shown.itertuples(index=False):
        cells = "".join(f'<td{"" if c in TEXT_COLUMNS else " class=num"}>{esc(v)}</td>' for c, v in zip(shown.columns, row))
        body.append(f"<tr>{cells}</tr>")
    notes = "".join(f'<p class="caption">{esc(line)}</p>' for line in footer)
    return f'<div class="scroll"><table><thead><tr>{header}</tr></thead><tbody>{"".join(body)}</tbody></table></div>{notes}'


def figure_html(plot: Plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{esc(plot.title)}">'
            f"<figcaption>{esc(plot.caption)}</figcaption></figure>")


def _fmt(column: str, value: Any) -> str:
    return format_value(column, value)


def headline_items(report: ReportTables) -> list[str]:
    """One plain sentence per decoder: how much faster, why (τ), and whether quality held."""
    summary = report.tables["summary"]
    several = len(report.runs) > 1
    items = []
    for _, row in report.drafting_rows(summary).iterrows():
        device = row.get("device")  # a run timed on several device types: one line per device type
        who = (f"<b>{esc(row.decoder)}</b>" + (f" on {esc(device)}" if isinstance(device, str) else "")
               + (f" <span class=muted>({esc(row.run)})</span>" if several else ""))
        if pd.notna(row.speedup):
            ci = "" if pd.isna(row.speedup_ci_low) else f" (95% CI {row.speedup_ci_low:.2f}–{row.speedup_ci_high:.2f})"
            speed = f"{row.speedup:.2f}× the speed of {row.reference}{ci} on {int(row.n_compared)} questions"
            if too_few_for_ci(row.n_compared):
                speed += f" (no 95% CI: too few questions, an interval needs {MIN_QUESTIONS_FOR_CI})"
            speed += NOISE_WORDS.get(row.get("vs_noise"), "")
        else:
            speed = f"{_fmt('tokens_per_s', row.tokens_per_s)} tokens/s ({row.reference} not run: no speedup)"
        parts = [speed, f"τ = {_fmt('tau', row.tau)} tokens per step"]
        if pd.notna(row.exact_match):
            parts.append(f"{_fmt('exact_match', row.exact_match)} of turns token-identical to {row.reference}")
        drift = _drift_row(report, row.run, row.decoder)
        if drift is not None and pd.notna(drift.get("exact_vs_fp32")):
            # Beside the baseline's own match with fp32, so a reader can tell rounding from a decoder bug.
            parts.append(f"{_fmt('exact_vs_fp32', drift['exact_vs_fp32'])} token-identical to the float32 reference "
                         f"(the {row.reference} itself: {_fmt('baseline_exact_vs_fp32', drift['baseline_exact_vs_fp32'])})")
        if "score" in summary.columns and pd.notna(row.get("score")):
            delta = row.get("score_vs_baseline")
            parts.append(f"MT-Bench {row.score:.2f}" + (f" ({delta:+.2f} vs {row.reference} on the same turns)" if pd.notna(delta) else ""))
        items.append(f"<li>{who}: " + "; ".join(esc(p) for p in parts) + ".</li>")
    return items


def _drift_row(report: ReportTables, run: str, decoder: str) -> pd.Series | None:
    precision = report.tables.get("precision")
    if precision is None or precision.empty:
        return None
    rows = precision[(precision.run == run) & (precision.decoder == decoder)]
    return rows.iloc[0] if len(rows) else None


NOISE_WORDS = {"inside noise": ", inside the noise band: not distinguishable from no speedup",
               "faster": ", above the noise band", "slower": ", below the noise band"}


def banner_html(report: ReportTables) -> str:
    """The lines a reader must see before any number (noise floor, shared-CPU turns), escaped."""
    if not report.banner:
        return ""
    return '<div class="banner">' + "".join(f"<p>{esc(line)}</p>" for line in report.banner) + "</div>"


def runs_line(runs: list[RunData]) -> str:
    """Which runs these are: folder name, model, device, dtype."""
    parts = []
    for run in runs:
        device = run.info.get("device") or {}
        details = [run.settings.get("model"), device.get("name") or device.get("type") or run.settings.get("device"),
                   device.get("dtype") or run.settings.get("dtype"), engine_words(device.get("engine"))]
        extra = ", ".join(esc(d) for d in details if d)
        parts.append(f"<b>{esc(run.label)}</b>" + (f" ({extra})" if extra else ""))
    return "; ".join(parts)


# --------------------------------------------------------------------------- sample answers


def _common_questions(run: RunData) -> list:
    """Question ids every decoder answered, spread over categories (one per category first)."""
    model_ids = run.model_ids()
    if not model_ids:
        return []
    answered = [{r["question_id"]: r for r in run.answers[m]} for m in model_ids]
    common = [q for q in answered[0] if all(q in a for a in answered[1:])]
    by_category: dict[str, list] = {}
    for q in common:
        by_category.setdefault(str(answered[0][q].get("category")), []).append(q)
    picked: list = []
    while len(picked) < SAMPLES_PER_RUN and any(by_category.values()):
        for ids in by_category.values():
            if ids and len(picked) < SAMPLES_PER_RUN:
                picked.append(ids.pop(0))
    return picked


def _question_text(run: RunData, question_id: Any) -> list[str]:
    question = run.questions.get(question_id) or {}
    turns = question.get("turns")
    return [str(t) for t in turns] if isinstance(turns, list) else []


def _scores(run: RunData) -> dict:
    """(model_id, question_id, turn) -> score from the primary judge, for the sample badges."""
    judge = primary_judge(run)
    if not judge:
        return {}
    return {(r.get("model"), r.get("question_id"), r.get("turn")): r.get("score") for r in run.judgments[judge]}


def _answer_block(run: RunData, model_id: str, record: dict, scores: dict) -> str:
    """One decoder's answer: badges (identical to baseline? tokens, time), then each turn with its grade."""
    choice = (record.get("choices") or [{}])[0]
    matches = choice.get("exact_match")
    badges = []
    if isinstance(matches, list) and any(m is not None for m in matches):
        same = all(m for m in matches if m is not None)
        badges.append(f'<span class="badge{"" if same else " bad"}">{"token-identical to baseline" if same else "differs from baseline"}</span>')
    tokens = sum(v for v in choice.get("new_tokens") or [] if isinstance(v, (int, float)))
    seconds = sum(v for v in choice.get("wall_time") or [] if isinstance(v, (int, float)))
    badges.append(f'<span class="badge">{int(tokens)} tokens, {seconds:.2f} s</span>')
    turns = []
    for i, text in enumerate(choice.get("turns") or [], 1):
        score = scores.get((model_id, record["question_id"], i))
        grade = "" if score is None else f' <span class="badge{" bad" if score == -1 else ""}">{"grade failed" if score == -1 else "score " + esc(score)}</span>'
        turns.append(f"<div class=muted>turn {i}{grade}</div><pre>{esc(text)}</pre>")
    return (f'<div class="answer"><h4>{esc(run.decoder_of(model_id))}</h4>{"".join(badges)}'
            f"{''.join(turns) or '<p class=muted>empty answer</p>'}</div>")


def samples_html(run: RunData) -> str:
    """A few questions with every decoder's answer side by side, so a reader can judge quality by eye."""
    blocks = []
    scores = _scores(run)
    for question_id in _common_questions(run):
        records = {m: next(r for r in run.answers[m] if r["question_id"] == question_id) for m in run.model_ids()}
        first = next(iter(records.values()))
        title = f"Question {question_id} · {first.get('category') or 'unknown'}"
        question = "".join(f'<div class="question"><b>user, turn {i}:</b> {esc(t)}</div>' for i, t in enumerate(_question_text(run, question_id), 1))
        answers = "".join(_answer_block(run, m, r, scores) for m, r in records.items())
        blocks.append(f'<div class="sample"><h3>{esc(title)}</h3>{question}<div class="answers">{answers}</div></div>')
    if not blocks:
        return '<p class="muted">no question was answered by every decoder yet.</p>'
    return "".join(blocks)


# ------------------------------------------------------------------------------ methodology


def method_html(report: ReportTables) -> str:
    """How the numbers were measured: the conventions a reader needs to trust (or question) them."""
    warmups = sorted({str(run.info.get("warmup", run.settings.get("warmup"))) for run in report.runs
                      if run.info.get("warmup", run.settings.get("warmup")) is not None})
    warmup = f"{', '.join(warmups)} untimed warm-up generation(s) per decoder" if warmups else "untimed warm-up generations per decoder"
    items = [
        "<b>new tokens</b>: tokens emitted per turn, cut at the end-of-sequence token (inclusive) and at max-new-tokens; "
        "tokens generated past either are never counted.",
        "<b>wall time</b>: prefill + decoding per turn, excluding tokenisation, with the accelerator synchronised; "
        f"{esc(warmup)} ran before timing started.",
        "<b>interleaving</b>: decoders run question by question in turn, so drift of the machine (heat, other load) hits all of them alike; "
        "all decoders of a run ran in the same process on the same machine.",
        "<b>tokens/s</b> = Σ new tokens / Σ wall time over a decoder's answered questions.",
        "<b>speedup</b> = tokens/s of the decoder / tokens/s of the baseline, both summed over the questions <i>both</i> answered "
        "(column “compared”); a decoder cut short is compared only on what it finished. The 95% interval is a paired bootstrap over "
        f"questions ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}, ratio of sums in each resample). Where fewer than "
        f"{MIN_QUESTIONS_FOR_CI} questions were compared (a category of a short run, often) there is no interval (“n=2, no CI”) and no "
        "whisker: a bootstrap over so few questions only restates them (its nominal 95% interval held the true speedup in 49% of "
        "simulated runs at 2 questions, 78% at 4, 82% at 5). Even above that it is somewhat too narrow (88% at 8 questions, 91% at 20).",
        "<b>speedup (Spec-Bench)</b>: Spec-Bench's convention, the mean of per-question tokens/s of the decoder divided by the baseline's, "
        "on the same questions; it weights short answers more and is shown so numbers compare with its leaderboard.",
        "<b>τ (acceptance length)</b>: mean accepted tokens per step = Σ new tokens / Σ decoding steps, a step being one base-model "
        "forward after prefill; it includes the base model's own token, so the baseline's τ is 1.00. It is Spec-Bench's “mean accepted "
        "tokens” and vLLM's “mean acceptance length”. “≥d drafts” is the share of steps that accepted at least d drafted tokens.",
        "<b>exact match</b>: share of turns whose token ids equal the baseline's. Greedy decoding with draft heads is lossless in exact "
        "arithmetic, so 100% is expected in float32; float16/bfloat16 kernels may round differently for different batch shapes and drift. "
        "n/a: sampled decoding or no baseline.",
        "<b>drift</b>: the drift table recomputes exact match from the answers' token ids, against the baseline decoded in the run's "
        "dtype and, for bfloat16/float16 runs, against the baseline decoded again in float32; “first divergence” is the index of the "
        "first token where a turn parts from the reference (turns that never part have none). The baseline's own match against float32 "
        "is the floor the precision sets: a decoder near it differs because of rounding, not because of drafting.",
        "<b>noise floor</b>: the <code>control</code> decoder is an A/A copy of the baseline, interleaved like any decoder; its speedup "
        "interval is what measurement noise alone produces. “vs noise” says whether a decoder's interval lies above it (faster), below "
        "it (slower) or overlaps it (inside noise); without a control, 1.00× stands in for the band. Turns timed while other processes "
        "shared the CPU are flagged by the run and counted (“shared-CPU turns”).",
        "<b>MT-Bench score</b>: single-answer grades 1–10 by an LLM judge (math, reasoning and coding against reference answers), FastChat's "
        "convention: mean per turn, overall = mean of all graded turns. A judgment without a parseable rating is missing and lowers "
        "<i>coverage</i> (graded / answered turns); it is never silently dropped. Δ score compares with the baseline on turns graded for both. "
        "A turn token-identical to the baseline's inherits the baseline's grade instead of a new judge call (“grades reused”).",
    ]
    return '<section class="method" id="method"><h2>How these numbers were measured</h2><ul>' + "".join(f"<li>{i}</li>" for i in items) + "</ul></section>"


# ---------------------------------------------------------------------------------- the page


def _section(anchor: str, title: str, *parts: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{"".join(parts)}</section>'


def _plots(plots: list[Plot], keys: Iterable[str]) -> str:
    wanted = tuple(keys)
    figures = "".join(figure_html(p) for p in plots if p.key in wanted or any(p.key.startswith(k + "-") for k in wanted))
    return f'<div class="figs">{figures}</div>' if figures else ""


def render_html(report: ReportTables, plots: list[Plot]) -> str:
    """The whole report page as one string."""
    t = report.tables
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    notes = ("<div class=notes><b>Notes</b><ul>" + "".join(f"<li>{esc(n)}</li>" for n in report.notes) + "</ul></div>") if report.notes else ""
    headline = headline_items(report)
    nav = "".join(f'<a href="#{a}">{esc(l)}</a>' for a, l in [("glance", "At a glance"), ("speed", "Speed"), ("drift", "Drift"), ("acceptance", "Acceptance"),
                                                                ("quality", "Quality"), ("samples", "Sample answers"), ("method", "Method"), ("config", "Configuration")])
    body = [
        "<h1>medusa-bench report</h1>",
        f'<p class="meta">Runs: {runs_line(report.runs)}. Generated {esc(generated)}.</p>',
        banner_html(report),
        f"<nav>{nav}</nav>",
        _section("glance", TABLE_TITLES["summary"], f'<ul class="headline">{"".join(headline)}</ul>' if headline else "", notes,
                 table_html(t["summary"], "no answers yet", FOOTERS["summary"]), _plots(plots, ["speedup", "quality"])),
        _section("speed", TABLE_TITLES["speed"], table_html(t["speed"], "no answers yet"),
                 *([f"<h3>{esc(TABLE_TITLES['spec_bench'])}</h3>", table_html(t["spec_bench"])] if "spec_bench" in t else []),
                 *([f"<h3>{esc(TABLE_TITLES['repeat'])}</h3>", table_html(t["repeat"])] if "repeat" in t else []),
                 "<h3>Per category</h3>", table_html(t["categories"], "no answers yet", FOOTERS["categories"])),
        _section("drift", TABLE_TITLES["precision"],
                 table_html(t["precision"], "no token ids to compare (sampled decoding, or a run written before token ids were saved)"),
                 _plots(plots, ["divergence"])),
        _section("acceptance", TABLE_TITLES["acceptance"], table_html(t["acceptance"]),
                 f"<h3>{esc(TABLE_TITLES['tokens_per_step'])}</h3>", table_html(t["tokens_per_step"]),
                 *([f"<h3>{esc(TABLE_TITLES['prediction'])}</h3>", table_html(t["prediction"], "", FOOTERS["prediction"])] if "prediction" in t else []),
                 _plots(plots, ["tokens_per_step", "tau", "step_time", "tree"])),
        *([_section("sweep", TABLE_TITLES["sweep"], table_html(t["sweep"]), _plots(plots, ["sweep"]))] if "sweep" in t else []),
        *([_section("batch", TABLE_TITLES["batch"], table_html(t["batch"], "", FOOTERS["batch"]), _plots(plots, ["batch"]))]
          if "batch" in t else []),
        _section("quality", TABLE_TITLES["quality"], table_html(t["quality"], "no judgments yet: run `medusa-bench judge` on the run folder")),
        _section("samples", "Sample answers", *(f"<h3>{esc(run.label)}</h3>" * (len(report.runs) > 1) + samples_html(run) for run in report.runs)),
        method_html(report),
        _section("config", TABLE_TITLES["config"], table_html(t["config"])),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>medusa-bench report: {esc(', '.join(r.label for r in report.runs))}</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(body)}</main></body></html>\n")
