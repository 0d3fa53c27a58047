"""One-shot GPU check: SmolLM2 decoders eager vs captured, model.generate(), a 7B-shape step, in one md.

Made to be run once on a rented GPU with a hard time limit and no network, so robustness
comes first: every item runs inside try/except (a failure is recorded with its first line
and where, and the script goes on), items run in order of importance and are skipped when
the time budget (`--budget-s`) would be exceeded, and `gpu-<device>.md` + `gpu-<device>.json`
are rewritten after every item, so a kill at any point keeps what was measured.

Items, most important first:
  smollm/<dtype>/baseline-captured, baseline-eager, decoders   (bfloat16 first)
  7b            bare forward vs our whole step at a Llama-2-7B shape, random weights, 512 cached tokens
  generate/<dtype>   transformers' model.generate() greedy, eager and static cache + compile
  then the same for the other dtypes.

The SmolLM2 numbers come from the package's own run loop (`run_benchmark`) and are read back
with its own report code (`medusa_bench.results.report.collect`), one metric convention:
tokens/s = Σ new tokens / Σ wall time, speedup against the run's baseline, τ = Σ new tokens /
Σ steps, exact match and first divergence against the baseline's token ids.

    python3 benchmarks/gpu_check.py --questions .gpu/a/question.jsonl --out "$OUT"
    .venv/bin/python benchmarks/gpu_check.py --device cpu --dtypes float32 --limit 1 --max-new-tokens 8 --tiny-7b --out /tmp/gpucheck
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import re
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(HERE), str(ROOT)):  # benchmarks/ helpers and the package, also under runpy / another cwd
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

DECODERS = ["baseline", "medusa", "medusa:tree-16", "hydra", "hydra:tree-16", "pld"]
SIZES_7B = (1, 2, 4, 8, 16, 32, 64)
CONTEXT_7B = 512
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
TARGETS = {
    "generate": "captured baseline >= 2.5x eager model.generate() (SmolLM2 bf16)",
    "step": "whole step <= 1.10x a bare forward at 7B shape, n <= 64",
    "fp32": "fp32 exact match 100%",
    "hydra": "hydra --tree auto >= 1.3x captured baseline",
}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def say(text: str) -> None:
    print(text, flush=True)


def num(value):
    """JSON-safe float (NaN → None)."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) or math.isinf(value) else value


def error_record(error: BaseException) -> dict:
    """The exception's first line and where it was raised (innermost frame, and innermost frame of this repo)."""
    first = (str(error).strip().splitlines() or [""])[0][:300]
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.name != "_on_sigterm"]  # a kill: where it landed
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else "?"
    ours = [f for f in frames if str(ROOT) in str(Path(f.filename).resolve())]
    repo = f"{Path(ours[-1].filename).resolve().relative_to(ROOT)}:{ours[-1].lineno} in {ours[-1].name}" if ours else None
    return {"error": f"{type(error).__name__}: {first}", "where": where, "repo_where": repo}


class Killed(BaseException):
    """SIGTERM (a `timeout` running out): recorded in the item that was running, then the script stops."""


def _on_sigterm(signum, frame):
    raise Killed(f"killed by signal {signum} (time limit?)")


# ------------------------------------------------------------------------------ the check
class Check:
    """Items run in order, each guarded and budgeted; results rewritten to md + json after each."""

    def __init__(self, args, command: str):
        self.args = args
        self.start = time.monotonic()
        self.device = self._device()
        self.slug = self._slug()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.md_path = self.out / f"gpu-{self.slug}.md"
        self.json_path = self.out / f"gpu-{self.slug}.json"
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        self.runs = Path(args.runs or ROOT / "results" / f"gpu-check-{self.slug}") / stamp
        self.items: dict[str, dict] = {}
        self.loaded = None  # (dtype name, LoadedModel): one SmolLM2 load kept at a time
        self.rates: dict[str, float] = {}  # measured seconds per token, for cost estimates
        self.meta = self._meta(command)
        self.write()

    # ---------------------------------------------------------------- setup
    def _device(self):
        name = self.args.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(name)

    def _slug(self) -> str:
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
        else:
            name = "cpu"
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"

    def _meta(self, command: str) -> dict:
        import transformers

        from medusa_bench.results.files import git_hash

        meta = {"device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else f"cpu ({_cpu_name()})",
                "torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
                "cuda": torch.version.cuda, "date": now(), "git_hash": git_hash(ROOT) or _git_fallback(),
                "command": command, "budget_s": self.args.budget_s, "runs": str(self.runs),
                "settings": {k: v for k, v in vars(self.args).items()}}
        meta["engine"] = engine_support()
        return meta

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    # ---------------------------------------------------------------- items
    def item(self, name: str, cost_s: float, fn) -> dict | None:
        """Run `fn(record)` unless the budget forbids; record ok / failed / skipped; rewrite the files."""
        record = {"status": "running", "started_s": round(self.elapsed(), 1), "cost_estimate_s": round(cost_s, 1)}
        only = [o.strip() for o in (self.args.only or "").split(",") if o.strip()]
        if only and not any(name.startswith(o) for o in only):
            return None  # not asked for (--only): left out of the files
        if self.elapsed() + cost_s > self.args.budget_s:
            record.update(status="skipped: time budget", note=f"{self.elapsed():.0f} s elapsed + ~{cost_s:.0f} s > {self.args.budget_s} s")
            self.items[name] = record
            say(f"[{self.elapsed():6.1f}s] {name}: skipped (time budget: ~{cost_s:.0f} s needed)")
            self.write()
            return None
        say(f"[{self.elapsed():6.1f}s] {name}: start (~{cost_s:.0f} s)")
        self.items[name] = record
        self.write()
        t0 = time.monotonic()
        try:
            fn(record)
            record["status"] = "ok" if record.get("status") == "running" else record["status"]
        except BaseException as error:  # noqa: BLE001 — record everything, even a KeyboardInterrupt's place
            record.update(status="failed", **error_record(error))
            say(f"[{self.elapsed():6.1f}s] {name}: FAILED {record['error']} at {record['where']}"
                + (f" ({record['repo_where']})" if record.get("repo_where") and record["repo_where"] != record["where"] else ""))
            if isinstance(error, (KeyboardInterrupt, Killed)):
                record["seconds"] = round(time.monotonic() - t0, 1)
                self.write()
                raise
        record["seconds"] = round(time.monotonic() - t0, 1)
        say(f"[{self.elapsed():6.1f}s] {name}: {record['status']} in {record['seconds']} s")
        self.write()
        return record

    def write(self) -> None:
        data = {"meta": self.meta, "elapsed_s": round(self.elapsed(), 1), "items": self.items}
        for path, text in ((self.json_path, json.dumps(data, indent=1, default=str) + "\n"), (self.md_path, render_md(data))):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)

    # ---------------------------------------------------------------- cost estimates (seconds)
    def tokens(self, turns: int = 2) -> int:
        return self.args.limit * turns * self.args.max_new_tokens

    def per_token(self, kind: str) -> float:
        default = {"eager": 0.02, "captured": 0.008, "generate": 0.025} if self.device.type == "cuda" else \
                  {"eager": 0.06, "captured": 0.06, "generate": 0.06}
        return self.rates.get(kind, default[kind])

    def load_cost(self, dtype: str) -> float:
        if self.loaded and self.loaded[0] == dtype:
            return 0.0
        return 30.0 if not self.rates.get("loaded_once") else 8.0

    # ---------------------------------------------------------------- SmolLM2
    def model(self, dtype: str):
        from medusa_bench.models import load_model

        if self.loaded and self.loaded[0] == dtype:
            return self.loaded[1]
        self.free()
        t0 = time.monotonic()
        loaded = load_model(self.args.model, self.device.type if self.device.index is None else str(self.device), dtype)
        self.rates["loaded_once"] = 1.0
        say(f"  loaded {self.args.model} in {dtype} on {loaded.device} in {time.monotonic() - t0:.1f} s (attention: {loaded.attn_implementation})")
        self.loaded = (dtype, loaded)
        return loaded

    def free(self) -> None:
        self.loaded = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def run_config(self, dtype: str, decoders: list[str], compile_mode: str, folder: Path):
        from medusa_bench.bench.loop import RunConfig
        from medusa_bench.decoders.options import DecoderOptions

        fields = {f.name for f in dataclasses.fields(RunConfig)}
        kwargs = dict(model=self.args.model, decoders=decoders, bench="mt_bench", questions=self.questions, limit=self.args.limit,
                      max_new_tokens=self.args.max_new_tokens, out=folder, device=str(self.device), dtype=dtype, warmup=1,
                      options=DecoderOptions(tree="auto"), precision_reference="none")
        if self.questions is None:
            kwargs["bench"] = "quick"
        applied = {}
        if "compile" in fields:
            kwargs["compile"] = applied["compile"] = compile_mode
        if "cache" in fields:
            kwargs["cache"] = applied["cache"] = "auto"
        return RunConfig(**kwargs), applied

    def smollm_run(self, dtype: str, label: str, decoders: list[str], compile_mode: str, record: dict) -> None:
        from rich.console import Console

        from medusa_bench.bench.loop import run_benchmark
        from medusa_bench.results.report import collect

        loaded = self.model(dtype)
        folder = self.runs / f"{SHORT.get(dtype, dtype)}-{label}"
        config, applied = self.run_config(dtype, decoders, compile_mode, folder)
        record["run_dir"] = str(folder)
        record["compile"] = applied.get("compile", "n/a: RunConfig has no compile field (eager)")
        record["cache"] = applied.get("cache", "n/a")
        if compile_mode == "off" or "compile" not in applied:
            set_engine(loaded, "off", record)  # the same loaded model served a captured run before: plain again
        t0 = time.monotonic()
        run_benchmark(config, console=Console(stderr=True), loaded=loaded)
        record["run_seconds"] = round(time.monotonic() - t0, 1)
        report = collect([folder])
        speed = report.tables["speed"]
        precision = report.tables.get("precision")
        divergence = {}
        if precision is not None and not precision.empty and "divergence_vs_baseline" in precision.columns:
            divergence = dict(zip(precision.decoder, precision.divergence_vs_baseline))
        info = report.runs[0].info if report.runs else {}
        trees = info.get("trees") or {}
        record["engine_used"] = (info.get("device") or {}).get("engine")  # what run.json says the run used
        rows = {}
        for _, row in speed.iterrows():
            name = row.decoder
            tree = trees.get(name) or {}
            rows[name] = {"tokens_per_s": num(row.tokens_per_s), "speedup": num(row.speedup), "ci_low": num(row.speedup_ci_low),
                          "ci_high": num(row.speedup_ci_high), "tau": num(row.tau), "exact_match": num(row.exact_match),
                          "exact_turns": int(row.exact_match_turns), "first_divergence_median": num(divergence.get(name)),
                          "new_tokens": int(row.new_tokens), "wall_time_s": num(row.wall_time_s), "questions": int(row.n_questions),
                          "tree": f"{tree.get('name')} ({tree.get('num_nodes')} nodes{', auto' if tree.get('auto') else ''})" if tree else None}
            say(f"  {dtype} {label} {name}: {rows[name]['tokens_per_s']:.1f} tok/s, speedup {fmt(rows[name]['speedup'], 2)}x, "
                f"tau {fmt(rows[name]['tau'], 2)}, exact {fmt_pct(rows[name]['exact_match'])}, first divergence {fmt(rows[name]['first_divergence_median'], 0)}"
                + (f", tree {rows[name]['tree']}" if rows[name]["tree"] else ""))
        record["decoders"] = rows
        record["baseline_turn1"] = turn1(folder, loaded.name)
        base = rows.get("baseline")
        if base and base["tokens_per_s"]:
            self.rates["captured" if compile_mode != "off" and "compile" in applied else "eager"] = 1.0 / base["tokens_per_s"]

    def generate_item(self, dtype: str, record: dict) -> None:
        """model.generate() greedy, eager then static cache (+ compile on CUDA), on turn 1 of the same questions."""
        from baseline_vs_generate import hf_generate

        from medusa_bench.inputs.chat import build_prompt, conversation
        from medusa_bench.inputs.questions import load_questions

        loaded = self.model(dtype)
        set_engine(loaded, "off", record)
        _, questions = load_questions("mt_bench" if self.questions else "quick", self.questions, self.args.limit)
        prompts = {str(q.question_id): build_prompt(loaded, conversation(q.turns[:1], [])) for q in questions}
        ours = {label: (self.items.get(f"smollm/{dtype}/{label}") or {}).get("baseline_turn1") for label in ("baseline-eager", "baseline-captured")}
        n = self.args.max_new_tokens
        longest = max(prompts.values(), key=len)
        modes = {"eager": {"disable_compile": True}, "captured": {"cache_implementation": "static"}}
        record["modes"] = {}
        for mode, kwargs in modes.items():
            if mode == "captured" and self.elapsed() + self.gen_captured_cost() > self.args.budget_s:
                record["modes"][mode] = {"status": "skipped: time budget"}
                say(f"  generate {dtype} {mode}: skipped (time budget)")
                self.write()
                continue
            entry = record["modes"][mode] = {"kwargs": {k: str(v) for k, v in kwargs.items()}}
            try:
                if mode == "captured":
                    reset_dynamo()
                t0 = time.monotonic()
                for _ in range(2 if mode == "captured" else 1):  # compile + CUDA-graph recording happen here; longest prompt sizes the static cache
                    hf_generate(loaded, longest, n, **kwargs)
                entry["warmup_s"] = round(time.monotonic() - t0, 1)
                entry["compiled"] = compiled_flag(loaded.model, mode)
                tokens = wall = 0.0
                turns = {}
                for qid, ids in prompts.items():
                    out, seconds = hf_generate(loaded, ids, n, **kwargs)
                    tokens += len(out)
                    wall += seconds
                    turns[qid] = out
                entry["tokens_per_s"] = num(tokens / wall) if wall else None
                entry["new_tokens"] = int(tokens)
                for label, baseline in ours.items():
                    if not baseline:
                        continue
                    common = [q for q in turns if q in baseline["token_ids"]]
                    same = sum(turns[q] == baseline["token_ids"][q] for q in common)
                    entry[f"same_tokens_vs_{label}"] = f"{same}/{len(common)}"
                    if entry["tokens_per_s"] and baseline["tokens_per_s"]:
                        entry[f"{label}_over_generate"] = num(baseline["tokens_per_s"] / entry["tokens_per_s"])
                say(f"  generate {dtype} {mode}: {entry['tokens_per_s']:.1f} tok/s (warm-up {entry['warmup_s']} s, compiled: {entry['compiled']}); "
                    + ", ".join(f"{k} {fmt(v, 2) if isinstance(v, float) else v}" for k, v in entry.items() if k.startswith(("same_", "baseline-"))))
                if mode == "eager" and entry["tokens_per_s"]:
                    self.rates["generate"] = 1.0 / entry["tokens_per_s"]
            except Exception as error:  # noqa: BLE001
                entry.update(status="failed", **error_record(error))
                say(f"  generate {dtype} {mode}: FAILED {entry['error']} at {entry['where']}")
            self.write()
        record["ours"] = {label: ({"tokens_per_s": v["tokens_per_s"], "turns": len(v["token_ids"])} if v else None) for label, v in ours.items()}

    def gen_captured_cost(self) -> float:
        compile_s = 90.0 if self.device.type == "cuda" else 0.0
        return compile_s + self.tokens(1) * self.per_token("captured") * 2

    # ---------------------------------------------------------------- 7B shape
    def seven_b(self, record: dict) -> None:
        from verify_overhead import tree_of

        from medusa_bench.decoders.spec import Proposer, SpeculativeDecoder
        from medusa_bench.runtime.cache import crop_cache
        from medusa_bench.runtime.forward import sync
        from medusa_bench.decoders.medusa import MedusaProposer
        from medusa_bench.heads.medusa import MedusaHeads

        self.free()
        loaded = random_llama(self.device, self.args.tiny_7b)
        record["shape"] = {k: getattr(loaded.model.config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")}
        record["dtype"] = str(loaded.dtype).replace("torch.", "")
        record["context"] = CONTEXT_7B
        repeats = self.args.repeats_7b
        record["repeats"] = repeats
        heads = MedusaHeads.for_model(loaded.model, num_heads=4)  # random Medusa heads drafting on the shared lm_head
        with torch.no_grad():
            heads.res_weight.normal_(0.0, 0.02)
        context = torch.randint(100, 20000, (CONTEXT_7B,), generator=torch.Generator().manual_seed(0)).tolist()

        def decoder(n: int):
            if n == 1:
                return SpeculativeDecoder("baseline", loaded, Proposer())
            return SpeculativeDecoder("medusa", loaded, MedusaProposer(heads, tree_of(n), loaded.device))

        def timed(fn) -> float:
            sync(loaded.device)
            t0 = time.perf_counter()
            fn()
            sync(loaded.device)
            return time.perf_counter() - t0

        rows = record["sizes"] = {}
        with torch.inference_mode():
            for mode in ("eager", "captured"):
                if mode == "captured":
                    if self.meta.get("captured_mode") == "off":
                        record["captured"] = "not measured: compile off (CPU)"
                        break
                    if not set_engine(loaded, "on", record):
                        record["captured"] = record.get("engine_note") or "no engine: captured not measured"
                        say(f"  7b captured: {record['captured']}")
                        break
                for n in SIZES_7B:
                    row = rows.setdefault(str(n), {})
                    try:
                        dec = decoder(n)
                        state = dec.prefill(context)
                        mark, cache = state.checkpoint(), state.cache
                        root = int(state.logits.argmax())
                        ids = torch.randint(100, 20000, (1, n), device=loaded.device)
                        positions = (CONTEXT_7B + torch.arange(n, device=loaded.device))[None]

                        def bare():  # on the step's engine: eager, or replayed when captured
                            dec.engine.forward(ids, cache, positions, None, ())

                        def step():
                            dec.step(state, root)

                        bare_t, step_t = [], []
                        for i in range(3 + repeats):  # 3 warm-up rounds (captures happen there)
                            if mode == "eager":
                                b = timed(bare)
                                crop_cache(cache, CONTEXT_7B)
                            s = timed(step)
                            dec.rewind(state, mark)
                            if i >= 3:
                                if mode == "eager":
                                    bare_t.append(b)
                                step_t.append(s)
                        if mode == "eager":
                            row["forward_ms"] = statistics.median(bare_t) * 1e3
                        row[f"step_{mode}_ms"] = statistics.median(step_t) * 1e3
                        if row.get("forward_ms"):
                            row[f"step_{mode}_over_forward"] = row[f"step_{mode}_ms"] / row["forward_ms"]
                        say(f"  7b n={n:>2} {mode}: forward {fmt(row.get('forward_ms'), 2)} ms, step {row[f'step_{mode}_ms']:.2f} ms, "
                            f"step/forward {fmt(row.get(f'step_{mode}_over_forward'), 3)}")
                        del dec, state, cache
                    except Exception as error:  # noqa: BLE001
                        row[f"{mode}_error"] = error_record(error)
                        say(f"  7b n={n} {mode}: FAILED {row[f'{mode}_error']['error']} at {row[f'{mode}_error']['where']}")
                    self.write()
        # the tree optimiser on the shipped heads' acceptance with this step-time profile
        record["tree_auto"] = {}
        for mode in ("eager", "captured"):
            step_time = {int(n): r[f"step_{mode}_ms"] / 1e3 for n, r in rows.items() if r.get(f"step_{mode}_ms")}
            if 1 not in step_time or len(step_time) < 2:
                continue
            for kind in ("medusa", "hydra"):
                key = f"{kind}/{mode}"
                try:
                    record["tree_auto"][key] = tree_for_profile(self, kind, step_time)
                    r = record["tree_auto"][key]
                    if r.get("n"):
                        say(f"  7b tree auto {key}: n={r['n']}, tau {r['tau']:.2f}, predicted {r['speedup']:.2f}x ({r['calibration_from']})")
                    else:
                        say(f"  7b tree auto {key}: {r.get('note')}")
                except Exception as error:  # noqa: BLE001
                    record["tree_auto"][key] = error_record(error)
                    say(f"  7b tree auto {key}: FAILED {record['tree_auto'][key]['error']}")
        del heads, loaded
        self.free()

    # ---------------------------------------------------------------- plan
    def main(self) -> None:
        args = self.args
        self.questions = find_questions(args.questions)
        self.meta["questions"] = str(self.questions) if self.questions else "built-in quick bench (no MT-Bench file found)"
        say(f"gpu_check on {self.meta['device']}: torch {self.meta['torch']}, transformers {self.meta['transformers']}, "
            f"budget {args.budget_s} s, questions {self.meta['questions']}, engine: {self.meta['engine']}")
        self.write()
        sections = {s.strip() for s in args.sections.split(",") if s.strip()}
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        compile_on = args.compile or ("on" if self.device.type == "cuda" else "off")
        self.meta["captured_mode"] = compile_on
        captured = compile_on != "off" and self.meta["engine"]["run_config_compile"]
        decoders = [d.strip() for d in args.decoders.split(",") if d.strip()]

        def smollm(dtype):
            if "smollm" not in sections:
                return
            t = self.tokens()
            self.item(f"smollm/{dtype}/baseline-captured", self.load_cost(dtype) + 20 + t * self.per_token("captured"),
                      lambda r: self.smollm_run(dtype, "baseline-captured", ["baseline"], compile_on, r))
            if captured:  # without the engine both runs would be the same eager run
                self.item(f"smollm/{dtype}/baseline-eager", self.load_cost(dtype) + 5 + t * self.per_token("eager"),
                          lambda r: self.smollm_run(dtype, "baseline-eager", ["baseline"], "off", r))
            self.item(f"smollm/{dtype}/decoders", self.load_cost(dtype) + 60 + t * self.per_token("captured") * 4,
                      lambda r: self.smollm_run(dtype, "decoders", decoders, compile_on, r))

        def generate(dtype):
            if "smollm" not in sections and "generate" not in sections:
                return
            cost = self.load_cost(dtype) + self.tokens(1) * self.per_token("generate") * 1.3
            self.item(f"generate/{dtype}", cost, lambda r: self.generate_item(dtype, r))

        first, rest = dtypes[:1], dtypes[1:]
        for dtype in first:
            smollm(dtype)
        if "7b" in sections:
            per = 40 if args.tiny_7b or self.device.type == "cuda" else 600
            self.item("7b", per, self.seven_b)
        for dtype in first:
            generate(dtype)
        for dtype in rest:
            smollm(dtype)
        for dtype in rest:
            generate(dtype)
        self.free()
        say(f"[{self.elapsed():6.1f}s] done: {self.md_path}")
        self.write()


# ------------------------------------------------------------------------------ helpers
def _cpu_name() -> str:
    try:
        from medusa_bench.bench.device import cpu_model

        return cpu_model() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def _git_fallback() -> str | None:
    head = ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (ROOT / ".git" / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return None


def engine_support() -> dict:
    """What the lead's engine work offers in this checkout: RunConfig.compile/cache, medusa_bench.runtime.engine.use_engine."""
    info = {"run_config_compile": False, "run_config_cache": False, "use_engine": False}
    try:
        from medusa_bench.bench.loop import RunConfig

        fields = {f.name for f in dataclasses.fields(RunConfig)}
        info["run_config_compile"], info["run_config_cache"] = "compile" in fields, "cache" in fields
    except Exception as error:  # noqa: BLE001
        info["run_config_error"] = error_record(error)["error"]
    try:
        from medusa_bench.runtime import engine

        info["use_engine"] = callable(getattr(engine, "use_engine", None))
    except ImportError:
        pass
    except Exception as error:  # noqa: BLE001
        info["engine_error"] = error_record(error)["error"]
    return info


def set_engine(loaded, compile_mode: str, record: dict) -> bool:
    """`use_engine(loaded, cache="auto", compile=...)` where the engine exists; False (and a note) where it does not."""
    try:
        from medusa_bench.runtime.engine import use_engine
    except ImportError:
        record["engine_note"] = "medusa_bench.runtime.engine.use_engine not in this checkout (eager)"
        return False
    result = use_engine(loaded, cache="auto", compile=compile_mode)
    record.setdefault("engine", []).append({"compile": compile_mode, "returned": repr(result)[:120]})
    return True


def find_questions(explicit: str | None) -> Path | None:
    """--questions, else an MT-Bench question.jsonl found nearby (no download: the GPU machine is offline)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise SystemExit(f"--questions {path}: file not found")
        return path.resolve()
    candidates = [ROOT / ".gpu" / "a" / "question.jsonl", ROOT.parent / "shared" / "data" / "mt_bench" / "question.jsonl"]
    if os.environ.get("MEDUSA_BENCH_DATA"):
        candidates.insert(0, Path(os.environ["MEDUSA_BENCH_DATA"]) / "mt_bench" / "question.jsonl")
    return next((p.resolve() for p in candidates if p.is_file()), None)


def turn1(folder: Path, model_name: str) -> dict | None:
    """The baseline's first turns in a run folder: tokens/s (Σ tokens / Σ wall) and token ids per question."""
    from medusa_bench.results import files

    records = files.read_jsonl(files.answer_path(folder, f"{model_name}-baseline"))
    if not records:
        return None
    tokens = wall = 0.0
    ids = {}
    for record in records:
        choice = record["choices"][0]
        tokens += choice["new_tokens"][0]
        wall += choice["wall_time"][0]
        ids[str(record["question_id"])] = choice["token_ids"][0]
    return {"tokens_per_s": num(tokens / wall) if wall else None, "token_ids": ids}


def reset_dynamo() -> None:
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass


def compiled_flag(model, mode: str):
    if mode != "captured" or next(model.parameters()).device.type != "cuda":
        return False
    compiled = getattr(model, "_compiled_call", None)
    return compiled is not None if hasattr(model, "_compiled_call") else "unknown"


def random_llama(device: torch.device, tiny: bool):
    """A randomly initialised model of Llama-2-7B's shape in fp16 (fp32 on CPU), built on the meta device: no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from medusa_bench.models import LoadedModel

    shape = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=688) if tiny else \
        dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, **shape)
    config._attn_implementation = "sdpa"
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0)  # RMSNorm weights
            else:
                param.normal_(0.0, 0.02, generator=generator)
        for module in model.modules():  # non-persistent buffers (rotary inv_freq) are garbage after to_empty: rebuild them
            if hasattr(module, "inv_freq"):
                try:
                    fresh = type(module)(config=config, device=device)
                except TypeError:
                    fresh = type(module)(config)
                for buffer_name, buffer in fresh.named_buffers(recurse=False):
                    setattr(module, buffer_name, buffer.to(device))
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=None, name="llama-2-7b-shape" + ("-tiny" if tiny else ""), spec="random",
                       device=device, dtype=dtype, eos_token_ids=[2], context_length=4096, source="random init",
                       attn_implementation=config._attn_implementation)


def tree_for_profile(check: Check, kind: str, step_time: dict[int, float]) -> dict:
    """What `--tree auto`'s search picks for the SmolLM2 heads' acceptance under this step-time profile."""
    from medusa_bench.bench.autotree import DEFAULT_MIN_SPEEDUP
    from medusa_bench.paths import cache_dir
    from medusa_bench.trees.search import Latency, best_tree, load_calibration

    source = None
    for name, item in check.items.items():  # the smollm decoders run's own calibration file (run.json "trees")
        if not name.endswith("/decoders") or not item.get("run_dir"):
            continue
        run_dir = Path(item["run_dir"])
        try:
            trees = json.loads((run_dir / "run.json").read_text()).get("trees") or {}
        except (OSError, ValueError):
            continue
        record = trees.get(kind) or {}
        file = (record.get("files") or {}).get("calibration")
        if file and (run_dir / file).is_file():
            source = run_dir / file
            break
    if source is None:  # else the newest tree-cache table for these heads
        tables = sorted((cache_dir() / "trees").glob(f"{check.args.model}-{kind}-*/calibration.json"), key=lambda p: p.stat().st_mtime)
        source = tables[-1] if tables else None
    if source is None:
        return {"note": "skipped: no acceptance calibration from the smollm section or the tree cache"}
    calibration = load_calibration(source)
    latency = Latency(step_time, context_len=CONTEXT_7B, baseline_step_time=step_time[1])
    result = best_tree(calibration, latency, max(step_time), None, None, DEFAULT_MIN_SPEEDUP)
    choice = result.choice
    trees = [row for row in choice.table if row["n"] > 1]
    best = max(trees, key=lambda row: (row["throughput"], -row["n"])) if trees else None
    return {"best_tree_n": best["n"] if best else None, "best_tree_speedup": num(best["speedup"]) if best else None,
            "best_tree_tau": num(best["tau"]) if best else None, "n": choice.n, "tau": choice.tau, "speedup": choice.speedup, "step_ms": choice.step_time * 1e3,
            "beats_baseline": choice.beats_baseline, "reason": choice.reason, "calibration_from": str(source),
            "table": [{k: num(v) for k, v in row.items()} for row in choice.table if row["n"] in step_time or row["n"] == choice.n]}


# ------------------------------------------------------------------------------ markdown
def fmt(value, digits: int = 1, suffix: str = "") -> str:
    value = num(value)
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def fmt_pct(value) -> str:
    value = num(value)
    return "n/a" if value is None else f"{100 * value:.0f}%"


def verdict(ok) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines + [""]


def status_line(item: dict | None) -> str | None:
    if item is None:
        return "not run"
    if item["status"] == "ok":
        return None
    if item["status"] == "failed":
        return f"failed: {item['error']} at {item['where']}" + (f" ({item['repo_where']})" if item.get("repo_where") and item["repo_where"] != item["where"] else "")
    return item["status"] + (f" ({item['note']})" if item.get("note") else "")


def render_md(data: dict) -> str:
    meta, items = data["meta"], data["items"]
    dtypes = [d.strip() for d in meta["settings"]["dtypes"].split(",") if d.strip()]
    lines = [f"# GPU check: {meta['device']}", "",
             f"- date: {meta['date']}; elapsed {data['elapsed_s']} s of a {meta['budget_s']} s budget",
             f"- torch {meta['torch']} (CUDA {meta['cuda']}), transformers {meta['transformers']}, Python {meta['python']}",
             f"- git: {meta['git_hash'] or 'unknown'}",
             *([f"- **stopped early: {meta['stopped']}**"] if meta.get("stopped") else []),
             f"- command: `{meta['command']}`",
             f"- model {meta['settings']['model']}, {meta['settings']['limit']} questions ({meta.get('questions', '?')}), "
             f"max {meta['settings']['max_new_tokens']} new tokens, greedy; captured = compile `{meta.get('captured_mode', '?')}`",
             f"- engine in this checkout: RunConfig.compile {meta['engine'].get('run_config_compile')}, "
             f"RunConfig.cache {meta['engine'].get('run_config_cache')}, engine.use_engine {meta['engine'].get('use_engine')}",
             ""]
    targets = []

    # ---- SmolLM2 decoders per dtype
    for dtype in dtypes:
        key = f"smollm/{dtype}/decoders"
        item = items.get(key)
        if item is None and f"smollm/{dtype}/baseline-captured" not in items:
            continue
        mode = (item or {}).get("compile", "?")
        lines += [f"## SmolLM2 decoders, {dtype}, compile {mode}" + (" (captured)" if mode in ("on", "auto") else ""), ""]
        problem = status_line(item)
        if problem:
            lines += [f"_{problem}_", ""]
        rows = (item or {}).get("decoders") or {}
        if rows:
            lines += [f"engine: {json.dumps(item.get('engine_used')) if item.get('engine_used') else item.get('compile')}; "
                      f"run folder `{item.get('run_dir')}`", ""]
            body = []
            for name, r in rows.items():
                target = ""
                if name == "hydra":
                    target = f">= 1.30x: {verdict(r['speedup'] >= 1.3 if r['speedup'] is not None else None)}"
                    targets.append([TARGETS["hydra"] + f" ({dtype})", fmt(r["speedup"], 2, "x"), verdict(r["speedup"] >= 1.3 if r["speedup"] is not None else None)])
                if dtype == "float32" and name != "baseline":
                    ok = r["exact_match"] == 1.0 if r["exact_match"] is not None else None
                    target = (target + "; " if target else "") + f"exact 100%: {verdict(ok)}"
                    targets.append([TARGETS["fp32"] + f" ({name})", fmt_pct(r["exact_match"]), verdict(ok)])
                ci = f"{fmt(r['ci_low'], 2)}–{fmt(r['ci_high'], 2)}" if r["ci_low"] is not None else "n/a"
                body.append([name, r.get("tree") or "", fmt(r["tokens_per_s"]), fmt(r["speedup"], 2, "x"), ci, fmt(r["tau"], 2),
                             fmt_pct(r["exact_match"]), fmt(r["first_divergence_median"], 0), target])
            lines += table(["decoder", "tree", "tok/s", "speedup", "95% CI", "τ", "exact", "1st div.", "target"], body)

    # ---- baseline eager vs captured
    body = []
    for dtype in dtypes:
        cap, eag = items.get(f"smollm/{dtype}/baseline-captured"), items.get(f"smollm/{dtype}/baseline-eager")
        if cap is None and eag is None:
            continue
        c = ((cap or {}).get("decoders") or {}).get("baseline", {}).get("tokens_per_s")
        e = ((eag or {}).get("decoders") or {}).get("baseline", {}).get("tokens_per_s")
        note = "; ".join(filter(None, [status_line(cap) and f"captured {status_line(cap)}", status_line(eag) and f"eager {status_line(eag)}"]))
        used = (cap or {}).get("engine_used") or {}
        body.append([dtype, fmt(e), fmt(c), fmt(c / e, 2, "x") if c and e else "n/a",
                     f"{used.get('compile', (cap or {}).get('compile', ''))}, {used.get('cache', '')} cache".strip(", "), note])
    if body:
        lines += ["## Our baseline: eager vs captured", ""] + table(["dtype", "eager tok/s", "captured tok/s", "captured/eager", "captured run's engine", "note"], body)

    # ---- model.generate()
    body = []
    for dtype in dtypes:
        item = items.get(f"generate/{dtype}")
        if item is None:
            continue
        modes = item.get("modes") or {}
        ours = item.get("ours") or {}
        oe = (ours.get("baseline-eager") or {}).get("tokens_per_s")
        oc = (ours.get("baseline-captured") or {}).get("tokens_per_s")
        ge = (modes.get("eager") or {}).get("tokens_per_s")
        gc_ = (modes.get("captured") or {}).get("tokens_per_s")
        ratio_target = oc / ge if oc and ge else None
        if dtype == "bfloat16":
            targets.append([TARGETS["generate"], fmt(ratio_target, 2, "x"), verdict(ratio_target >= 2.5 if ratio_target else None)])
        notes = [status_line(item)] + [f"{m}: {v.get('status')} {v.get('error', '')}".strip() for m, v in modes.items() if v.get("status")]
        same = "; ".join(f"{m} vs ours-{lbl.split('-')[1]} {v}" for m, mv in modes.items() for k, v in mv.items()
                         if k.startswith("same_tokens_vs_") for lbl in [k[len("same_tokens_vs_"):]])
        body.append([dtype, fmt(ge), fmt(gc_), str((modes.get("captured") or {}).get("compiled", "n/a")), fmt(oe), fmt(oc),
                     fmt(oe / ge, 2, "x") if oe and ge else "n/a", fmt(oc / gc_, 2, "x") if oc and gc_ else "n/a",
                     fmt(ratio_target, 2, "x") + (" (target >= 2.5x)" if dtype == "bfloat16" else ""), same, "; ".join(filter(None, notes))])
    if body:
        lines += ["## model.generate() vs our baseline (turn 1 of the same questions)", "",
                  "gen = transformers generate() greedy: eager (dynamic cache, disable_compile) and captured (cache_implementation=static, "
                  "auto-compiled on CUDA); ours = our baseline decoder's turn-1 answers from the runs above.", ""]
        lines += table(["dtype", "gen eager", "gen capt.", "compiled", "ours eager", "ours capt.", "ours/gen eager", "ours/gen capt.",
                        "ours capt./gen eager", "same tokens", "note"], body)

    # ---- 7B
    item = items.get("7b")
    if item is not None:
        shape = item.get("shape") or {}
        lines += ["## Llama-2-7B shape, random weights: our step vs a bare forward" + (" (TINY: --tiny-7b)" if shape.get("hidden_size") != 4096 else ""), "",
                  f"{shape.get('num_hidden_layers', '?')} layers, hidden {shape.get('hidden_size', '?')}, {item.get('dtype', '?')}, "
                  f"{item.get('context', '?')} cached tokens, median of {item.get('repeats', '?')}; step = `SpeculativeDecoder.step` with 4 random "
                  "Medusa heads on a fixed tree of n nodes (mc_sim_7b_63 prefix), forward = the model alone over n tokens on the same engine (eager, or replayed when captured; the first H200 check, before this, timed it eager in both).", ""]
        problem = status_line(item)
        if problem:
            lines += [f"_{problem}_", ""]
        if item.get("captured"):
            lines += [f"captured: {item['captured']}", ""]
        body, worst = [], {}
        for n, r in (item.get("sizes") or {}).items():
            for mode in ("eager", "captured"):
                x = r.get(f"step_{mode}_over_forward")
                if x is not None:
                    worst[mode] = max(worst.get(mode, 0), x)
            errors = "; ".join(f"{m}: {r[f'{m}_error']['error']}" for m in ("eager", "captured") if r.get(f"{m}_error"))
            body.append([n, fmt(r.get("forward_ms"), 2), fmt(r.get("step_eager_ms"), 2), fmt(r.get("step_eager_over_forward"), 3),
                         fmt(r.get("step_captured_ms"), 2), fmt(r.get("step_captured_over_forward"), 3), errors])
        if body:
            lines += table(["n", "forward ms", "step eager ms", "eager/fwd", "step capt. ms", "capt./fwd", "error"], body)
        for mode, x in worst.items():
            tiny = " (TINY model, not 7B)" if shape.get("hidden_size") != 4096 else ""
            targets.append([TARGETS["step"] + f" ({mode}, worst n){tiny}", fmt(x, 3, "x"), verdict(x <= 1.10)])
        autos = item.get("tree_auto") or {}
        if autos:
            body = []
            for key, r in autos.items():
                if r.get("n"):
                    body.append([key, r["n"], fmt(r["tau"], 2), fmt(r["step_ms"], 2), fmt(r["speedup"], 2, "x"),
                                 f"n={r.get('best_tree_n')}: τ {fmt(r.get('best_tree_tau'), 2)}, {fmt(r.get('best_tree_speedup'), 2, 'x')}",
                                 Path(r["calibration_from"]).name])
                else:
                    body.append([key, "n/a", "", "", "", "", r.get("note") or r.get("error", "")])
            lines += ["### What `--tree auto` would pick at 7B step times (SmolLM2 heads' acceptance)", "",
                      "Hydra's drafting cost is not in this Medusa-step profile.", ""]
            lines += table(["heads/profile", "chosen n", "τ", "step ms", "predicted", "best tree (needs > 1.03x)", "calibration"], body)

    if targets:
        lines += ["## Targets", ""] + table(["target", "measured", "verdict"], targets)

    lines += ["## Items", ""]
    lines += table(["item", "status", "seconds", "started at s"],
                   [[name, (status_line(it) or "ok"), it.get("seconds", ""), it.get("started_s", "")] for name, it in items.items()])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "results"), help="where gpu-<device>.md and .json go")
    parser.add_argument("--runs", default=None, help="parent of the run folders (default results/gpu-check-<device>/<time>)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--questions", default=None, help="an MT-Bench question.jsonl (default: .gpu/a/ or ../shared/data/mt_bench/)")
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--decoders", default=",".join(DECODERS),
                        help="the decoders item's run (first must be baseline), e.g. baseline,eagle,eagle2,eagle3")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sections", default="smollm,7b", help="smollm (decoders + generate), 7b")
    parser.add_argument("--compile", default=None, choices=("on", "auto", "off"),
                        help="RunConfig.compile of the captured runs (default: on with CUDA, off on CPU)")
    parser.add_argument("--budget-s", type=float, default=450.0)
    parser.add_argument("--only", default=None, help="comma-separated item names (or prefixes) to run, e.g. "
                        "smollm/float32/decoders,generate/bfloat16 (a short re-check)")
    parser.add_argument("--tiny-7b", action="store_true", help="2 layers, hidden 256 instead of Llama-2-7B's shape (CPU testing)")
    parser.add_argument("--repeats-7b", type=int, default=None, help="timed repeats per size (default 20 on CUDA, 5 on CPU)")
    args = parser.parse_args()
    command = "python3 " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], os.getcwd()) if sys.argv[0] else "gpu_check.py", *sys.argv[1:]])
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    check = Check(args, command)
    if args.repeats_7b is None:
        args.repeats_7b = 20 if check.device.type == "cuda" else 5
    check.meta["settings"]["repeats_7b"] = args.repeats_7b
    try:
        check.main()
    except (KeyboardInterrupt, Killed) as error:
        check.meta["stopped"] = f"{type(error).__name__}: {error}"
        check.write()
        say(f"stopped: {error}; kept what was measured in {check.md_path}")
        raise SystemExit(130)


if __name__ == "__main__":
    main()
