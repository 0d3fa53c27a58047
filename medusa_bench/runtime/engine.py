"""How a base forward runs under the verify loop: which KV cache, and whether steps are captured.

Two choices, made once per loaded model (`use_engine`) so that the baseline and every
speculative decoder of a run share them (a speedup then compares methods, not engines):

- **cache** `static` (default where the model allows it): `SlotCache` (runtime/cache.py), a
  transformers `Cache` whose layers are buffers allocated once per generation for prompt +
  max_new_tokens + a step's tree (the gpt-fast idea). A forward writes its keys/values at slots
  length…length+q-1; keeping a step's accepted path is an in-place gather of at most depth+1
  slots; nothing is concatenated or reallocated per step. `dynamic`: transformers' DynamicCache,
  whose every step concatenates onto each layer's keys (cost grows with the context). Models
  with sliding-window or chunked layers use `dynamic` (their tree masks are per layer type, see
  runtime/forward.py).
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

from medusa_bench.errors import UserError
from medusa_bench.models import text_config
from medusa_bench.runtime.cache import SlotCache
from medusa_bench.runtime.forward import attention_layout, forward, model_call

CACHE_KINDS = ("auto", "static", "dynamic")
COMPILE_MODES = ("auto", "on", "off")
MAX_CAPTURED_TOKENS = 256  # longer forwards (prefills) stay eager: one graph per prompt length would not pay


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def static_refusal(model) -> Optional[str]:
    """Why this model cannot use SlotCache (None: it can)."""
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
            return DynamicCache()  # no config: full layers for every layer type (cache.full_layers)
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
        """`forward` (runtime/forward.py), replayed from a recorded graph where this cache has them and the shape allows."""
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
