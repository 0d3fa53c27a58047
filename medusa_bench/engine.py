"""How a base forward runs under the verify loop: which KV cache, and whether steps are captured.

Two choices, made once per loaded model (`use_engine`) so that the baseline and every
speculative decoder of a run share them (a speedup then compares methods, not engines):

- **cache** `static` (default where the model allows it): `SlotCache`, a transformers `Cache`
  whose layers are buffers allocated once per generation for prompt + max_new_tokens + a
  step's tree (the gpt-fast idea). A forward writes its keys/values at slots length…length+q-1;
  keeping a step's accepted path is an in-place gather of at most depth+1 slots; nothing is
  concatenated or reallocated per step. `dynamic`: transformers' DynamicCache, whose every step
  concatenates onto each layer's keys (cost grows with the context). Models with sliding-window
  or chunked layers use `dynamic` (their tree masks are per layer type, see decoders/spec.py).
- **compile** `on` (CUDA): each distinct step shape (q tokens, hidden layers asked for) is
  captured once as a CUDA graph over a static cache whose whole buffer attention reads; its
  inputs are the tokens, the first slot and a tree's mask block, and positions, write slots and
  the mask are computed in the graph; the prefill stays eager. On CPU `on` compiles the same
  static-shape step with torch.compile instead (one compile per shape and cache). `off`: eager.
  `auto`: captured on CUDA, eager on CPU (compiling measured 1.05x there: README, "The engine").
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

from medusa_bench.errors import UserError
from medusa_bench.models import text_config

CACHE_KINDS = ("auto", "static", "dynamic")
COMPILE_MODES = ("auto", "on", "off")
MAX_CAPTURED_TOKENS = 256  # longer forwards (prefills) stay eager: one graph per prompt length would not pay


# ------------------------------------------------------------------------------ the static cache
class SlotLayer(CacheLayerMixin):
    """One layer's keys and values: [1, kv_heads, capacity, head_dim] buffers, allocated at the first write.

    Where every layer has one shape they are views into one `SlotCache.storage` tensor, so that
    keeping a step's accepted path is one gather for all layers, not two per layer (on the H200's
    host each launch costs tens of µs: 30 layers × 4 launches were a whole forward's time).
    """

    is_compileable = True
    is_sliding = False

    def __init__(self, cache: "SlotCache", index: int):
        super().__init__()
        self.cache, self.index = cache, index
        self.shared = False  # keys/values are views into cache.storage

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        cache = self.cache
        shape = (*key_states.shape[:2], cache.capacity, key_states.shape[-1])  # [batch, kv_heads, capacity, head_dim]
        if cache.storage is None and cache.uniform and key_states.shape == value_states.shape:
            cache.storage = cache.make((len(cache.layers), 2, *shape), key_states)
        storage = cache.storage
        self.shared = storage is not None and storage.shape[2:] == shape and storage.dtype == key_states.dtype
        if self.shared:
            self.keys, self.values = storage[self.index, 0], storage[self.index, 1]
        else:  # a layer of another shape: its own buffers, and per-layer gathers from now on
            cache.uniform = False
            self.keys = cache.make(shape, key_states)
            self.values = cache.make((*shape[:-1], value_states.shape[-1]), value_states)
        self.is_initialized = True

    def grow(self, capacity: int) -> None:
        """Own buffers only (shared storage grows in SlotCache.reserve)."""
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = self.cache.make((*old.shape[:2], capacity, old.shape[-1]), old)
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cache = self.cache
        if cache.whole:  # captured: static shapes; slots and mask are the graph's inputs
            self.keys.index_copy_(2, cache.slots, key_states)
            self.values.index_copy_(2, cache.slots, value_states)
            return self.keys, self.values
        end = cache.start + key_states.shape[-2]
        self.keys[:, :, cache.start:end] = key_states  # [1, kv_heads, q, head_dim]
        self.values[:, :, cache.start:end] = value_states
        return self.keys[:, :, :end], self.values[:, :, :end]  # views: what a DynamicCache would hold

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # transformers 4.5x passes cache_position [q], 5.x the query length
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return (self.cache.capacity if self.cache.whole else self.cache.start + q), 0

    def get_seq_length(self) -> int:
        return self.cache.start

    def get_max_length(self) -> int:
        return self.cache.capacity

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("SlotCache is cut back with crop_cache / keep_in_cache (decoders/spec.py)")


class SlotCache(Cache):
    """A position-indexed KV cache that never reallocates: `length` slots hold the context.

    `forward` (decoders/spec.py) sets `start = length` before a model call and advances `length`
    after it; `keep` and `crop` rewrite `length` (and gather the kept slots), as `crop_cache` and
    `keep_in_cache` do to a DynamicCache.
    """

    def __init__(self, num_layers: int, capacity: int, zeroed: bool = False):
        self.capacity = capacity
        self.zeroed = zeroed  # buffers start as zeros (a captured step reads every slot)
        self.length = 0  # valid slots: the context
        self.start = 0  # first slot of the forward in progress (= length between forwards)
        self.whole = False  # attention reads every slot (captured steps); else slots 0 … start+q-1
        self.slots: Optional[torch.Tensor] = None  # [q] long: where a captured forward writes
        self.graphs: Optional[dict] = None  # captured mode: recorded steps over this cache, by shape
        self.owner = lambda: None  # weakref to the DecodeState using this cache (Engine.claim)
        self.storage: Optional[torch.Tensor] = None  # [layers, 2, batch, kv_heads, capacity, head_dim]
        self.uniform = True  # every layer's buffers are views into `storage`
        super().__init__(layers=[SlotLayer(self, i) for i in range(num_layers)])

    def make(self, shape, like: torch.Tensor) -> torch.Tensor:
        # empty, not zeros: eager forwards read only written slots; a captured one masks the rest,
        # and a masked slot must hold finite numbers (0 × NaN would poison the sum), hence zeros there
        return (torch.zeros if self.zeroed else torch.empty)(shape, dtype=like.dtype, device=like.device)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start

    def keep(self, start: int, keep: torch.Tensor, contiguous: bool) -> None:
        """Keep slots start+keep (sorted, keep[0] == 0) as start … start+m-1."""
        if not contiguous:
            index = keep + start  # [m]
            end = start + keep.numel()
            if self.uniform and self.storage is not None:  # every layer at once: [layers, 2, batch, heads, m, dim]
                self.storage[:, :, :, :, start:end] = self.storage.index_select(4, index)
            else:
                for layer in self.layers:
                    if layer.is_initialized:
                        layer.keys[:, :, start:end] = layer.keys.index_select(2, index)
                        layer.values[:, :, start:end] = layer.values.index_select(2, index)
        self.length = self.start = start + keep.numel()

    def crop(self, length: int) -> None:
        self.length = self.start = min(self.length, length)

    def reserve(self, need: int) -> None:
        """Room for `need` slots: reallocate (doubling) and copy when short; addresses then change."""
        if need <= self.capacity:
            return
        old, self.capacity = self.capacity, max(need, 2 * self.capacity)
        if self.graphs:
            self.graphs.clear()  # recorded steps hold the old buffers' addresses
        if self.storage is not None:
            storage, self.storage = self.storage, self.make((*self.storage.shape[:4], self.capacity, self.storage.shape[-1]), self.storage)
            self.storage[:, :, :, :, :old] = storage
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            if layer.shared:
                layer.keys, layer.values = self.storage[layer.index, 0], self.storage[layer.index, 1]
            else:
                layer.grow(self.capacity)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def static_refusal(model) -> Optional[str]:
    """Why this model cannot use SlotCache (None: it can)."""
    from medusa_bench.decoders.spec import attention_layout

    try:
        layout = attention_layout(model.config)
    except UserError as error:
        return str(error)
    if layout is not None:
        return "sliding-window or chunked attention layers: their tree masks need a cache that keeps per-layer-type views"
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    return None


# ------------------------------------------------------------------------------ captured steps
class CapturedStep:
    """One step shape (q tokens, hidden layers, last_only) recorded as a CUDA graph over `cache`.

    Inputs per replay: the tokens, the first slot (`start`, a 0-d tensor) and, for a tree, its
    depths and its [q, q] block of the mask. Positions, write slots and the whole [q, capacity]
    mask are computed inside the graph from them, so a plain step launches two copies and the
    replay (on the H200's host each launch costs tens of µs: see docs/results/gpu-nvidia-h200.md).
    """

    def __init__(self, model, cache: SlotCache, input_ids, positions, mask, hidden_layers, last_only, pool, mode="cuda-graphs"):
        from medusa_bench.decoders.spec import model_call

        device, q, dtype = input_ids.device, input_ids.shape[1], model.dtype
        self.q, self.low = q, torch.finfo(dtype).min
        self.ids = input_ids.clone()  # [1, q]
        self.start = torch.zeros((), dtype=torch.long, device=device)  # first slot of this step
        self.offsets = torch.arange(q, device=device)  # [q]
        self.depths = self.offsets.clone()  # [q] position - start (a chain: 0 … q-1)
        self.causal = torch.full((q, q), self.low, dtype=dtype, device=device).triu_(1)  # [q, q] additive
        self.block = self.causal.clone()  # [q, q] the mask among the new tokens
        self.columns = torch.arange(cache.capacity, device=device)  # [capacity]
        self.tree = False  # the block and depths hold a tree's (else the causal chain's)
        self.fill(cache, input_ids, positions, mask)

        def call():
            relative = self.columns - self.start  # [capacity]: slot - start
            block = self.block.index_select(1, relative.clamp(0, q - 1))  # [q, capacity]
            mask = torch.where(relative < 0, 0.0, torch.where(relative < q, block, self.low))  # prefix | step | unused
            cache.whole, cache.slots = True, self.start + self.offsets  # [q] write slots
            try:
                return model_call(model, self.ids, cache, (self.start + self.depths)[None], mask[None, None].to(dtype),
                                  hidden_layers, last_only)
            finally:
                cache.whole, cache.slots = False, None

        self.call, self.graph = call, None
        if mode == "torch-compile":  # CPU: one compiled graph per shape and cache (recompiles are seconds each)
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self.call = torch.compile(call, dynamic=False)
            return
        if device.type != "cuda":  # no graphs: each run calls again with the same static shapes (tests use this on CPU)
            return
        # warm-up on a side stream (cuBLAS workspaces, lazy inits), then record; both rewrite the
        # same slots with the same inputs, so the cache ends as one forward would leave it
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                call()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits, self.hidden = call()

    def fill(self, cache: SlotCache, input_ids, positions, mask) -> None:
        start = cache.length
        self.ids.copy_(input_ids)
        self.start.fill_(start)
        if mask is not None:  # a tree: [1, 1, q, start + q] additive; its last q columns are the block
            self.block.copy_(mask[0, 0, :, start:])
            torch.sub(positions[0], start, out=self.depths)
            self.tree = True
        elif self.tree:  # back to a chain
            self.block.copy_(self.causal)
            self.depths.copy_(self.offsets)
            self.tree = False

    def run(self, cache: SlotCache, input_ids, positions, mask):
        self.fill(cache, input_ids, positions, mask)
        if self.graph is None:
            self.logits, self.hidden = self.call()
        else:
            self.graph.replay()
        cache.length = cache.start = cache.length + self.q
        # copies: the next replay overwrites the graph's outputs, but callers keep rows (next logits)
        return self.logits.clone(), (self.hidden.clone() if self.hidden is not None else None)


# ------------------------------------------------------------------------------ the engine
@dataclass
class Engine:
    """The cache kind and capture mode of one loaded model (see the module docstring)."""

    model: torch.nn.Module
    device: torch.device
    cache: str = "static"  # static | dynamic (resolved)
    compile: str = "off"  # off | cuda-graphs | torch-compile (resolved)
    reason: str = ""  # why, when the resolved choice differs from what was asked

    def __post_init__(self):
        self.num_layers = text_config(self.model.config).num_hidden_layers
        self.caches: list[SlotCache] = []  # captured mode: caches kept with their graphs, reused when free
        self.pool = None  # CUDA graph memory pool shared by every recorded step

    def like(self, model) -> "Engine":
        """The same choices for another model (a Medusa-2 backbone beside the run's model)."""
        return resolve(model, self.device, self.cache, "off" if self.compile == "off" else "on")

    def describe(self) -> dict:
        return {"cache": self.cache, "compile": self.compile, **({"reason": self.reason} if self.reason else {})}

    def new_cache(self, tokens: int, draft: int = 0):
        """A cache for one generation: `tokens` (prompt + new tokens) plus a step of `draft` drafts.

        It grows, copying, if more come. Captured steps attend over the whole buffer, so its size
        shapes the rounding of attention sums: it depends on `tokens` alone (rounded up to 256,
        plus 256 slots for any tree up to that size), never on the decoder, so that the baseline
        and a tree decoder answering the same prompt use the same buffer size.
        """
        if self.cache == "dynamic":
            return DynamicCache()  # no config: full layers for every layer type (spec.full_layers)
        if self.compile == "off":
            return SlotCache(self.num_layers, tokens + draft + 1)
        # Captured steps hold a cache's addresses, so caches are kept (with their recorded steps)
        # and handed out again once the state using them is gone.
        capacity = round_up(tokens, 256) + max(256, round_up(draft + 1, 256))
        cache = next((c for c in self.caches if c.owner() is None and c.capacity == capacity), None)
        if cache is None:
            free = [c for c in self.caches if c.owner() is None]
            if len(free) >= 4:  # keep a few sizes, not every one ever asked for
                self.caches.remove(free[0])
            cache = SlotCache(self.num_layers, capacity, zeroed=True)
            cache.graphs = {}
            self.caches.append(cache)
        cache.length = cache.start = 0
        return cache

    def claim(self, cache, state) -> None:
        """`state` uses `cache` until it is garbage (captured mode hands the cache out again after that)."""
        if isinstance(cache, SlotCache):
            cache.owner = weakref.ref(state)

    def forward(self, input_ids, cache, positions, mask, hidden_layers, last_only: bool = False):
        """spec.forward, replayed from a recorded graph where this cache has them and the shape allows."""
        from medusa_bench.decoders.spec import forward

        q = input_ids.shape[1]
        graphs = getattr(cache, "graphs", None)
        if (graphs is None or q > MAX_CAPTURED_TOKENS or isinstance(mask, dict)
                or cache.length == 0 or cache.length + q > cache.capacity):  # prefill, or growing: eager
            return forward(self.model, input_ids, cache, positions, mask, hidden_layers, last_only)
        key = (q, tuple(hidden_layers or ()), last_only)
        step = graphs.get(key)
        if step is None:
            if self.pool is None and self.device.type == "cuda":
                self.pool = torch.cuda.graph_pool_handle()
            step = graphs[key] = CapturedStep(self.model, cache, input_ids, positions, mask, hidden_layers, last_only,
                                              self.pool, self.compile)
        return step.run(cache, input_ids, positions, mask)


def check_options(cache: str, compile: str) -> None:
    """One line for a bad --cache / --compile, before anything slow happens."""
    if cache not in CACHE_KINDS:
        raise UserError(f"unknown --cache {cache!r}; valid values are: {', '.join(CACHE_KINDS)}")
    if compile not in COMPILE_MODES:
        raise UserError(f"unknown --compile {compile!r}; valid values are: {', '.join(COMPILE_MODES)}")


def resolve(model, device: torch.device, cache: str = "auto", compile: str = "auto") -> Engine:
    """The engine asked for, or the nearest one this model and device allow (with the reason)."""
    check_options(cache, compile)
    reasons = []
    refusal = static_refusal(model) if cache != "dynamic" else None
    if cache == "static" and refusal:
        raise UserError(f"--cache static is not possible for this model ({refusal}); use --cache auto or dynamic")
    kind = "dynamic" if cache == "dynamic" or refusal else "static"
    if refusal:
        reasons.append(f"dynamic cache: {refusal}")
    mode = "off"
    if compile in ("on", "auto") and device.type == "cuda":
        if kind == "static":
            mode = "cuda-graphs"
        elif compile == "on":
            raise UserError("--compile on needs the static cache, which this model cannot use; use --compile off")
        else:
            reasons.append("eager: captured steps need the static cache")
    elif compile == "on":  # CPU: torch.compile over the same static shapes
        if kind != "static":
            raise UserError("--compile on needs the static cache, which this model cannot use; use --compile off")
        mode = "torch-compile"
    elif compile == "auto" and device.type != "cuda":
        reasons.append("eager on CPU")  # torch.compile measured 1.05x here, at tens of seconds per step shape: README
    return Engine(model, device, kind, mode, "; ".join(reasons))


def use_engine(loaded, cache: str = "auto", compile: str = "auto") -> Engine:
    """Set the engine every decoder built on `loaded` from now on uses."""
    loaded.engine = resolve(loaded.model, loaded.device, cache, compile)
    return loaded.engine


def engine_of(loaded) -> Engine:
    """The loaded model's engine: static cache where possible, eager unless `use_engine` said otherwise."""
    if getattr(loaded, "engine", None) is None:
        loaded.engine = resolve(loaded.model, loaded.device, "auto", "off")
    return loaded.engine
