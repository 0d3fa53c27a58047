"""How one base forward runs: the model call, the hidden states read on the way, the tree mask.

- `forward` appends q tokens to a cache (a DynamicCache, or the engine's SlotCache whose slots
  it advances); `model_call` is the model's own forward with no cache bookkeeping (what a
  captured step records, runtime/engine.py). Logits are the model's own (softcapping included).
- Hidden states come from forward hooks on the decoder body and its layers (`body_and_layers`),
  indexed as transformers' `hidden_states`, never `output_hidden_states`.
- A user-supplied 4-D mask replaces the model's own: `attention_layout` says which local limits
  (sliding windows, chunks) each layer type has, and `tree_mask` copies them into the tree mask.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional, Union

import torch

from medusa_bench.errors import UserError
from medusa_bench.models import cache_kwargs, text_config
from medusa_bench.runtime.cache import SlotCache
from medusa_bench.trees.tree import TreeBuffers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)



# ------------------------------------------------------------------------------ attention layout
FULL, SLIDING, CHUNKED = "full_attention", "sliding_attention", "chunked_attention"


@dataclass(frozen=True)
class AttentionLayout:
    """What the model's attention layers see beyond causality, so that the tree mask can copy it.

    A user-supplied 4-D mask replaces the model's own, sliding window included: the tree mask must
    restrict each layer type the way transformers' mask functions would for a plain forward.
    """

    limits: dict  # layer type -> (window, chunk), None where that layer type has no such limit
    per_type: bool  # mixed layer types: pass {layer type: mask} (transformers 5 models read such a dict)

    def bites(self, last_position: int) -> bool:
        """Does any limit hide a key from a query at `last_position` (the deepest tree node)?"""
        return any(chunk is not None or (window is not None and last_position >= window)
                   for window, chunk in self.limits.values())


def attention_layout(config) -> Optional[AttentionLayout]:
    """The model's local-attention limits, or None when every layer sees the whole prefix (the plain path)."""
    text = text_config(config)
    window = getattr(text, "sliding_window", None) or None
    chunk = getattr(text, "attention_chunk_size", None) or None
    types = getattr(text, "layer_types", None)
    if not isinstance(types, (list, tuple)):  # one kind of layer (Mistral, Phi3: windowed when sliding_window is set)
        return AttentionLayout({FULL: (window, None)}, per_type=False) if window else None
    unknown = sorted(set(types) - {FULL, SLIDING, CHUNKED})
    if unknown:  # recurrent state cannot be cut back to the accepted path like a KV cache
        raise UserError(f"tree verification needs attention layers but this model has {', '.join(unknown)} layers; use the baseline decoder")
    limits = {kind: (window if kind == SLIDING else None, chunk if kind == CHUNKED else None) for kind in dict.fromkeys(types)}
    if all(limit == (None, None) for limit in limits.values()):
        return None
    return AttentionLayout(limits, per_type=len(limits) > 1)


def tree_mask(buffers: TreeBuffers, prefix: int, dtype: torch.dtype, layout: Optional[AttentionLayout]):
    """The verify forward's mask: one [1, 1, n, prefix + n] additive mask, or {layer type: mask}."""
    if layout is None or not layout.bites(prefix + buffers.max_depth):
        return buffers.additive_mask(prefix, dtype)  # no limit reaches into the tree's view: every layer alike
    masks = {kind: buffers.additive_mask(prefix, dtype) if limit == (None, None)
             else buffers.local_mask(prefix, dtype, *limit) for kind, limit in layout.limits.items()}
    return masks if layout.per_type else next(iter(masks.values()))


# ------------------------------------------------------------------------------ model calls
Hidden = Union[bool, tuple]  # False: none; True: the final normed state; or transformers' hidden_states indices


def forward(model, input_ids: torch.Tensor, cache, position_ids: torch.Tensor, mask: Optional[torch.Tensor],
            want_hidden: Hidden, last_only: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One base forward appending to `cache` (a DynamicCache or the engine's SlotCache). Returns
    logits [q, V] ([1, V] with last_only) and hidden states: [q, H] post-norm for
    `want_hidden=True`, [q, k * H] for k layer indices, else None.
    """
    if not isinstance(cache, SlotCache):
        return model_call(model, input_ids, cache, position_ids, mask, want_hidden, last_only)
    logits, hidden = forward_rows(model, input_ids, cache, position_ids, mask, want_hidden, last_only)
    return logits[0], (hidden[0] if hidden is not None else None)


def forward_rows(model, input_ids: torch.Tensor, cache: SlotCache, positions: torch.Tensor, mask,
                 want_hidden: Hidden, last_only: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One base forward of q tokens per row, written at the SlotCache's next q slots (every row's):
    logits [B, q, V] ([B, 1, V] with last_only), hidden [B, q, k * H] or None."""
    q = input_ids.shape[1]
    cache.reserve(cache.length + q)
    cache.start = cache.length
    out = batched_call(model, input_ids, cache, positions, mask, want_hidden, last_only)
    cache.length = cache.start = cache.start + q
    return out


def model_call(model, input_ids: torch.Tensor, cache, position_ids: torch.Tensor, mask, want_hidden: Hidden,
               last_only: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The model's forward as `forward` describes it, with no cache bookkeeping (a captured step records this)."""
    logits, hidden = batched_call(model, input_ids, cache, position_ids, mask, want_hidden, last_only)
    return logits[0], (hidden[0] if hidden is not None else None)


def batched_call(model, input_ids: torch.Tensor, cache, position_ids: torch.Tensor, mask, want_hidden: Hidden,
                 last_only: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The model's forward over B rows: logits [B, q, V] ([B, 1, V] with last_only), hidden [B, q, k * H] or None.

    Hidden states come from forward hooks on the layers asked for, never `output_hidden_states`,
    which keeps every layer's [B, q, H] output (SmolLM2: 31 of them) to hand back one.
    """
    layers = (-1,) if want_hidden is True else tuple(want_hidden or ())
    captured: list = [None] * len(layers)
    handles = [_hook(model, index, captured, slot) for slot, index in enumerate(layers)]
    try:
        out = model(
            input_ids=input_ids,  # [B, q]
            position_ids=position_ids,  # [B, q]
            attention_mask=mask,  # None (causal), [B, 1, q, past + q] additive, or {layer type: such a mask}
            **cache_kwargs(model, cache),
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
        )
    finally:
        for handle in handles:
            handle.remove()
    if not layers:
        return out.logits, None
    return out.logits, captured[0] if len(captured) == 1 else torch.cat(captured, dim=-1)


_BODIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def body_and_layers(model) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """The decoder body (whose output is the final normed hidden state) and its decoder layers.

    `get_decoder()`/`base_model` miss some (Llama4ForCausalLM answers itself), so: the module
    holding the ModuleList of `num_hidden_layers` layers (LlamaModel.layers, GPT2Model.h, …).
    """
    if model not in _BODIES:
        config = text_config(model.config)
        count = getattr(config, "num_hidden_layers", None)
        for module in model.modules():
            layers = next((c for c in module.children() if isinstance(c, torch.nn.ModuleList) and len(c) == count), None)
            if layers is not None:
                _BODIES[model] = (module, layers)
                break
        else:
            raise UserError(f"cannot find the decoder layers of {type(model).__name__} to read its hidden states")
    return _BODIES[model]


def _hook(model, index: int, captured: list, slot: int):
    """A forward hook storing hidden_states[index] ([B, q, H]) into captured[slot]."""
    body, layers = body_and_layers(model)
    index = index + len(layers) + 1 if index < 0 else index
    if not 0 <= index <= len(layers):
        raise UserError(f"hidden state {index} asked for, but the model has {len(layers)} layers (0 … {len(layers)})")

    def output(module, args, out):
        captured[slot] = out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out

    def embeddings(module, args, kwargs):
        captured[slot] = args[0] if args else kwargs["hidden_states"]

    if index == len(layers):  # the body's output: after the final norm, as transformers' hidden_states[-1]
        return body.register_forward_hook(output)
    if index == 0:  # the first layer's input: the (scaled) embeddings
        return layers[0].register_forward_pre_hook(embeddings, with_kwargs=True)
    return layers[index - 1].register_forward_hook(output)
