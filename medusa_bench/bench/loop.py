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
from typing import Optional

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
                    "device", "dtype", "precision_reference", "cache", "compile")


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
        options = DecoderOptions(**decoder_options)
        split = lambda text: [x.strip() for x in text.split(",") if x.strip()] if text else None  # noqa: E731
        return cls(decoders=names, question_ids=split(question_ids), categories=split(categories),
                   temperature=temperature, options=options, **rest)

    def sampling_for(self, question: Question) -> Sampling:
        """FastChat's per-category temperature when asked; a per-question seed so runs repeat."""
        temperature = CATEGORY_TEMPERATURE.get(question.category, 0.7) if self.temperature == "category" else self.temperature
        seed = self.seed + zlib.crc32(str(question.question_id).encode())
        return Sampling(temperature=float(temperature), top_p=self.top_p, seed=seed)


def default_out(config: RunConfig, model_name: str) -> Path:
    return Path("results") / f"{model_name}-{config.bench}"


def settings_of(config: RunConfig, question_file: Path, device, dtype) -> dict:
    return {
        "model": config.model, "bench": config.bench, "question_file": str(question_file),
        "max_new_tokens": config.max_new_tokens, "temperature": config.temperature, "top_p": config.top_p,
        "seed": config.seed, "device": device.type, "dtype": str(dtype).replace("torch.", ""),
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


def write_run_file(run_dir: Path, config: RunConfig, settings: dict, loaded, decoders: dict, previous: Optional[dict],
                   hashes: Optional[dict] = None) -> dict:
    names = list(dict.fromkeys((previous or {}).get("decoders", []) + list(decoders)))
    run = {
        "tool": "medusa-bench", "version": __version__,
        "created": (previous or {}).get("created", files.now_iso()), "updated": files.now_iso(),
        "git_hash": files.git_hash(), "settings": settings, "decoders": names,
        "models": {**(previous or {}).get("models", {}), **{name: model_id(loaded, name) for name in decoders}},
        "questions": (previous or {}).get("questions"), "warmup": config.warmup,
        "versions": files.package_versions(), "device": device_info(loaded),
        "trees": {**(previous or {}).get("trees", {}), **tree_records(decoders)},  # each drafting decoder's tree + hash
        "content_hashes": hashes or (previous or {}).get("content_hashes"),  # questions and heads, checked on resume
    }
    dtype_auto = loaded.dtype_auto or (previous or {}).get("device", {}).get("dtype_auto")
    if dtype_auto:  # how --dtype auto chose (a resume keeps the first choice); absent when --dtype was explicit
        run["device"]["dtype_auto"] = dtype_auto
    if settings.get("precision_reference", "none") != "none":
        run["precision_reference"] = {"dtype": settings["precision_reference"], "file": reference_file(loaded, settings["precision_reference"])}
    files.write_json(run_dir / files.RUN_FILE, run)
    return run


def model_id(loaded, decoder_name: str) -> str:
    """'smollm2-135m' + 'medusa:chain-2' → 'smollm2-135m-medusa-chain-2' (a file-safe name)."""
    return f"{loaded.name}-{decoder_name}".replace(":", "-").replace("/", "-").replace(" ", "")


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


def warm_up(decoders: dict[str, Decoder], loaded, questions: list[Question], config: RunConfig) -> None:
    """Untimed generations so lazy initialisation, allocator growth and caches don't hit timing."""
    prompt = build_prompt(loaded, conversation(questions[0].turns[:1], []))
    for decoder in decoders.values():
        for _ in range(config.warmup):
            decoder.generate(prompt, min(config.max_new_tokens, 32), Sampling())


def run_benchmark(config: RunConfig, console: Optional[Console] = None, loaded=None) -> Path:
    """Run (or resume) a benchmark; returns the run folder. Python API behind `medusa-bench run`."""
    from medusa_bench.models import load_model, model_name, resolve_device, resolve_dtype

    console = console or Console(stderr=True)
    question_file, questions = load_questions(config.bench, config.questions, config.limit, config.question_ids, config.categories)
    names = config.decoders
    for name in names:  # fail on a typo before loading anything
        if split_spec(name)[0] not in decoder_names():
            build_decoder(name, None, config.options)
    device = resolve_device(config.device)
    run_dir = files.ensure_writable_dir(config.out or default_out(config, model_name(config.model)))
    lock = files.lock_run_dir(run_dir)  # noqa: F841 — held until this call returns: one writer per run folder
    dtype_name = precision.run_dtype(config.dtype, run_dir)  # a resumed --dtype auto run keeps its folder's dtype
    if loaded is None and dtype_name == "auto":  # measured on the loaded model: the settings need the answer
        loaded = precision.load_auto(config.model, config.device, config.trust_remote_code)
    dtype = loaded.dtype if loaded is not None else resolve_dtype(dtype_name, device)
    settings = settings_of(config, question_file, device, dtype)
    settings["precision_reference"] = precision.reference_dtype(config.precision_reference, settings["dtype"])
    previous = check_same_settings(run_dir, settings)  # refuse before the slow model load
    hashes = check_same_contents(previous, content_hashes(config, questions), question_file)
    loaded = loaded or load_model(config.model, config.device, dtype_name, config.trust_remote_code)
    use_engine(loaded, config.cache, config.compile)  # before any decoder: they all share it
    decoders = {name: build_decoder(name, loaded, config.options) for name in names}
    # Within a question, reference decoders go first (but control and baseline swap every other
    # question: question_order); an answer whose reference has not answered yet waits for it.
    references_first = {d.baseline_name for d in decoders.values()}
    names = sorted(names, key=lambda name: name not in references_first)
    files.ensure_writable_dir(run_dir / files.ANSWER_DIR)
    store_in_run(run_dir, decoders, previous)  # --tree auto: tree.json, calibration.json, latency.json
    write_run_file(run_dir, config, settings, loaded, decoders, previous, hashes)

    paths = {name: files.answer_path(run_dir, model_id(loaded, name)) for name in names}
    for path in paths.values():
        files.repair_jsonl(path)
    done = {name: {str(r["question_id"]): r for r in files.read_jsonl(path)} for name, path in paths.items()}
    references = {ref: done.get(ref) or {str(r["question_id"]): r for r in files.read_jsonl(files.answer_path(run_dir, model_id(loaded, ref)))}
                  for ref in {decoder.baseline_name for decoder in decoders.values()}}
    reference = PrecisionReference(run_dir, loaded, config) if settings["precision_reference"] != "none" else None
    todo = [(question, name) for question in questions for name in names if str(question.question_id) not in done[name]]
    reference_todo = [question for question in questions if reference and str(question.question_id) not in reference.done]
    if not todo and not reference_todo and not config.remeasure_flagged:
        console.print(f"nothing to do: all {len(questions)} questions × {len(names)} decoders are in {run_dir}")
    elif todo or reference_todo:
        if reference_todo:
            reference.load()  # before timing: no model load (and its garbage) between timed answers
        warm_up({n: decoders[n] for n in {name for _, name in todo}}, loaded, questions, config)
        gc.collect()  # the loads' garbage now, not in a timed turn (and no finalizer there to swallow a Ctrl-C)
        with run_progress(console) as progress:
            task = progress.add_task("starting", total=len(todo) + len(reference_todo))
            for index, question in enumerate(questions):
                qid, pending = str(question.question_id), []
                for name in question_order(names, index):
                    if qid in done[name]:
                        continue
                    choice = answer_question(decoders[name], loaded, question, config, on_step=live_rate(progress, task, question, name))
                    pending = store_ready(pending + [(answer_record(question, name, decoders[name], loaded, choice), decoders[name])],
                                          references, names, paths)
                    progress.advance(task)
                if reference and qid not in reference.done:  # after the timed answers: never between them
                    reference.answer(question, references, live_rate(progress, task, question, PrecisionReference.DECODER))
                    progress.advance(task)
    if config.remeasure_flagged:
        remeasure_flagged(questions, names, decoders, loaded, config, paths, console)
    flagged, total = count_flagged(r for path in paths.values() for r in files.read_jsonl(path))
    if flagged:
        console.print(f"{flagged} of {total} turns were measured while the CPU was shared; rerun with --remeasure-flagged on a quiet machine")
    return run_dir


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
    """The precision reference's answer file, relative to the run folder."""
    return f"precision_reference/{loaded.name}-baseline-{dtype}.jsonl"


class PrecisionReference:
    """The baseline's answers decoded again in float32 (untimed): the precision's noise floor.

    A bf16 verify forward over n tokens rounds differently than n one-token forwards, so bf16
    decoders part from the bf16 baseline; where the fp32 baseline parts from it too, at the
    same positions, it is the precision, not the decoder. Same questions, both turns, the fp32
    conversation carrying its own turn-1 answer; appended and resumable like the answers.
    """

    DECODER = "baseline@float32"

    def __init__(self, run_dir: Path, loaded, config: RunConfig):
        self.path = Path(run_dir) / reference_file(loaded, "float32")
        files.ensure_writable_dir(self.path.parent)
        files.repair_jsonl(self.path)
        self.done = {str(r["question_id"]): r for r in files.read_jsonl(self.path)}
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

    def answer(self, question: Question, references: dict, on_step=None) -> dict:
        decoder = self.load()
        qid = str(question.question_id)
        choice = answer_question(decoder, decoder.loaded, question, self.config, on_step=on_step)
        choice["exact_match"] = exact_match(choice, decoder, references.get("baseline", {}).get(qid), self.DECODER)
        record = answer_record(question, self.DECODER, decoder, decoder.loaded, choice)
        record["model_id"] = Path(self.path).stem
        files.append_jsonl(self.path, record)
        self.done[qid] = record
        return record


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
    if baseline is None or name == decoder.baseline_name or not decoder.lossless or choice["temperature"] != 0:
        return None
    reference = baseline["choices"][0].get("token_ids") or []
    return [i < len(reference) and tokens == reference[i] for i, tokens in enumerate(choice["token_ids"])]
