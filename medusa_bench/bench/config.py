"""A run's configuration: the options, the settings a run folder keeps fixed, and the resume checks.

`RunConfig` is what `medusa-bench run` parsed (`from_cli`: every bad value a one-line
UserError). `settings_of` is the part that changes the numbers; a run folder keeps it for its
whole life (`check_same_settings`), and `content_hashes` covers what paths cannot see (the
questions' and heads' contents), so a resume never mixes results of different runs.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from medusa_bench.bench import precision
from medusa_bench.inputs.questions import CATEGORY_TEMPERATURE, Question
from medusa_bench.decoders.base import Sampling
from medusa_bench.decoders.options import DecoderOptions, declared
from medusa_bench.decoders.registry import check_required, decoder_names, entry, heads_option, split_spec, tree_decoders
from medusa_bench.errors import UserError
from medusa_bench.results import files
from medusa_bench.results.spec_bench import LEADERBOARD_DECODERS
from medusa_bench.runtime.engine import check_options as check_engine_options

# Settings that change the numbers: a run folder keeps them fixed for its whole life. The
# decoders' own options (decoders/options.py) join them: `setting_keys()`.
RUN_SETTING_KEYS = ("model", "bench", "question_file", "max_new_tokens", "temperature", "top_p", "seed",
                    "device", "dtype", "precision_reference", "cache", "compile", "endpoints", "reference")


# `--decoders` groups: a name that stands for several decoders. spec-bench: Spec-Bench's
# leaderboard rows (A100, Vicuna-13B) in its order, after the baseline they are measured against.
DECODER_GROUPS = {"spec-bench": ("baseline", *LEADERBOARD_DECODERS)}
# `<decoder>:sweep`: the optimiser's tree beside the fixed alternatives, in one interleaved run, the
# check that `auto` is the best of them: chains 1-4, small trees (the first n - 1 paths of
# mc_sim_7b_63) and Medusa's published 64-node tree (EAGLE-2's own default, 60 tokens, is as large).
SWEEP = "sweep"
SWEEP_TREES = ("auto", "chain-1", "chain-2", "chain-3", "chain-4", "tree-8", "tree-16", "tree-32", "mc_sim_7b_63")
# Dynamic trees (eagle2, eagle3) sweep knob sets (trees/dynamic.DynamicKnobs): chains of 1-3, small trees of
# top-k 2-8, and the EAGLE code's own defaults, 60 draft tokens at top-k 10, depth 5 (EAGLE-2) and 7 (EAGLE-3).
DYNAMIC_SWEEP_DECODERS = ("eagle2", "eagle3")
DYNAMIC_SWEEP = ("auto", "dynamic-n2-d1-k1", "dynamic-n3-d2-k1", "dynamic-n4-d3-k1", "dynamic-n5-d2-k2",
                 "dynamic-n9-d3-k4", "dynamic-n16-d4-k8", "dynamic-n61-d5-k10", "dynamic-n61-d7-k10")


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
    per_task: Optional[int] = None  # N questions of each task of the bench (inputs/questions.BENCH_TASKS)
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
    cache: str = "auto"  # KV cache: auto | static | dynamic (runtime/engine.py)
    compile: str = "auto"  # captured steps: auto (CUDA graphs on CUDA, eager on CPU) | on | off
    # Scale-out on Ray (bench/distributed.py); none of these is a setting: every answer records its device.
    workers: Optional[int] = None  # Ray workers (a local Ray instance unless ray_address is given)
    ray_address: Optional[str] = None  # join this Ray cluster ("auto": the one the environment names)
    gpus_per_worker: Optional[float] = None  # None: 1 where the cluster has GPUs, else 0
    cpus_per_worker: int = 1  # CPU workers: torch threads per worker
    batch_sizes: list[int] = field(default_factory=list)  # after the answers, every decoder at these batch sizes (bench/batch_sweep.py)

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
        names = expand_groups([d.strip() for d in decoders.split(",") if d.strip()])
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
        for name in names:  # a missing datastore fails here, not after the model loaded and trees were sized
            check_required(name, options)
        split = lambda text: [x.strip() for x in text.split(",") if x.strip()] if text else None  # noqa: E731
        return cls(decoders=names, question_ids=split(question_ids), categories=split(categories),
                   temperature=temperature, options=options, **rest)

    def sampling_for(self, question: Question) -> Sampling:
        """FastChat's per-category temperature when asked; a per-question seed so runs repeat."""
        temperature = CATEGORY_TEMPERATURE.get(question.category, 0.7) if self.temperature == "category" else self.temperature
        seed = self.seed + zlib.crc32(str(question.question_id).encode())
        return Sampling(temperature=float(temperature), top_p=self.top_p, seed=seed)


def expand_groups(names: list[str]) -> list[str]:
    """`--decoders` with a group (DECODER_GROUPS) in it: the group's decoders in its order, each
    once (`baseline,spec-bench` keeps one baseline); a group naming a decoder that is not
    registered is one line saying which. `hydra:sweep` is hydra on each of SWEEP_TREES."""
    names = [swept for name in names for swept in expand_sweep(name)]
    listed = [name for name in names if name not in DECODER_GROUPS]
    expanded: list[str] = []
    for name in names:
        if name not in DECODER_GROUPS:
            expanded.append(name)
            continue
        registered = decoder_names()
        missing = [member for member in DECODER_GROUPS[name] if member not in registered]
        if missing:
            raise UserError(f"decoder group {name!r} needs {', '.join(missing)}, not registered in this medusa-bench; "
                            f"list the decoders instead (valid names: {', '.join(registered)})")
        expanded += [member for member in DECODER_GROUPS[name] if member not in listed and member not in expanded]
    return expanded


def expand_sweep(spec: str) -> list[str]:
    """'hydra:sweep' → ['hydra:auto', 'hydra:chain-1', …] ('eagle2:sweep': DYNAMIC_SWEEP's knob sets); 'pld:sweep' → the decoder at each of its
    declared knob settings (registry.Knobs.sweep: 'pld:auto', 'pld', 'pld:tokens5', …); any other spec as it is."""
    name, tree = split_spec(spec)
    if tree != SWEEP:
        return [spec]
    found = entry(name)
    if found.tree:
        return [f"{name}:{tree}" for tree in (DYNAMIC_SWEEP if name in DYNAMIC_SWEEP_DECODERS else SWEEP_TREES)]
    if found.knobs is not None and found.knobs.sweep:
        return [f"{name}:{suffix}" if suffix else name for suffix in found.knobs.sweep]
    knobbed = [n for n in decoder_names() if entry(n).knobs is not None and entry(n).knobs.sweep]
    raise UserError(f"{spec}: {name} has no tree and no knobs to sweep; sweep one of {', '.join(tree_decoders() + knobbed)}")


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
