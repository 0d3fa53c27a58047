"""Checkpoint file helpers shared by the head formats (Medusa and Hydra).

Everything here reads *tensors only*: safetensors, or `torch.load(weights_only=True)`.
Downloaded checkpoints are untrusted; unpickling arbitrary objects from them would run code.
"""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medusa_bench.errors import UserError

# Weight files of a transformers model folder, in the order transformers itself tries them.
MODEL_WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

# Heads kept in a repository can store their weight matrices as int8 with one float32 scale per
# output row: `name` holds round(w / s) and `name_scale` [rows, 1] holds s = max|row| / 127, the
# `weight` / `weight_scale` pair of compressed-tensors' W8A16 channel scheme. load_tensors gives back
# w = q * s in float32, so every loader reads such a file unchanged. Only matrices of at least
# INT8_MIN_SIZE elements are quantised; vectors (biases, norms) and small tensors stay in bfloat16.
# On the shipped SmolLM2 heads it halves 16-bit storage (61 MB in fp16, 31 MB in int8) and moves τ
# at 16 nodes by -0.003 to +0.002, EAGLE-1's by -0.014 (docs/results/cpu-heads-int8-data-curve.md).
INT8 = "int8"
SCALE_SUFFIX = "_scale"
INT8_MIN_SIZE = 1 << 16
STORAGE_DTYPES = ("float32", "float16", "bfloat16", INT8)


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or a UserError saying which file is broken."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_tensors(path: Path, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors or torch (.pt/.bin) file, optionally only keys with keep(key).

    safetensors files are read lazily, so a filter skips the other tensors' bytes (a 13 GB model
    shard costs only the head tensors). Torch files are memory-mapped where the format allows.
    """
    path = Path(path)
    keep_with_scales = None if keep is None else (lambda k: keep(k.removesuffix(SCALE_SUFFIX)))
    if path.suffix == ".safetensors":
        return dequantize_int8(_load_safetensors(path, keep_with_scales))
    return dequantize_int8(_load_torch(path, keep_with_scales))


# --------------------------------------------------------------------------- int8 storage


def quantizable(tensor: torch.Tensor) -> bool:
    """A matrix (or a stack of them, [..., rows, cols]) big enough to store in int8."""
    return tensor.is_floating_point() and tensor.ndim >= 2 and tensor.shape[-2] * tensor.shape[-1] >= INT8_MIN_SIZE


def int8_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [..., rows, cols], scale float32 [..., rows, 1]) with tensor ~= q * scale, row by row."""
    w = tensor.detach().float()
    scale = (w.abs().amax(dim=-1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / scale).round().clamp(-127, 127).to(torch.int8), scale


def quantize_int8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors for int8 storage: big matrices as int8 + per-row float32 scales, the rest bfloat16."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if tensor.ndim == 2 and quantizable(tensor) and not name.endswith(SCALE_SUFFIX):
            out[name], out[name + SCALE_SUFFIX] = int8_rows(tensor)
        else:
            out[name] = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
    return out


def dequantize_int8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int8 matrices with their `_scale` back as float32, and then every float tensor in float32
    (one dtype, as from any other file); tensors without int8 pairs are returned as they are."""
    pairs = [k for k, v in tensors.items() if v.dtype == torch.int8 and k + SCALE_SUFFIX in tensors]
    if not pairs:
        return tensors
    out = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}
    for name in pairs:
        out[name] = out[name].float() * out.pop(name + SCALE_SUFFIX)
    return out


def round_trip(module: torch.nn.Module, save_dtype: str) -> torch.nn.Module:
    """`module` (changed in place) holding what loading it back from `save_dtype` storage gives."""
    if save_dtype != INT8:
        dtype = getattr(torch, save_dtype)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(p.to(dtype))
        return module
    with torch.no_grad():  # a module may stack its matrices ([layers, heads, H, H]); files hold them one by one
        for p in module.parameters():
            if quantizable(p):
                q, scale = int8_rows(p)
                p.copy_(q.float() * scale)
            elif p.is_floating_point():
                p.copy_(p.to(torch.bfloat16))
    return module


def storage_torch_dtype(save_dtype: str) -> torch.dtype:
    """The dtype a trainer writes its weights in for `save_dtype` storage. int8 is written in
    float32 and quantised afterwards (finish_folder), so its rows come from the trained weights
    rather than from a 16-bit rounding of them, and match what `loaded_copy` computes."""
    return torch.float32 if save_dtype == INT8 else getattr(torch, save_dtype)


def loaded_copy(module: torch.nn.Module, save_dtype: str) -> torch.nn.Module:
    """A copy of `module` holding what loading it back from `save_dtype` storage gives (`module`
    is untouched). Trainers measure held-out metrics on it, so the numbers they report are the files'."""
    return round_trip(copy.deepcopy(module), save_dtype)


def finish_folder(folder: Path, save_dtype: str) -> list[Path]:
    """The last step of writing a heads folder in `save_dtype`: int8 compresses the float32 files
    just written (compress_folder); the other dtypes are already stored as they are. Returns the files rewritten."""
    return compress_folder(folder) if save_dtype == INT8 else []


def compress_folder(folder: Path, skip: Iterable[str] = ("adapter_model.safetensors",)) -> list[Path]:
    """Rewrite a heads folder's weight files (*.safetensors, *.pt) for int8 storage, in place.

    `skip`: files other code reads itself, left as they are (peft reads its adapter: Medusa-2's
    trainer writes it in bfloat16 when asked for int8). Returns the files rewritten; a file
    already in int8 is left alone.
    """
    rewritten = []
    for path in sorted(Path(folder).glob("*.safetensors")) + sorted(Path(folder).glob("*.pt")):
        if path.name in skip:
            continue
        raw = _load_safetensors(path, None) if path.suffix == ".safetensors" else _load_torch(path, None)
        if any(v.dtype == torch.int8 for v in raw.values()):
            continue
        save_tensors(path, quantize_int8(raw), metadata={"storage": "int8 per-row scales (name_scale)"})
        rewritten.append(path)
    return rewritten


def tensor_names(path: Path) -> list[str]:
    """The tensor names in a file; for safetensors only the header is read."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return list(handle.keys())
        except Exception as exc:
            raise UserError(f"cannot read {path} as safetensors: {exc}") from None
    return list(_load_torch(path, keep=None))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write tensors as safetensors (by suffix) or a plain torch state dict (anything else).

    Tensors are cloned contiguous first: views into one stacked storage would otherwise be refused
    by safetensors (shared memory) or drag the whole storage along into every key by torch.save.
    """
    path = Path(path)
    plain = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        save_file(plain, str(path), metadata={"format": "pt", **(metadata or {})})
    else:
        torch.save(plain, path)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """Hex sha256 over names, dtypes, shapes and bytes of tensors (order independent)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# --------------------------------------------------------------------------- model folders


def model_weight_files(folder: Path, key_prefix: str = "") -> list[Path]:
    """The weight files of a transformers model folder, in the order transformers tries them.

    With a shard index, only the shards holding some key that starts with `key_prefix`.
    """
    folder = Path(folder)
    for name in MODEL_WEIGHT_NAMES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        weight_map = read_json(path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{path} has no 'weight_map'; re-save the model with save_pretrained")
        return [folder / f for f in sorted({f for k, f in weight_map.items() if k.startswith(key_prefix)})]
    return []


def load_model_tensors(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Only the tensors whose names start with `prefix` from a (possibly sharded) model folder."""
    found: dict[str, torch.Tensor] = {}
    for path in model_weight_files(folder, key_prefix=prefix):
        if not path.is_file():
            raise UserError(f"{folder} is incomplete: its shard index names {path.name}, which is missing")
        found.update(load_tensors(path, keep=lambda k: k.startswith(prefix)))
    return found


# --------------------------------------------------------------------------- hub / local paths


def resolve_folder(path_or_id: str | Path, allow_patterns: Iterable[str]) -> Path:
    """A local folder for `path_or_id`: the path itself, or a Hugging Face Hub snapshot.

    Only files matching `allow_patterns` are downloaded, so heads never pull a whole model.
    """
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    text = str(path_or_id)
    if not _HUB_ID.match(text):
        raise UserError(f"{text} does not exist; pass a local heads folder or a Hub id like owner/name")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=list(allow_patterns)))
    except Exception as exc:  # network, auth, missing repo: all user-fixable
        raise UserError(
            f"{text} is not a local path and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}); download it and pass the folder"
        ) from None


# --------------------------------------------------------------------------- readers


def _load_safetensors(path: Path, keep) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys() if keep is None or keep(k)}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"cannot read {path} as safetensors: {exc}") from None


def _load_torch(path: Path, keep) -> dict[str, torch.Tensor]:
    data = _torch_load_weights_only(path)
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a dict of tensors (a state dict), found {type(data).__name__}")
    out = {}
    for key, value in data.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(
                f"{path} holds a non-tensor entry {key!r} ({type(value).__name__}); "
                "expected a flat state dict of tensors"
            )
        if keep is None or keep(key):
            out[key] = value
    return out


def _torch_load_weights_only(path: Path):
    """torch.load restricted to tensors and plain containers; mmap when the file allows it."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (non-zip) files cannot be mapped: read them whole
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch raises this both for a refused global (a pickle that would run code) and for
        # bytes that are no pickle at all; only a well-formed pickle stream is the former.
        if _well_formed_pickle(path):
            raise UserError(
                f"refusing to load {path}: it contains pickled Python objects other than tensors — refused for safety; "
                "convert it to a plain state dict or safetensors in an environment you trust"
            ) from None
        raise UserError(_not_a_checkpoint(path)) from None
    except Exception:  # OSError, EOFError, KeyError, zip errors…: the bytes are not a torch file
        raise UserError(_not_a_checkpoint(path)) from None


def _not_a_checkpoint(path: Path) -> str:
    return f"{path} is not a valid checkpoint (corrupt or truncated, or not a torch file); download or save it again"


def _well_formed_pickle(path: Path) -> bool:
    """Whether the pickle data torch reads from `path` parses completely (without running it).

    A torch zip file holds one pickle (`*/data.pkl`); a legacy torch file is several pickles in
    a row (magic number, protocol, system info, the object, storage keys) before raw storage
    bytes; a plain `pickle.dump` file is one. Random or truncated bytes fail to parse early.
    """
    import io as _io
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if not names:
                    return False
                stream, needed = _io.BytesIO(archive.read(names[0])), 1
        else:
            stream, needed = _io.BytesIO(Path(path).read_bytes()), 5
        parsed = 0
        while parsed < needed:
            if stream.tell() == len(stream.getbuffer()):
                return parsed > 0  # every pickle in the file parsed (a plain pickle.dump file)
            for _ in pickletools.genops(stream):
                pass
            parsed += 1
        return True
    except Exception:  # unknown opcode, truncated stream, bad zip: corrupt, not malicious
        return False


# ------------------------------------------------------------------------------ base models
def read_config(folder: Path) -> dict:
    """A heads folder's config.json, or {} when there is none."""
    path = Path(folder) / "config.json"
    return read_json(path) if path.is_file() else {}


def text_config(model):
    """The language model's config (multimodal models nest it)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def output_weight(model, what: str = "draft heads") -> torch.Tensor:
    """The base model's lm_head weight [V, H]: shared heads end in it, fitting checks read its shape."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None:
        raise UserError(f"the base model {model_name_of(model) or ''} has no lm_head; {what} need a causal LM")
    return weight


def model_name_of(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None
