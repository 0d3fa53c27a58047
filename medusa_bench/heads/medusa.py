"""Medusa draft heads: the module, and reading/writing the checkpoint formats people publish.

Formats (all read and written here):

- ``medusa1`` (FasterDecoding/Medusa): folder with ``config.json`` (``medusa_num_heads``,
  ``medusa_num_layers``, ``base_model_name_or_path``) and ``medusa_lm_head.pt`` (or
  ``.safetensors``) holding ``{h}.{l}.linear.weight|bias`` (ResBlocks) and ``{h}.{L}.weight``
  (each head's own [V, H] vocab projection).
- ``v2`` (TGI / LoRAX): same folder layout, config ``version: "2"``,
  ``medusa_lm_head.safetensors`` with ResBlocks only; logits go through the base ``lm_head``.
  Like LoRAX, a head file without projection keys is read as v2 whatever its config says.
- ``medusa2``: a fine-tuned full model folder; its config adds ``medusa_num_heads`` /
  ``medusa_num_layers`` and its weights hold the heads under ``medusa_head.{h}.…``.

Published configs sometimes state fewer heads than the file holds: the weights are trusted,
with a warning.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medusa_bench import __version__
from medusa_bench.errors import UserError
from medusa_bench.heads import io
from medusa_bench.heads.common import DraftHeads, locate
from medusa_bench.models import linear

FORMATS = ("medusa1", "v2", "medusa2")
HEAD_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")  # preference order
MEDUSA2_PREFIX = "medusa_head."

_RES_KEY = re.compile(r"^(\d+)\.(\d+)\.linear\.(weight|bias)$")
_PROJ_KEY = re.compile(r"^(\d+)\.(\d+)\.weight$")


class MedusaHeads(DraftHeads):
    """K Medusa heads: each is L ResBlocks ``x + SiLU(W x + b)`` then a vocab projection.

    The weights are *stored* stacked over heads, so drafting and training run all heads as
    batched matmuls with no per-step stacking and no second copy to keep in sync after loading
    or ``.to()``:

    - ``res_weight``: [L, K, H, H] (nn.Linear layout: out, in), zero-initialised as in Medusa
    - ``res_bias``:   [L, K, H]
    - ``proj_weight``: [K, V, H], each head's own projection (Medusa-1), or None when the heads
      share the base model's ``lm_head`` (v2 style). The shared weight is a reference to the
      base model's tensor (see ``attach_lm_head``), not a parameter of the heads, so saving
      the heads writes only head weights.

    Pass ``vocab_size=None`` for heads that share the base ``lm_head``. The drafting contract
    (``draft_topk``, draft vocabulary, fitting, fingerprint) is `DraftHeads`'.
    """

    kind = "Medusa heads"

    def __init__(
        self,
        num_heads: int,
        hidden_size: int,
        vocab_size: int | None = None,
        num_layers: int = 1,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if num_heads < 1 or num_layers < 0 or hidden_size < 1:
            raise ValueError(f"bad head shape: heads={num_heads} layers={num_layers} hidden={hidden_size}")
        like = {"dtype": dtype, "device": device}
        self.res_weight = nn.Parameter(torch.empty(num_layers, num_heads, hidden_size, hidden_size, **like))
        self.res_bias = nn.Parameter(torch.empty(num_layers, num_heads, hidden_size, **like))
        if vocab_size is None:
            self.register_parameter("proj_weight", None)
        else:
            self.proj_weight = nn.Parameter(torch.empty(num_heads, vocab_size, hidden_size, **like))
        self.format: str | None = None  # filled by the loaders: one of FORMATS
        self.reset_parameters()

    # ------------------------------------------------------------------ construction

    def reset_parameters(self) -> None:
        """Medusa's init: W = 0 (each ResBlock starts near identity), bias as nn.Linear."""
        bound = self.hidden_size**-0.5
        with torch.no_grad():
            self.res_weight.zero_()
            self.res_bias.uniform_(-bound, bound)
            if self.proj_weight is not None:
                self.proj_weight.normal_(0.0, 0.02)

    @classmethod
    def for_model(cls, model: nn.Module, num_heads: int = 4, num_layers: int = 1, shared_lm_head: bool = True):
        """Fresh heads fitted to a transformers CausalLM, ready to train.

        Own projections start as copies of the base ``lm_head`` (Medusa-1's init); shared ones
        reference it. The heads take the ``lm_head``'s dtype and device.
        """
        weight = io.output_weight(model, "Medusa heads")  # [V, H]
        vocab = None if shared_lm_head else weight.shape[0]
        heads = cls(num_heads, weight.shape[1], vocab, num_layers, dtype=weight.dtype, device=weight.device)
        if shared_lm_head:
            heads.attach_lm_head(weight)
        else:
            with torch.no_grad():
                heads.proj_weight.copy_(weight.detach().unsqueeze(0).expand_as(heads.proj_weight))
        heads.base_model_name_or_path = io.model_name_of(model)
        return heads

    def attach_lm_head(self, lm_head: Tensor | nn.Module) -> None:
        """Use the base model's lm_head (weight [V, H], or a module with .weight) for the logits.

        Only a reference is kept: it follows the base model, and is never saved with the heads.
        """
        weight = lm_head.weight if isinstance(lm_head, nn.Module) else lm_head
        if weight.dim() != 2 or weight.shape[1] != self.hidden_size:
            raise UserError(
                f"the base lm_head has shape {tuple(weight.shape)} but the heads need [vocab, {self.hidden_size}]"
            )
        self.__dict__["_lm_head"] = weight  # bypass nn.Module.__setattr__: must not become a parameter

    def attach_base(self, model: nn.Module) -> None:
        """What the heads use of the base model: its lm_head, when they share it."""
        if self.shares_lm_head:
            self.attach_lm_head(io.output_weight(model, self.kind))

    # ------------------------------------------------------------------ shapes

    @property
    def num_layers(self) -> int:
        return self.res_weight.shape[0]

    @property
    def num_heads(self) -> int:
        return self.res_weight.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.res_weight.shape[-1]

    @property
    def shares_lm_head(self) -> bool:
        return self.proj_weight is None

    @property
    def lm_head_weight(self) -> Tensor:
        """The shared base lm_head weight [V, H]."""
        if self._lm_head is None:
            raise RuntimeError(
                "these Medusa heads share the base model's lm_head: load them with "
                "load_heads(path, base_model=model) or call attach_lm_head(model.get_output_embeddings())"
            )
        return self._lm_head

    def extra_repr(self) -> str:
        vocab = "shared lm_head" if self.shares_lm_head else f"vocab={self.vocab_size}"
        return f"heads={self.num_heads}, layers={self.num_layers}, hidden={self.hidden_size}, {vocab}"

    # ------------------------------------------------------------------ compute

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden [..., H] -> logits [K, ..., V] (training and evaluation)."""
        lead = hidden.shape[:-1]
        logits = self._logits(hidden.reshape(-1, self.hidden_size), slice(0, self.num_heads))  # [K, N, V]
        return logits.view(self.num_heads, *lead, logits.shape[-1])

    @torch.no_grad()
    def draft_logits(self, hidden: Tensor, head: int | slice | None = None) -> Tensor:
        """hidden [H] or [B, H] -> logits [n, V] or [n, B, V] of the heads `head` picks (default all).

        An int `head` picks that head alone: no head dimension ([V] or [B, V]).
        """
        heads, one = self._select(head)
        logits = self._logits(hidden.reshape(-1, self.hidden_size), heads)  # [n, B, V]
        logits = logits.squeeze(1) if hidden.dim() == 1 else logits
        return logits[0] if one else logits

    @torch.no_grad()
    @torch.no_grad()
    def true_ranks(self, hidden: Tensor, tokens: Tensor, positions: Tensor, depth: int, top_k: int, chunk: int = 64) -> Tensor:
        """Where each true future token sits in each head's drafted top-k: [T, depth] (for `--tree auto`).

        hidden [S, H] and tokens [S] of one sequence, positions [T]: head d (1-based) at t predicts
        tokens[t + 1 + d]. Ranked by `draft_topk` itself, the decoder's drafting call (so a restricted
        draft vocabulary counts as it drafts); top_k where the token is not drafted, -1 past the end.
        """
        size = tokens.shape[0]
        offsets = torch.arange(2, depth + 2, device=tokens.device)  # head d (1-based) predicts t + 1 + d
        target_pos = positions[:, None] + offsets[None]  # [T, depth]
        valid = target_pos < size
        targets = tokens[target_pos.clamp(max=size - 1)]  # [T, depth]
        ranks = []
        for start in range(0, positions.shape[0], chunk):
            rows = slice(start, start + chunk)
            drafted = self.draft_topk(hidden[positions[rows]], top_k, head=slice(depth)).transpose(0, 1)  # [t, depth, k]
            hit = drafted == targets[rows].unsqueeze(-1)  # [t, depth, k]
            ranks.append(torch.where(hit.any(-1), hit.int().argmax(-1), top_k))  # [t, depth]
        return torch.cat(ranks).masked_fill(~valid, -1)

    def draft_topk(self, hidden: Tensor, top_k: int, head: int | slice | None = None) -> Tensor:
        """The drafting hot path, once per decoding step on the accepted node's hidden row.

        hidden [H] or [B, H] -> token ids LongTensor [n, top_k] or [n, B, top_k], best first, on
        the hidden's device, for the heads `head` picks (default all; an int: that head alone, no
        head dimension). A tree of depth d needs only ``head=slice(d)``, which skips the rest.
        """
        if self._draft_vocab is None:
            return self.draft_logits(hidden, head).topk(top_k, dim=-1).indices
        heads, one = self._select(head)
        y = self._trunk(hidden.reshape(-1, self.hidden_size), heads)  # [n, B, H]
        logits = self._project(y, heads, self._draft_proj)  # [n, B, V']
        ids = self._draft_vocab[logits.topk(top_k, dim=-1).indices]  # [n, B, k] in the full vocabulary
        ids = ids.squeeze(1) if hidden.dim() == 1 else ids
        return ids[0] if one else ids

    def _vocab_weight(self) -> Tensor:
        """The vocab projection: own [K, V, H], or the shared base lm_head [V, H]."""
        return self.proj_weight if self.proj_weight is not None else self.lm_head_weight

    def _restricted_projection(self, ids: Tensor) -> Tensor:
        """The projection rows of the draft vocabulary ids: [V', H] or [K, V', H]."""
        return self._vocab_weight().detach().index_select(-2, ids).contiguous()

    def _logits(self, x: Tensor, heads: slice) -> Tensor:
        """x [N, H] -> logits [n, N, V] of the n heads in `heads`, every head in one batched matmul."""
        return self._project(self._trunk(x, heads), heads, self._vocab_weight())

    def _trunk(self, x: Tensor, heads: slice) -> Tensor:
        """x [N, H] -> [n, N, H] after the ResBlocks of the n heads in `heads`."""
        y = x.to(self.res_weight.dtype).unsqueeze(0).expand(heads.stop - heads.start, -1, -1)  # [n, N, H]
        for layer in range(self.num_layers):
            w = self.res_weight[layer, heads]  # [n, H, H], contiguous
            b = self.res_bias[layer, heads].unsqueeze(1)  # [n, 1, H]
            y = y + F.silu(torch.baddbmm(b, y, w.mT))  # [n, N, H]
        return y

    @staticmethod
    def _project(y: Tensor, heads: slice, weight: Tensor) -> Tensor:
        """[n, N, H] -> [n, N, V]: own projections [K, V, H] as one bmm, a shared [V, H] as one matmul."""
        if weight.dim() == 3:
            return torch.bmm(y, weight[heads].mT)  # [n, N, H] @ [n, H, V]
        return linear(y.to(weight.dtype), weight)  # [n, N, V]

    def _select(self, head: int | slice | None) -> tuple[slice, bool]:
        """The heads `head` picks as a slice of consecutive heads, and whether it picked one by index."""
        K = self.num_heads
        if head is None:
            return slice(0, K), False
        if isinstance(head, slice):
            start, stop, step = head.indices(K)
            if step == 1 and start < stop and (head.stop is None or head.stop <= K):
                return slice(start, stop), False
        elif 0 <= head < K:
            return slice(head, head + 1), True
        raise ValueError(f"asked for heads {head}; these Medusa heads have {K}")

    def fingerprint(self) -> str:
        """As DraftHeads.fingerprint; a Medusa-2 folder's heads live in its model weights: only those tensors
        are hashed, so fingerprinting never reads a whole 13 GB model."""
        if self.format == "medusa2" and self.source is not None:
            return io.sha256_tensors(io.load_model_tensors(Path(self.source), MEDUSA2_PREFIX))
        return super().fingerprint()

    # ------------------------------------------------------------------ published key layout

    def medusa_state_dict(self, prefix: str = "", with_projection: bool = True) -> dict[str, Tensor]:
        """Weights under the published per-head keys (views, no copies).

        ``{prefix}{h}.{l}.linear.weight|bias`` and, for own projections, ``{prefix}{h}.{L}.weight``.
        """
        out: dict[str, Tensor] = {}
        L = self.num_layers
        for h in range(self.num_heads):
            for layer in range(L):
                out[f"{prefix}{h}.{layer}.linear.weight"] = self.res_weight[layer, h]
                out[f"{prefix}{h}.{layer}.linear.bias"] = self.res_bias[layer, h]
            if with_projection and self.proj_weight is not None:
                out[f"{prefix}{h}.{L}.weight"] = self.proj_weight[h]
        return out

    @classmethod
    def from_medusa_state_dict(cls, tensors: dict[str, Tensor], source: str = "the checkpoint") -> MedusaHeads:
        """Heads from per-head keys (no prefix). Head and layer counts come from the keys."""
        K, L, has_proj = _parse_layout(tensors, source)
        first = tensors["0.0.linear.weight"] if L else tensors["0.0.weight"]
        dtype, H = first.dtype, first.shape[-1]

        def get(key: str, shape: tuple[int, ...]) -> Tensor:
            t = tensors[key]
            if tuple(t.shape) != shape:
                raise UserError(f"{source}: tensor {key!r} has shape {tuple(t.shape)}, expected {shape}")
            return t.to(dtype)

        V = tensors[f"0.{L}.weight"].shape[0] if has_proj else None
        heads = cls(K, H, V, L, dtype=dtype, device="meta")  # shapes only; real tensors below
        weights = [[get(f"{h}.{l}.linear.weight", (H, H)) for h in range(K)] for l in range(L)]
        biases = [[get(f"{h}.{l}.linear.bias", (H,)) for h in range(K)] for l in range(L)]
        heads.res_weight = nn.Parameter(_stack_or_empty(weights, (0, K, H, H), dtype))  # [L, K, H, H]
        heads.res_bias = nn.Parameter(_stack_or_empty(biases, (0, K, H), dtype))  # [L, K, H]
        if has_proj:  # [K, V, H]
            heads.proj_weight = nn.Parameter(torch.stack([get(f"{h}.{L}.weight", (V, H)) for h in range(K)]))
        heads.source = source
        return heads


# ====================================================================== loading


def load_heads(path: str | Path, base_model: nn.Module | None = None) -> MedusaHeads:
    """Medusa heads from a folder (Medusa-1, v2 or Medusa-2, detected), a head file, or a Hub id.

    With ``base_model`` (a transformers CausalLM) the heads are checked against it (hidden size,
    vocabulary), shared heads get its ``lm_head`` attached, and all move to its dtype/device.
    """
    folder, head_file = _locate(path)
    if head_file is not None:
        heads = _load_head_file(head_file, io.read_config(folder))
    else:
        heads = load_medusa2_heads(folder)
    if base_model is not None:
        heads.fit_to_base(base_model)
    return heads


def detect_format(path: str | Path) -> str:
    """'medusa1', 'v2' or 'medusa2' for a local folder or head file, as load_heads will read it.

    Like LoRAX, the tensor names decide between Medusa-1 and v2 (no projection keys: v2).
    """
    _, head_file = _locate(path)
    if head_file is None:
        return "medusa2"
    names = io.tensor_names(head_file)
    return "medusa1" if any(_PROJ_KEY.match(k) for k in names) else "v2"


def load_medusa2_heads(folder: str | Path) -> MedusaHeads:
    """The heads of a Medusa-2 model folder: only its ``medusa_head.*`` tensors are read."""
    folder = Path(folder)
    config = io.read_config(folder)
    if not io.model_weight_files(folder):
        raise _missing_files_error(folder)
    tensors = io.load_model_tensors(folder, MEDUSA2_PREFIX)
    if not tensors:
        raise UserError(
            f"{folder} holds a model but no {MEDUSA2_PREFIX}* tensors: it is not a Medusa-2 folder; "
            "pass a folder with Medusa heads"
        )
    stripped = {k[len(MEDUSA2_PREFIX):]: v for k, v in tensors.items()}
    heads = MedusaHeads.from_medusa_state_dict(stripped, source=str(folder))
    _check_declared(heads, config, str(folder))
    heads.format = "medusa2"
    # The backbone of a Medusa-2 folder is the folder itself.
    heads.base_model_name_or_path = config.get("base_model_name_or_path") or str(folder)
    return heads


# ====================================================================== saving


def save_heads(
    heads: MedusaHeads,
    folder: str | Path,
    format: str | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write ``config.json`` + the head file in the Medusa-1 or v2 layout; returns the head file.

    Default format: v2 for heads sharing the base lm_head, medusa1 otherwise. Shared heads can
    also be written as medusa1 (each head gets a copy of the attached lm_head), which the
    reference Medusa code reads.
    """
    fmt = format or ("v2" if heads.shares_lm_head else "medusa1")
    if fmt not in ("medusa1", "v2"):
        raise UserError(f"unknown heads format {fmt!r}; use 'medusa1' or 'v2' (save_medusa2 writes a full model)")
    if fmt == "v2" and not heads.shares_lm_head:
        raise UserError(
            "these heads have their own vocab projections; v2 heads use the base lm_head: save as medusa1"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = heads.medusa_state_dict()
    if fmt == "medusa1" and heads.shares_lm_head:
        tensors.update({f"{h}.{heads.num_layers}.weight": heads.lm_head_weight for h in range(heads.num_heads)})
    name = "medusa_lm_head.pt" if fmt == "medusa1" else "medusa_lm_head.safetensors"
    for stale in HEAD_FILES:  # an old head file beside the new one would be read instead of it
        if stale != name:
            (folder / stale).unlink(missing_ok=True)
    io.save_tensors(folder / name, tensors)
    io.write_json(folder / "config.json", _head_config(heads, fmt, base_model_name_or_path))
    if fmt == "v2" and heads.num_layers != 1:
        warnings.warn(
            f"{folder}: TGI and LoRAX read only 1-layer v2 heads; these have {heads.num_layers}", stacklevel=2
        )
    return folder / name


def save_medusa2(folder: str | Path, base_model: nn.Module, tokenizer, heads: MedusaHeads) -> Path:
    """A Medusa-2 folder: the (fine-tuned) base model with the heads under ``medusa_head.*``.

    ``AutoModelForCausalLM.from_pretrained(folder)`` loads the backbone (transformers reports the
    extra keys as unexpected and ignores them); ``load_heads(folder)`` reads the heads.
    """
    heads.check_fits(base_model)
    folder = Path(folder)
    state = dict(base_model.state_dict())
    # Clones: views into the stacked storage would look like shared tensors to save_pretrained.
    state.update({k: v.detach().clone() for k, v in heads.medusa_state_dict(prefix=MEDUSA2_PREFIX).items()})
    base_model.save_pretrained(folder, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    config = io.read_json(folder / "config.json")
    config.update(
        medusa_num_heads=heads.num_heads,
        medusa_num_layers=heads.num_layers,
        medusa_bench_version=__version__,
    )
    io.write_json(folder / "config.json", config)
    return folder


# ====================================================================== helpers


def _parse_layout(tensors: dict[str, Tensor], source: str) -> tuple[int, int, bool]:
    """(num_heads, num_layers, has_own_projection) from per-head keys; strict about gaps."""
    res: dict[tuple[int, int], set[str]] = {}
    proj: dict[int, int] = {}
    unknown = []
    for key in tensors:
        if m := _RES_KEY.match(key):
            res.setdefault((int(m[1]), int(m[2])), set()).add(m[3])
        elif m := _PROJ_KEY.match(key):
            proj[int(m[1])] = int(m[2])
        else:
            unknown.append(key)
    head_ids = sorted({h for h, _ in res} | set(proj))
    if not head_ids:
        raise UserError(f"{source} holds no Medusa head tensors (expected keys like '0.0.linear.weight')")
    if unknown:
        warnings.warn(f"{source}: ignoring {len(unknown)} unexpected tensors, e.g. {unknown[0]!r}", stacklevel=3)
    K = len(head_ids)
    if head_ids != list(range(K)):
        raise UserError(f"{source}: heads are numbered {head_ids}, expected 0..{K - 1}")
    layers = {h: sorted(l for hh, l in res if hh == h) for h in head_ids}
    L = len(layers[0])
    for h, ids in layers.items():
        if ids != list(range(L)):
            raise UserError(f"{source}: head {h} has ResBlocks {ids}, head 0 has {list(range(L))}")
        for l in ids:
            if res[(h, l)] != {"weight", "bias"}:
                missing = ({"weight", "bias"} - res[(h, l)]).pop()
                raise UserError(f"{source}: ResBlock {h}.{l} lacks its {missing}")
    if proj and (sorted(proj) != head_ids or set(proj.values()) != {L}):
        raise UserError(
            f"{source}: every head needs its projection '{{head}}.{L}.weight'; "
            f"found (head, index) {sorted(proj.items())}"
        )
    return K, L, bool(proj)


def _stack_or_empty(rows: list[list[Tensor]], empty_shape: tuple[int, ...], dtype) -> Tensor:
    """torch.stack of a 2-level list (layers x heads); an empty [0, ...] tensor when L = 0."""
    if not rows:
        return torch.empty(empty_shape, dtype=dtype)
    return torch.stack([torch.stack(row) for row in rows])


def _check_declared(heads: MedusaHeads, config: dict, source: str) -> None:
    """Warn where config.json disagrees with the weights; the weights win."""
    for field, actual in (("medusa_num_heads", heads.num_heads), ("medusa_num_layers", heads.num_layers)):
        declared = config.get(field)
        if declared is not None and declared != actual:
            warnings.warn(
                f"{source}: config.json declares {field}={declared} but the weights hold {actual}; using {actual}",
                stacklevel=3,
            )


def _load_head_file(path: Path, config: dict) -> MedusaHeads:
    heads = MedusaHeads.from_medusa_state_dict(io.load_tensors(path), source=str(path))
    _check_declared(heads, config, str(path))
    if _declares_v2(config) and not heads.shares_lm_head:
        warnings.warn(
            f"{path}: config says version 2 but the file has its own vocab projections; reading it as Medusa-1",
            stacklevel=3,
        )
    heads.format = "v2" if heads.shares_lm_head else "medusa1"
    heads.base_model_name_or_path = config.get("base_model_name_or_path")
    return heads


def _locate(path: str | Path) -> tuple[Path, Path | None]:
    """(folder, head file, or None for a Medusa-2 folder). A Hub id is downloaded first."""
    folder, head_file = locate(path, HEAD_FILES, ["config.json", "medusa_lm_head.*"])
    if head_file is None and not Path(path).expanduser().is_dir():  # Medusa-2 on the Hub: the heads live in the model weights
        folder = io.resolve_folder(path, ["*.json", "*.safetensors", "pytorch_model*.bin"])
    if head_file is None and not io.model_weight_files(folder):
        raise _missing_files_error(folder)
    return folder, head_file


def _missing_files_error(folder: Path) -> UserError:
    looked = ", ".join(HEAD_FILES + io.MODEL_WEIGHT_NAMES)
    return UserError(
        f"{folder} has no Medusa heads: looked for {looked} "
        "(Medusa-1/v2 head files, or a Medusa-2 model with medusa_head.* tensors)"
    )


def _declares_v2(config: dict) -> bool:
    return str(config.get("version", "1")).strip() in ("2", "2.0")


def _head_config(heads: MedusaHeads, fmt: str, base_model_name_or_path: str | None) -> dict:
    config = {
        "medusa_num_heads": heads.num_heads,
        "medusa_num_layers": heads.num_layers,
        "base_model_name_or_path": base_model_name_or_path or heads.base_model_name_or_path,
        "hidden_size": heads.hidden_size,
        "vocab_size": heads.vocab_size,
        "medusa_bench_version": __version__,
    }
    if fmt == "v2":
        config["version"] = "2"  # TGI/LoRAX key; no "architectures" (TGI would take it for an MLP speculator)
    return {k: v for k, v in config.items() if v is not None}
