"""EAGLE draft heads: a one-layer draft model over the base model's features, and reading/writing EAGLE checkpoints.

EAGLE-1/2 (`variant="eagle"`) predicts the base model's next *feature* (its final normed hidden
state f, the one lm_head reads) from the previous feature and the next token's embedding:

    x_t = fc([E(token_{t+1}), f_t])                  [2H] -> [H], with bias
    g_t = decoder layer(x_t)                         the base's own layer class, without its input norm
    logits = base lm_head(g_t)                       g_t ~ f_{t+1}: frozen, shared

EAGLE-3 (`variant="eagle3"`) fuses three base layers (low, middle, high: transformers'
hidden_states 2, L // 2 and L - 3, as the reference takes them) by one fc [3H] -> [H] (no bias);
its layer's attention reads [input_norm(E(token)), hidden_norm(feature)] (2H wide, the residual
is the fused feature), then its own `norm` and `lm_head` onto a draft vocabulary of Vd tokens:
draft id i is base token i + d2t[i]; t2d [V] marks the base tokens it can draft.

A deeper draft feeds the layer's own output g back as the feature (EAGLE-1 through fc again,
EAGLE-3 as the fused feature), so one call, `step`, drafts every depth. Rows attend through the
draft's own KV cache (`transformers.DynamicCache`): true rows (base features of accepted tokens)
are kept, tree rows are cropped away after each step (decoders/eagle.py).

Checkpoints (SafeAILab/EAGLE `eagle/model/cnets1.py` and `cnets.py`; vLLM `llama_eagle.py`,
`llama_eagle3.py`): a folder with ``config.json`` and ``pytorch_model.bin`` or
``model.safetensors`` holding

    EAGLE-1/2: fc.weight, fc.bias, layers.0.self_attn.{q,k,v,o}_proj.weight,
               layers.0.mlp.{gate,up,down}_proj.weight, layers.0.post_attention_layernorm.weight
    EAGLE-3:   fc.weight [H, 3H], midlayer.self_attn.{q,k,v}_proj.weight [., 2H], midlayer.self_attn.o_proj.weight,
               midlayer.mlp.*, midlayer.{hidden_norm,input_layernorm,post_attention_layernorm}.weight,
               norm.weight, lm_head.weight [Vd, H], d2t [Vd], t2d [V]

plus an optional ``embed_tokens.weight`` (a copy of the base's; the base's own is used). A
leading ``model.`` on every key is accepted. Tensors only are read (`weights_only` for .bin).
The layer is built from the base model's config (the draft's config.json may override its
intermediate size, head counts and norm epsilon); Llama-style layers only (self_attn, mlp,
input_layernorm, post_attention_layernorm), which is what EAGLE publishes heads for.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medusa_bench import __version__
from medusa_bench.errors import UserError
from medusa_bench.heads import io
from medusa_bench.heads.common import DraftHeads, locate
from medusa_bench.heads.layers import embedding_name, prefix_layer
from medusa_bench.models import cache_kwargs, linear, text_config

VARIANTS = ("eagle", "eagle3")
HEAD_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.safetensors")  # preference order
DEFAULT_DEPTH = 5  # deepest draft the decoders ask for (EAGLE-2's default depth)
LLAMA_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
# fields of a draft's config.json that may differ from the base model's (EAGLE-3 heads often set them)
CONFIG_OVERRIDES = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps")


def eagle3_layers(num_layers: int) -> tuple[int, int, int]:
    """The reference's feature layers (inputs of decoder layers 2, L // 2 and L - 3) as transformers' hidden_states indices."""
    return (2, num_layers // 2, num_layers - 3)


class EagleHeads(DraftHeads):
    """An EAGLE draft model (see the module docstring); `step` runs it, `draft_top` drafts from its outputs.

    - ``fc``: Linear(2H, H) (EAGLE-1/2) or Linear(3H, H) (EAGLE-3)
    - ``decoder``: a one-layer model of the base architecture (its rotary embedding, its layer
      ``decoder.layers[0]``, its final norm: EAGLE-3's ``norm``); the token embedding there is a stub
    - EAGLE-3: ``hidden_norm``, ``lm_head`` [Vd, H], buffers ``d2t`` [Vd] and ``t2d`` [V]

    The base embeddings and lm_head are references (`attach_base`), never parameters.
    """

    kind = "EAGLE heads"

    def __init__(self, base_config, variant: str = "eagle", draft_vocab_size: Optional[int] = None,
                 feature_layers: Optional[tuple[int, ...]] = None, overrides: Optional[dict] = None, fc_bias: bool = True,
                 *, dtype=None, device=None):
        super().__init__()
        if variant not in VARIANTS:
            raise UserError(f"unknown EAGLE variant {variant!r}; use one of: {', '.join(VARIANTS)}")
        config = copy.deepcopy(base_config)
        for key, value in (overrides or {}).items():
            if key in CONFIG_OVERRIDES and value is not None:
                setattr(config, key, value)
        self.variant = variant
        self.decoder = prefix_layer(config)
        layer = self.layer
        parts = {name for name, _ in layer.named_children()}
        if not LLAMA_PARTS <= parts or parts - LLAMA_PARTS - {"dropout", "resid_dropout"}:
            raise UserError(f"EAGLE heads need a Llama-style decoder layer ({', '.join(sorted(LLAMA_PARTS))}); "
                            f"{type(layer).__name__} has {', '.join(sorted(parts))}")
        H = config.hidden_size
        like = {"dtype": dtype, "device": device}
        if variant == "eagle":
            layer.input_layernorm = nn.Identity()  # EAGLE-1/2's layer 0 has no input norm (cnets1: index 0)
            self.decoder.norm = nn.Identity()  # nor a final norm: lm_head reads the output directly
            self.fc = nn.Linear(2 * H, H, bias=fc_bias, **like)
            self.hidden_norm = self.lm_head = None
            self.feature_layers: tuple[int, ...] = (-1,)
        else:
            if not draft_vocab_size:
                raise UserError("EAGLE-3 heads need draft_vocab_size (the rows of their lm_head)")
            attention = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):  # the attention reads [embedding, feature]: 2H wide
                old = getattr(attention, name)
                setattr(attention, name, nn.Linear(2 * H, old.out_features, bias=old.bias is not None))
            self.hidden_norm = copy.deepcopy(layer.input_layernorm)
            self.feature_layers = tuple(feature_layers or eagle3_layers(config.num_hidden_layers_of_base))
            self.fc = nn.Linear(len(self.feature_layers) * H, H, bias=False, **like)
            self.lm_head = nn.Linear(H, draft_vocab_size, bias=False, **like)
            self.register_buffer("d2t", torch.zeros(draft_vocab_size, dtype=torch.long))
            self.register_buffer("t2d", torch.zeros(config.vocab_size_of_base, dtype=torch.bool))
        self.to(**{k: v for k, v in like.items() if v is not None})
        self.depth = DEFAULT_DEPTH  # tree depth the decoders draft to (`num_heads` for the tree code)
        self._embed: Tensor | None = None

    # ------------------------------------------------------------------ shapes

    @property
    def layer(self) -> nn.Module:
        """The draft's decoder layer (the one-layer model's layer list: `layers`, GPT-2's `h`, …)."""
        return next(m for m in self.decoder.modules() if isinstance(m, nn.ModuleList))[0]

    @property
    def num_heads(self) -> int:
        """Depth of the trees drafted (EAGLE has one head for every depth)."""
        return self.depth

    @property
    def hidden_size(self) -> int:
        return self.fc.out_features

    @property
    def shares_lm_head(self) -> bool:
        return self.lm_head is None

    @property
    def vocab_size(self) -> int | None:
        if self.lm_head is not None:
            return self.t2d.shape[0]
        return None if self._lm_head is None else self._lm_head.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    def extra_repr(self) -> str:
        vocab = "shared lm_head" if self.shares_lm_head else f"draft vocab={self.lm_head.out_features}"
        return f"variant={self.variant}, features={self.feature_layers}, {vocab}"

    # ------------------------------------------------------------------ base model

    def attach_base(self, model: nn.Module) -> None:
        embed = model.get_input_embeddings().weight  # [V, H]
        if embed.shape[1] != self.hidden_size:
            raise UserError(f"the base embeddings have shape {tuple(embed.shape)} but the EAGLE heads need [vocab, {self.hidden_size}]")
        self.__dict__["_embed"] = embed  # not a parameter: never saved, never trained
        self.__dict__["_lm_head"] = io.output_weight(model, self.kind)

    def check_fits(self, base_model: nn.Module) -> None:
        super().check_fits(base_model)
        layers = io.text_config(base_model).num_hidden_layers
        if any(not -1 <= i <= layers for i in self.feature_layers):
            raise UserError(f"{self.kind} {self.source or ''} read base layers {list(self.feature_layers)} but the base model "
                            f"has {layers}; pass EAGLE heads trained for this model")

    @property
    def base_lm_head(self) -> Tensor:
        if self._lm_head is None:
            raise RuntimeError("EAGLE heads need the base model: load them with base_model=... or call attach_base(model)")
        return self._lm_head

    def embed(self, ids: Tensor) -> Tensor:
        if self._embed is None:
            raise RuntimeError("EAGLE heads need the base model: load them with base_model=... or call attach_base(model)")
        return F.embedding(ids, self._embed)

    # ------------------------------------------------------------------ compute

    def step(self, features: Tensor, tokens: Tensor, positions: Tensor, cache, allowed: Optional[Tensor]) -> Tensor:
        """One draft forward over q rows, appended to `cache`: row i pairs features[i] with tokens[i].

        features [q, W] (base features: W = k·H; the draft's own output: H), tokens [q] (the next
        token of each row), positions [q], allowed [q, past + q] bool (True: may attend; None for
        one row, which sees the whole cache) -> the draft's outputs g [q, H].
        """
        features = features.to(self.dtype)
        emb = self.embed(tokens).to(self.dtype)  # [q, H]
        layer = self.layer
        if self.variant == "eagle":
            x = self.fc(torch.cat([emb, features], dim=-1))  # [q, H]
            attention_in = x
        else:
            x = self.fc(features) if features.shape[-1] != self.hidden_size else features  # [q, H]: the fused feature
            attention_in = torch.cat([layer.input_layernorm(emb), self.hidden_norm(x)], dim=-1)  # [q, 2H]
        rope = self.decoder.rotary_emb(attention_in[None], positions[None])
        mask = None
        if allowed is not None:
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
            mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
            mask = mask[None, None]  # [1, 1, q, past + q]
        out = layer.self_attn(hidden_states=attention_in[None], position_embeddings=rope, attention_mask=mask,
                              **cache_kwargs(layer.self_attn, cache))[0]  # [1, q, H]
        h = x[None] + out
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h[0]

    def logits(self, g: Tensor) -> Tensor:
        """g [N, H] -> draft logits [N, V'] over the drafting vocabulary (`draft_ids` maps columns to base ids)."""
        if self.lm_head is not None:
            return self.lm_head(self.decoder.norm(g))
        if self._draft_vocab is not None:
            return linear(g, self._draft_proj)
        return linear(g, self.base_lm_head)

    @property
    def draft_ids(self) -> Optional[Tensor]:
        """Base token id of each draft-logit column [V'], or None when the columns are the base vocabulary."""
        if self.lm_head is not None:
            return torch.arange(self.d2t.shape[0], device=self.d2t.device) + self.d2t
        return self._draft_vocab

    @torch.no_grad()
    def draft_top(self, g: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
        """g [N, H] -> (the top_k base token ids [N, k], their draft log-probabilities [N, k]), best first."""
        top = torch.log_softmax(self.logits(g).float(), dim=-1).topk(top_k, dim=-1)
        ids = self.draft_ids
        return (top.indices if ids is None else ids[top.indices]), top.values

    def draft_topk(self, x: Tensor, top_k: int, head=None) -> Tensor:
        """The drafting contract (heads/common.py): top_k base token ids [N, k] from outputs g [N, H]."""
        return self.draft_top(x, top_k)[0]

    def _vocab_weight(self) -> Tensor:
        return self.lm_head.weight if self.lm_head is not None else self.base_lm_head

    def _restricted_projection(self, ids: Tensor):
        if self.lm_head is not None:
            raise UserError("EAGLE-3 heads draft among their own vocabulary (d2t); pass --draft-vocab 0")
        return self.base_lm_head.detach().index_select(0, ids).contiguous()  # [V', H]

    # ------------------------------------------------------------------ teacher-forced unroll

    def unroll(self, features: Tensor, ids: Tensor, depth: int) -> list[Tensor]:
        """The drafts along a known sequence, every depth, as decoding would make them ("training-time test").

        features [S, W] (base features of one sequence), ids [S] -> `depth` tensors g_d [S - 1, H]:
        row t of g_1 reads (features[t], ids[t + 1]) at position t and drafts ids[t + 2]; row t of
        g_d reads (g_{d-1}[t], ids[t + d]) at position t + d - 1 and drafts ids[t + d + 1], seeing
        the true rows 0 … t and its own chain (rows t of depths 2 … d), exactly what a tree node
        d levels below the root sees. Rows whose tokens lie past the end are junk (callers mask).
        """
        from transformers import DynamicCache

        S = ids.shape[0]
        T = S - 1
        device = ids.device
        cache = DynamicCache()
        t = torch.arange(T, device=device)
        causal = t[:, None] >= t[None, :]  # [T, T]
        g = self.step(features[:T], ids[1:], t, cache, causal)
        outs = [g]
        eye = torch.eye(T, dtype=torch.bool, device=device)
        for d in range(2, depth + 1):
            allowed = torch.cat([causal] + [eye] * (d - 1), dim=1)  # [T, d * T]
            g = self.step(g, ids[(t + d).clamp(max=S - 1)], t + d - 1, cache, allowed)
            outs.append(g)
        return outs

    @torch.no_grad()
    def true_ranks(self, features: Tensor, ids: Tensor, positions: Tensor, depth: int, top_k: int = 10) -> Tensor:
        """Rank of each true token among the depth-d drafts, the path above it drafted right (calibration).

        features [S, W], ids [S], positions [T] -> LongTensor [T, depth]: [i, d - 1] is the rank of
        ids[t + 1 + d] at t = positions[i]; top_k where the drafting vocabulary lacks it; -1 past the end.
        """
        if ids.shape[0] < 3:
            return torch.full((positions.shape[0], depth), -1, dtype=torch.long, device=ids.device)
        return self.ranks_of(self.unroll(features.to(self.dtype), ids, depth), ids, positions, top_k)

    def ranks_of(self, outs: list[Tensor], ids: Tensor, positions: Tensor, top_k: int) -> Tensor:
        """`true_ranks` from an `unroll` already made: outs (one g_d [S - 1, H] per depth) -> [T, depth]."""
        S = ids.shape[0]
        ranks = torch.full((positions.shape[0], len(outs)), -1, dtype=torch.long, device=ids.device)
        column = self.column_of(ids)  # [S]: each token's draft-logit column, -1 if not draftable
        for d, g in enumerate(outs, start=1):
            valid = positions + d + 1 < S
            rows = positions[valid]
            logits = self.logits(g[rows]).float()  # [n, V']
            col = column[rows + d + 1]
            true = logits.gather(1, col.clamp(min=0)[:, None])  # [n, 1]
            rank = (logits > true).sum(1)
            ranks[valid, d - 1] = torch.where(col >= 0, rank, torch.full_like(rank, top_k))
        return ranks

    def column_of(self, ids: Tensor) -> Tensor:
        """ids [S] -> the draft-logit column of each token [S] (-1: not in the drafting vocabulary)."""
        draft = self.draft_ids
        if draft is None:
            return ids
        lookup = torch.full((int(max(int(ids.max()), int(draft.max()))) + 1,), -1, dtype=torch.long, device=ids.device)
        lookup[draft.to(ids.device)] = torch.arange(draft.shape[0], device=ids.device)
        return lookup[ids]

    # ------------------------------------------------------------------ published key layout

    def published_keys(self) -> dict[str, str]:
        """The reference's key -> this module's state_dict key."""
        prefix = "layers.0." if self.variant == "eagle" else "midlayer."
        keys = {f"{prefix}{name}": f"decoder.layers.0.{name}" for name in self.layer.state_dict()}
        keys.update({f"fc.{name}": f"fc.{name}" for name in self.fc.state_dict()})
        if self.variant == "eagle3":
            keys.update({"midlayer.hidden_norm.weight": "hidden_norm.weight", "norm.weight": "decoder.norm.weight",
                         "lm_head.weight": "lm_head.weight", "d2t": "d2t", "t2d": "t2d"})
        return keys

    def eagle_state_dict(self) -> dict[str, Tensor]:
        local = self.state_dict()
        return {published: local[own] for published, own in self.published_keys().items()}


# ====================================================================== building


def draft_base_config(base_config):
    """The base's text config with what building a draft reads (base depth and vocabulary) kept aside."""
    config = copy.deepcopy(text_config(base_config))
    config.num_hidden_layers_of_base = config.num_hidden_layers
    config.vocab_size_of_base = config.vocab_size
    return config


def new_eagle_heads(model: nn.Module, variant: str = "eagle", draft_vocab: Optional[Tensor] = None) -> EagleHeads:
    """Fresh heads fitted to a transformers CausalLM, ready to train.

    EAGLE-3's draft vocabulary `draft_vocab` [Vd] (base ids, any order) fixes d2t/t2d; its lm_head
    starts as those rows of the base lm_head, its norm as the base's final norm.
    """
    weight = io.output_weight(model, EagleHeads.kind)  # [V, H]
    config = draft_base_config(model.config)
    size = None if draft_vocab is None else int(draft_vocab.numel())
    if variant == "eagle3" and size is None:
        raise UserError("EAGLE-3 heads need a draft vocabulary to start from")
    heads = EagleHeads(config, variant, size, dtype=weight.dtype, device=weight.device)
    H = heads.hidden_size
    with torch.no_grad():
        # Start as the identity on the (last) feature, like a fresh Medusa head: fc passes it through and
        # the layer's residual branches start at zero, so depth 1 begins at lm_head(f_t) and learns from
        # there (a random start needs far more data than a CPU budget gives).
        heads.fc.weight.zero_()
        heads.fc.weight[:, -H:].copy_(torch.eye(H))
        if heads.fc.bias is not None:
            heads.fc.bias.zero_()
        heads.layer.self_attn.o_proj.weight.zero_()
        heads.layer.mlp.down_proj.weight.zero_()
    if variant == "eagle3":
        ids = torch.sort(draft_vocab.to(weight.device)).values
        with torch.no_grad():
            heads.d2t.copy_(ids - torch.arange(size, device=ids.device))
            heads.t2d.zero_()
            heads.t2d[ids] = True
            heads.lm_head.weight.copy_(weight[ids])
            base_norm = _final_norm(model)
            if base_norm is not None:
                heads.decoder.norm.load_state_dict(base_norm.state_dict())
    heads.attach_base(model)
    heads.base_model_name_or_path = io.model_name_of(model)
    return heads


def _final_norm(model: nn.Module) -> Optional[nn.Module]:
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    return getattr(body, "norm", None)


# ====================================================================== loading


def load_eagle_heads(path: str | Path, base_model: nn.Module) -> EagleHeads:
    """EAGLE-1/2 or EAGLE-3 heads from a folder (or a Hub id, or the weight file), fitted to `base_model`."""
    folder, head_file = _locate(path)
    config = io.read_config(folder)
    tensors = {re.sub(r"^model\.", "", k): v for k, v in io.load_tensors(head_file).items()}
    heads = from_eagle_state_dict(tensors, base_model.config, config, source=str(head_file))
    heads.base_model_name_or_path = config.get("base_model_name_or_path")
    heads.fit_to_base(base_model)
    return heads.eval()


def variant_of(tensors: dict[str, Tensor], source: str) -> str:
    if any(k.startswith("midlayer.") for k in tensors):
        return "eagle3"
    if any(k.startswith("layers.0.") for k in tensors):
        if any(re.match(r"layers\.[1-9]", k) for k in tensors):
            raise UserError(f"{source}: EAGLE heads with more than one layer are not supported")
        return "eagle"
    hint = " (a Hydra or Medusa checkpoint? use --hydra-heads / --medusa-heads)" if any("hydra" in k or k[:1].isdigit() for k in tensors) else ""
    raise UserError(f"{source} holds no EAGLE tensors (expected 'layers.0.*' or 'midlayer.*' keys){hint}")


def from_eagle_state_dict(tensors: dict[str, Tensor], base_config, config: dict, source: str = "the checkpoint") -> EagleHeads:
    """Heads from the reference's keys, built on the base's architecture; shapes checked with one clear line."""
    variant = variant_of(tensors, source)
    base = draft_base_config(base_config)
    fc = tensors.get("fc.weight")
    if fc is None:
        raise UserError(f"{source}: missing tensor 'fc.weight'; the file is incomplete")
    H = base.hidden_size
    if fc.shape[0] != H:
        raise UserError(f"{source}: the EAGLE heads have hidden size {fc.shape[0]} but the base model has {H}; "
                        "pass EAGLE heads trained for this model")
    draft_vocab = feature_layers = None
    if variant == "eagle3":
        if "lm_head.weight" not in tensors or "d2t" not in tensors:
            raise UserError(f"{source}: EAGLE-3 heads need 'lm_head.weight' and 'd2t'; the file is incomplete")
        draft_vocab = tensors["lm_head.weight"].shape[0]
        if "t2d" in tensors and tensors["t2d"].shape[0] != base.vocab_size:
            raise UserError(f"{source}: the EAGLE-3 heads map onto a vocabulary of {tensors['t2d'].shape[0]} tokens "
                            f"but the base model has {base.vocab_size}; pass EAGLE heads trained for this model")
        layers = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids") or config.get("feature_layers")
        feature_layers = tuple(layers) if layers else None
        if fc.shape[1] % H or (feature_layers and fc.shape[1] != len(feature_layers) * H):
            raise UserError(f"{source}: fc.weight {tuple(fc.shape)} does not fuse {len(feature_layers or (0,) * 3)} "
                            f"features of size {H}")
        if feature_layers is None:
            if fc.shape[1] != 3 * H:
                raise UserError(f"{source}: fc.weight reads {fc.shape[1] // H} features; name them in config.json "
                                "(eagle_config.eagle_aux_hidden_state_layer_ids)")
    elif fc.shape[1] != 2 * H:
        raise UserError(f"{source}: fc.weight {tuple(fc.shape)} should read [embedding, feature] = {2 * H} wide")
    overrides = {k: config.get(k) for k in CONFIG_OVERRIDES}
    gate = tensors.get(("layers.0." if variant == "eagle" else "midlayer.") + "mlp.gate_proj.weight")
    if overrides["intermediate_size"] is None and gate is not None:  # no config.json: the weights say it
        overrides["intermediate_size"] = gate.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        heads = EagleHeads(base, variant, draft_vocab, feature_layers, overrides, fc_bias="fc.bias" in tensors,
                           dtype=fc.dtype)
    wanted = {k: v.shape for k, v in heads.eagle_state_dict().items()}
    missing = sorted(set(wanted) - set(tensors))
    if variant == "eagle3" and missing == ["t2d"]:  # some exports drop t2d: it follows from d2t
        missing = []
        tensors = {**tensors, "t2d": _t2d_from(tensors["d2t"], base.vocab_size)}
    if missing:
        raise UserError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing); the file is incomplete "
                        "or made for another architecture")
    for key, shape in wanted.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise UserError(f"{source}: tensor {key!r} has shape {tuple(tensors[key].shape)}, expected {tuple(shape)} "
                            "for the base model's layer; pass EAGLE heads trained for this model")
    extra = [k for k in tensors if k not in wanted and k != "embed_tokens.weight"]
    if extra:
        warnings.warn(f"{source}: ignoring {len(extra)} unexpected tensors, e.g. {extra[0]!r}", stacklevel=3)
    local = {own: tensors[published].to(torch.long if own == "d2t" else torch.bool if own == "t2d" else fc.dtype)
             for published, own in heads.published_keys().items()}
    stub = heads.decoder.get_input_embeddings().weight
    local[f"decoder.{embedding_name(heads.decoder)}"] = stub.detach()
    heads.load_state_dict(local, strict=True)
    heads.source = source
    return heads


def _t2d_from(d2t: Tensor, vocab: int) -> Tensor:
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[torch.arange(d2t.shape[0]) + d2t] = True
    return t2d


# ====================================================================== saving


def save_eagle_heads(heads: EagleHeads, folder: str | Path, base_model_name_or_path: Optional[str] = None,
                     dtype: Optional[torch.dtype] = None, **extra_config) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the reference layout; returns the weight file."""
    folder = Path(folder)
    tensors = heads.eagle_state_dict()
    if dtype is not None:
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    folder.mkdir(parents=True, exist_ok=True)
    for stale in HEAD_FILES[1:]:
        (folder / stale).unlink(missing_ok=True)
    io.save_tensors(folder / HEAD_FILES[0], tensors)
    layer_config = heads.decoder.config
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": getattr(layer_config, "model_type", None),
        "eagle_variant": heads.variant,
        "hidden_size": heads.hidden_size,
        "intermediate_size": getattr(layer_config, "intermediate_size", None),
        "num_attention_heads": getattr(layer_config, "num_attention_heads", None),
        "num_key_value_heads": getattr(layer_config, "num_key_value_heads", None),
        "head_dim": getattr(layer_config, "head_dim", None),
        "rms_norm_eps": getattr(layer_config, "rms_norm_eps", None),
        "num_hidden_layers": 1,
        "bias": heads.fc.bias is not None,
        "vocab_size": getattr(layer_config, "vocab_size_of_base", None),
        "base_model_name_or_path": base_model_name_or_path or heads.base_model_name_or_path,
        "medusa_bench_version": __version__,
        **extra_config,
    }
    if heads.variant == "eagle3":
        config.update(draft_vocab_size=heads.lm_head.out_features, target_hidden_size=heads.hidden_size,
                      eagle_config={"eagle_aux_hidden_state_layer_ids": list(heads.feature_layers)})
    io.write_json(folder / "config.json", {k: v for k, v in config.items() if v is not None})
    return folder / HEAD_FILES[0]


def _locate(path: str | Path) -> tuple[Path, Path]:
    folder, head_file = locate(path, HEAD_FILES, ["config.json", "pytorch_model.bin", "model.safetensors"])
    if head_file is None:
        raise UserError(f"{folder} has no EAGLE heads: looked for {', '.join(HEAD_FILES)}; "
                        "pass an EAGLE heads folder, or train some with `medusa-bench train eagle`")
    return folder, head_file
