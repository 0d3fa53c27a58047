"""llama.cpp's own `llama-server` for benchmarks/engines.py: plain, a draft model, and n-gram lookup.

Built here, once, from the llama.cpp that the llama-cpp-python 0.3.36 sdist vendors (b11312,
commit 0c1e57098; scripts/setup.sh builds that sdist's library, so it compiles on this machine),
with scripts/setup.sh's PORTABLE flags (never -march=native: a native build died with SIGILL on
another CPU kind), one static binary, only the `llama-server` target. Cached in the user cache
under `engines/llama-server-<commit>-<hash of the flags>/` (sources, binary, converted model;
the record of the build in its `.medusa-bench-ready` and in each method's recorded config).
Measured on the 2-core AMD EPYC, shared with other work: 1020 s (206 build steps), a 14.3 MB
binary (it links only libc, libstdc++ and libgomp), 217 MB of sources (kept: the model converter
lives there), 515 MB of F32 model.

Models:
- main: the embedded model's HF folder (`resolve_source("smollm2-135m")`: the shipped Q4_1 GGUF
  dequantised to fp32 safetensors) converted to an F32 GGUF by the vendored convert_hf_to_gguf.py
  (run by this project's python, the vendored gguf-py first on PYTHONPATH);
- draft: the shipped Q4_1 GGUF itself (`embedded_gguf`). A self-draft, the same model quantized:
  it exercises the engine's draft-model path at the cost of a 4-bit 135M model, but a real draft
  would be a smaller model, and none exists for SmolLM2-135M. The main model being the Q4_1
  weights dequantised, the two differ only by llama.cpp's quantised arithmetic (Q4_1 x Q8_1 dot
  products against F32): nearly every draft token is accepted (24 of 28 on MT-Bench 81, τ 4.0 of
  a possible 5), so τ here shows the engine's verify path at work, not how good a draft is.

Methods (all with SERVER_FLAGS: `-t`/`-tb` every core, `-c 16384 -np 8` (8 slots of 2048
tokens), `--metrics`; sampling from the client: greedy, temperature 0):
- plain:  no speculation;
- draft:  `-md <Q4_1 GGUF> --spec-type draft-simple --spec-draft-n-max 4 --spec-draft-n-min 0`;
- lookup: `--spec-type ngram-simple --spec-ngram-simple-size-n 3 --spec-ngram-simple-size-m 4`,
  prompt lookup: drafts the tokens that followed an earlier occurrence of the last 3 in the
  context (prompt and answer so far), no second model. (This build also has ngram-map-k,
  ngram-map-k4v, ngram-mod and ngram-cache; ngram-simple is the classic prompt lookup.)

Concurrency: with `-np 8` every request of the sweep's highest level has its own slot and the
server decodes all slots in one batch (continuous batching), drafting for each slot and verifying
them together; none waits (`llamacpp:requests_deferred` 0). Checked with 8 requests at once,
plain and draft: all 8 launched together, and the draft server kept drafting for each.

τ comes from the server: the last streamed chunk carries `timings` with `draft_n` and
`draft_n_accepted` (tools/server/server-common.cpp, server_slot_stats::to_json), which
medusa_bench/bench/endpoint_client.py turns into steps = completion tokens - accepted; its /slots
say whether the server speculates (a turn where lookup matched nothing then counts a step a
token, τ 1). `--metrics` also exposes `llamacpp:spec_decode_num_{drafts,draft_tokens,
accepted_tokens}_total`, server-wide.

What the answers show (MT-Bench 81, 32 new tokens): lookup gives plain's text on both turns;
draft parts from it at the 7th token. Not a drafting bug: plain decodes one token at a time,
draft verifies 5 at once, and llama.cpp's logits for a token inside a batch differ slightly from
the same token alone. There " from" and " at" were 0.002 apart (-1.8053 and -1.8072 one at a
time; -1.8084 and -1.8079 with the prefix evaluated as one batch), so the batch flipped the
greedy choice. llama-server's chat stream carries no token ids (asked for logprobs while drafting,
it gives them only for tokens decoded without a draft), so answers compare by text.

Timing caveat: llama.cpp's worker threads spin at each barrier; with another process on the same
2 cores a token took 0.2-1.6 s instead of 15 ms. Measure on an otherwise idle machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from engine_server import Server, engines_root

SDIST = "llama-cpp-python==0.3.36"
LLAMA_COMMIT = "0c1e57098"  # the llama.cpp commit llama-cpp-python 0.3.36 vendors (its CHANGELOG)
# Its release number (tag b11312 = 0c1e57098). The sdist has no .git, so CMake cannot find either:
# both are given, or llama-server would call itself "b0-unknown" (its /props build_info).
LLAMA_BUILD = 11312
NAME = f"llama.cpp llama-server b{LLAMA_BUILD}"
METHODS = ["plain", "draft", "lookup"]
SERVED_NAME = "smollm2-135m"

# scripts/setup.sh's PORTABLE: x86-64 with AVX2/FMA/F16C/BMI2; AVX-512, AVX-VNNI and AMX off.
PORTABLE = ["-DGGML_NATIVE=OFF", "-DGGML_SSE42=ON", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
            "-DGGML_F16C=ON", "-DGGML_BMI2=ON", "-DGGML_AVX_VNNI=OFF", "-DGGML_AVX512=OFF",
            "-DGGML_AVX512_VBMI=OFF", "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX512_BF16=OFF",
            "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
# What the server needs and nothing it would download: LLAMA_CURL is deprecated at this commit
# (a no-op here; on older commits it turns libcurl off), LLAMA_OPENSSL off (no HTTPS here), the web
# UI neither built with npm nor fetched from the Hugging Face bucket (it would need the network),
# one static binary (no shared libraries to keep beside it).
SERVER_BUILD = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF",
                "-DLLAMA_USE_PREBUILT_UI=OFF", f"-DLLAMA_BUILD_COMMIT={LLAMA_COMMIT}",
                f"-DLLAMA_BUILD_NUMBER={LLAMA_BUILD}"]
FLAGS = PORTABLE + SERVER_BUILD
FLAGS_HASH = hashlib.sha256(" ".join(FLAGS).encode()).hexdigest()[:12]

THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
CONTEXT = 2048  # tokens per slot
PARALLEL = 8  # slots: the sweep's highest concurrency decodes in one batch, none waits for a slot
SERVER_FLAGS = ["-t", str(THREADS), "-tb", str(THREADS), "-c", str(CONTEXT * PARALLEL), "-np", str(PARALLEL),
                "--metrics", "--no-webui"]
# Draft chains of at most 4 tokens: the number of our Medusa heads and the chain vLLM drafts here,
# so τ compares across engines. This self-draft is accepted nearly always, so longer chains would
# only raise τ towards a ceiling no real draft reaches; and each draft token is one forward of the
# Q4_1 model, not free on 2 cores. At least 0: a step may draft nothing. Draft-side p_min stays at
# this build's default 0.0 (draft all 4; no confidence cut-off).
DRAFT = ["--spec-draft-n-max", "4", "--spec-draft-n-min", "0"]
# Prompt lookup: the 3 tokens just decoded matched against everything earlier in the context, the
# (up to) 4 tokens that followed the match drafted. One n-gram size, where vLLM tries 5 down to 2:
# 3 matches often enough in a chat answer without drafting from every common word pair. 4 as for
# the draft model. The defaults (12 and 48) are made for code edits, where long spans repeat; they
# seldom match in a 64-token answer.
LOOKUP = ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3", "--spec-ngram-simple-size-m", "4"]


def build(root: Path) -> dict:
    """`root/bin/llama-server` and the vendored source, made once; the build's record (seconds, size)."""
    marker = root / ".medusa-bench-ready"
    if marker.is_file():
        return json.loads(marker.read_text())
    missing = [tool for tool in ("cmake", "c++") if not shutil.which(tool)]
    if missing:
        raise RuntimeError(f"llama-server cannot be built here: no {' or '.join(missing)} (apt-get install cmake g++)")
    if root.exists():
        shutil.rmtree(root)  # an interrupted build
    (root / "bin").mkdir(parents=True)
    start = time.perf_counter()
    download = root / "download"
    command = [sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:", "-d", str(download)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    with tarfile.open(next(download.glob("llama_cpp_python-*.tar.gz"))) as archive:
        archive.extractall(root / "src", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    shutil.rmtree(download)
    source = source_tree(root)
    log = root / "build.log"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    steps = [["cmake", "-S", str(source), "-B", str(root / "build"), *generator, *FLAGS],
             ["cmake", "--build", str(root / "build"), "--target", "llama-server", "-j", str(THREADS)]]
    with open(log, "w") as out:
        for step in steps:
            print("$", " ".join(step), f"(log: {log})", flush=True)
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                last = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
                raise RuntimeError(f"llama-server did not build ({' '.join(step[:2])} failed; see {log}): {last[0] if last else ''}")
    shutil.copy2(root / "build" / "bin" / "llama-server", root / "bin" / "llama-server")
    shutil.rmtree(root / "build")
    seconds = time.perf_counter() - start
    size = (root / "bin" / "llama-server").stat().st_size
    record = {"build_seconds": round(seconds), "binary_mb": round(size / 2**20, 1), "llama_cpp": LLAMA_COMMIT,
              "source": SDIST, "flags": FLAGS}
    print(f"{NAME}: built in {seconds:.0f} s, llama-server {size / 2**20:.1f} MB", flush=True)
    marker.write_text(json.dumps(record))
    return record


def source_tree(root: Path) -> Path:
    return next((root / "src").glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"


def main_model(root: Path, folder: str) -> Path:
    """The HF folder as an F32 GGUF, converted once by the vendored convert_hf_to_gguf.py (run by this
    project's python, which has what it imports: torch, transformers, numpy; the vendored gguf-py first
    on PYTHONPATH, ahead of the `gguf` wheel this project installs)."""
    target = root / "models" / f"{Path(folder).name}-f32.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    source = source_tree(root)
    command = [sys.executable, str(source / "convert_hf_to_gguf.py"), "--outtype", "f32", "--outfile", str(partial), folder]
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(source / "gguf-py"), "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        last = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()][-1:]
        raise RuntimeError(f"convert_hf_to_gguf.py could not convert {folder}: {last[0] if last else done.returncode}")
    partial.rename(target)
    return target


def prepare(root: Path | None = None) -> dict:
    from medusa_bench.models import embedded_gguf, resolve_source

    root = root or engines_root() / f"llama-server-{LLAMA_COMMIT}-{FLAGS_HASH}"
    record = build(root)
    binary = root / "bin" / "llama-server"
    options = subprocess.run([str(binary), "--help"], capture_output=True, text=True).stdout
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    version = next((line for line in (version.stdout + version.stderr).splitlines() if line.startswith("version")), "")
    return {"root": root, "binary": binary, "build": record, "version": version, "options": options,
            "model": main_model(root, resolve_source("smollm2-135m")[0]), "draft": embedded_gguf("smollm2-135m")}


def server(method: str, context: dict) -> Server | str:
    argv = [str(context["binary"]), "-m", str(context["model"]), "--alias", SERVED_NAME,
            "--host", "127.0.0.1", "--port", "{port}", *SERVER_FLAGS]
    if method == "draft":
        argv += ["-md", str(context["draft"]), "--spec-type", "draft-simple", *DRAFT]
    elif method == "lookup":
        if "ngram-simple" not in context["options"]:
            return "this llama-server build has no n-gram speculation (`--spec-type ngram-simple`)"
        argv += LOOKUP
    elif method != "plain":
        return f"unknown method {method}"
    models = {"model": context["model"], **({"draft": context["draft"]} if method == "draft" else {})}
    speculative = argv[argv.index("-md"):] if "-md" in argv else argv[argv.index("--spec-type"):] if "--spec-type" in argv else []
    config = {"speculative": [Path(a).name if a == str(context["draft"]) else a for a in speculative], "args": argv[1:], "version": context["version"], "build": context["build"],
              "models": {k: {"file": Path(v).name, "mb": round(Path(v).stat().st_size / 2**20, 1)} for k, v in models.items()}}
    return Server(argv, {}, "/health", config)
