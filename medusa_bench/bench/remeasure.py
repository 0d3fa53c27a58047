"""`run --remeasure-flagged`: re-time the questions whose turns were measured while the CPU was shared."""

from __future__ import annotations

from rich.console import Console

from medusa_bench.bench.answer import answer_question, question_order, warm_up
from medusa_bench.bench.config import RunConfig
from medusa_bench.bench.contention import TIMING_FIELDS, is_flagged
from medusa_bench.bench.progress import live_rate, run_progress
from medusa_bench.inputs.questions import Question
from medusa_bench.results import files


def remeasure_flagged(questions: list[Question], names: list[str], decoders: dict, loaded, config: RunConfig,
                      paths: dict, console: Console) -> None:
    """Re-time every decoder on the questions with a contended turn; keep the answers (tokens, text).

    Replaces wall_time, prefill_time, step_times, cpu_share, load_avg and contended in place and marks the record
    "remeasured"; an answer whose tokens differ on the re-run keeps its old record, said at the end.
    """
    records = {name: files.read_jsonl(paths[name]) for name in names}
    by_question = {name: {str(r["question_id"]): r for r in rows} for name, rows in records.items()}
    flagged = [(index, question) for index, question in enumerate(questions)
               if any(is_flagged(r) for name in names if (r := by_question[name].get(str(question.question_id))))]
    if not flagged:
        console.print("no contended turns to remeasure")
        return
    warm_up(decoders, loaded, questions, config)
    kept_old = []
    with run_progress(console) as progress:
        task = progress.add_task("remeasuring", total=len(flagged) * len(names))
        for index, question in flagged:
            qid = str(question.question_id)
            for name in question_order(names, index):
                old = by_question[name].get(qid)
                if old is not None:
                    new = answer_question(decoders[name], loaded, question, config, on_step=live_rate(progress, task, question, name))
                    if new["token_ids"] != old["choices"][0]["token_ids"]:
                        kept_old.append(f"{name} on question {qid}")
                    else:
                        old["choices"][0].update({key: new[key] for key in TIMING_FIELDS if key in new})
                        old["remeasured"] = True
                progress.advance(task)
            for name in names:
                if qid in by_question[name]:
                    files.rewrite_jsonl(paths[name], records[name])  # atomic: a kill keeps the old file or the new one
    console.print(f"remeasured {len(flagged)} questions × {len(names)} decoders")
    if kept_old:
        console.print(f"kept the old answer and timing of {', '.join(kept_old)}: the re-run's tokens differ")
