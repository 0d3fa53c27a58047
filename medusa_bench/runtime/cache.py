"""The KV caches under the verify loop, and the one way a step cuts them back: `keep_in_cache`, `crop_cache`.

Two kinds (the engine picks one per loaded model, runtime/engine.py):

- `SlotCache` (static): a transformers `Cache` whose layers are buffers allocated once per
  generation for prompt + max_new_tokens + a step's tree (the gpt-fast idea). A forward writes
  its keys/values at slots length…length+q-1; keeping a step's accepted path is an in-place
  gather of at most depth+1 slots; nothing is concatenated or reallocated per step.
- transformers' `DynamicCache` (models with sliding-window or chunked layers, `--cache dynamic`):
  every step concatenates onto each layer's keys (cost grows with the context). It must keep
  full layers (`full_layers`): the loop windows through the mask, never by evicting keys.

After a verify step the loop keeps the accepted path and drops the rest of the tree
(`keep_in_cache`); a rewind drops everything past a length (`crop_cache`); both take either kind.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


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
        raise RuntimeError("SlotCache is cut back with crop_cache / keep_in_cache (runtime/cache.py)")


class SlotCache(Cache):
    """A position-indexed KV cache that never reallocates: `length` slots hold the context.

    `forward` (runtime/forward.py) sets `start = length` before a model call and advances `length`
    after it; `keep` and `crop` rewrite `length` (and gather the kept slots), as `crop_cache` and
    `keep_in_cache` below do to a DynamicCache.
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

    def keep_rows(self, start: int, keep: torch.Tensor, contiguous: bool) -> None:
        """Batched: row b keeps slots start+keep[b] (keep [B, m], sorted per row) as start … start+m-1.

        Rows keep m slots each; a row that accepted fewer pads `keep` with any slot, and its batch
        state masks those columns out (runtime/batch.py): no row is ever shifted against another.
        `contiguous`: every row's kept slots already stand where they belong (no gather).
        """
        m = keep.shape[1]
        if contiguous:
            self.length = self.start = start + m
            return
        index = keep + start  # [B, m]
        if self.uniform and self.storage is not None:  # [layers, 2, B, heads, capacity, dim]
            layers, two, _, heads, _, dim = self.storage.shape
            gather = index[None, None, :, None, :, None].expand(layers, two, -1, heads, m, dim)
            self.storage[:, :, :, :, start:start + m] = self.storage.gather(4, gather)
        else:
            for layer in self.layers:
                if layer.is_initialized:
                    for name in ("keys", "values"):
                        buffer = getattr(layer, name)  # [B, heads, capacity, dim]
                        gather = index[:, None, :, None].expand(-1, buffer.shape[1], m, buffer.shape[-1])
                        buffer[:, :, start:start + m] = buffer.gather(2, gather)
        self.length = self.start = start + m

    def select_rows(self, rows: torch.Tensor) -> None:
        """Batched: keep only these rows (finished sequences leave the batch), buffers re-made smaller."""
        if self.storage is not None:
            self.storage = self.storage.index_select(2, rows)
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            if layer.shared:
                layer.keys, layer.values = self.storage[layer.index, 0], self.storage[layer.index, 1]
            else:
                layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)

    def join(self, other: "SlotCache", start: int, width: int, capacity: int) -> None:
        """Batched: `other`'s rows join this cache's (continuous batching, decoders/batched.py).

        This cache's slots start … length-1 and `other`'s 0 … other.length-1 are both right-aligned
        to end at slot `width` (slots before `start` that no row uses any more are dropped), in new
        zeroed buffers of `capacity` slots: rows of this cache first, then `other`'s. The slots left
        of a row's context are holes its mask hides; zeros keep them finite (0 × NaN poisons a sum).
        """
        if self.storage is not None and other.storage is not None and self.uniform and other.uniform:
            self.storage = _joined(self.storage, start, self.length, other.storage, other.length, width, capacity, 2, 4)
        else:
            for mine, theirs in zip(self.layers, other.layers):
                if mine.is_initialized and theirs.is_initialized:
                    for name in ("keys", "values"):  # [B, heads, capacity, dim]
                        setattr(mine, name, _joined(getattr(mine, name), start, self.length, getattr(theirs, name),
                                                    other.length, width, capacity, 0, 2))
                    mine.shared = False  # its own buffers now, even where it was a view into the old storage
            self.storage, self.uniform = None, False
        for layer in self.layers:
            if layer.is_initialized and layer.shared:
                layer.keys, layer.values = self.storage[layer.index, 0], self.storage[layer.index, 1]
        if self.graphs:
            self.graphs.clear()  # recorded steps hold the old buffers' addresses
        self.capacity, self.length, self.start = capacity, width, width

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


def _joined(mine: torch.Tensor, start: int, end: int, theirs: torch.Tensor, their_end: int, width: int,
            capacity: int, batch_dim: int, slot_dim: int) -> torch.Tensor:
    """mine's slots start … end-1 over theirs's 0 … their_end-1, both ending at slot `width`; rows stacked."""
    shape = list(mine.shape)
    shape[batch_dim] += theirs.shape[batch_dim]
    shape[slot_dim] = capacity
    out = mine.new_zeros(shape)
    rows = mine.shape[batch_dim]
    out.narrow(batch_dim, 0, rows).narrow(slot_dim, width - (end - start), end - start).copy_(mine.narrow(slot_dim, start, end - start))
    out.narrow(batch_dim, rows, theirs.shape[batch_dim]).narrow(slot_dim, width - their_end, their_end).copy_(theirs.narrow(slot_dim, 0, their_end))
    return out


# ------------------------------------------------------------------------------ keep / crop, either kind
def cache_length(cache) -> int:
    return cache.length if isinstance(cache, SlotCache) else cache.get_seq_length()


def full_layers(cache) -> None:
    """Slot arithmetic below needs every layer to keep every key (DynamicCache without a config).

    A sliding-window cache layer (DynamicSlidingWindowLayer) drops its oldest keys when a tree is
    appended, so rejected nodes would push out prefix keys later queries still see, and its slots
    no longer start at position 0: the loop keeps full layers and windows through the mask instead.
    """
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        raise ValueError("speculative decoding needs a cache that keeps every key: use DynamicCache() without a config")


def crop_cache(cache, length: int) -> None:
    """Drop every slot past `length` (transformers' own `crop` changed meaning across versions)."""
    if isinstance(cache, SlotCache):
        return cache.crop(length)
    full_layers(cache)
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]


def keep_in_cache(cache, start: int, keep: torch.Tensor, contiguous: bool) -> None:
    """Keep slots start+keep (sorted, keep[0] == 0) as start…start+m-1 and drop the rest."""
    if isinstance(cache, SlotCache):
        return cache.keep(start, keep, contiguous)
    new_length = start + keep.numel()
    full_layers(cache)
    for layer in cache.layers:
        if not contiguous:
            index = keep + start  # [m]
            layer.keys[:, :, start:new_length] = layer.keys.index_select(2, index)
            layer.values[:, :, start:new_length] = layer.values.index_select(2, index)
        layer.keys = layer.keys[:, :, :new_length]
        layer.values = layer.values[:, :, :new_length]
