"""OpenVINO GenAI for benchmarks/engines.py: plain, prompt lookup, and a draft model, each served by
benchmarks/openvino_server.py (OpenVINO GenAI's ContinuousBatchingPipeline behind an
OpenAI-compatible route; OpenVINO Model Server, its own server, is not on the package registry).

The venv (user cache) holds openvino-genai, and optimum-intel to export the embedded model:
`optimum-cli export openvino` in fp32 for the served model and in int8 (weights) for the draft.
The draft is the same model with int8 weights, a self-draft: there is no smaller SmolLM2 to draft
with, so it exercises the engine's draft-model path; it is not a draft anyone would deploy.

What it took (openvino-genai 2026.4.1, optimum-intel 2.2.0, a 2-core AMD EPYC Zen 4):
- pip resolves torchvision from PyPI as a CUDA build, and importing transformers' modeling code then
  dies with "operator torchvision::nms does not exist" (the same as vLLM's venv): uninstalled.
- the CPU plugin computes in bf16 by default where the CPU has it, and keeps the KV cache in u8:
  the servers run with f32 hints, which makes all three token-identical to our fp32 baseline.
- torch is pinned to the project's CPU build (2.13.0): an unpinned one is a multi-GB CUDA build.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from engine_server import Server, cached_venv, engines_root

VERSION = "2026.4.1.0"
NAME = f"openvino-genai {VERSION.removesuffix('.0')}"
OPTIMUM_INTEL = "2.2.0"
SERVED_NAME = "smollm2-135m"
METHODS = ["plain", "pld", "draft"]
ASSISTANT_TOKENS = 4  # tokens drafted a step: the chain length vLLM's methods use here
MAX_NGRAM = 3  # prompt lookup's longest n-gram (GenAI's samples use 3)
SERVER = Path(__file__).resolve().parent / "openvino_server.py"


def prepare(root: Path | None = None) -> dict:
    from medusa_bench.models import resolve_source

    root = root or engines_root() / f"openvino-genai-{VERSION}"
    python = cached_venv(root, [
        ["pip", "install", f"openvino-genai=={VERSION}", f"optimum-intel[openvino]=={OPTIMUM_INTEL}", "torch==2.13.0",
         "fastapi", "uvicorn"],
        ["pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
    ], NAME)
    base = resolve_source("smollm2-135m")[0]
    models = {weights: export(python, base, root / "models" / f"smollm2-135m-{weights}", weights) for weights in ("fp32", "int8")}
    return {"root": root, "python": python, **models}


def export(python: Path, base: str, out: Path, weights: str) -> Path:
    """`optimum-cli export openvino` once (about a minute each on 2 cores); tokenizer IRs come with it."""
    if (out / "openvino_model.xml").is_file() and (out / "openvino_detokenizer.xml").is_file():
        return out
    cli = python.parent / "optimum-cli"
    command = [str(cli), "export", "openvino", "--model", base, "--task", "text-generation-with-past",
               "--weight-format", weights, str(out)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


def server(method: str, context: dict) -> Server | str:
    argv = [str(context["python"]), str(SERVER), "--model", str(context["fp32"]), "--served-model-name", SERVED_NAME,
            "--port", "{port}", "--num-assistant-tokens", str(ASSISTANT_TOKENS), "--max-ngram-size", str(MAX_NGRAM),
            "--precision", "f32"]  # the plugin's default is bf16 with a u8 KV cache: see openvino_server.PRECISIONS
    config: dict = {}
    if method == "pld":
        argv.append("--prompt-lookup")
        config = {"prompt_lookup": True, "num_assistant_tokens": ASSISTANT_TOKENS, "max_ngram_size": MAX_NGRAM}
    elif method == "draft":
        argv += ["--draft", str(context["int8"])]
        config = {"draft_model": "the same model, int8 weights", "num_assistant_tokens": ASSISTANT_TOKENS}
    return Server(argv, {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}, "/health", config)
