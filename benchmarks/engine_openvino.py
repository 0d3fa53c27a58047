"""OpenVINO GenAI for benchmarks/engines.py: plain, prompt lookup, and two draft models, each served by
benchmarks/openvino_server.py (OpenVINO GenAI's ContinuousBatchingPipeline behind an
OpenAI-compatible route; OpenVINO Model Server, its own server, is not on the package registry).

The venv (user cache) holds openvino-genai, and optimum-intel to export models with
`optimum-cli export openvino`. There is no smaller SmolLM2 to draft with, so the drafts are the
model itself:
- `sps`: our self-speculative draft (medusa_bench/decoders/sps.py): the base model with the layers
  our `sps` decoder skips (its calibration search, cached per model: the same set) removed, written
  as a model of its own and exported in fp32. OpenVINO drafts `ASSISTANT_TOKENS` a step with it;
  our `sps` with the same set and `--sps-threshold 0 --sps-max-draft 4` drafts the same chain, so
  their τ should agree (engines.py runs it as `ours-sps`).
- `draft-int8`: the same model with int8 weights: it agrees with the base nearly always but costs
  nearly as much, so it only exercises the engine's draft-model path; no one would deploy it.

What it took (openvino-genai 2026.4.1, optimum-intel 2.2.0, a 2-core AMD EPYC Zen 4):
- pip resolves torchvision from PyPI as a CUDA build, and importing transformers' modeling code then
  dies with "operator torchvision::nms does not exist" (the same as vLLM's venv): uninstalled.
- the CPU plugin computes in bf16 by default where the CPU has it, and keeps the KV cache in u8:
  the servers run with f32 hints, which makes all three token-identical to our fp32 baseline.
- torch is pinned to the project's CPU build (2.13.0): an unpinned one is a multi-GB CUDA build.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from engine_server import Server, cached_venv, engines_root

VERSION = "2026.4.1.0"
NAME = f"openvino-genai {VERSION.removesuffix('.0')}"
OPTIMUM_INTEL = "2.2.0"
SERVED_NAME = "smollm2-135m"
METHODS = ["plain", "pld", "sps", "draft-int8"]
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
    skip = sps_skip()
    skipped = layer_skipped(base, skip, root / "models" / f"smollm2-135m-skip-{'-'.join(map(str, skip))}-hf")
    models["sps"] = export(python, str(skipped), skipped.with_name(skipped.name.removesuffix("-hf") + "-fp32"), "fp32")
    return {"root": root, "python": python, "skip": skip, **models}


def sps_skip() -> list[int]:
    """The layers our `sps` decoder skips on the embedded model by default (its cached calibration search)."""
    code = ("import json; from medusa_bench.models import load_model; from medusa_bench.decoders.sps import choose_skip; "
            "from medusa_bench.decoders.options import DecoderOptions; "
            "print(json.dumps(choose_skip(load_model('smollm2-135m', 'cpu', 'float32'), DecoderOptions().sps_skip_ratio)['skip']))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def layer_skipped(base: str, skip: list[int], out: Path) -> Path:
    """`base` (an HF folder) without the decoder layers in `skip`: the kept layers renumbered in order,
    which runs exactly what skipping them does (each layer its own KV cache; rotary positions unchanged)."""
    if (out / "model.safetensors").is_file():
        return out
    from safetensors.torch import load_file, save_file

    config = json.loads((Path(base) / "config.json").read_text())
    layers = config["num_hidden_layers"]
    kept = [i for i in range(layers) if i not in set(skip)]
    renumber = {old: new for new, old in enumerate(kept)}
    tensors = {}
    for name, tensor in load_file(str(Path(base) / "model.safetensors")).items():
        match = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if match is None:
            tensors[name] = tensor
        elif int(match.group(1)) in renumber:
            tensors[f"model.layers.{renumber[int(match.group(1))]}.{match.group(2)}"] = tensor
    config["num_hidden_layers"] = len(kept)
    for key, value in list(config.items()):  # per-layer lists (layer_types and the like) keep the kept layers' entries
        if isinstance(value, list) and len(value) == layers:
            config[key] = [value[i] for i in kept]
    out.mkdir(parents=True, exist_ok=True)
    for path in Path(base).iterdir():
        if path.name not in ("model.safetensors", "config.json"):
            shutil.copy(path, out / path.name)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


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
    elif method == "sps":
        argv += ["--draft", str(context["sps"])]
        config = {"draft_model": f"the model without layers {context['skip']} (our sps draft)", "num_assistant_tokens": ASSISTANT_TOKENS}
    elif method == "draft-int8":
        argv += ["--draft", str(context["int8"])]
        config = {"draft_model": "the same model, int8 weights", "num_assistant_tokens": ASSISTANT_TOKENS}
    return Server(argv, {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}, "/health", config)
