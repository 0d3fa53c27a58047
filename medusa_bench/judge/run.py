"""Grade a run folder's answers with an LLM judge: `judge_run(run_dir, ...)`.

Writes `model_judgment/<judge>_single.jsonl` (or `_pair.jsonl`) in FastChat's format, one line
per judgment appended as soon as it is made, so a killed run loses only the calls in flight
and a re-run skips what is already in the file. A greedy decoder whose answer is
token-identical to the baseline's (`exact_match`) reuses the baseline's judgment
(`reused_from`) instead of paying for another call. Unparseable judgments (score -1, winner
"error") are kept and skipped on resume; `retry_unparseable` asks again and replaces each old
line with the new judgment in an atomic rewrite of the file.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from medusa_bench.errors import UserError
from medusa_bench.judge import mtbench
from medusa_bench.judge.summary import summarize_pairwise, summarize_single
from medusa_bench.judge.client import DEFAULT_KEY_ENV, JudgeClient, RetryPolicy, run_bounded
from medusa_bench.results.files import JUDGMENT_DIR, append_jsonl, load_answers, load_run, lock_run_dir, read_jsonl, rewrite_jsonl

MODES = ("single", "pairwise")
SCORES = ("text", "logprobs")
REFERENCE_BENCHES = ("mt_bench", "spec_bench")  # benches whose MT-Bench questions have GPT-4 references
TOP_LOGPROBS = 20
CHARS_PER_TOKEN = 4  # the usual English average of GPT tokenizers: a dry run's estimate, not a count


@dataclass
class Answer:
    """One decoder's answer to one question, as the judge needs it."""

    model_id: str
    decoder: str
    question_id: int
    turns: list[str]
    exact_match: list | None


@dataclass
class Task:
    """One judgment to make: a single grading, or a pairwise game (both orders)."""

    question: dict
    turn: int
    answer: Answer
    other: Answer | None = None  # pairwise: the baseline
    reference: list[str] | None = None


@dataclass
class JudgeResult:
    """What `judge_run` did and the summary of everything in the judgment file."""

    path: Path
    mode: str
    judged: int = 0  # new judgments that needed judge calls
    reused: int = 0  # new judgments copied from the baseline's (or identical-answer ties)
    skipped: int = 0  # already in the file
    retried: int = 0  # unparseable judgments asked again (retry_unparseable) and replaced
    unparsed: int = 0  # new judgments with no parseable verdict (score -1 / winner "error")
    summary: "object" = None  # pandas DataFrame, see summarize_*
    records: list[dict] = field(default_factory=list, repr=False)
    dry_run: Optional["DryRun"] = None  # judge_run(dry_run=True): what it would send; nothing else is set


@dataclass
class DryRun:
    """What a judgment would send (`judge --dry-run`), sending nothing."""

    requests: int  # judge calls (pairwise: two per game, one per order)
    prompt_tokens: int  # about: the prompts' characters / CHARS_PER_TOKEN
    max_output_tokens: int  # at most: requests × --max-tokens
    reused: int  # judgments copied from the baseline's instead of asked for
    skipped: int  # already in the judgment file

    def line(self) -> str:
        return (f"dry run: {self.requests} judge requests, about {self.prompt_tokens:,} prompt tokens "
                f"(+ at most {self.max_output_tokens:,} output tokens); {self.reused} judgments reused, "
                f"{self.skipped} already done; nothing sent")


def judgment_path(run_dir: Path, judge_model: str, mode: str) -> Path:
    """model_judgment/<judge>_single.jsonl or <judge>_pair.jsonl (unsafe characters → '_')."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", judge_model).strip("._") or "judge"
    return Path(run_dir) / JUDGMENT_DIR / f"{safe}_{'single' if mode == 'single' else 'pair'}.jsonl"


def judge_run(
    run_dir: Path | str,
    *,
    judge_model: str = "gpt-4",
    base_url: str | None = None,
    api_key_env: str = DEFAULT_KEY_ENV,
    mode: str = "single",
    parallel: int = 8,
    decoders: list[str] | None = None,
    baseline: str = "baseline",
    reuse: bool = True,
    score: str = "text",
    max_tokens: int = 2048,
    temperature: float = 0.0,
    timeout: float = 120.0,
    retry: RetryPolicy | None = None,
    questions: Path | str | None = None,
    judge_prompts: Path | str | None = None,
    reference_answers: Path | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    retry_unparseable: bool = False,
    dry_run: bool = False,
) -> JudgeResult:
    """Judge the answers in `run_dir`; returns counts and a summary (see module docstring).

    `progress(done, total)` is called after each judgment. Retryable endpoint failures are
    retried per `retry`; when they run out, or on any other 4xx, a `UserError` is raised after
    the judgments in flight are saved. `retry_unparseable` asks the judge again for judgments
    stored as unparseable; each new one replaces its old line. `dry_run`: count the requests and
    about how many tokens they would send (`result.dry_run`), with no key, no call, no file written.
    """
    mode = {"pairwise-baseline": "pairwise", "pair": "pairwise"}.get(mode, mode)  # FastChat's names too
    if mode not in MODES:
        raise UserError(f"unknown judge mode {mode!r}; valid modes are: {', '.join(MODES)}")
    if score not in SCORES:
        raise UserError(f"unknown --score {score!r}; valid values are: {', '.join(SCORES)}")
    if score == "logprobs" and mode != "single":
        raise UserError("--score logprobs applies to single-answer grading only (--mode single)")
    if parallel < 1 or max_tokens < 1:
        raise UserError("--parallel and --max-tokens must be at least 1")
    run_dir = Path(run_dir)
    client = None if dry_run else JudgeClient(judge_model, base_url=base_url, key_env=api_key_env, timeout=timeout, retry=retry)

    run_info = load_run(run_dir)
    run_lock = None if dry_run else lock_run_dir(run_dir)  # noqa: F841 — held until this call returns: one writer per run folder
    answers = _collect_answers(run_dir, run_info)
    selected = _select(answers, decoders, baseline, mode)
    baseline_id = next((m for m, a in answers.items() if a and next(iter(a.values())).decoder == baseline), None)
    if mode == "pairwise" and baseline_id is None:
        raise UserError(f"pairwise mode compares each decoder with {baseline!r}, but the run has no {baseline!r} answers")

    question_map = mtbench.load_questions(_question_file(run_info, questions))
    for model_id in selected:
        missing = [qid for qid in answers[model_id] if qid not in question_map]
        if missing:
            raise UserError(f"{model_id} answers question {missing[0]}, which is not in the question file: pass --questions")
    prompts = mtbench.load_judge_prompts(
        mtbench.resolve_data_file("mt_bench", mtbench.JUDGE_PROMPTS_FILE, judge_prompts, "--judge-prompts")
    )
    references = _references(run_info, reference_answers, question_map, answers, selected)

    path = judgment_path(run_dir, judge_model, mode)
    existing = read_jsonl(path)
    if mode == "single":
        _check_score_method(path, existing, score)
    # Keys whose unparseable judgment is asked again: left out of `existing` so they are planned
    # (and a reuse never copies the old -1), replaced in the file when the new one arrives.
    stale = {_record_key(mode, r) for r in existing if _unparsed(r)} if retry_unparseable else set()
    existing = [r for r in existing if _record_key(mode, r) not in stale]

    plan = _plan(mode, selected, answers, baseline_id, question_map, references, reuse)
    keys = {_record_key(mode, r) for r in existing}
    todo_call, todo_reuse, skipped = [], [], 0
    for task, reusable in plan:
        key = _task_key(mode, task, judge_model)
        if key in keys:
            skipped += 1
        elif reusable and mode == "pairwise":
            todo_reuse.append(task)
        elif reusable and (_baseline_key(task, baseline_id, judge_model) in keys or baseline_id in selected):
            todo_reuse.append(task)
        else:
            todo_call.append(task)

    result = JudgeResult(path=path, mode=mode, skipped=skipped)
    if dry_run:
        result.dry_run = _dry_run(mode, prompts, todo_call, len(todo_reuse), skipped, max_tokens)
        return result
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    total = len(todo_call) + len(todo_reuse)
    done = 0

    def save(record: dict) -> None:
        nonlocal done
        with lock:
            key = _record_key(mode, record)
            if key in stale:
                _replace_line(path, mode, key, record)
                stale.discard(key)
                result.retried += 1
            else:
                append_jsonl(path, record)
            existing.append(record)
            done += 1
            if record.get("reused_from"):
                result.reused += 1
            else:
                result.judged += 1
            if _unparsed(record):
                result.unparsed += 1
        if progress:
            progress(done, total)

    def work(task: Task) -> None:
        if mode == "single":
            save(_judge_single(client, prompts, task, judge_model, score, max_tokens, temperature))
        else:
            save(_judge_pair(client, prompts, task, judge_model, max_tokens, temperature))

    if progress:
        progress(0, total)
    for _ in run_bounded(todo_call, work, parallel):
        pass
    for task in todo_reuse:
        if mode == "pairwise":
            save(_identical_pair(prompts, task, judge_model))
            continue
        source = _find_baseline_record(existing, task, baseline_id, judge_model)
        if source is None:  # the baseline's own judgment is missing: pay for this one
            work(task)
            continue
        record = dict(source, model=task.answer.model_id, reused_from=baseline_id, tstamp=time.time())
        save(record)

    result.records = read_jsonl(path)
    if mode == "single":
        result.summary = summarize_single(result.records, answers, question_map, selected)
    else:
        result.summary = summarize_pairwise(result.records, answers, question_map, selected, baseline_id)
    return result


# ------------------------------------------------------------------------------ inputs
def _collect_answers(run_dir: Path, run_info: dict) -> dict[str, dict[int, Answer]]:
    """{model_id: {question_id: Answer}} from model_answer/*.jsonl."""
    decoder_of = {model_id: decoder for decoder, model_id in (run_info.get("models") or {}).items()}
    collected: dict[str, dict[int, Answer]] = {}
    for model_id, records in load_answers(run_dir).items():
        by_question = {}
        for record in records:
            choice = (record.get("choices") or [{}])[0]
            by_question[record["question_id"]] = Answer(
                model_id=model_id,
                decoder=record.get("decoder") or decoder_of.get(model_id, model_id),
                question_id=record["question_id"],
                turns=list(choice.get("turns") or []),
                exact_match=choice.get("exact_match"),
            )
        collected[model_id] = by_question
    if not any(collected.values()):
        raise UserError(f"{run_dir} has no answers to judge (model_answer/*.jsonl is empty or missing): run `medusa-bench run` first")
    return collected


def _select(answers: dict, decoders: list[str] | None, baseline: str, mode: str) -> list[str]:
    """Model ids to judge: all, or those whose decoder name or model id is in `decoders`."""
    names = {m: (next(iter(a.values())).decoder if a else m) for m, a in answers.items()}
    if not decoders:
        chosen = [m for m in answers if answers[m]]
    else:
        chosen = []
        for wanted in decoders:
            match = [m for m, d in names.items() if wanted in (m, d)]
            if not match:
                raise UserError(f"no answers for decoder {wanted!r} in this run; it has: {', '.join(sorted(set(names.values())))}")
            chosen += [m for m in match if m not in chosen]
    if mode == "pairwise":
        chosen = [m for m in chosen if names[m] != baseline]
        if not chosen:
            raise UserError("pairwise mode needs at least one decoder besides the baseline")
    return chosen


def _question_file(run_info: dict, explicit) -> Path:
    """--questions > the run's own question file > <bench>/question.jsonl resolved like the run's."""
    settings = run_info.get("settings") or {}
    if not explicit:
        for key in ("questions", "question_file", "questions_path"):
            value = settings.get(key)
            if isinstance(value, str) and Path(value).expanduser().is_file():
                return Path(value).expanduser()
    return mtbench.resolve_data_file(settings.get("bench") or "mt_bench", "question.jsonl", explicit, "--questions")


def _references(run_info, explicit, question_map, answers, selected) -> dict:
    """{question_id: reference turns} for reference-graded categories.

    From the question record's own `reference` field when it has one, else from GPT-4's
    reference answers (MT-Bench and Spec-Bench's MT-Bench part, or an explicit file).
    """
    needed = {
        qid for m in selected for qid in answers[m]
        if question_map[qid].get("category") in mtbench.NEED_REF_CATS
    }
    references = {qid: question_map[qid]["reference"] for qid in needed if question_map[qid].get("reference")}
    bench = (run_info.get("settings") or {}).get("bench") or "mt_bench"
    if needed - references.keys() and (explicit or bench in REFERENCE_BENCHES):
        from_file = mtbench.load_reference_answers(
            mtbench.resolve_data_file("mt_bench", mtbench.REFERENCE_FILE, explicit, "--reference-answers")
        )
        references = {**{q: from_file[q] for q in needed if q in from_file}, **references}
    return references


def _check_score_method(path: Path, existing: list[dict], score: str) -> None:
    methods = {str(r.get("score_method", "text")).split("-")[0] for r in existing}
    if methods and methods != {score}:
        raise UserError(
            f"{path} holds judgments scored by {', '.join(sorted(methods))}, not {score}: "
            f"use --score {methods.pop()} to resume it, or move the file away to start over"
        )


# ------------------------------------------------------------------------------ planning
def _plan(mode, selected, answers, baseline_id, question_map, references, reuse):
    """[(Task, reusable)] for every (answer, turn) to judge, baseline first."""
    order = sorted(selected, key=lambda m: m != baseline_id)
    plan = []
    for model_id in order:
        for qid, answer in sorted(answers[model_id].items()):
            question = question_map[qid]
            base = answers.get(baseline_id, {}).get(qid) if baseline_id else None
            reference = references.get(qid) if question.get("category") in mtbench.NEED_REF_CATS else None
            for turn in range(1, min(len(question["turns"]), len(answer.turns), 2) + 1):
                if mode == "pairwise" and (base is None or len(base.turns) < turn):
                    continue
                task = Task(question, turn, answer, base if mode == "pairwise" else None, reference)
                reusable = reuse and model_id != baseline_id and _identical(answer, base, turn)
                plan.append((task, reusable))
    return plan


def _identical(answer: Answer, base: Answer | None, turn: int) -> bool:
    """Token-identical to the baseline for every turn the judge sees (exact_match true)."""
    if base is None or not isinstance(answer.exact_match, list) or len(answer.exact_match) < turn:
        return False
    return all(answer.exact_match[:turn]) and answer.turns[:turn] == base.turns[:turn]


def _judge_tuple(judge_model: str, prompt: str) -> list:
    return [judge_model, prompt]


def _task_prompt_name(mode: str, task: Task) -> str:
    return mtbench.prompt_name(
        "single" if mode == "single" else "pair", task.question.get("category", ""), task.turn, task.reference is not None
    )


def _task_key(mode, task: Task, judge_model) -> tuple:
    judge = (judge_model, _task_prompt_name(mode, task))
    if mode == "single":
        return (task.question["question_id"], task.answer.model_id, task.turn, judge)
    return (task.question["question_id"], task.answer.model_id, task.other.model_id, task.turn, judge)


def _baseline_key(task: Task, baseline_id, judge_model) -> tuple:
    judge = (judge_model, _task_prompt_name("single", task))
    return (task.question["question_id"], baseline_id, task.turn, judge)


def _record_key(mode, record: dict) -> tuple:
    judge = tuple(record.get("judge") or ())
    if mode == "single":
        return (record.get("question_id"), record.get("model"), record.get("turn", 1), judge)
    return (record.get("question_id"), record.get("model_1"), record.get("model_2"), record.get("turn", 1), judge)


def _find_baseline_record(records, task, baseline_id, judge_model) -> dict | None:
    key = _baseline_key(task, baseline_id, judge_model)
    for record in records:
        if _record_key("single", record) == key:
            return record
    return None


def _unparsed(record: dict) -> bool:
    """A judgment without a verdict: score -1 (single) or an "error" winner (pairwise)."""
    return record.get("score", 0) == mtbench.UNPARSED or "error" in (record.get("g1_winner"), record.get("g2_winner"))


def _replace_line(path: Path, mode: str, key: tuple, record: dict) -> None:
    """Put `record` where the unparseable judgment with `key` was; atomic (temp file + rename),
    so a kill leaves either the old file or the new one."""
    kept, placed = [], False
    for old in read_jsonl(path):
        if _record_key(mode, old) == key and _unparsed(old):
            if not placed:
                kept.append(record)
                placed = True
            continue
        kept.append(old)
    if not placed:
        kept.append(record)
    rewrite_jsonl(path, kept)


# ------------------------------------------------------------------------------ judging
def _dry_run(mode: str, prompts, tasks: list[Task], reused: int, skipped: int, max_tokens: int) -> DryRun:
    """The calls `tasks` would make and their prompts' size, built as the real calls build them."""
    calls = []
    for task in tasks:
        if mode == "single":
            calls.append(mtbench.single_prompt(prompts, task.question, task.answer.turns, task.turn, task.reference))
        else:  # both orders: two calls per game
            a, b = task.answer.turns, task.other.turns
            calls += [mtbench.pair_prompt(prompts, task.question, a, b, task.turn, task.reference),
                      mtbench.pair_prompt(prompts, task.question, b, a, task.turn, task.reference)]
    characters = sum(len(m["content"]) for prompt in calls for m in prompt.messages())
    return DryRun(requests=len(calls), prompt_tokens=round(characters / CHARS_PER_TOKEN),
                  max_output_tokens=len(calls) * max_tokens, reused=reused, skipped=skipped)


def _judge_single(client, prompts, task: Task, judge_model, score, max_tokens, temperature) -> dict:
    prompt = mtbench.single_prompt(prompts, task.question, task.answer.turns, task.turn, task.reference)
    reply = client.chat(
        prompt.messages(), max_tokens=max_tokens, temperature=temperature,
        top_logprobs=TOP_LOGPROBS if score == "logprobs" else None,
    )
    rating = mtbench.parse_rating(reply.text)
    record = {
        "question_id": task.question["question_id"],
        "model": task.answer.model_id,
        "judge": _judge_tuple(judge_model, prompt.name),
        "user_prompt": prompt.user,
        "judgment": reply.text,
        "score": rating,
        "turn": task.turn,
        "tstamp": time.time(),
        "score_method": "text",
    }
    if score == "logprobs":
        expected = mtbench.expected_rating(reply.logprobs)
        if expected is None:
            record["score_method"] = "logprobs-fallback-text"
        else:
            record.update(score=round(expected, 4), score_method="logprobs", parsed_score=rating)
    return record


def _judge_pair(client, prompts, task: Task, judge_model, max_tokens, temperature) -> dict:
    a, b = task.answer, task.other
    g1 = mtbench.pair_prompt(prompts, task.question, a.turns, b.turns, task.turn, task.reference)
    g2 = mtbench.pair_prompt(prompts, task.question, b.turns, a.turns, task.turn, task.reference)
    text1 = client.chat(g1.messages(), max_tokens=max_tokens, temperature=temperature).text
    text2 = client.chat(g2.messages(), max_tokens=max_tokens, temperature=temperature).text
    g1_map = {"A": "model_1", "B": "model_2"}
    g2_map = {"A": "model_2", "B": "model_1"}
    v1, v2 = mtbench.parse_pair_verdict(text1), mtbench.parse_pair_verdict(text2)
    return {
        "question_id": task.question["question_id"],
        "model_1": a.model_id,
        "model_2": b.model_id,
        "g1_winner": g1_map.get(v1, v1),
        "g2_winner": g2_map.get(v2, v2),
        "judge": _judge_tuple(judge_model, g1.name),
        "g1_user_prompt": g1.user,
        "g1_judgment": text1,
        "g2_user_prompt": g2.user,
        "g2_judgment": text2,
        "turn": task.turn,
        "tstamp": time.time(),
    }


def _identical_pair(prompts, task: Task, judge_model) -> dict:
    """A tie recorded without a call: the two answers are token-identical."""
    a, b = task.answer, task.other
    g1 = mtbench.pair_prompt(prompts, task.question, a.turns, b.turns, task.turn, task.reference)
    g2 = mtbench.pair_prompt(prompts, task.question, b.turns, a.turns, task.turn, task.reference)
    note = "(not judged: the answers are token-identical, so this is a tie)"
    return {
        "question_id": task.question["question_id"],
        "model_1": a.model_id,
        "model_2": b.model_id,
        "g1_winner": "tie",
        "g2_winner": "tie",
        "judge": _judge_tuple(judge_model, g1.name),
        "g1_user_prompt": g1.user,
        "g1_judgment": note,
        "g2_user_prompt": g2.user,
        "g2_judgment": note,
        "turn": task.turn,
        "tstamp": time.time(),
        "reused_from": b.model_id,
    }


# ------------------------------------------------------------------------------ summaries
