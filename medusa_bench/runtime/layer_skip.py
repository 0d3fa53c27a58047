"""A draft model that is the base model with layers skipped, or another model: its forward and its KV cache.

- `skipping(model, layers)`: while inside, the chosen decoder layers return their input
  unchanged (an instance `forward` that hands back the hidden states, in the shape the layer's
  own forward returns: a tensor in transformers 5, a tuple before); the weights are the base
  model's, nothing is copied. `check_skippable` proves once per model that a layer's output has
  its input's shape (a residual stream) and says in one line when it has not.
- `DraftRunner`: the draft's own `SlotCache` (only the layers it runs allocate buffers) and the
  token ids in it. `catch_up(sequence)` crops the cache to the longest prefix it shares with
  `sequence` and feeds the rest (the tokens the last verify step accepted, then the new root);
  `feed` appends draft tokens (a chain's next token, or a tree level under its own mask). With
  `captured=True` (the base runs CUDA graphs) plain chain feeds replay graphs recorded per cache
  and shape with the layers skipped (runtime/engine.py), tree levels stay eager.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Optional, Sequence

import torch

from medusa_bench.errors import UserError
from medusa_bench.models import text_config
from medusa_bench.runtime.cache import SlotCache
from medusa_bench.runtime.engine import Engine, static_refusal
from medusa_bench.runtime.forward import body_and_layers, forward

_OUTPUT_KIND: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> ("tensor" | "tuple", tuple length)


# ------------------------------------------------------------------------------ skipping layers
def check_skippable(model) -> tuple[str, int]:
    """How the model's decoder layers return their output: ("tensor", 1) or ("tuple", n).

    One 1-token forward with a hook on the first layer, once per model. A layer whose output is
    not a hidden state of its input's shape cannot be skipped: one line says so.
    """
    if model in _OUTPUT_KIND:
        return _OUTPUT_KIND[model]
    refusal = static_refusal(model)
    if refusal:
        raise UserError(f"sps drafts with a cache every layer reads whole, which this model cannot use ({refusal}); "
                        "use another decoder")
    _, layers = body_and_layers(model)
    seen: dict = {}

    def hook(module, args, kwargs, out):
        seen["input"] = args[0] if args else kwargs.get("hidden_states")
        seen["output"] = out

    handle = layers[0].register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=next(model.parameters()).device), use_cache=False)
    finally:
        handle.remove()
    given, out = seen.get("input"), seen.get("output")
    if isinstance(out, torch.Tensor) and isinstance(given, torch.Tensor) and out.shape == given.shape:
        kind = ("tensor", 1)
    elif isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and given is not None and out[0].shape == given.shape:
        kind = ("tuple", len(out))
    else:
        raise UserError(f"cannot skip layers of {type(model).__name__}: its decoder layers do not map hidden states "
                        "to hidden states of the same shape; pass --draft-model PATH instead")
    _OUTPUT_KIND[model] = kind
    return kind


@contextlib.contextmanager
def skipping(model, layers: Sequence[int]):
    """Within: decoder layers `layers` (0-based) return their input hidden states unchanged."""
    if not layers:
        yield
        return
    kind, length = check_skippable(model)
    _, modules = body_and_layers(model)

    def identity(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden if kind == "tensor" else (hidden,) + (None,) * (length - 1)

    patched = [modules[i] for i in layers]
    before = [module.__dict__.get("forward") for module in patched]  # an instance forward already there (accelerate's hooks)
    for module in patched:
        module.forward = identity  # an instance attribute: nn.Module.__call__ finds it before the class's
    try:
        yield
    finally:
        for module, own in zip(patched, before):
            if own is None:
                del module.forward
            else:
                module.forward = own


def check_layers(model, layers: Sequence[int]) -> tuple[int, ...]:
    """The layer indices sorted and checked against the model: one line for a bad set."""
    count = text_config(model.config).num_hidden_layers
    bad = [i for i in layers if not 0 <= i < count]
    if bad:
        raise UserError(f"--sps-skip {','.join(map(str, layers))}: layers are 0 … {count - 1}, got {bad[0]}")
    if len(set(layers)) >= count:
        raise UserError(f"--sps-skip names every one of the {count} layers: keep at least one")
    return tuple(sorted(set(layers)))


# ------------------------------------------------------------------------------ the draft's forward
class DraftRunner:
    """A draft model's forward (`model` with `skip` layers skipped) over its own KV cache of known tokens."""

    def __init__(self, model, skip: Sequence[int] = (), device: Optional[torch.device] = None, captured: bool = False):
        self.model = model
        self.skip = tuple(skip)
        self.device = device or next(model.parameters()).device
        check_skippable(model)  # also refuses models the static cache cannot serve
        self.num_layers = text_config(model.config).num_hidden_layers
        # captured chain steps: graphs recorded per (q, cache) with the skip in force, replayed as such
        self.engine = Engine(model, self.device, "static", "cuda-graphs") if captured else None
        self.cache: Optional[SlotCache] = None
        self.tokens: list[int] = []  # ids whose keys/values the cache holds, in order
        self.stable = 0  # the first `stable` cached tokens are known to match the context

    @property
    def length(self) -> int:
        return len(self.tokens)

    def reset(self, capacity: int) -> None:
        """A new generation: an empty cache with room for `capacity` tokens (it grows when short)."""
        if self.cache is None or self.cache.capacity < capacity:
            if self.engine is not None:
                self.cache = self.engine.new_cache(capacity)
                self.engine.claim(self.cache, self)
            else:
                self.cache = SlotCache(self.num_layers, capacity)
            self.cache.uniform = False  # per-layer buffers: skipped layers never allocate theirs
        self.cache.crop(0)
        self.tokens, self.stable = [], 0

    def rewind(self, length: int) -> None:
        self.stable = min(self.stable, length)

    def crop(self, length: int) -> None:
        self.cache.crop(length)
        del self.tokens[length:]
        self.stable = min(self.stable, length)

    def catch_up(self, sequence: list[int]) -> torch.Tensor:
        """Logits [V] after `sequence` (the context + the root): only what the cache lacks is fed."""
        common = min(self.length, len(sequence) - 1)  # the last token is always fed: its logits are wanted
        for i in range(self.stable, common):
            if self.tokens[i] != sequence[i]:
                common = i
                break
        self.crop(common)
        logits = self.feed(sequence[common:], last_only=True)[0]
        self.stable = len(sequence)
        return logits

    def feed(self, tokens: list[int], positions: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
             last_only: bool = False) -> torch.Tensor:
        """Append `tokens` (positions: the next ones, or `positions` [q] for tree nodes, with `mask`
        [1, 1, q, length + q] additive); logits [q, V] ([1, V] with last_only)."""
        start, q = self.length, len(tokens)
        ids = torch.tensor([tokens], device=self.device)  # [1, q]
        positions = (torch.arange(start, start + q, device=self.device) if positions is None else positions)[None]  # [1, q]
        with skipping(self.model, self.skip):
            if self.engine is not None and mask is None and start > 0:
                logits, _ = self.engine.forward(ids, self.cache, positions, None, (), last_only)
            else:
                logits, _ = forward(self.model, ids, self.cache, positions, mask, False, last_only)
        self.tokens.extend(tokens)
        return logits
