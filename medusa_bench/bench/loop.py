"""The benchmark run: questions × decoders, interleaved, timed, appended as it goes, resumable.

Decoders take turns question by question so machine drift (thermal, other processes) hits all
of them alike. Each finished (question, decoder) pair is one appended line in that decoder's
answer file; re-running the same command skips those pairs. A run folder made with other
settings is refused instead of mixing results.

`run_benchmark` is the Python API behind `medusa-bench run`; the parts it joins:
config.py (options, settings, resume checks) · run_folder.py (run.json, file names, the folder's
lock) · answer.py (the run's decoders, one question, exact match, storing) · reference.py (the
float32 reference) · remeasure.py · audit.py (the optimiser's prediction checked on the run's
text, prediction.json) · distributed.py (Ray) · endpoints.py (serving endpoints).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Optional

from rich.console import Console

from medusa_bench.bench import precision
from medusa_bench.bench.audit import AUDIT_FILE, audit_run, early_check
from medusa_bench.bench.answer import answer_one_question, build_run_decoders, references_first, store_ready, warm_up
from medusa_bench.bench.autotree import saved_profiles, store_in_run
from medusa_bench.bench.pld_search import saved_searches, store_searches
from medusa_bench.bench.build import fastest_prediction
from medusa_bench.bench.config import (RunConfig, check_same_contents, check_same_settings, content_hashes, default_out,
                                       settings_of)
from medusa_bench.bench.device import device_name
from medusa_bench.bench.progress import live_rate, run_progress
from medusa_bench.inputs.questions import Question, load_questions
from medusa_bench.bench.reference import Float32Baseline, PrecisionReference
from medusa_bench.bench.remeasure import remeasure_flagged
from medusa_bench.bench.run_verdict import write_run_verdict
from medusa_bench.bench.run_folder import claimed_run_dir, keep_questions, local_source, open_answers, reference_answers, write_run_file
from medusa_bench.decoders.registry import build_decoder, decoder_names, split_spec
from medusa_bench.errors import UserError
from medusa_bench.results import files
from medusa_bench.results.stats import MIN_QUESTIONS_FOR_CI
from medusa_bench.runtime.engine import use_engine


def run_benchmark(config: RunConfig, console: Optional[Console] = None, loaded=None, endpoints=None) -> Path:
    """Run (or resume) a benchmark; returns the run folder. Python API behind `medusa-bench run`.

    In this process, or over Ray workers (`config.on_cluster`: distributed.run_on_cluster); either
    way this process is the only one writing the run folder. `endpoints` (endpoints.EndpointRun):
    serving endpoints that answer beside the in-process decoders, question by question. A run
    refused before it wrote anything leaves no folder behind (run_folder.claimed_run_dir).
    """
    from medusa_bench.models import model_name, resolve_device

    console = console or Console(stderr=True)
    question_file, questions = load_questions(config.bench, config.questions, config.limit, config.question_ids, config.categories, config.per_task)
    for name in config.decoders:  # fail on a typo before loading anything
        if split_spec(name)[0] not in decoder_names():
            build_decoder(name, None, config.options)
    if config.on_cluster:
        from medusa_bench.bench.distributed import import_ray

        if endpoints:
            raise UserError("--endpoint runs send requests from one process (--concurrency sets how many in flight): drop --workers/--ray-address")
        import_ray()  # Ray missing: one line saying what to install, before anything is made
    opened = open_run_endpoints(endpoints, config.decoders)  # an unreachable server or a wrong key: before the model loads
    device = None if config.on_cluster else resolve_device(config.device)  # Ray: each worker's own
    with claimed_run_dir(config.out or default_out(config, model_name(config.model))) as run_dir:
        dtype_name = precision.run_dtype(config.dtype, run_dir)  # a resumed --dtype auto run keeps its folder's dtype
        if config.on_cluster:
            from medusa_bench.bench.distributed import run_on_cluster

            return run_on_cluster(config, questions, question_file, run_dir, dtype_name, console)
        run_in_process(config, questions, question_file, run_dir, dtype_name, device, loaded, endpoints, opened, console)
    return run_dir


def open_run_endpoints(run, taken: list[str]) -> dict:
    """`run`'s endpoints (endpoints.EndpointRun), connected; none when it is None."""
    if not run:
        return {}
    from medusa_bench.bench.endpoints import open_endpoints

    clash = sorted(set(run.endpoints) & set(taken))
    if clash:
        raise UserError(f"--endpoint name {clash[0]!r} is also a decoder of this run: give the endpoint another name")
    return open_endpoints(run)


def predicted_fastest(config: RunConfig, candidate) -> Optional[dict]:
    """The optimiser's fastest configuration of the run's `--tree auto` decoders and `pld:auto` on `candidate` (one
    precision of the model), on the engine the run will use: `--dtype auto` compares precisions by it."""
    use_engine(candidate, config.cache, config.compile)
    return fastest_prediction(config.decoders, candidate, config.options)


def run_in_process(config: RunConfig, questions: list[Question], question_file: Path, run_dir: Path, dtype_name: str,
                   device, loaded, endpoints, opened: dict, console: Console) -> None:
    """The run on this process's model: settings checked before the slow load, decoders built,
    run.json written, then every missing answer (`answer_questions`) and what follows them."""
    from medusa_bench.models import load_model, resolve_dtype

    if loaded is None and dtype_name == "auto":  # measured on the loaded model: the settings need the answer
        loaded = precision.load_auto(config.model, config.device, config.trust_remote_code,
                                     lambda candidate: predicted_fastest(config, candidate))
    dtype = loaded.dtype if loaded is not None else resolve_dtype(dtype_name, device)
    settings = settings_of(config, question_file, device.type, str(dtype).replace("torch.", ""))
    settings["precision_reference"] = precision.reference_dtype(config.precision_reference, settings["dtype"])
    if endpoints:
        settings.update(endpoints=dict(endpoints.endpoints), reference=endpoints.reference)
    previous = check_same_settings(run_dir, settings)  # refuse before the slow model load
    hashes = check_same_contents(previous, content_hashes(config, questions), question_file)
    loaded = loaded or load_model(config.model, config.device, dtype_name, config.trust_remote_code)
    plan = {"profiles": saved_profiles(run_dir, config.decoders, config.options), "searches": saved_searches(run_dir, config.decoders)}
    decoders = build_run_decoders(config.decoders, loaded, config, plan)  # a resume decides as the run did
    served = {}
    if opened:
        from medusa_bench.bench.endpoints import endpoint_decoders

        served = endpoint_decoders(opened, endpoints.reference, config.model, run_dir, console)
    answerers = {**decoders, **served}  # in-process decoders and endpoints take turns alike
    names = references_first(answerers)
    files.ensure_writable_dir(run_dir / files.ANSWER_DIR)
    store_in_run(run_dir, decoders, previous)  # --tree auto: tree.json, calibration.json, latency.json
    store_searches(run_dir, decoders)  # pld:auto: pld-search.json
    write_run_file(run_dir, config, settings, local_source(loaded, decoders, served), previous, hashes)
    keep_questions(run_dir, questions)

    ids = {name: decoder.file_id for name, decoder in served.items()}
    paths, done = open_answers(run_dir, loaded, names, ids)
    reference = PrecisionReference(run_dir, loaded) if settings["precision_reference"] != "none" else None
    float32 = Float32Baseline(loaded, config) if reference else None  # loaded on first use: the reference's answers, the verdict's spread
    todo = [(question, name) for question in questions for name in names if str(question.question_id) not in done[name]]
    reference_todo = [question for question in questions if reference and str(question.question_id) not in reference.done]
    if not todo and not reference_todo and not config.remeasure_flagged:
        console.print(f"nothing to do: all {len(questions)} questions × {len(names)} decoders are in {run_dir}")
    elif todo or reference_todo:
        references = reference_answers(run_dir, loaded, done, {decoder.baseline_name for decoder in answerers.values()})
        in_turn_order = {name: answerers[name] for name in names}
        answer_questions(questions, in_turn_order, loaded, config, paths, done, references, reference, console, float32)
    if config.remeasure_flagged:  # the local CPU's contention: endpoints are timed on their servers
        remeasure_flagged(questions, [name for name in names if name in decoders], decoders, loaded, config, paths, console)
    if todo or config.remeasure_flagged or not (run_dir / AUDIT_FILE).is_file():
        audit_run(run_dir, decoders, questions, loaded, log=lambda line: console.print(line, highlight=False, soft_wrap=True))
    write_run_verdict(run_dir, decoders, loaded, float32, log=lambda line: console.print(line, highlight=False, soft_wrap=True))
    if config.batch_sizes:
        from medusa_bench.bench.batch_sweep import batch_sweep

        _, done = open_answers(run_dir, loaded, ["baseline"], {})  # as stored: turn 2 carries the baseline's turn 1
        batch_sweep(run_dir, decoders, questions, done["baseline"], loaded, config, console)
    if served:
        from medusa_bench.bench.endpoints import finish_endpoints

        _, done = open_answers(run_dir, loaded, list(served), ids)  # as stored: the sweep replays each endpoint's turns
        finish_endpoints(run_dir, served, questions, done, config, endpoints.concurrency, console)


def answer_questions(questions: list[Question], answerers: dict, loaded, config: RunConfig, paths: dict, done: dict,
                     references: dict, reference: Optional[PrecisionReference], console: Console,
                     float32: Optional[Float32Baseline] = None) -> None:
    """Every missing answer, question by question, each decoder in the question's turn order
    (`answerers`: name → decoder, references first); the float32 reference after the timed answers."""
    wanted_by = {str(q.question_id): [name for name in answerers if str(q.question_id) not in done[name]] for q in questions}
    float32 = float32 or Float32Baseline(loaded, config)
    reference_todo = [q for q in questions if reference and str(q.question_id) not in reference.done]
    if reference_todo:
        float32.load()  # before timing: no model load (and its garbage) between timed answers
    warm_up({name: answerers[name] for name in answerers if any(name in wanted for wanted in wanted_by.values())}, loaded, questions, config)
    gc.collect()  # the loads' garbage now, not in a timed turn (and no finalizer there to swallow a Ctrl-C)
    device_label = device_name(loaded)  # per answer: the report never pools devices (Ray runs mix them)
    counts: dict[str, list[tuple[int, int]]] = {name: [] for name in answerers}  # (tokens, steps) per answer: early_check
    with run_progress(console) as progress:
        task = progress.add_task("starting", total=sum(map(len, wanted_by.values())) + len(reference_todo))
        for index, question in enumerate(questions):
            qid, pending = str(question.question_id), []
            for record in answer_one_question(question, index, answerers, loaded, config, wanted_by[qid],
                                              on_step=lambda name: live_rate(progress, task, question, name)):  # noqa: B023 — used at once
                record.setdefault("device", device_label)  # endpoints say "endpoint": never paired with local answers
                pending = store_ready(pending + [(record, answerers[record["decoder"]])], references, list(answerers), paths)
                note_counts(counts, record, answerers, console)
                progress.advance(task)
            if reference and qid not in reference.done:  # after the timed answers: never between them
                record = float32.record(question, live_rate(progress, task, question, Float32Baseline.DECODER))
                reference.store(record, references, float32.facts)
                progress.advance(task)


def note_counts(counts: dict, record: dict, answerers: dict, console: Console) -> None:
    """Keep an answer's (tokens, steps); once there are enough for an interval, say if its decoder's predicted τ is off (audit.early_check)."""
    choice, name = record["choices"][0], record["decoder"]
    if name not in counts or not choice.get("decoding_steps"):
        return
    counts[name].append((sum(choice["new_tokens"]), sum(choice["decoding_steps"])))
    if len(counts[name]) == MIN_QUESTIONS_FOR_CI:
        line = early_check(name, answerers[name], counts[name])
        if line:
            console.print(line, highlight=False, soft_wrap=True)
