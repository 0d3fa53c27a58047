"""Spec-Bench's layout: `--per-task` over its six tasks, the `spec-bench` decoder group, and the
report's Spec-Bench table (leaderboard rows, columns and numbers) on a real run of the embedded model."""

from __future__ import annotations

import json
import math
import re
import shutil
from io import StringIO

import pytest
from rich.console import Console

from conftest import run_cli
from medusa_bench.bench.config import DECODER_GROUPS, RunConfig, expand_groups
from medusa_bench.bench.loop import run_benchmark
from medusa_bench.decoders.registry import decoder_names, needs_step_profile
from medusa_bench.errors import UserError
from medusa_bench.inputs.questions import BENCH_TASKS, MT_BENCH_CATEGORIES, load_questions, task_of
from medusa_bench.results.report import build_report, collect
from medusa_bench.results.spec_bench import (LEADERBOARD, LEADERBOARD_DECODERS, LEADERBOARD_OVERALL, LEADERBOARD_TAU, TASK_LABELS,
                                            leaderboard_row)
from medusa_bench.results.tables import TABLE_TITLES

TASKS = list(BENCH_TASKS["spec_bench"])


@pytest.fixture(scope="module")
def spec_bench_file(data_dir):
    path = data_dir / "spec_bench" / "question.jsonl"
    if not path.is_file():
        pytest.skip(f"Spec-Bench questions not found at {path}")
    return path


def ids_by_task(questions) -> dict[str, list]:
    found = {task: [] for task in TASKS}
    for question in questions:
        found[task_of("spec_bench", question.category)].append(question.question_id)
    return found


# ------------------------------------------------------------------------------ --per-task
def test_per_task_takes_the_first_questions_of_each_task(spec_bench_file):
    _, one = load_questions("spec_bench", per_task=1)
    assert [(q.question_id, q.category) for q in one] == [(81, "writing"), (161, "translation"), (241, "summarization"),
                                                           (321, "qa"), (401, "math_reasoning"), (481, "rag")]
    _, eight = load_questions("spec_bench", per_task=8)
    by_task = ids_by_task(eight)
    # multi-turn: the first question of each MT-Bench category; the others: their first 8, in file order
    assert by_task["multi_turn"] == [81, 91, 101, 111, 121, 131, 141, 151]
    assert [q.category for q in eight[:8]] == list(MT_BENCH_CATEGORIES)
    assert by_task["translation"] == list(range(161, 169)) and by_task["rag"] == list(range(481, 489))
    _, ten = load_questions("spec_bench", per_task=10)  # round-robin: the 9th and 10th are the second writing and roleplay
    assert ids_by_task(ten)["multi_turn"] == [81, 82, 91, 92, 101, 111, 121, 131, 141, 151]
    assert [q.question_id for q in load_questions("spec_bench", per_task=10)[1]] == [q.question_id for q in ten]  # deterministic
    _, everything = load_questions("spec_bench", per_task=500)
    assert {task: len(ids) for task, ids in ids_by_task(everything).items()} == {task: 80 for task in TASKS}
    _, math_only = load_questions("spec_bench", per_task=3, categories=["math", "rag"])  # the other selections still apply
    assert [q.question_id for q in math_only] == [111, 112, 113, 481, 482, 483]


def test_per_task_refusals_are_one_line(spec_bench_file, capsys, monkeypatch):
    with pytest.raises(UserError, match=r"^--per-task must be >= 1, got 0$"):
        load_questions("spec_bench", per_task=0)
    with pytest.raises(UserError, match="--per-task: mt_bench has no tasks"):
        load_questions("mt_bench", per_task=2)
    code, _, err = run_cli(capsys, monkeypatch, "run", "--bench", "quick", "--per-task", "2", "--out", "unused")
    assert code == 2 and err.count("\n") <= 2 and "error: --per-task: quick has no tasks" in " ".join(err.split())
    code, _, err = run_cli(capsys, monkeypatch, "run", "--bench", "spec_bench", "--per-task", "-1", "--out", "unused")
    assert code == 2 and "error: --per-task must be >= 1, got -1" in err


# ------------------------------------------------------------------------------ the decoder group
def cli_args(**kw) -> dict:
    base = dict(decoders="baseline", question_ids=None, categories=None, temperature="0", max_new_tokens=8, warmup=0)
    return {**base, **kw}


def test_spec_bench_group_is_the_leaderboard_in_its_order():
    assert LEADERBOARD_DECODERS == ("eagle3", "samd-eagle2", "eagle2", "hydra", "recycling", "eagle", "medusa", "pld", "sps", "rest",
                                    "lookahead")
    assert [(row.overall, row.tau) for row in LEADERBOARD][:3] == [(3.02, 5.71), (2.77, 4.52), (2.46, 4.43)]
    missing = [name for name in LEADERBOARD_DECODERS if name not in decoder_names()]
    if missing:  # decoders still being written: the group says which, in one line
        with pytest.raises(UserError, match=f"decoder group 'spec-bench' needs {', '.join(missing)}, not registered"):
            RunConfig.from_cli(**cli_args(decoders="spec-bench", control=True))
        return
    with pytest.raises(UserError, match="decoder 'rest' needs --rest-datastore PATH"):  # refused before any model loads
        RunConfig.from_cli(**cli_args(decoders="spec-bench", control=True))
    store = {"rest_datastore": "store.npz"}  # checked for being set here; read when rest is built
    config = RunConfig.from_cli(**cli_args(decoders="spec-bench", control=True, decoder_options=store))
    assert config.decoders == ["baseline", *LEADERBOARD_DECODERS, "control"]
    assert RunConfig.from_cli(**cli_args(decoders="baseline,spec-bench", decoder_options=store)).decoders == ["baseline", *LEADERBOARD_DECODERS]


def test_groups_expand_in_place_once_and_refuse_unregistered_members(monkeypatch):
    monkeypatch.setitem(DECODER_GROUPS, "free", ("baseline", "pld", "samd"))
    assert expand_groups(["suffix", "free"]) == ["suffix", "baseline", "pld", "samd"]
    assert expand_groups(["pld", "free", "suffix"]) == ["pld", "baseline", "samd", "suffix"]  # pld once, where it was listed
    config = RunConfig.from_cli(**cli_args(decoders="free", control=True))
    assert config.decoders == ["baseline", "pld", "samd", "control"]
    monkeypatch.setitem(DECODER_GROUPS, "broken", ("baseline", "no-such-decoder"))
    with pytest.raises(UserError, match=r"^decoder group 'broken' needs no-such-decoder, not registered .*valid names: baseline, ") as error:
        RunConfig.from_cli(**cli_args(decoders="pld,broken"))
    assert "\n" not in str(error.value)


def test_full_asks_a_step_profile_drafter_for_every_candidate():
    """`recycling:full` is the paper's drafting (the leaderboard's τ) beside `recycling`, what pays here."""
    config = RunConfig.from_cli(**cli_args(decoders="baseline,recycling,recycling:full"))
    assert config.decoders == ["baseline", "recycling", "recycling:full"]
    assert not needs_step_profile("recycling:full") and needs_step_profile("recycling")
    assert leaderboard_row("recycling:full").method == "Recycling"
    with pytest.raises(UserError, match=r"^pld:chain-2: pld drafts on no tree, .*: pld:full, recycling:full, ") as error:
        RunConfig.from_cli(**cli_args(decoders="baseline,pld:chain-2"))
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------ the report's table
@pytest.fixture(scope="module")
def spec_run(smollm, spec_bench_file, tmp_path_factory):
    """One question per task, 8 new tokens, samd listed before pld (the table reorders), with the A/A control.
    pld and samd draft every candidate: their step-time profile took 3 minutes to measure on this shared CPU."""
    out = tmp_path_factory.mktemp("spec") / "run"
    drafts_all = {"extra": {"pld_adaptive": False, "samd_adaptive": False}}
    config = RunConfig.from_cli(**cli_args(decoders="baseline,samd,pld", control=True), bench="spec_bench", per_task=1, out=out,
                                device="cpu", dtype="float32", precision_reference="none", decoder_options=drafts_all)
    run_benchmark(config, console=Console(file=StringIO()), loaded=smollm)
    log = StringIO()
    run_benchmark(config, console=Console(file=log, width=200), loaded=smollm)  # the same command resumes: nothing left to do
    assert "nothing to do: all 6 questions × 4 decoders" in log.getvalue()
    return out


def answers(run_dir, decoder: str) -> dict:
    path = run_dir / "model_answer" / f"smollm2-135m-{decoder}.jsonl"
    return {r["question_id"]: r for r in map(json.loads, path.read_text().splitlines())}


def speedup(decoder: dict, baseline: dict, ids) -> float:
    """Ratio of summed tokens/s on `ids`, straight from the answer files."""
    def rate(records):
        tokens = sum(sum(records[q]["choices"][0]["new_tokens"]) for q in ids)
        return tokens / sum(sum(records[q]["choices"][0]["wall_time"]) for q in ids)
    return rate(decoder) / rate(baseline)


def test_spec_bench_table_has_the_leaderboard_layout_and_the_runs_numbers(spec_run):
    table = collect([spec_run]).tables["spec_bench"]
    assert list(table.decoder) == ["pld", "samd", "control"]  # leaderboard rows first, then the others, control last
    assert list(table.columns) == ["run", "decoder", "reference", "n_compared", *TASK_LABELS.values(), "Overall", "speedup_ci_low",
                                   "speedup_ci_high", "vs_noise", "tau", LEADERBOARD_OVERALL, LEADERBOARD_TAU]
    assert list(TASK_LABELS.values()) == ["Multi-turn", "Translation", "Summarization", "QA", "Math", "RAG"]
    baseline = answers(spec_run, "baseline")
    first = {"multi_turn": 81, "translation": 161, "summarization": 241, "qa": 321, "math_reasoning": 401, "rag": 481}
    for _, row in table.iterrows():
        mine = answers(spec_run, row.decoder)
        for task, label in TASK_LABELS.items():
            assert row[label] == pytest.approx(speedup(mine, baseline, [first[task]]))
        assert row.Overall == pytest.approx(speedup(mine, baseline, list(first.values())))
        assert row.n_compared == 6 and row.speedup_ci_low <= row.Overall <= row.speedup_ci_high  # 6 questions: an interval
        steps = sum(sum(r["choices"][0]["decoding_steps"]) for r in mine.values())
        assert row.tau == pytest.approx(sum(sum(r["choices"][0]["new_tokens"]) for r in mine.values()) / steps)
    pld, samd, control = (table[table.decoder == name].iloc[0] for name in ("pld", "samd", "control"))
    assert (pld[LEADERBOARD_OVERALL], pld[LEADERBOARD_TAU]) == (1.56, 1.67)
    assert math.isnan(samd[LEADERBOARD_OVERALL]) and math.isnan(control[LEADERBOARD_TAU])
    assert control.vs_noise == "noise floor" and pld.vs_noise in ("faster", "slower", "inside noise")


def test_spec_bench_table_in_every_format(spec_run, tmp_path):
    markdown = build_report([spec_run], fmt="markdown")
    title = TABLE_TITLES["spec_bench"]
    section = markdown.split(f"## {title}")[1].split("\n## ")[0]
    header = ("| decoder | compared | Multi-turn | Translation | Summarization | QA | Math | RAG | Overall | 95% CI | vs noise | τ | "
              "Spec-Bench leaderboard (A100, Vicuna-13B): Overall | Spec-Bench leaderboard (A100, Vicuna-13B): τ |")
    assert section.strip().splitlines()[0] == header
    assert [line.split(" | ")[0] for line in section.strip().splitlines()[2:]] == ["| pld", "| samd", "| control"]
    assert "| 1.56 | 1.67 |" in section and "Spec-Bench table: each speedup is against this run's baseline" in markdown
    text = build_report([spec_run], fmt="table")
    assert title in text and "Spec-Bench leaderboard (A100, Vicuna-13B): τ" in text
    page = build_report([spec_run], out=tmp_path / "report.html").read_text()
    spec = page.split(f"<h3>{title}</h3>")[1].split("<h3>Per category</h3>")[0]
    assert "<th>Multi-turn</th>" in spec and "<th>Spec-Bench leaderboard (A100, Vicuna-13B): τ</th>" in spec
    assert spec.index("<td>pld</td>") < spec.index("<td>samd</td>") < spec.index("<td>control</td>")


def test_no_spec_bench_table_for_other_benches(smollm, tmp_path):
    out = tmp_path / "quick"
    config = RunConfig.from_cli(**cli_args(max_new_tokens=2), bench="quick", limit=1, out=out, device="cpu", dtype="float32",
                                precision_reference="none")
    run_benchmark(config, console=Console(file=StringIO()), loaded=smollm)
    report = collect([out])
    assert "spec_bench" not in report.tables and not any("Spec-Bench table" in note for note in report.notes)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian package `chromium` is not installed (the test set-up script installs it)")
def test_spec_bench_table_as_a_browser_parses_it(spec_run, tmp_path):
    """The page as headless Chromium parsed it: the Spec-Bench table whole, its header in the leaderboard's order."""
    from test_report import chromium

    page = build_report([spec_run], out=tmp_path / "report.html")
    dom = chromium("--virtual-time-budget=3000", "--dump-dom", page.resolve().as_uri(), profile=tmp_path / "profile").stdout
    spec = dom.split(f"<h3>{TABLE_TITLES['spec_bench']}</h3>")[1].split("</table>")[0]
    headers = re.findall(r"<th>([^<]*)</th>", spec)
    assert headers[headers.index("Multi-turn"):headers.index("Overall") + 1] == [*TASK_LABELS.values(), "Overall"]
    assert re.findall(r"<tr><td>([^<]*)</td>", spec) == ["pld", "samd", "control"]
    assert "<script" not in dom.lower()
