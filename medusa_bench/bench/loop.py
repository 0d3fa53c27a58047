"""The benchmark run: questions × decoders, interleaved, timed, appended as it goes, resumable.

Decoders take turns question by question so machine drift (thermal, other processes) hits all
of them alike. Each finished (question, decoder) pair is one appended line in that decoder's
answer file; re-running the same command skips those pairs. A run folder made with other
settings is refused instead of mixing results.
"""

from __future__ import annotations

import gc
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from medusa_bench import __version__
from medusa_bench.bench import precision
from medusa_bench.bench.autotree import store_in_run, tree_records
from medusa_bench.bench.contention import TIMING_FIELDS, count_flagged, cpu_meter, is_flagged
from medusa_bench.bench.prompts import build_prompt, conversation
from medusa_bench.bench.questions import CATEGORY_TEMPERATURE, Question, load_questions
from medusa_bench.decoders.base import Decoder, DecoderOptions, Sampling, build_decoder, decoder_names, heads_option, split_spec
from medusa_bench.decoders.options import declared
from medusa_bench.engine import check_options as check_engine_options
from medusa_bench.engine import engine_of, use_engine
from medusa_bench.errors import UserError
from medusa_bench.results import files

# Settings that change the numbers: a run folder keeps them fixed for its whole life. The
# decoders' own options (decoders/options.py) join them: `setting_keys()`.
RUN_SETTING_KEYS = ("model", "bench", "question_file", "max_new_tokens", "temperature", "top_p", "seed",
                    "device", "dtype", "precision_reference", "cache", "compile", "endpoints", "reference")


def setting_keys() -> tuple:
    return RUN_SETTING_KEYS + tuple(option.name for option in declared())


@dataclass
class RunConfig:
    model: str = "smollm2-135m"
    decoders: list[str] = field(default_factory=lambda: ["baseline"])
    bench: str = "mt_bench"
    questions: Optional[Path] = None
    limit: Optional[int] = None
    question_ids: Optional[list[str]] = None
    categories: Optional[list[str]] = None
    max_new_tokens: int = 256
    temperature: float | str = 0.0  # a number or "category"
    top_p: float = 1.0
    seed: int = 0
    warmup: int = 1
    out: Optional[Path] = None
    device: str = "auto"
    dtype: str = "auto"
    options: DecoderOptions = field(default_factory=DecoderOptions)
    trust_remote_code: bool = False
    precision_reference: Optional[str] = None  # float32 | none; None: float32 unless the run is float32
    remeasure_flagged: bool = False  # re-time the questions with a contended turn, keeping their answers
    cache: str = "auto"  # KV cache: auto | static | dynamic (engine.py)
    compile: str = "auto"  # captured steps: auto (CUDA graphs on CUDA, eager on CPU) | on | off
    # Scale-out on Ray (bench/distributed.py); none of these is a setting: every answer records its device.
    workers: Optional[int] = None  # Ray workers (a local Ray instance unless ray_address is given)
    ray_address: Optional[str] = None  # join this Ray cluster ("auto": the one the environment names)
    gpus_per_worker: Optional[float] = None  # None: 1 where the cluster has GPUs, else 0
    cpus_per_worker: int = 1  # CPU workers: torch threads per worker

    @property
    def on_cluster(self) -> bool:
        return self.workers is not None or self.ray_address is not None

    @classmethod
    def from_cli(cls, *, decoders: str, question_ids, categories, temperature: str, decoder_options: Optional[dict] = None,
                 control=False, **rest) -> "RunConfig":
        """Parse the CLI's strings; every bad value is a one-line UserError. The declared decoder
        options (decoders/options.py) come in `decoder_options` or as keywords of their own."""
        declared_names = {option.name for option in declared()}
        decoder_options = {**(decoder_options or {}), **{key: rest.pop(key) for key in list(rest) if key in declared_names}}
        names = [d.strip() for d in decoders.split(",") if d.strip()]
        if not names:
            raise UserError("--decoders is empty; valid names are: " + ", ".join(decoder_names()))
        if control and "control" in names:
            raise UserError("control is asked for twice: drop it from --decoders or drop --control")
        names += ["control"] if control else []  # the A/A noise floor: the baseline's work, timed again
        if len(set(names)) != len(names):
            raise UserError(f"--decoders lists a decoder twice: {decoders}")
        precision.check_reference_option(rest.get("precision_reference"))
        check_engine_options(rest.get("cache", "auto"), rest.get("compile", "auto"))
        if temperature != "category":
            try:
                temperature = float(temperature)
            except ValueError:
                raise UserError(f"--temperature must be a number >= 0 or 'category', got {temperature!r}") from None
            if temperature < 0:
                raise UserError(f"--temperature must be >= 0, got {temperature}")
        if rest["max_new_tokens"] < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {rest['max_new_tokens']}")
        if rest["warmup"] < 0:
            raise UserError(f"--warmup must be >= 0, got {rest['warmup']}")
        check_cluster_options(rest)
        options = DecoderOptions(**decoder_options)
        split = lambda text: [x.strip() for x in text.split(",") if x.strip()] if text else None  # noqa: E731
        return cls(decoders=names, question_ids=split(question_ids), categories=split(categories),
                   temperature=temperature, options=options, **rest)

    def sampling_for(self, question: Question) -> Sampling:
        """FastChat's per-category temperature when asked; a per-question seed so runs repeat."""
        temperature = CATEGORY_TEMPERATURE.get(question.category, 0.7) if self.temperature == "category" else self.temperature
        seed = self.seed + zlib.crc32(str(question.question_id).encode())
        return Sampling(temperature=float(temperature), top_p=self.top_p, seed=seed)


def check_cluster_options(options: dict) -> None:
    """The Ray options make sense together (one line each when not)."""
    workers, address = options.get("workers"), options.get("ray_address")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if options.get("cpus_per_worker", 1) < 1:
        raise UserError(f"--cpus-per-worker must be >= 1, got {options['cpus_per_worker']}")
    gpus = options.get("gpus_per_worker")
    if gpus is not None and gpus < 0:
        raise UserError(f"--gpus-per-worker must be >= 0, got {gpus}")
    on_cluster = workers is not None or address is not None
    if not on_cluster and (gpus is not None or options.get("cpus_per_worker", 1) != 1):
        raise UserError("--gpus-per-worker and --cpus-per-worker size Ray workers: add --workers N or --ray-address ADDR")
    if on_cluster and options.get("remeasure_flagged"):
        raise UserError("--remeasure-flagged re-times in one process: drop --workers/--ray-address for it")


def default_out(config: RunConfig, model_name: str) -> Path:
    return Path("results") / f"{model_name}-{config.bench}"


def settings_of(config: RunConfig, question_file: Path, device_type: Optional[str], dtype: Optional[str]) -> dict:
    """The run's settings (run.json); `device_type` 'cpu' | 'cuda', `dtype` 'float32' …"""
    return {
        "model": config.model, "bench": config.bench, "question_file": str(question_file),
        "max_new_tokens": config.max_new_tokens, "temperature": config.temperature, "top_p": config.top_p,
        "seed": config.seed, "device": device_type, "dtype": dtype,
        "cache": config.cache, "compile": config.compile, **config.options.as_dict(),
    }


def check_same_settings(run_dir: Path, settings: dict, keys: Optional[tuple] = None) -> Optional[dict]:
    """The existing run.json, or a UserError naming every setting in `keys` that differs."""
    if not (run_dir / files.RUN_FILE).exists():
        return None
    previous = files.load_run(run_dir)
    before = previous.get("settings", {})
    keys = keys if keys is not None else setting_keys()
    changed = [f"{key} was {before.get(key)!r}, now {settings.get(key)!r}" for key in keys
               if key in before and before.get(key) != settings.get(key)]
    if changed:
        raise UserError(f"{run_dir} holds a run with other settings ({'; '.join(changed)}); "
                        "use another --out, or the same settings to resume it")
    return previous


def content_hashes(config: RunConfig, questions: list[Question]) -> dict:
    """What settings (paths) cannot see: {"questions": {id: sha256}, "heads": {folder: sha256}}.

    Per question, so a resume may select more or fewer questions; heads over the folders this
    run's decoders load, the shipped defaults included.
    """
    import dataclasses
    import hashlib
    import json
    from types import SimpleNamespace

    from medusa_bench.heads.common import default_heads, weights_hash
    from medusa_bench.models import model_name

    questions_hash = {str(q.question_id): hashlib.sha256(json.dumps(dataclasses.asdict(q), sort_keys=True, ensure_ascii=False).encode()).hexdigest()
                      for q in questions}
    heads = {}
    for name in config.decoders:
        option, kind = heads_option(split_spec(name)[0])
        if option is None:
            continue
        folder = getattr(config.options, option) or default_heads(SimpleNamespace(name=model_name(config.model)), kind)
        digest = weights_hash(folder) if folder else None  # None: a Hub id, or no heads (the build says so)
        if digest:
            heads[str(Path(folder).expanduser().resolve())] = digest
    return {"questions": questions_hash, "heads": heads}


def check_same_contents(previous: Optional[dict], hashes: dict, question_file: Path) -> dict:
    """Refuse a resume whose questions or heads changed under the same paths; the merged hashes."""
    before = (previous or {}).get("content_hashes") or {}
    short = lambda digest: digest[:8] + "…"  # noqa: E731
    for folder, new in hashes["heads"].items():
        old = (before.get("heads") or {}).get(folder)
        if old and old != new:
            raise UserError(f"heads in {folder} changed since this run started (hash {short(old)} → {short(new)}); use another --out")
    for qid, new in hashes["questions"].items():
        old = (before.get("questions") or {}).get(qid)
        if old and old != new:
            raise UserError(f"question {qid} in {question_file} changed since this run started "
                            f"(hash {short(old)} → {short(new)}); use another --out")
    return {kind: {**(before.get(kind) or {}), **hashes[kind]} for kind in ("questions", "heads")}


def cpu_model() -> Optional[str]:
    """The CPU's model name as lscpu shows it ('AMD EPYC …'): figures are only comparable within one CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip() or None
    except OSError:
        pass
    return None


def device_info(loaded) -> dict:
    import platform

    import torch

    info = {"type": loaded.device.type, "dtype": str(loaded.dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "cpu": cpu_model() or platform.processor() or platform.machine(),
            "attn_implementation": getattr(loaded, "attn_implementation", "") or None,
            "engine": engine_of(loaded).describe()}
    if loaded.device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(loaded.device)
    else:
        info["name"] = info["cpu"]
    return info


@dataclass
class AnswerSource:
    """What run.json says about where the answers come from: the model, its device, the decoders' trees.

    In-process runs: one loaded model (`local_source`). Ray runs: the first worker's device, and
    every worker's own record in `workers` (bench/distributed.py), with each device type's trees
    in `device_plans`.
    """

    model_name: str
    decoders: list[str]
    device: dict  # device_info()
    trees: dict  # autotree.tree_records(): each drafting decoder's tree + hash
    dtype_auto: Optional[dict] = None  # how --dtype auto chose
    workers: list[dict] = field(default_factory=list)
    device_plans: dict = field(default_factory=dict)
    endpoints: dict = field(default_factory=dict)  # serving endpoints beside the decoders: name → url, file_id, engine info


def local_source(loaded, decoders: dict, served: Optional[dict] = None) -> AnswerSource:
    """In-process decoders on `loaded`, and the endpoints `served` beside them (name → EndpointDecoder)."""
    endpoints = {name: {"url": d.endpoint.base_url, "metrics_url": d.endpoint.metrics_url, "file_id": d.file_id, **d.endpoint.info}
                 for name, d in (served or {}).items()}
    return AnswerSource(loaded.name, list(decoders), device_info(loaded), tree_records(decoders), loaded.dtype_auto,
                        endpoints=endpoints)


def open_run_endpoints(run, taken: list[str]) -> dict:
    """`run`'s endpoints (bench/endpoints.EndpointRun), connected; none when it is None."""
    if not run:
        return {}
    from medusa_bench.bench.endpoints import open_endpoints

    clash = sorted(set(run.endpoints) & set(taken))
    if clash:
        raise UserError(f"--endpoint name {clash[0]!r} is also a decoder of this run: give the endpoint another name")
    return open_endpoints(run)



def write_run_file(run_dir: Path, config: RunConfig, settings: dict, source: AnswerSource, previous: Optional[dict],
                   hashes: Optional[dict] = None) -> dict:
    previous = previous or {}
    names = list(dict.fromkeys(previous.get("decoders", []) + source.decoders))
    run = {
        "tool": "medusa-bench", "version": __version__,
        "created": previous.get("created", files.now_iso()), "updated": files.now_iso(),
        "git_hash": files.git_hash(), "settings": settings, "decoders": names,
        "models": {**previous.get("models", {}), **{name: model_id(source.model_name, name) for name in source.decoders}},
        "questions": previous.get("questions"), "warmup": config.warmup,
        "versions": files.package_versions(), "device": dict(source.device),
        "trees": {**previous.get("trees", {}), **source.trees},  # each drafting decoder's tree + hash
        "content_hashes": hashes or previous.get("content_hashes"),  # questions and heads, checked on resume
    }
    dtype_auto = source.dtype_auto or previous.get("device", {}).get("dtype_auto")
    if dtype_auto:  # how --dtype auto chose (a resume keeps the first choice); absent when --dtype was explicit
        run["device"]["dtype_auto"] = dtype_auto
    if settings.get("precision_reference", "none") != "none":
        run["precision_reference"] = {"dtype": settings["precision_reference"], "file": reference_file(source.model_name, settings["precision_reference"])}
    # Ray runs: every worker that answered, by id (a resume adds its own), and each device type's trees.
    new_ids = {worker["id"] for worker in source.workers}
    workers = [w for w in previous.get("workers", []) if w.get("id") not in new_ids] + source.workers
    if workers:
        run["workers"] = workers
    plans = {**previous.get("device_plans", {}), **source.device_plans}
    if plans:
        run["device_plans"] = plans
    if source.endpoints:  # answer files named after the server's model; the reference endpoint (settings)
        run["decoders"] = list(dict.fromkeys(run["decoders"] + list(source.endpoints)))
        run["models"].update({name: e["file_id"] for name, e in source.endpoints.items()})
        run["endpoints"] = {name: {k: v for k, v in e.items() if k != "file_id"} for name, e in source.endpoints.items()}
        run["reference"] = settings.get("reference")
    files.write_json(run_dir / files.RUN_FILE, run)
    return run


def model_id(loaded, decoder_name: str) -> str:
    """'smollm2-135m' + 'medusa:chain-2' → 'smollm2-135m-medusa-chain-2' (a file-safe name).

    `loaded` is the loaded model or its name (a Ray driver loads none)."""
    name = loaded if isinstance(loaded, str) else loaded.name
    return f"{name}-{decoder_name}".replace(":", "-").replace("/", "-").replace(" ", "")


def answer_question(decoder: Decoder, loaded, question: Question, config: RunConfig, on_step=None) -> dict:
    """Both turns of one question; turn 2 sees this decoder's own turn-1 answer."""
    sampling = config.sampling_for(question)
    turns, new_tokens, wall, steps, accepts, token_ids = [], [], [], [], [], []
    usages = []  # per turn: cpu_share, load_avg, contended (bench/contention.py)
    for turn in range(len(question.turns)):
        prompt_ids = build_prompt(loaded, conversation(question.turns[: turn + 1], turns))
        with cpu_meter(loaded.device) as usage:
            result = decoder.generate(prompt_ids, config.max_new_tokens, sampling, on_step=on_step)
        usages.append(usage)
        text = loaded.tokenizer.decode(result.token_ids, skip_special_tokens=True).strip()
        turns.append(text)
        new_tokens.append(len(result.token_ids))
        wall.append(round(result.wall_time, 6))
        steps.append(result.steps)
        accepts.append(result.accept_lengths)
        token_ids.append(result.token_ids)
    return {"index": 0, "turns": turns, "new_tokens": new_tokens, "wall_time": wall, "decoding_steps": steps,
            "accept_lengths": accepts, "token_ids": token_ids, "temperature": sampling.temperature,
            **{key: [usage[key] for usage in usages] for key in ("cpu_share", "load_avg", "contended")}}


def build_run_decoders(names: list[str], loaded, config: RunConfig, build=build_decoder) -> dict[str, Decoder]:
    """Every decoder of the run on `loaded`, in the run's order; they share one engine (built first)."""
    use_engine(loaded, config.cache, config.compile)  # before any decoder: they all share it
    return {name: build(name, loaded, config.options) for name in names}


def references_first(decoders: dict) -> list[str]:
    """The decoders' names, reference decoders first: within a question an answer whose reference
    has not answered yet waits for it (but control and baseline swap every other question:
    question_order)."""
    references = {decoder.baseline_name for decoder in decoders.values()}
    return sorted(decoders, key=lambda name: name not in references)


def answer_one_question(question: Question, index: int, decoders: dict, loaded, config: RunConfig,
                        wanted: Optional[Iterable[str]] = None, on_step=None) -> Iterator[dict]:
    """The unit of work: one question answered by each wanted decoder, interleaved in this
    question's turn order (`question_order`), so every per-question speedup is timed on one
    device. Yields each answer record as it is finished; writes nothing (the caller stores them:
    run_benchmark in-process, the driver for Ray workers).

    `decoders`: name → decoder-like (`generate`, `baseline_name`, `lossless`), references first;
    `wanted`: the names still missing for this question (default all); `on_step(name)` returns
    that answer's step callback.
    """
    wanted = set(decoders if wanted is None else wanted)
    for name in question_order(list(decoders), index):
        if name not in wanted:
            continue
        decoder = decoders[name]
        if hasattr(decoder, "answer"):  # an endpoint (bench/endpoints.py): both turns over HTTP, its own record
            record = decoder.answer(question, config)
            if record is not None:  # None: failed after retries, in failed.jsonl; the same command retries it
                yield record
            continue
        choice = answer_question(decoder, loaded, question, config, on_step=on_step(name) if on_step else None)
        yield answer_record(question, name, decoder, loaded, choice)


@dataclass(frozen=True)
class DecoderFacts:
    """What storing an answer needs of its decoder (`store_ready`, `exact_match`): a Ray driver holds no decoders."""

    name: str
    baseline_name: str
    lossless: bool

    @classmethod
    def of(cls, decoder) -> "DecoderFacts":
        return cls(decoder.name, decoder.baseline_name, decoder.lossless)


def open_answers(run_dir: Path, model, names: list[str], ids: Optional[dict] = None) -> tuple[dict, dict]:
    """(paths, done) of this run's answer files, torn last lines repaired: done {name: {question id: record}}.

    `ids`: answer file ids that are not `model_id(model, name)` (endpoints name theirs after the server's model)."""
    paths = {name: files.answer_path(run_dir, (ids or {}).get(name) or model_id(model, name)) for name in names}
    for path in paths.values():
        files.repair_jsonl(path)
    return paths, {name: {str(r["question_id"]): r for r in files.read_jsonl(path)} for name, path in paths.items()}


def reference_answers(run_dir: Path, model, done: dict, reference_names: Iterable[str]) -> dict:
    """{reference: {question id: record}} of the decoders others are compared with (their own
    `done` when in this run, else read from their files); store_ready keeps it current."""
    return {ref: done.get(ref) or {str(r["question_id"]): r for r in files.read_jsonl(files.answer_path(run_dir, model_id(model, ref)))}
            for ref in set(reference_names)}


def warm_up(decoders: dict[str, Decoder], loaded, questions: list[Question], config: RunConfig) -> None:
    """Untimed generations so lazy initialisation, allocator growth and caches don't hit timing."""
    prompt = build_prompt(loaded, conversation(questions[0].turns[:1], []))
    for decoder in decoders.values():
        for _ in range(config.warmup):
            if hasattr(decoder, "warm_up"):  # an endpoint: one untimed request
                decoder.warm_up(questions[0], config)
            else:
                decoder.generate(prompt, min(config.max_new_tokens, 32), Sampling())


def run_benchmark(config: RunConfig, console: Optional[Console] = None, loaded=None, endpoints=None) -> Path:
    """Run (or resume) a benchmark; returns the run folder. Python API behind `medusa-bench run`.

    In this process, or over Ray workers (`config.on_cluster`: `run_on_cluster`); either way this
    process is the only one writing the run folder. `endpoints` (bench/endpoints.EndpointRun):
    serving endpoints that answer beside the in-process decoders, question by question.
    """
    from medusa_bench.models import load_model, model_name, resolve_device, resolve_dtype

    console = console or Console(stderr=True)
    question_file, questions = load_questions(config.bench, config.questions, config.limit, config.question_ids, config.categories)
    names = config.decoders
    for name in names:  # fail on a typo before loading anything
        if split_spec(name)[0] not in decoder_names():
            build_decoder(name, None, config.options)
    if config.on_cluster:
        from medusa_bench.bench.distributed import import_ray

        if endpoints:
            raise UserError("--endpoint runs send requests from one process (--concurrency sets how many in flight): drop --workers/--ray-address")
        import_ray()  # Ray missing: one line saying what to install, before anything is made
    opened = open_run_endpoints(endpoints, names)  # an unreachable server or a wrong key: before the model loads
    device = None if config.on_cluster else resolve_device(config.device)  # Ray: each worker's own
    run_dir = files.ensure_writable_dir(config.out or default_out(config, model_name(config.model)))
    lock = files.lock_run_dir(run_dir)  # noqa: F841 — held until this call returns: one writer per run folder
    dtype_name = precision.run_dtype(config.dtype, run_dir)  # a resumed --dtype auto run keeps its folder's dtype
    if config.on_cluster:
        return run_on_cluster(config, questions, question_file, run_dir, dtype_name, console)
    if loaded is None and dtype_name == "auto":  # measured on the loaded model: the settings need the answer
        loaded = precision.load_auto(config.model, config.device, config.trust_remote_code)
    dtype = loaded.dtype if loaded is not None else resolve_dtype(dtype_name, device)
    settings = settings_of(config, question_file, device.type, str(dtype).replace("torch.", ""))
    settings["precision_reference"] = precision.reference_dtype(config.precision_reference, settings["dtype"])
    if endpoints:
        settings.update(endpoints=dict(endpoints.endpoints), reference=endpoints.reference)
    previous = check_same_settings(run_dir, settings)  # refuse before the slow model load
    hashes = check_same_contents(previous, content_hashes(config, questions), question_file)
    loaded = loaded or load_model(config.model, config.device, dtype_name, config.trust_remote_code)
    decoders = build_run_decoders(names, loaded, config)
    served = {}
    if opened:
        from medusa_bench.bench.endpoints import endpoint_decoders

        served = endpoint_decoders(opened, endpoints.reference, config.model, run_dir, console)
    answerers = {**decoders, **served}  # in-process decoders and endpoints take turns alike
    names = references_first(answerers)
    files.ensure_writable_dir(run_dir / files.ANSWER_DIR)
    store_in_run(run_dir, decoders, previous)  # --tree auto: tree.json, calibration.json, latency.json
    write_run_file(run_dir, config, settings, local_source(loaded, decoders, served), previous, hashes)

    ids = {name: decoder.file_id for name, decoder in served.items()}
    paths, done = open_answers(run_dir, loaded, names, ids)
    references = reference_answers(run_dir, loaded, done, {decoder.baseline_name for decoder in answerers.values()})
    reference = PrecisionReference(run_dir, loaded) if settings["precision_reference"] != "none" else None
    todo = [(question, name) for question in questions for name in names if str(question.question_id) not in done[name]]
    reference_todo = [question for question in questions if reference and str(question.question_id) not in reference.done]
    if not todo and not reference_todo and not config.remeasure_flagged:
        console.print(f"nothing to do: all {len(questions)} questions × {len(names)} decoders are in {run_dir}")
    elif todo or reference_todo:
        float32 = Float32Baseline(loaded, config)
        if reference_todo:
            float32.load()  # before timing: no model load (and its garbage) between timed answers
        warm_up({n: answerers[n] for n in {name for _, name in todo}}, loaded, questions, config)
        gc.collect()  # the loads' garbage now, not in a timed turn (and no finalizer there to swallow a Ctrl-C)
        device_label = device_info(loaded)["name"]  # per answer: the report never pools devices (Ray runs mix them)
        in_turn_order = {name: answerers[name] for name in names}
        with run_progress(console) as progress:
            task = progress.add_task("starting", total=len(todo) + len(reference_todo))
            for index, question in enumerate(questions):
                qid, pending = str(question.question_id), []
                wanted = [name for name in names if qid not in done[name]]
                for record in answer_one_question(question, index, in_turn_order, loaded, config, wanted,
                                                  on_step=lambda name: live_rate(progress, task, question, name)):  # noqa: B023 — used at once
                    record.setdefault("device", device_label)  # endpoints say "endpoint": never paired with local answers
                    pending = store_ready(pending + [(record, answerers[record["decoder"]])], references, names, paths)
                    progress.advance(task)
                if reference and qid not in reference.done:  # after the timed answers: never between them
                    record = float32.record(question, live_rate(progress, task, question, Float32Baseline.DECODER))
                    reference.store(record, references, float32.facts)
                    progress.advance(task)
    if config.remeasure_flagged:  # the local CPU's contention: endpoints are timed on their servers
        remeasure_flagged(questions, [name for name in names if name in decoders], decoders, loaded, config, paths, console)
    if served:
        from medusa_bench.bench.endpoints import finish_endpoints

        _, done = open_answers(run_dir, loaded, list(served), ids)  # as stored: the sweep replays each endpoint's turns
        finish_endpoints(run_dir, served, questions, done, config, endpoints.concurrency, console)
    flagged, total = count_flagged(r for path in paths.values() for r in files.read_jsonl(path))
    if flagged:
        console.print(f"{flagged} of {total} turns were measured while the CPU was shared; rerun with --remeasure-flagged on a quiet machine")
    return run_dir


def run_on_cluster(config: RunConfig, questions: list[Question], question_file: Path, run_dir: Path, dtype_name: str,
                   console: Console) -> Path:
    """`run_benchmark` over Ray workers (bench/distributed.py): they answer whole questions, this
    process stores each answer as it arrives (`store_ready`, `files.append_jsonl`), the only writer
    of the run folder, so resume, the refusal of changed settings and torn-line repair work as in
    one process. What the workers decide (device type, dtype) is checked once the first has loaded.
    """
    from medusa_bench.bench.distributed import Job, WorkerPool
    from medusa_bench.models import model_name

    model, names = model_name(config.model), list(config.decoders)
    decided_by_workers = ("device", "dtype", "precision_reference")
    check_same_settings(run_dir, settings_of(config, question_file, None, None),
                        tuple(key for key in setting_keys() if key not in decided_by_workers))  # before starting anything
    files.ensure_writable_dir(run_dir / files.ANSWER_DIR)
    paths, done = open_answers(run_dir, model, names)
    if dtype_name != "auto" and not missing_work(questions, done, run_dir, model, config, dtype_name):
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
    flagged, total = count_flagged(r for path in paths.values() for r in files.read_jsonl(path))
    if flagged:
        console.print(f"{flagged} of {total} turns were measured while the CPU was shared; rerun with --remeasure-flagged "
                      "(in one process: without --workers) on a quiet machine")
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


def run_progress(console: Console) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    return Progress(*columns, console=console, transient=False)


def live_rate(progress: Progress, task, question: Question, name: str):
    """on_step callback: the live tokens/s of this answer in the progress line."""
    live = {"tokens": 0, "start": time.perf_counter()}

    def on_step(tokens):
        live["tokens"] += len(tokens)
        rate = live["tokens"] / max(time.perf_counter() - live["start"], 1e-9)
        progress.update(task, description=f"q {question.question_id} · {name} · {rate:5.1f} tok/s")

    return on_step


def question_order(names: list[str], index: int) -> list[str]:
    """The decoders' turn order for the question at `index`: control (the A/A pair's second half)
    runs right after the baseline, or right before it every other question, so neither of the
    two is always the one that runs first."""
    if "baseline" not in names or "control" not in names:
        return names
    order = [name for name in names if name != "control"]
    order.insert(order.index("baseline") + (index + 1) % 2, "control")
    return order


def answer_record(question: Question, name: str, decoder: Decoder, loaded, choice: dict) -> dict:
    return {
        "question_id": question.question_id, "answer_id": files.answer_id(), "model_id": model_id(loaded, name),
        "decoder": name, "baseline": decoder.baseline_name, "category": question.category, "tstamp": time.time(), "choices": [choice],
    }


def store_ready(pending: list, references: dict, names: list[str], paths: dict) -> list:
    """Append the pending (record, decoder) pairs whose reference has answered this question (or
    is not in this run), exact match filled in; return those still waiting. Control may run
    before the baseline, so its answer waits for the baseline's."""
    def waits(record: dict) -> bool:
        ref = record["baseline"]
        return ref in names and ref != record["decoder"] and str(record["question_id"]) not in references[ref]

    while True:
        ready = [(record, decoder) for record, decoder in pending if not waits(record)]
        if not ready:
            return pending
        pending = [(record, decoder) for record, decoder in pending if waits(record)]  # before storing changes `waits`
        for record, decoder in ready:
            qid, choice = str(record["question_id"]), record["choices"][0]
            choice["exact_match"] = exact_match(choice, decoder, references[record["baseline"]].get(qid), record["decoder"])
            files.append_jsonl(paths[record["decoder"]], record)
            if record["decoder"] in references:
                references[record["decoder"]][qid] = record


def reference_file(loaded, dtype: str) -> str:
    """The precision reference's answer file, relative to the run folder (`loaded`: the model or its name)."""
    name = loaded if isinstance(loaded, str) else loaded.name
    return f"precision_reference/{name}-baseline-{dtype}.jsonl"


class Float32Baseline:
    """The baseline's answers decoded again in float32 (untimed): the precision's noise floor.

    A bf16 verify forward over n tokens rounds differently than n one-token forwards, so bf16
    decoders part from the bf16 baseline; where the fp32 baseline parts from it too, at the
    same positions, it is the precision, not the decoder. Same questions, both turns, the fp32
    conversation carrying its own turn-1 answer. Decodes only; `PrecisionReference` stores.
    """

    DECODER = "baseline@float32"

    def __init__(self, loaded, config: RunConfig):
        self.run_model, self.config, self.decoder = loaded, config, None

    def load(self) -> Decoder:
        """A second, float32 copy of the model, loaded only when a question needs it."""
        from medusa_bench.models import load_model

        if self.decoder is None:
            model = load_model(self.run_model.spec, str(self.run_model.device), "float32", self.config.trust_remote_code)
            model.name = self.run_model.name
            self.decoder = build_decoder("baseline", model, self.config.options)
            self.decoder.name = self.DECODER
        return self.decoder

    @property
    def facts(self) -> DecoderFacts:
        return DecoderFacts.of(self.load())

    def record(self, question: Question, on_step=None) -> dict:
        """Both turns of `question` in float32, as an answer record (exact match filled in when stored)."""
        decoder = self.load()
        choice = answer_question(decoder, decoder.loaded, question, self.config, on_step=on_step)
        record = answer_record(question, self.DECODER, decoder, decoder.loaded, choice)
        record["model_id"] = Path(reference_file(self.run_model, "float32")).stem
        return record


class PrecisionReference:
    """The run folder's float32 baseline answers (`Float32Baseline`): appended and resumable like the answers."""

    DECODER = Float32Baseline.DECODER

    def __init__(self, run_dir: Path, loaded):
        """`loaded`: the run's model, or its name (a Ray driver loads none)."""
        self.path = Path(run_dir) / reference_file(loaded, "float32")
        files.ensure_writable_dir(self.path.parent)
        files.repair_jsonl(self.path)
        self.done = {str(r["question_id"]): r for r in files.read_jsonl(self.path)}

    def store(self, record: dict, references: dict, decoder) -> None:
        """Append one float32 answer, its exact match against the run's baseline filled in."""
        qid, choice = str(record["question_id"]), record["choices"][0]
        choice["exact_match"] = exact_match(choice, decoder, references.get("baseline", {}).get(qid), self.DECODER)
        files.append_jsonl(self.path, record)
        self.done[qid] = record


def remeasure_flagged(questions: list[Question], names: list[str], decoders: dict, loaded, config: RunConfig,
                      paths: dict, console: Console) -> None:
    """Re-time every decoder on the questions with a contended turn; keep the answers (tokens, text).

    Replaces wall_time, cpu_share, load_avg and contended in place and marks the record
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
                        old["choices"][0].update({key: new[key] for key in TIMING_FIELDS})
                        old["remeasured"] = True
                progress.advance(task)
            for name in names:
                if qid in by_question[name]:
                    files.rewrite_jsonl(paths[name], records[name])  # atomic: a kill keeps the old file or the new one
    console.print(f"remeasured {len(flagged)} questions × {len(names)} decoders")
    if kept_old:
        console.print(f"kept the old answer and timing of {', '.join(kept_old)}: the re-run's tokens differ")


def exact_match(choice: dict, decoder: Decoder, baseline: Optional[dict], name: str) -> Optional[list[bool]]:
    """Per turn: does a greedy lossless decoder reproduce its baseline's tokens? None if n/a."""
    if hasattr(decoder, "exact_match"):  # an endpoint: ids where both have them, else text (bench/endpoints.py)
        return decoder.exact_match(choice, baseline)
    if baseline is None or name == decoder.baseline_name or not decoder.lossless or choice["temperature"] != 0:
        return None
    reference = baseline["choices"][0].get("token_ids") or []
    return [i < len(reference) and tokens == reference[i] for i, tokens in enumerate(choice["token_ids"])]
