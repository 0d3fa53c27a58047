"""Hydra draft heads: each head sees the tokens chosen above it, and reading/writing Hydra checkpoints.

Head k (0-based) drafts the token at depth k + 1 of the candidate tree. A *grounded* head takes
the base hidden state h (the one that predicted the root) and the embeddings of the k + 1
tokens above it on the path — the root and the drafts at depths 1..k:

    x_k = [h, E(root), E(t_1), ..., E(t_k)]                              [H * (k + 2)]
    y   = res_connection(x_k) + SiLU(W x_k + b)      (then L - 1 plain ResBlocks y + SiLU(W y + b))
    logits = hydra_lm_head[k](y)  or the base lm_head(y) when the heads share it

Architectures (`hydra_head_arch`):
- ``mlp``: h is the base model's last (post-norm) hidden state.
- ``prefix-mlp`` (Hydra++): h first goes through one extra decoder layer of the base
  architecture (the "prefix layer") that attends over the hidden states of the whole prefix.

Checkpoint (zankner/Hydra): folder with ``config.json`` (``hydra_num_heads``,
``hydra_num_layers``, ``hydra_head_arch``, ``grounded_heads``, ``base_model_name_or_path``) and
``hydra_lm_head.pt``, the state dict of the reference head module:

    mlp:        hydra_mlp.{k}.{j}.linear.weight|bias, hydra_mlp.{k}.0.res_connection.weight|bias,
                hydra_lm_head.{k}.weight|bias
    prefix-mlp: the same with dropout layers in between (ResBlock j at index 2j + 1,
                hydra_lm_head.{k}.1.*), plus prefix_embeding_layer.* (a one-layer base model)

Heads without ``hydra_lm_head.*`` keys share the base model's lm_head (this tool's default:
a few MB instead of one [V, H] projection per head). The reference repeats one ResBlock
instance for layers 1..L-1 of a head; here they are separate layers (identical when read
from such a file). Tensors only are read. This tool writes the same keys to
``hydra_lm_head.safetensors`` (no pickle; bfloat16 by default for trained heads) and reads either file;
loading with a base model upcasts the stored tensors to its dtype.
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
from medusa_bench.heads.layers import embedding_name, prefix_layer
from medusa_bench.models import cache_kwargs, linear

ARCHS = ("mlp", "prefix-mlp")
HEAD_FILES = ("hydra_lm_head.safetensors", "hydra_lm_head.pt")  # preference order; saves write the first
PREFIX_KEY = "prefix_embeding_layer."  # sic: the reference's spelling

_MLP_KEY = re.compile(r"^hydra_mlp\.(\d+)\.(\d+)\.(linear|res_connection)\.(weight|bias)$")
_PROJ_KEY = re.compile(r"^hydra_lm_head\.(\d+)\.(?:1\.)?(weight|bias)$")


class ResBlock(nn.Module):
    """y = skip(x) + SiLU(W x + b); skip is a linear map when the input is wider than the output."""

    def __init__(self, in_size: int, hidden_size: int, **like):
        super().__init__()
        self.linear = nn.Linear(in_size, hidden_size, **like)
        self.res_connection = nn.Linear(in_size, hidden_size, **like) if in_size != hidden_size else None
        with torch.no_grad():
            self.linear.weight.zero_()  # Hydra's init: the block starts as its skip path

    def forward(self, x: Tensor) -> Tensor:
        skip = x if self.res_connection is None else self.res_connection(x)
        return skip + F.silu(self.linear(x))


class HydraHeads(DraftHeads):
    """K Hydra heads (module names follow the published keys: ``hydra_mlp``, ``hydra_lm_head``).

    - ``hydra_mlp[k]``: a Sequential of L ResBlocks, the first over [h, k + 1 token embeddings]
      (grounded) or over h alone (ungrounded)
    - ``hydra_lm_head[k]``: each head's own Linear(H, V) with bias, or None when the heads
      share the base lm_head (``attach_base``)
    - ``prefix``: the Hydra++ prefix layer (a one-layer base model), None for ``mlp``

    The base model's token embeddings and lm_head (the logits of shared heads; the teacher in
    training) are references (``attach_base``), never parameters of the heads, so saving
    writes head weights only. The drafting contract (``draft_topk``, draft vocabulary, fitting,
    fingerprint) is `DraftHeads`'.
    """

    kind = "Hydra heads"

    def __init__(self, num_heads: int, hidden_size: int, vocab_size: int | None = None, num_layers: int = 1,
                 arch: str = "mlp", grounded: bool = True, base_config=None, *, dtype=None, device=None):
        super().__init__()
        if num_heads < 1 or num_layers < 1 or hidden_size < 1:
            raise UserError(f"bad Hydra head shape: heads={num_heads} layers={num_layers} hidden={hidden_size}; "
                            "use at least 1 head and 1 layer")
        if arch not in ARCHS:
            raise UserError(f"unknown Hydra head architecture {arch!r}; use one of: {', '.join(ARCHS)}")
        like = {"dtype": dtype, "device": device}
        H = hidden_size
        self.arch, self.grounded = arch, grounded
        self.hydra_mlp = nn.ModuleList(
            nn.Sequential(ResBlock(H * (k + 2) if grounded else H, H, **like),
                          *(ResBlock(H, H, **like) for _ in range(num_layers - 1)))
            for k in range(num_heads)
        )
        self.hydra_lm_head = None
        if vocab_size is not None:
            self.hydra_lm_head = nn.ModuleList(nn.Linear(H, vocab_size, **like) for _ in range(num_heads))
        self.prefix = None
        if arch == "prefix-mlp":
            if base_config is None:
                raise UserError("prefix-mlp Hydra heads need the base model's config to build their prefix layer")
            self.prefix = prefix_layer(base_config).to(**{k: v for k, v in like.items() if v is not None})
        self._embed: Tensor | None = None  # base input embeddings [V, H]; never registered

    @classmethod
    def for_model(cls, model: nn.Module, num_heads: int = 4, num_layers: int = 1, arch: str = "mlp",
                  shared_lm_head: bool = True) -> HydraHeads:
        """Fresh grounded heads fitted to a transformers CausalLM, ready to train.

        Each head's skip path starts as [I, 0, …]: it passes the base state through and ignores
        the token embeddings, so a head starts where a Medusa head does (the reference starts it
        random, which needs far more data than a CPU budget gives). Own projections start as
        copies of the base lm_head (Hydra's init), with zero bias.
        """
        weight = io.output_weight(model, cls.kind)  # [V, H]
        vocab = None if shared_lm_head else weight.shape[0]
        H = weight.shape[1]
        heads = cls(num_heads, H, vocab, num_layers, arch, True, io.text_config(model), dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            for head in heads.hydra_mlp:
                skip = head[0].res_connection  # Linear(H * (k + 2), H)
                skip.weight.zero_()
                skip.weight[:, :H].copy_(torch.eye(H))
                skip.bias.zero_()
        if heads.hydra_lm_head is not None:
            with torch.no_grad():
                for linear in heads.hydra_lm_head:
                    linear.weight.copy_(weight)
                    linear.bias.zero_()
        heads.attach_base(model)
        heads.base_model_name_or_path = io.model_name_of(model)
        return heads

    def attach_base(self, model: nn.Module) -> None:
        """Keep references to the base model's input embeddings (and lm_head, if shared)."""
        embed = model.get_input_embeddings().weight  # [V, H]
        if embed.shape[1] != self.hidden_size:
            raise UserError(f"the base embeddings have shape {tuple(embed.shape)} but the heads need [vocab, {self.hidden_size}]")
        self.__dict__["_embed"] = embed  # bypass nn.Module.__setattr__: must not become a parameter
        self.__dict__["_lm_head"] = io.output_weight(model, self.kind)  # the logits of shared heads; the teacher in training

    # ------------------------------------------------------------------ shapes

    @property
    def num_heads(self) -> int:
        return len(self.hydra_mlp)

    @property
    def num_layers(self) -> int:
        return len(self.hydra_mlp[0])

    @property
    def hidden_size(self) -> int:
        return self.hydra_mlp[0][0].linear.out_features

    @property
    def shares_lm_head(self) -> bool:
        return self.hydra_lm_head is None

    def extra_repr(self) -> str:
        vocab = "shared lm_head" if self.shares_lm_head else f"vocab={self.vocab_size}"
        return f"arch={self.arch}, grounded={self.grounded}, heads={self.num_heads}, layers={self.num_layers}, {vocab}"

    # ------------------------------------------------------------------ compute

    @property
    def base_lm_head(self) -> Tensor:
        """The base model's lm_head weight [V, H] (attached, not a parameter)."""
        if self._lm_head is None:
            raise RuntimeError("Hydra heads need the base model: load them with base_model=... or call attach_base(model)")
        return self._lm_head

    def embed(self, ids: Tensor) -> Tensor:
        """ids [...] -> base input embeddings [..., H]."""
        if self._embed is None:
            raise RuntimeError("Hydra heads need the base model: load them with base_model=... or call attach_base(model)")
        return F.embedding(ids, self._embed)

    def head_logits(self, k: int, x: Tensor) -> Tensor:
        """Head k on its inputs x [N, H * (k + 2)] (grounded) or [N, H] -> logits [N, V]."""
        y = self.hydra_mlp[k](x)  # [N, H]
        if self.hydra_lm_head is not None:
            return self.hydra_lm_head[k](y)
        return linear(y, self.base_lm_head)

    @torch.no_grad()
    def draft_topk(self, x: Tensor, top_k: int, head: int) -> Tensor:
        """The drafting hot path: head `head` on its inputs x [N, W] -> the top_k token ids [N, top_k], best first.

        Each head reads the path above it, so heads draft one at a time: `head` is an int.
        """
        if self._draft_vocab is None:
            return self.head_logits(head, x).topk(top_k, dim=-1).indices
        weight, bias = self._draft_proj[head]  # [V', H], [V'] or None
        logits = linear(self.hydra_mlp[head](x), weight, bias)  # [N, V']
        return self._draft_vocab[logits.topk(top_k, dim=-1).indices]

    def _vocab_weight(self) -> Tensor:
        """A vocab projection weight [V, H]: head 0's own, or the shared base lm_head."""
        return self.hydra_lm_head[0].weight if self.hydra_lm_head is not None else self.base_lm_head

    def _restricted_projection(self, ids: Tensor) -> list:
        """Per head (weight [V', H], bias [V'] or None): the projection rows of the draft vocabulary ids."""
        if self.hydra_lm_head is None:
            return [(self.base_lm_head.detach().index_select(0, ids).contiguous(), None)] * self.num_heads
        return [(lin.weight.detach().index_select(0, ids).contiguous(), lin.bias.detach()[ids])
                for lin in self.hydra_lm_head]

    def extend(self, x: Tensor, ids: Tensor) -> Tensor:
        """Path inputs one level deeper: x [N, W] + tokens [N] -> [N, W + H] (unchanged if ungrounded)."""
        return torch.cat([x, self.embed(ids)], dim=-1) if self.grounded else x

    def root_inputs(self, states: Tensor, roots: Tensor) -> Tensor:
        """Head 0's inputs: states [N, H] (after the prefix layer) + the roots [N] -> [N, 2H] or [N, H]."""
        return self.extend(states, roots)

    def prefix_states(self, hidden: Tensor, cache=None, position_ids: Tensor | None = None) -> Tensor:
        """hidden [B, T, H] -> the heads' input states [B, T, H]: the prefix layer's output, or hidden itself."""
        if self.prefix is None:
            return hidden
        out = self.prefix(inputs_embeds=hidden, **cache_kwargs(self.prefix, cache), position_ids=position_ids,
                          use_cache=cache is not None)
        return out.last_hidden_state

    def path_inputs(self, states: Tensor, ids: Tensor, k: int) -> Tensor:
        """Teacher-forced inputs of head k at every position that has a target.

        states [B, T, H], ids [B, T] -> [B, T - k - 2, W]: row t is [state_t, E(ids[t+1]), ..., E(ids[t+k+1])]
        and its target is ids[t + k + 2].
        """
        rows = max(ids.shape[1] - k - 2, 0)
        parts = [states[:, :rows]]
        if self.grounded:
            embeds = self.embed(ids)  # [B, T, H]
            parts += [embeds[:, j: j + rows] for j in range(1, k + 2)]
        return torch.cat(parts, dim=-1)

    def inputs_at(self, states: Tensor, ids: Tensor, positions: Tensor, k: int) -> Tensor:
        """Head k's teacher-forced inputs at some positions of one sequence.

        states [S, H], ids [S], positions [N] (each with t + k + 1 < S) -> [N, W]: row i is
        [state_t, E(ids[t+1]), ..., E(ids[t+k+1])] for t = positions[i].
        """
        parts = [states[positions]]
        if self.grounded:
            parts += [self.embed(ids[positions + j]) for j in range(1, k + 2)]
        return torch.cat(parts, dim=-1)

    @torch.no_grad()
    def true_ranks(self, hidden: Tensor, ids: Tensor, positions: Tensor | None = None, depth: int | None = None,
                   chunk: int = 128) -> Tensor:
        """Rank of the true token at each depth, given that the true tokens above it were drafted.

        hidden [S, H] (base hidden states of one sequence), ids [S] (its tokens: the truth),
        positions [T] (default all) -> LongTensor [T, depth]: [i, d - 1] is the rank of
        ids[t + 1 + d] among head d - 1's candidates at t = positions[i], conditioned on the root
        ids[t + 1] and the drafts ids[t + 2 .. t + d] above it; 0 = top-1; -1 past the end.
        """
        S = ids.shape[0]
        depth = self.num_heads if depth is None else depth
        positions = torch.arange(S, device=ids.device) if positions is None else positions
        ranks = torch.full((positions.shape[0], depth), -1, dtype=torch.long, device=ids.device)  # [T, depth]
        states = self.prefix_states(hidden[None].to(self.dtype))[0]  # [S, H]
        for k in range(depth):
            valid = (positions + k + 2 < S).nonzero().flatten()  # rows whose target exists
            for start in range(0, valid.shape[0], chunk):
                rows = valid[start: start + chunk]
                t = positions[rows]  # [c]
                logits = self.head_logits(k, self.inputs_at(states, ids, t, k)).float()  # [c, V]
                true = logits.gather(1, ids[t + k + 2, None])  # [c, 1]
                ranks[rows, k] = (logits > true).sum(dim=1)
        return ranks

    @property
    def dtype(self) -> torch.dtype:
        return self.hydra_mlp[0][0].linear.weight.dtype

    # ------------------------------------------------------------------ published key layout

    def hydra_state_dict(self) -> dict[str, Tensor]:
        """Weights under the reference's keys (see the module docstring); no base tensors."""
        local = self.state_dict()
        return {published: local[own] for published, own in self.published_keys().items()}

    def published_keys(self) -> dict[str, str]:
        """The reference's key -> this module's state_dict key (ResBlock j sits at 2j + 1 in prefix-mlp heads)."""
        step, offset, middle = (2, 1, ".1") if self.arch == "prefix-mlp" else (1, 0, "")
        keys = {}
        for k, head in enumerate(self.hydra_mlp):
            for j, block in enumerate(head):
                for name in block.state_dict():
                    keys[f"hydra_mlp.{k}.{step * j + offset}.{name}"] = f"hydra_mlp.{k}.{j}.{name}"
        if self.hydra_lm_head is not None:
            for k in range(self.num_heads):
                for name in ("weight", "bias"):
                    keys[f"hydra_lm_head.{k}{middle}.{name}"] = f"hydra_lm_head.{k}.{name}"
        if self.prefix is not None:
            stub = embedding_name(self.prefix)
            for name in self.prefix.state_dict():
                if name != stub:  # unused: the prefix layer reads hidden states
                    keys[PREFIX_KEY + name] = f"prefix.{name}"
        return keys


# ====================================================================== loading


def load_hydra_heads(path: str | Path, base_model: nn.Module | None = None) -> HydraHeads:
    """Hydra heads from a folder (or a Hub id, or the head file itself).

    With ``base_model`` the heads are checked against it (hidden size, vocabulary), get its
    embeddings (and lm_head if shared) attached, and move to its dtype and device. prefix-mlp
    heads need ``base_model``: their prefix layer has the base model's architecture.
    """
    folder, head_file = _locate(path)
    config = io.read_config(folder)
    arch = config.get("hydra_head_arch", "mlp")
    if arch not in ARCHS:
        raise UserError(f"{folder}: hydra_head_arch {arch!r} is not supported; this tool reads {' and '.join(ARCHS)} heads")
    if config.get("hidden_state_offset", 0):
        raise UserError(f"{folder}: hidden_state_offset={config['hidden_state_offset']} is not supported "
                        "(heads must read the base model's last hidden state)")
    if arch == "prefix-mlp" and base_model is None:
        raise UserError(f"{folder}: prefix-mlp Hydra heads need the base model to load (pass base_model)")
    tensors = io.load_tensors(head_file)
    heads = from_hydra_state_dict(tensors, arch, bool(config.get("grounded_heads", True)),
                                  io.text_config(base_model) if base_model is not None else None, source=str(head_file))
    declared = config.get("hydra_num_heads")
    if declared is not None and declared != heads.num_heads:
        warnings.warn(f"{folder}: config.json declares hydra_num_heads={declared} but the weights hold "
                      f"{heads.num_heads}; using {heads.num_heads}", stacklevel=2)
    heads.base_model_name_or_path = config.get("base_model_name_or_path")
    if base_model is not None:
        heads.fit_to_base(base_model)
    return heads.eval()  # the prefix layer of a GPT2-like base has dropout: off for drafting


def from_hydra_state_dict(tensors: dict[str, Tensor], arch: str = "mlp", grounded: bool = True, base_config=None,
                          source: str = "the checkpoint") -> HydraHeads:
    """Heads from the reference's keys; head and layer counts come from the keys."""
    K, L, has_proj = _parse_layout(tensors, arch, source)
    first = tensors["hydra_mlp.0.{}.linear.weight".format(1 if arch == "prefix-mlp" else 0)]
    H, dtype = first.shape[0], first.dtype
    has_skip = "hydra_mlp.0.{}.res_connection.weight".format(1 if arch == "prefix-mlp" else 0) in tensors
    if has_skip != grounded or first.shape[1] != (2 * H if grounded else H):
        raise UserError(f"{source}: head 0's first layer has input width {first.shape[1]}, which does not match "
                        f"grounded_heads={grounded} for hidden size {H}; fix grounded_heads in config.json")
    V = None
    if has_proj:
        V = tensors["hydra_lm_head.0.{}weight".format("1." if arch == "prefix-mlp" else "")].shape[0]
    with torch.device("meta"):  # shapes only; real tensors are assigned below
        heads = HydraHeads(K, H, V, L, arch, grounded, base_config, dtype=dtype)
    wanted = {k: v.shape for k, v in heads.hydra_state_dict().items()}
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise UserError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing); the file is incomplete")
    for key, shape in wanted.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise UserError(f"{source}: tensor {key!r} has shape {tuple(tensors[key].shape)}, expected {tuple(shape)}")
    stub = PREFIX_KEY + embedding_name(heads.prefix) if heads.prefix is not None else None
    extra = [k for k in tensors if k not in wanted and k != stub]
    if extra:
        warnings.warn(f"{source}: ignoring {len(extra)} unexpected tensors, e.g. {extra[0]!r}", stacklevel=3)
    _assign(heads, {k: tensors[k].to(dtype) for k in wanted})
    heads.source = source
    return heads


def _assign(heads: HydraHeads, tensors: dict[str, Tensor]) -> None:
    """Load published-key tensors into the (meta) modules, replacing their parameters."""
    local = {own: tensors[published] for published, own in heads.published_keys().items()}
    if heads.prefix is not None:  # the embedding stub is never saved
        stub = heads.prefix.get_input_embeddings().weight
        local[f"prefix.{embedding_name(heads.prefix)}"] = torch.zeros(stub.shape, dtype=stub.dtype)
    heads.load_state_dict(local, strict=True, assign=True)
    if heads.prefix is not None:  # buffers that are not saved (rotary inv_freq) must be real tensors again
        rebuilt = prefix_layer(heads.prefix.config)
        for name, buffer in rebuilt.named_buffers():
            if buffer is not None:
                _set_buffer(heads.prefix, name, buffer)


def _set_buffer(module: nn.Module, name: str, value: Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    owner._buffers[leaf] = value


# ====================================================================== saving


def save_hydra_heads(heads: HydraHeads, folder: str | Path, base_model_name_or_path: str | None = None,
                     dtype: torch.dtype | None = None, **extra_config) -> Path:
    """Write ``config.json`` + ``hydra_lm_head.safetensors`` (the reference's keys); returns the head file.

    ``dtype`` stores the weights in a smaller type (e.g. bfloat16 for heads kept in a repository);
    loading casts them to the base model's dtype. An older ``hydra_lm_head.pt`` in the folder is removed.
    """
    folder = Path(folder)
    tensors = heads.hydra_state_dict()
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    check_loads_back(heads, tensors, folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in HEAD_FILES[1:]:
        (folder / stale).unlink(missing_ok=True)
    io.save_tensors(folder / HEAD_FILES[0], tensors)
    config = {
        "hydra_num_heads": heads.num_heads,
        "hydra_num_layers": heads.num_layers,
        "hydra_head_arch": heads.arch,
        "grounded_heads": heads.grounded,
        "hidden_state_offset": 0,
        "base_model_name_or_path": base_model_name_or_path or heads.base_model_name_or_path,
        "hidden_size": heads.hidden_size,
        "vocab_size": heads.vocab_size,
        "shared_lm_head": heads.shares_lm_head,
        "medusa_bench_version": __version__,
        **extra_config,
    }
    io.write_json(folder / "config.json", {k: v for k, v in config.items() if v is not None})
    return folder / HEAD_FILES[0]


def check_loads_back(heads: HydraHeads, tensors: dict[str, Tensor], folder: Path) -> None:
    """UserError unless `tensors` rebuild heads of the same layout: never write heads the tool cannot load."""
    config = heads.prefix.config if heads.prefix is not None else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an ignored tensor is a tensor lost
            back = from_hydra_state_dict(tensors, heads.arch, heads.grounded, config, source=str(folder))
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"refusing to save Hydra heads to {folder}: they would not load back ({first})") from None
    if set(back.state_dict()) != set(heads.state_dict()):
        raise UserError(f"refusing to save Hydra heads to {folder}: they would load back with other weights")


# ====================================================================== helpers


def _parse_layout(tensors: dict[str, Tensor], arch: str, source: str) -> tuple[int, int, bool]:
    """(num_heads, num_layers, has_own_projection) from the reference keys; strict about gaps."""
    step, offset = (2, 1) if arch == "prefix-mlp" else (1, 0)
    blocks: dict[int, set[int]] = {}
    proj: set[int] = set()
    for key in tensors:
        if m := _MLP_KEY.match(key):
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
        elif m := _PROJ_KEY.match(key):
            proj.add(int(m[1]))
    if not blocks:
        hint = " (is this a Medusa checkpoint? use --medusa-heads)" if any(k[:1].isdigit() for k in tensors) else ""
        raise UserError(f"{source} holds no Hydra head tensors (expected keys like 'hydra_mlp.0.0.linear.weight'){hint}")
    K = len(blocks)
    if sorted(blocks) != list(range(K)):
        raise UserError(f"{source}: heads are numbered {sorted(blocks)}, expected 0..{K - 1}")
    indices = sorted(blocks[0])
    L = len(indices)
    expected = [step * j + offset for j in range(L)]
    if indices != expected:
        raise UserError(f"{source}: head 0 has layers at {indices}, expected {expected} for hydra_head_arch={arch!r}; "
                        "check hydra_head_arch in config.json")
    for k, ids in blocks.items():
        if sorted(ids) != expected:
            raise UserError(f"{source}: head {k} has layers at {sorted(ids)}, head 0 at {expected}")
    if proj and sorted(proj) != list(range(K)):
        raise UserError(f"{source}: every head needs its projection hydra_lm_head.{{k}}; found heads {sorted(proj)}")
    return K, L, bool(proj)


def _locate(path: str | Path) -> tuple[Path, Path]:
    """(folder, head file). A Hub id is downloaded first (config and head file only)."""
    folder, head_file = locate(path, HEAD_FILES, ["config.json", "hydra_lm_head.*"])
    if head_file is None:
        raise UserError(f"{folder} has no Hydra heads: looked for {', '.join(HEAD_FILES)}; "
                        "pass a Hydra heads folder, or train some with `medusa-bench train hydra`")
    return folder, head_file
