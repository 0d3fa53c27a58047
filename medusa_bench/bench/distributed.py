"""Scale a run out over Ray (`run --workers N`, `--ray-address ADDR`): many GPUs, many machines.

A question is the unit of work. Each worker (a Ray actor, `QuestionWorker`) loads the model and
the run's decoders once and answers whole questions with `answer.answer_one_question`, all
decoders interleaved on its one device, so every per-question speedup is timed on one device.
The driver's `WorkerPool.run` hands one question at a time to each idle worker and yields the
answers as they arrive; `run_on_cluster`, the driver, stores them: the driver's process is the
run folder's only writer (workers write nothing), so resume, the refusal of changed settings
and torn-line repair work as they do in one process.

Faults: a worker that dies (SIGKILL, node lost) loses only the question it was answering; the
question goes back to the front of the queue and a replacement worker starts (at most
REPLACEMENTS_PER_WORKER per worker, then the survivors carry on). Ray's own restarts and task
retries stay off: a question is in one place at a time, and the driver drops any (question,
decoder) it has stored already, so no answer is written twice.

Devices: each worker reports its host, device, dtype and compile mode. What the run measures
per device (the `--tree auto` search, prompt lookup's step profile) is decided once per
device type: the first worker of a type measures (its *plan*), the others of that type build
the same trees from it; a resumed run reuses the plans run.json keeps.

Ray is optional (`pip install 'medusa-bench[ray]'`) and imported only here, only when asked for.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import socket
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from rich.console import Console

from medusa_bench.bench import precision
from medusa_bench.bench.answer import (DecoderFacts, answer_one_question, build_run_decoders, references_first, store_ready,
                                       warm_up)
from medusa_bench.bench.config import (RunConfig, check_same_contents, check_same_settings, content_hashes, setting_keys,
                                       settings_of)
from medusa_bench.bench.device import device_info
from medusa_bench.bench.progress import run_progress
from medusa_bench.inputs.questions import Question
from medusa_bench.bench.reference import Float32Baseline, PrecisionReference
from medusa_bench.bench.run_folder import AnswerSource, keep_questions, open_answers, reference_answers, write_run_file
from medusa_bench.errors import UserError
from medusa_bench.results import files

RAY_MISSING = "--workers needs Ray: pip install 'medusa-bench[ray]'"
REPLACEMENTS_PER_WORKER = 2  # workers started in place of dead ones, per worker asked for
ENV_PREFIX = "MEDUSA_BENCH_"  # the driver's settings of this kind reach every worker (data, caches)


# ------------------------------------------------------------------------------ the worker
class QuestionWorker:
    """One Ray worker: the model and every decoder of the run, loaded once, answering whole questions.

    A plain class: `WorkerPool` makes it a Ray actor. Calls come in this order: `start` (load
    the model), `build` (the decoders, from a device plan or measuring one), then `answer` per question.
    """

    def start(self, config, dtype: str) -> dict:
        """Load the model (`dtype` 'auto': measured here, see bench/precision.py); this worker's record."""
        import torch

        from medusa_bench.models import load_model
        from medusa_bench.runtime.engine import use_engine

        torch.set_num_threads(config.cpus_per_worker)  # the CPU share Ray reserved for this worker, no more
        self.config = config
        if dtype == "auto":
            self.loaded = precision.load_auto(config.model, config.device, config.trust_remote_code)
        else:
            self.loaded = load_model(config.model, config.device, dtype, config.trust_remote_code)
        use_engine(self.loaded, config.cache, config.compile)  # before any decoder: they all share it
        device = device_info(self.loaded)
        self.id = f"{socket.gethostname()}:{os.getpid()}"
        self.device_name = device["name"]
        return {"id": self.id, "host": socket.gethostname(), "pid": os.getpid(), "model": self.loaded.name,
                "device": device, "dtype": device["dtype"], "compile": device["engine"]["compile"],
                "dtype_auto": self.loaded.dtype_auto}

    def build(self, plan: Optional[dict], warmup_question, with_reference: bool) -> dict:
        """Build the run's decoders, warm them up; {"plan", "measured", "files", "facts"}.

        `plan` None: this worker is the first of its device type and measures (`--tree auto`,
        prompt lookup's profile); its plan and the optimiser's files go back to the driver.
        Otherwise the auto decoders get the plan's trees and profiles instead of measuring again.
        """
        decoders = build_run_decoders(self.config.decoders, self.loaded, self.config, plan)  # the plan's trees and profiles
        measured = plan is None
        plan, files = self.measured_plan(decoders) if measured else (plan, {})
        self.decoders = {name: decoders[name] for name in references_first(decoders)}
        self.float32 = Float32Baseline(self.loaded, self.config)
        facts = {name: DecoderFacts.of(decoder) for name, decoder in decoders.items()}
        if with_reference:
            facts[Float32Baseline.DECODER] = self.float32.facts  # loads it now: no model load between timed answers
        warm_up(decoders, self.loaded, [warmup_question], self.config)
        gc.collect()  # the loads' garbage now, not in a timed turn
        return {"plan": plan, "measured": measured, "files": files, "facts": facts}

    def measured_plan(self, decoders: dict) -> tuple[dict, dict]:
        """(plan, files): each drafting decoder's tree (an auto tree's paths included), prompt lookup's
        profiles and knob searches (pld:auto); the optimiser's, the profiles' and the searches' run-folder
        files, named as in-process runs name them."""
        from medusa_bench.bench.autotree import RUN_FILES, profile_files, tree_of, tree_records
        from medusa_bench.bench.pld_search import plan_record, search_files

        trees, files = {}, {}
        for name, record in tree_records(decoders).items():
            trees[name] = record
            if record["auto"]:  # the chosen tree's paths: what the other workers of this device type build
                record["paths"] = tree_of(decoders[name]).to_list()
                auto = decoders[name].autotree
                data = {"tree": auto.tree_json(), "calibration": auto.calibration.to_json(), "latency": auto.latency.to_json()}
                files.update({record["files"][kind]: data[kind] for kind in RUN_FILES})
        profiles, searches = {}, {}
        for name, file in profile_files(decoders).items():
            profiles[name] = files[file] = decoders[name].step_profile
        for name, file in search_files(decoders).items():  # pld:auto's knob search (bench/pld_search.py)
            files[file] = {**decoders[name].knob_search, "decoder": name}
            searches[name] = plan_record(files[file])  # run.json keeps the choice, the file the grid
        return {"trees": trees, "profiles": profiles, "searches": searches, "measured_by": self.id}, files

    def answer(self, question, index: int, wanted: list[str], with_reference: bool) -> list[dict]:
        """Every wanted decoder's answer to one question (and the float32 reference's), labelled with this worker."""
        records = list(answer_one_question(question, index, self.decoders, self.loaded, self.config, wanted))
        if with_reference:  # after the timed answers: never between them
            records.append(self.float32.record(question))
        for record in records:
            record.update(worker=self.id, device=self.device_name)
        return records


# ------------------------------------------------------------------------------ the driver's side
@dataclass
class Job:
    """One question and what it still lacks."""

    index: int  # in the run's question list: question_order alternates control and baseline by it
    question: Any
    wanted: list[str]  # decoders without an answer to it
    with_reference: bool  # the float32 reference lacks it too


@dataclass
class Event:
    """What `WorkerPool.run` reports: a worker is "ready" (`built`: its build result), a job's
    "answers" (`records`), or a worker was "lost" (its job went back to the queue)."""

    kind: str
    worker: dict
    records: list = field(default_factory=list)
    built: Optional[dict] = None
    job: Optional[Job] = None
    error: str = ""


@dataclass
class Worker:
    """The driver's view of one actor: loading → loaded → (waiting for its device type's plan →)
    building → idle ⇄ busy."""

    handle: Any
    number: int
    stage: str = "loading"
    info: Optional[dict] = None
    job: Optional[Job] = None

    @property
    def name(self) -> str:
        return self.info["id"] if self.info else f"worker {self.number}"

    @property
    def device(self) -> Optional[str]:
        return self.info["device"]["name"] if self.info else None


class WorkerPool:
    """Ray workers for one run: `start` them, then `run` the jobs; a context manager that stops them all."""

    # Called as on_dispatch(worker_info, job) right after a job is handed to a worker: an observer
    # hook (tests/test_ray.py kills a worker there, while it provably holds unanswered work).
    on_dispatch: Optional[Callable[[dict, "Job"], None]] = None

    def __init__(self, config, console: Optional[Console] = None):
        self.config = for_workers(config)
        self.console = console or Console(stderr=True)
        self.ray = import_ray()
        self.started_ray = connect(self.ray, config)
        self.cpus, self.gpus, fits = worker_shape(self.ray.cluster_resources(), config)
        self.size = config.workers or fits
        env = {key: value for key, value in os.environ.items() if key.startswith(ENV_PREFIX)}
        self.actor_class = self.ray.remote(QuestionWorker).options(
            num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0, max_task_retries=0,
            runtime_env={"env_vars": env} if env else None)
        self.workers: list[Worker] = []
        self.calls: dict[Any, Worker] = {}  # each worker's one call in flight
        self.launched = 0
        self.replacements_left = REPLACEMENTS_PER_WORKER * self.size
        self.dtype: Optional[str] = None
        self.first: Optional[dict] = None
        where = config.ray_address or "a local Ray instance"
        self.console.print(f"Ray: {self.size} workers on {where} ({self.cpus} CPU, {self.gpus:g} GPU each)", highlight=False)
        if self.size > fits:
            self.console.print(f"the cluster fits {fits} of them now; the others start as resources free up", highlight=False)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for worker in self.workers:
            self.kill(worker)
        self.workers, self.calls = [], {}
        if self.started_ray:
            self.ray.shutdown()

    def kill(self, worker: Worker) -> None:
        try:
            self.ray.kill(worker.handle, no_restart=True)
        except Exception:  # already gone
            pass

    # -- start
    def start(self, dtype: str) -> dict:
        """Start the workers; return the record of the first to load the model, whose device type
        and dtype are the run's. With `--dtype auto` that first worker measures alone and the
        others load the dtype it chose, so that every answer of the run is in one dtype."""
        alone = dtype == "auto"
        for _ in range(1 if alone else self.size):
            self.launch(dtype)
        while self.first is None:
            worker, value, lost = self.next_result()
            if lost is not None:
                self.lose(worker)
                self.console.print(f"{worker.name} died while loading the model: {lost}", highlight=False)
                self.replace(dtype)
                continue
            worker.info, worker.stage, self.first = value, "loaded", value
        self.dtype = self.first["dtype"]
        for _ in range(self.size - 1 if alone else 0):
            self.launch(self.dtype)
        return self.first

    def launch(self, dtype: str) -> None:
        self.launched += 1
        worker = Worker(self.actor_class.remote(), self.launched)
        self.workers.append(worker)
        self.calls[worker.handle.start.remote(self.config, dtype)] = worker

    def replace(self, dtype: str) -> None:
        """Start a worker in place of a dead one, or carry on with the survivors; none left is an error."""
        if self.replacements_left > 0:
            self.replacements_left -= 1
            self.launch(dtype)
        elif not self.workers:
            raise UserError("every Ray worker died and no replacements are left; rerun the same command to resume")

    def lose(self, worker: Worker) -> None:
        self.workers.remove(worker)
        self.kill(worker)  # a worker cut off (not dead) must not go on working for nobody

    def next_result(self) -> tuple[Worker, Any, Optional[str]]:
        """(worker, its call's result, None) or (worker, None, why it died) for the next call to finish.
        An error raised inside a worker stops the run: one line for a UserError, else the traceback."""
        from ray.exceptions import RayActorError, RayTaskError

        ready, _ = self.ray.wait(list(self.calls), num_returns=1)
        worker = self.calls.pop(ready[0])
        try:
            return worker, self.ray.get(ready[0]), None
        except RayActorError as error:  # the process is gone (killed, out of memory, node lost)
            return worker, None, first_line(error)
        except RayTaskError as error:
            if isinstance(error.cause, UserError):
                raise UserError(f"{worker.name}: {error.cause}") from None
            raise

    # -- run
    def run(self, jobs: list[Job], plans: dict, warmup_question, with_reference: bool) -> Iterator[Event]:
        """Answer `jobs`, one question at a time per idle worker; yield Events as things happen.

        `plans`: device name → plan from an earlier run (run.json `device_plans`); a device type
        without one gets it from its first worker (Event "ready" with `built["measured"]`).
        """
        queue = deque(jobs)
        plans = dict(plans)
        planners: dict[str, Worker] = {}  # device type → the worker measuring its plan
        waiting: dict[str, list[Worker]] = defaultdict(list)  # device type → workers waiting for that plan

        def build(worker: Worker, plan: Optional[dict]) -> None:
            worker.stage = "building"
            self.calls[worker.handle.build.remote(plan, warmup_question, with_reference)] = worker

        def loaded(worker: Worker) -> None:
            self.check_alike(worker)
            if worker.device in plans:
                build(worker, plans[worker.device])
            elif worker.device in planners:
                worker.stage = "waiting"
                waiting[worker.device].append(worker)
            else:
                planners[worker.device] = worker
                build(worker, None)

        def dispatch() -> None:
            for worker in self.workers:
                if worker.stage == "idle" and queue:
                    worker.job, worker.stage = queue.popleft(), "busy"
                    job = worker.job
                    self.calls[worker.handle.answer.remote(job.question, job.index, job.wanted, job.with_reference)] = worker
                    if self.on_dispatch is not None:
                        self.on_dispatch(worker.info, job)

        for worker in [w for w in self.workers if w.stage == "loaded"]:
            loaded(worker)
        while queue or any(w.stage == "busy" for w in self.workers):
            if not self.calls:
                raise UserError("no Ray worker can take the remaining questions; rerun the same command to resume")
            worker, value, lost = self.next_result()
            if lost is not None:
                self.lose(worker)
                job, worker.job = worker.job, None
                if job is not None:
                    queue.appendleft(job)  # the next free worker answers it
                if worker.device is not None and planners.get(worker.device) is worker:
                    del planners[worker.device]
                    if waiting[worker.device]:
                        loaded(waiting[worker.device].pop(0))  # the next of its type measures instead
                if queue or any(w.stage == "busy" for w in self.workers):
                    self.replace(self.dtype)
                dispatch()
                yield Event("lost", worker.info or {"id": worker.name}, job=job, error=lost)
            elif worker.stage == "loading":
                worker.info, worker.stage = value, "loaded"
                loaded(worker)
            elif worker.stage == "building":
                if value["measured"]:
                    plans[worker.device] = value["plan"]
                    del planners[worker.device]
                    for other in waiting.pop(worker.device, []):
                        build(other, value["plan"])
                worker.stage = "idle"
                dispatch()
                yield Event("ready", worker.info, built=value)
            else:  # busy: a question's answers
                job, worker.job, worker.stage = worker.job, None, "idle"
                dispatch()
                yield Event("answers", worker.info, records=value, job=job)

    def check_alike(self, worker: Worker) -> None:
        """Every worker decodes on the run's device type and dtype (its settings), whatever the device's model."""
        first, info = self.first["device"], worker.info["device"]
        if (info["type"], info["dtype"]) != (first["type"], first["dtype"]):
            raise UserError(f"{worker.name} decodes on {info['type']} in {info['dtype']}, the run on {first['type']} in "
                            f"{first['dtype']}: give every worker the same kind of device (--gpus-per-worker, --device, --dtype)")


# ------------------------------------------------------------------------------ the driver: the run folder's only writer
def run_on_cluster(config: RunConfig, questions: list[Question], question_file: Path, run_dir: Path, dtype_name: str,
                   console: Console) -> Path:
    """`run_benchmark` over Ray workers (`WorkerPool`): they answer whole questions, this
    process stores each answer as it arrives (`store_ready`, `files.append_jsonl`), the only writer
    of the run folder, so resume, the refusal of changed settings and torn-line repair work as in
    one process. What the workers decide (device type, dtype) is checked once the first has loaded.
    """
    from medusa_bench.models import model_name

    model, names = model_name(config.model), list(config.decoders)
    decided_by_workers = ("device", "dtype", "precision_reference")
    check_same_settings(run_dir, settings_of(config, question_file, None, None),
                        tuple(key for key in setting_keys() if key not in decided_by_workers))  # before starting anything
    files.ensure_writable_dir(run_dir / files.ANSWER_DIR)
    paths, done = open_answers(run_dir, model, names)
    if dtype_name != "auto" and not missing_work(questions, done, run_dir, model, config, dtype_name):
        keep_questions(run_dir, questions)
        console.print(f"nothing to do: all {len(questions)} questions × {len(names)} decoders are in {run_dir}")
        return run_dir
    with WorkerPool(config, console) as pool:
        first = pool.start(dtype_name)  # the run's device type and dtype: the first worker's
        settings = settings_of(config, question_file, first["device"]["type"], first["dtype"])
        settings["precision_reference"] = precision.reference_dtype(config.precision_reference, settings["dtype"])
        previous = check_same_settings(run_dir, settings)
        hashes = check_same_contents(previous, content_hashes(config, questions), question_file)
        reference = PrecisionReference(run_dir, model) if settings["precision_reference"] != "none" else None
        jobs = [Job(index, question, [name for name in names if str(question.question_id) not in done[name]],
                    reference is not None and str(question.question_id) not in reference.done)
                for index, question in enumerate(questions)]
        jobs = [job for job in jobs if job.wanted or job.with_reference]
        source = AnswerSource(model, names, first["device"], trees={}, dtype_auto=first.get("dtype_auto"))
        write_run_file(run_dir, config, settings, source, previous, hashes)
        keep_questions(run_dir, questions)
        stored = {(name, qid) for name in names for qid in done[name]} | {(PrecisionReference.DECODER, qid) for qid in (reference.done if reference else ())}
        facts, references, pending = {}, {}, []
        with run_progress(console) as progress:
            task = progress.add_task(f"starting {pool.size} Ray workers", total=sum(len(job.wanted) + job.with_reference for job in jobs))
            events = pool.run(jobs, (previous or {}).get("device_plans", {}), questions[0], with_reference=any(job.with_reference for job in jobs))
            for event in events:
                if event.kind == "ready":  # a worker built its decoders: record it (and its device type's plan)
                    if not facts:
                        facts = event.built["facts"]
                        references = reference_answers(run_dir, model, done, {fact.baseline_name for fact in facts.values()})
                    add_worker(run_dir, source, event, first["device"]["name"], previous)
                    write_run_file(run_dir, config, settings, source, previous, hashes)
                elif event.kind == "lost":
                    job = f"; question {event.job.question.question_id} goes back to the queue" if event.job else ""
                    progress.console.print(f"worker {event.worker['id']} died ({event.error}){job}", highlight=False)
                else:
                    for record in event.records:
                        key = (record["decoder"], str(record["question_id"]))
                        if key in stored:
                            continue  # answered before (a retried question): never written twice
                        stored.add(key)
                        if record["decoder"] == PrecisionReference.DECODER:
                            reference.store(record, references, facts[record["decoder"]])
                        else:
                            pending = store_ready(pending + [(record, facts[record["decoder"]])], references, names, paths)
                        progress.advance(task)
                    progress.update(task, description=f"q {event.job.question.question_id} · {event.worker['id']}")
    return run_dir


def missing_work(questions: list[Question], done: dict, run_dir: Path, model: str, config: RunConfig, dtype_name: str) -> bool:
    """Does any question lack an answer (or a float32 reference answer) in the run folder?"""
    if any(str(q.question_id) not in answers for answers in done.values() for q in questions):
        return True
    if precision.reference_dtype(config.precision_reference, dtype_name) == "none":
        return False
    reference = PrecisionReference(run_dir, model)
    return any(str(q.question_id) not in reference.done for q in questions)


def add_worker(run_dir: Path, source: AnswerSource, event, primary_device: str, previous: Optional[dict]) -> None:
    """Record a ready worker in `source` (run.json's `workers`); when it measured its device type's
    plan, that plan (`device_plans`) and the optimiser's files: in the run folder itself for the
    run's first device type (as in-process runs keep them), under devices/<type>/ for the others."""
    source.workers.append(event.worker)
    built, device = event.built, event.worker["device"]["name"]
    if not built["measured"]:
        return
    folder = "" if device == primary_device else f"devices/{file_safe(device)}/"
    for name, data in built["files"].items():
        path = run_dir / folder / name
        files.ensure_writable_dir(path.parent)
        files.write_json(path, data)
    plan = built["plan"]
    for record in plan["trees"].values():
        if "files" in record:
            record["files"] = {kind: folder + name for kind, name in record["files"].items()}
    source.device_plans[device] = plan
    if device == primary_device:
        before = (previous or {}).get("trees") or {}
        for name, record in plan["trees"].items():
            old = before.get(name, {}).get("hash")
            if old is not None and old != record["hash"]:  # as autotree.store_in_run refuses it in one process
                raise UserError(f"{run_dir} was run with another tree for {name} ({old}, now {record['hash']}: "
                                "the optimiser re-measured?); use another --out, or pass that run's tree.json as --tree to resume")
        source.trees = {name: {key: value for key, value in record.items() if key != "paths"} for name, record in plan["trees"].items()}


def file_safe(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' → 'nvidia-h100-80gb-hbm3'."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split()) or "device"


# ------------------------------------------------------------------------------ Ray itself
def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(RAY_MISSING) from None
    return ray


def connect(ray, config) -> bool:
    """Join `--ray-address`, or start a local Ray instance sized for `--workers`; True when this
    call started or joined Ray (and so must shut it down). A process already connected (a test,
    a notebook) keeps its own connection."""
    if ray.is_initialized():
        return False
    quiet = dict(logging_level=logging.WARNING, log_to_driver=True)  # workers' own output still shows
    try:
        if config.ray_address:
            ray.init(address=config.ray_address, **quiet)
        else:  # "local": a new instance even where another cluster runs or RAY_ADDRESS is set
            ray.init(address="local", num_cpus=config.workers * config.cpus_per_worker, include_dashboard=False, **quiet)
    except ConnectionError as error:
        raise UserError(f"cannot reach the Ray cluster at {config.ray_address}: {first_line(error)}") from None
    return True


def worker_shape(resources: dict, config) -> tuple[int, float, int]:
    """(CPUs, GPUs per worker, how many workers the cluster fits): `--gpus-per-worker` defaults to 1
    where the cluster has GPUs, else 0. One line when not even one worker fits."""
    cpus, total_cpus, total_gpus = config.cpus_per_worker, resources.get("CPU", 0), resources.get("GPU", 0)
    gpus = config.gpus_per_worker if config.gpus_per_worker is not None else (1 if total_gpus else 0)
    if gpus > total_gpus:
        raise UserError(f"--gpus-per-worker {gpus:g}: the Ray cluster has {total_gpus:g} GPUs; "
                        "pass --gpus-per-worker 0 to run on CPUs")
    if cpus > total_cpus:
        raise UserError(f"--cpus-per-worker {cpus}: the Ray cluster has {total_cpus:g} CPUs")
    return cpus, gpus, int(min(total_cpus // cpus, total_gpus // gpus if gpus else float("inf")))


def for_workers(config):
    """The run's config as workers get it: a model or option path given relative to this process's
    folder made absolute (a worker has a folder of its own; a path on a file system every node
    reads is the user's part). The run's settings keep the paths as given."""
    def absolute(value):
        return os.path.abspath(value) if isinstance(value, str) and not os.path.isabs(value) and os.path.exists(value) else value

    paths = {name: absolute(value) for name, value in config.options.as_dict().items() if absolute(value) != value}
    return dataclasses.replace(config, model=absolute(config.model), options=config.options.replace(**paths))


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
