"""Real serving engines speculating here, measured through `medusa-bench run --endpoint` (issue #35).

Engines (one module each; the contract is in benchmarks/engine_server.py):
- `vllm`: vLLM's CPU build: plain, ngram, our Medusa/EAGLE/EAGLE-3 heads at vLLM's default chain and
  at what `medusa-bench tree --export vllm` chose (engine_vllm.py);
- `openvino`: OpenVINO GenAI: plain, prompt lookup, our sps self-speculative draft, an int8 self-draft
  (engine_openvino.py, served by openvino_server.py);
- `llamacpp`: llama.cpp's llama-server (portable build): plain, a Q4_1 self-draft, n-gram lookup
  (engine_llamacpp.py).

For each engine and method it
1. makes the engine's venv (or build) once, cached in the user cache like benchmarks/vs_reference.py's
   reference venvs (each engine pins its own torch/transformers), and exports the embedded model;
2. starts the server on 127.0.0.1, a free port;
3. runs `medusa-bench run --endpoint <engine>-<method>=URL` (answers, then the `--concurrency`
   sweep) into `<out>/<engine>/<method>/`; τ comes from the server's own counters; the answers'
   token ids are compared with the same engine's plain server and with our own fp32 greedy
   baseline on the same questions (`<out>/ours*/`, run once in-process, see OURS);
4. stops the server (always, in a `finally`), and at the end prints one table per engine and
   writes `<out>/engines.json`.

One server at a time: the machine this was written on has 2 cores. Speedups are each method's
tokens/s over the same engine's plain server, from runs taken one after another (not
interleaved), so they carry the machine's drift; say so when quoting them.

    .venv/bin/python benchmarks/engines.py --limit 4 --max-new-tokens 64 --concurrency 1,2,4,8
    .venv/bin/python benchmarks/engines.py --engines openvino --methods plain,pld --limit 2 --concurrency 1,8
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (ROOT, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import engine_server  # noqa: E402

ENGINES = {"vllm": "engine_vllm", "openvino": "engine_openvino", "llamacpp": "engine_llamacpp"}


def run_client(name: str, url: str, out: Path, args) -> int:
    command = [sys.executable, "-m", "medusa_bench.cli", "run", "--endpoint", f"{name}={url}",
               "--limit", str(args.limit), "--max-new-tokens", str(args.max_new_tokens),
               "--concurrency", args.concurrency, "--out", str(out)]
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode


def answers(out: Path, decoder: str | None = None) -> list[dict]:
    """A run folder's answers (all its answer files, or the one whose model id ends in `-decoder`)."""
    from medusa_bench.results.files import load_answers

    return [answer for model_id, rows in load_answers(out).items()
            if decoder is None or model_id.endswith(f"-{decoder}") for answer in rows]


def answer_turns(out: Path, decoder: str | None = None) -> dict:
    """{(question id, turn): {"ids": token ids or None, "text": str}} of a method's answers
    (llama-server's chat stream returns no ids: its answers are compared by text)."""
    turns = {}
    for answer in answers(out, decoder):
        choice = answer["choices"][0]
        ids = choice.get("token_ids") or [None] * len(choice["turns"])
        for turn, (text, turn_ids) in enumerate(zip(choice["turns"], ids)):
            turns[(answer["question_id"], turn)] = {"ids": turn_ids, "text": text}
    return turns


def tau_of(choices: list[dict]) -> float | None:
    """τ in this project's convention: tokens over every step (README); None where a turn has no count."""
    tokens = sum(sum(choice["new_tokens"]) for choice in choices)
    steps = [s for choice in choices for s in (choice.get("decoding_steps") or [])]
    return round(tokens / sum(steps), 3) if steps and all(steps) and len(steps) == 2 * len(choices) else None


def identity(turns: dict, reference: dict) -> dict | None:
    """Turns identical to the reference's (by token ids where both have them, else by text), and where
    each other turn first differs ("token N" or "character N")."""
    shared = sorted(set(turns) & set(reference))
    if not shared:
        return None
    first, by_text = {}, 0
    for key in shared:
        mine, theirs = turns[key], reference[key]
        unit = "token" if mine["ids"] is not None and theirs["ids"] is not None else "character"
        a, b = (mine["ids"], theirs["ids"]) if unit == "token" else (mine["text"], theirs["text"])
        by_text += unit == "character"
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            first[f"{key[0]}/{key[1] + 1}"] = f"{unit} {at}"
    return {"identical": len(shared) - len(first), "turns": len(shared), "compared_by_text": by_text, "first_difference": first}


# Ours beside the engines, each run once into <out>/<name>/: our fp32 greedy baseline (the answers every
# engine is checked against), our Medusa with the same heads and chain vLLM drafts (its full vocabulary,
# as vLLM's export has it), our sps with the draft OpenVINO's `sps` method gets (the same skipped
# layers, the same fixed chain of 4), and (ours_eagle) our EAGLE-1/EAGLE-3 on the very folders
# exported for vLLM (EAGLE-1's fc.bias dropped there), static chains, full vocabulary.
OURS = {"ours": ["--decoders", "baseline,medusa:chain-4", "--draft-vocab", "0"],
        "ours-sps": ["--decoders", "sps", "--sps-threshold", "0", "--sps-max-draft", "4"]}


def ours_eagle(exported: Path) -> list[str]:
    return ["--decoders", "eagle:chain-4,eagle3:chain-4", "--eagle-heads", str(exported / "eagle"),
            "--eagle3-heads", str(exported / "eagle3"), "--eagle3-tree", "static", "--draft-vocab", "0"]


def run_ours(root: Path, args, runs: dict[str, list[str]]) -> dict:
    """Our decoders on the same questions, in-process, each of `runs` once: {decoder: τ}."""
    taus = {}
    for name, decoders in runs.items():
        out = root / name
        if not (out / "model_answer").is_dir():
            command = [sys.executable, "-m", "medusa_bench.cli", "run", *decoders, "--dtype", "float32", "--device", "cpu",
                       "--limit", str(args.limit), "--max-new-tokens", str(args.max_new_tokens), "--out", str(out)]
            print("$", " ".join(command), flush=True)
            subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
        from medusa_bench.results.files import load_answers

        for model_id, rows in load_answers(out).items():
            taus.setdefault(model_id.removeprefix("smollm2-135m-"), tau_of([a["choices"][0] for a in rows]))
    return taus


def summarise(method: str, out: Path, startup: float) -> dict:
    """tokens/s and τ per concurrency level from sweep.jsonl; the answers' τ from the servers' counters."""
    levels = {}
    for line in (out / "sweep.jsonl").read_text().splitlines():
        row = json.loads(line)
        levels[row["concurrency"]] = {"tokens_per_s": row["output_tokens_per_s"], "tau": row.get("tau"),
                                      "completed": row["completed"], "requests": row["requests"]}
    choices = [answer["choices"][0] for answer in answers(out)]
    tokens = sum(sum(choice["new_tokens"]) for choice in choices)
    seconds = sum(sum(choice["wall_time"]) for choice in choices)
    tau = tau_of(choices) or (1.0 if method == "plain" else None)  # a plain server without counters drafts nothing
    return {"method": method, "startup_s": round(startup), "turns": 2 * len(choices), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 2) if seconds else None, "tau": tau, "sweep": levels}


def run_method(engine, engine_name: str, method: str, context, out: Path, args) -> dict:
    spec = engine.server(method, context)
    if isinstance(spec, str):
        print(f"{engine_name} {method}: {spec}")
        return {"method": method, "refused": spec}
    out.mkdir(parents=True, exist_ok=True)
    port, log = engine_server.free_port(), out.parent / f"server-{method}.log"
    server = engine_server.start(spec, port, log)
    try:
        startup = engine_server.wait_ready(server, f"http://127.0.0.1:{port}{spec.health}", log, args.startup_timeout)
        print(f"{engine_name} {method}: server up after {startup:.0f} s", flush=True)
        code = run_client(f"{engine_name}-{method}", f"http://127.0.0.1:{port}/v1", out, args)
        if code != 0:
            return {"method": method, "error": f"medusa-bench run exited {code}", "log": str(log), "config": spec.config}
        return {**summarise(method, out, startup), "config": spec.config}
    except RuntimeError as error:
        print(f"{engine_name} {method}: {error}")
        return {"method": method, "error": str(error).splitlines()[0], "log": str(log), "config": spec.config}
    finally:
        engine_server.stop(server)


def rate(result: dict, level: int) -> float | None:
    """tokens/s at a concurrency level (JSON keeps the levels as strings)."""
    row = result["sweep"].get(level) or result["sweep"].get(str(level)) or {}
    return row.get("tokens_per_s")


def speedup(result: dict, plain: dict | None, level: int) -> str:
    mine, base = rate(result, level), rate(plain, level) if plain else None
    return f"{mine:.1f} ({mine / base:.2f}×)" if mine and base else (f"{mine:.1f}" if mine else "–")


def same_tokens(result: dict) -> list[str]:
    cells = []
    for key in ("vs_plain", "vs_ours"):
        check = result.get(key)
        cells.append(f"{check['identical']}/{check['turns']}" + (" (text)" if check.get("compared_by_text") else "") if check else "–")
    return cells


def print_table(name: str, results: list[dict], levels: list[int]) -> None:
    plain = next((r for r in results if r["method"] == "plain" and "sweep" in r), None)
    print(f"\n{name}\n{'method':14} {'tau':>5} {'tok/s':>6} " + " ".join(f"{'c=' + str(c):>13}" for c in levels) + "  same tokens as: plain, ours")
    for r in results:
        if "sweep" not in r:
            print(f"{r['method']:14} {'refused' if 'refused' in r else 'failed'}: {r.get('refused') or r.get('error')}")
            continue
        tau = f"{r['tau']:5.2f}" if r["tau"] else "  n/a"
        cells = [speedup(r, plain, c).replace("×", "x") for c in levels]
        print(f"{r['method']:14} {tau} {r['tokens_per_s'] or 0:6.1f} " + " ".join(f"{c:>13}" for c in cells) + f"  {', '.join(same_tokens(r))}")


# our decoder whose τ an engine's method is checked against (same heads, same chain)
OURS_FOR = {("vllm", "plain"): "baseline", ("vllm", "medusa"): "medusa-chain-4",
            ("vllm", "eagle"): "eagle-chain-4", ("vllm", "eagle3"): "eagle3-chain-4",
            ("openvino", "plain"): "baseline", ("openvino", "sps"): "sps", ("llamacpp", "plain"): "baseline"}


def speculation_asked(config: dict):
    """The part of a method's recorded config that sets speculation (vLLM's speculative_config,
    llama-server's flags from `-md` / `--spec-type` on, OpenVINO's options)."""
    if "speculative_config" in config:
        return config["speculative_config"]
    if "speculative" in config:
        return config["speculative"]
    args = config.get("args")
    if args is not None:
        start = next((i for i, a in enumerate(args) if a in ("-md", "--spec-type")), len(args))
        return [Path(a).name if "/" in a else a for a in args[start:]]
    return config


def markdown(summary: dict, args, levels: list[int]) -> str:
    """The results page: machine, command, one table per engine (what `--doc` writes)."""
    import platform

    import torch

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    field = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in cpu.splitlines() if ":" in line}
    lines = [f"# Real engines on this machine: {', '.join(summary[n]['engine'] for n in ENGINES if n in summary)}", "",
             f"Date {time.strftime('%Y-%m-%d')}. Machine: {field.get('Model name', platform.processor())}, "
             f"family {field.get('CPU family', '?')} model {field.get('Model', '?')}, {os.cpu_count()} cores "
             f"({'avx512_bf16' if 'avx512_bf16' in field.get('Flags', '') else 'no avx512_bf16'}; `lscpu`); "
             f"ours: torch {torch.__version__}. MT-Bench's first {args.limit} questions × 2 turns, "
             f"{args.max_new_tokens} new tokens, greedy, fp32. Generated by:", "",
             "```bash", f"benchmarks/engines.py --engines {args.engines} --limit {args.limit} "
             f"--max-new-tokens {args.max_new_tokens} --concurrency {args.concurrency}", "```", "",
             "τ: tokens per step, every step counted (README), from each server's own counts; τ ours: our decoder "
             "with the same heads and chain. tok/s: the concurrency sweep's output tokens/s (× the same engine's plain "
             "server at that level; servers measured one after another, not interleaved). Same tokens: turns identical "
             "to the engine's plain server and to our fp32 baseline (by token ids, or by text where the server returns none).", ""]
    head = ["method", "τ server", "τ ours"] + [f"c = {c} tok/s" for c in levels] + ["same as plain", "same as ours", "config"]
    for name in ENGINES:
        entry = summary.get(name)
        if not entry:
            continue
        install = entry.get("install") or {}
        lines += [f"## {entry['engine']}", "",
                  f"Install: {install.get('install_seconds', install.get('build_seconds', '?'))} s, "
                  f"{install.get('size') or str(install.get('binary_mb', '?')) + ' MB binary'}.", ""]
        if "error" in entry:
            lines += [f"Not set up: {entry['error']}", ""]
            continue
        results = entry["results"]
        plain = next((r for r in results if r["method"] == "plain" and "sweep" in r), None)
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in results:
            if "sweep" not in r:
                lines.append(f"| {r['method']} | {'refused' if 'refused' in r else 'failed'}: {r.get('refused') or r.get('error')} |")
                continue
            ours = (summary.get("ours") or {}).get("tau", {}).get(OURS_FOR.get((name, r["method"]), ""), None)
            config = speculation_asked(r.get("config") or {})
            config = json.dumps(config).replace("|", "\\|") if config else "none"
            lines.append("| " + " | ".join([r["method"], f"{r['tau']:.3f}" if r["tau"] else "n/a", f"{ours:.3f}" if ours else "–",
                                            *[speedup(r, plain, c) for c in levels], *same_tokens(r), f"`{config[:160]}`"]) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--methods", default="", help="comma-separated; default: each engine's own list")
    parser.add_argument("--limit", type=int, default=4, help="MT-Bench questions (both turns each)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "engines")
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds for a server to come up (vLLM's torch.compile on 2 cores: ~4 min)")
    parser.add_argument("--redo", action="store_true", help="measure again the methods --out already holds")
    parser.add_argument("--page-only", action="store_true", help="measure nothing: write the results page from --out's engines.json")
    parser.add_argument("--doc", type=Path, help="also write the results page here, e.g. docs/results/engines-cpu.md (always: <out>/engines.md)")
    args = parser.parse_args()
    names = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in names if e not in ENGINES]
    if unknown:
        raise SystemExit(f"unknown engine {', '.join(unknown)}; valid names are: {', '.join(ENGINES)}")
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    modules = {name: importlib.import_module(ENGINES[name]) for name in names}
    every = sorted({m for module in modules.values() for m in module.METHODS})
    if [m for m in wanted if m not in every]:
        raise SystemExit(f"unknown method {', '.join(m for m in wanted if m not in every)}; valid names are: {', '.join(every)}")

    args.out.mkdir(parents=True, exist_ok=True)
    summary_path = args.out / "engines.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if args.page_only:
        return write_page(summary, args)
    wants_sps = "openvino" in modules and (not wanted or "sps" in wanted)
    runs = {name: OURS[name] for name in ["ours", *(["ours-sps"] if wants_sps else [])]}
    summary["ours"] = {"tau": {**(summary.get("ours") or {}).get("tau", {}), **run_ours(args.out, args, runs)}}
    baseline = answer_turns(args.out / "ours", "baseline")
    for name, engine in modules.items():
        methods = [m for m in engine.METHODS if not wanted or m in wanted]
        if not methods:
            continue
        try:
            context = engine.prepare()
        except (subprocess.CalledProcessError, RuntimeError, OSError) as error:
            print(f"{name}: could not be set up here: {error}")
            summary[name] = {"engine": engine.NAME, "error": f"set-up failed: {error}"}
            summary_path.write_text(json.dumps(summary, indent=1))
            continue
        # what --out holds already, kept for the engine's methods this run does not measure
        done = {r["method"]: r for r in (summary.get(name) or {}).get("results", []) if r["method"] in engine.METHODS}
        for method in methods:  # written after each method: a run started again skips what it measured
            if "sweep" in done.get(method, {}) and not args.redo:
                print(f"{name} {method}: measured already in {summary_path} (--redo measures it again)")
                continue
            result = run_method(engine, name, method, context, args.out / name / method, args)
            if "sweep" in result:
                ids = answer_turns(args.out / name / method)
                result["vs_ours"] = identity(ids, baseline)
                if method != "plain" and (args.out / name / "plain" / "model_answer").is_dir():
                    result["vs_plain"] = identity(ids, answer_turns(args.out / name / "plain"))
            done[method] = result
            save_engine(summary, summary_path, name, engine, context, done)
        exported = context["root"] / "heads"
        if name == "vllm" and (exported / "eagle").is_dir() and (exported / "eagle3").is_dir():
            summary["ours"]["tau"].update(run_ours(args.out, args, {"ours-eagle": ours_eagle(exported)}))
        save_engine(summary, summary_path, name, engine, context, done)
        print_table(engine.NAME, summary[name]["results"], [int(c) for c in args.concurrency.split(",")])
    write_page(summary, args)


def save_engine(summary: dict, path: Path, name: str, engine, context: dict, done: dict) -> None:
    results = [done[m] for m in engine.METHODS if m in done]  # the engine's order; methods it no longer has dropped
    summary[name] = {"engine": engine.NAME, "install": engine_server.install_record(context["root"]), "results": results}
    path.write_text(json.dumps(summary, indent=1))


def write_page(summary: dict, args) -> None:
    page = markdown(summary, args, [int(c) for c in args.concurrency.split(",")])
    for path in [args.out / "engines.md", *([args.doc] if args.doc else [])]:
        path.write_text(page)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
