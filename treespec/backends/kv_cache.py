"""A preallocated KV cache that holds the accepted sequence plus a scratch region for a tree.

Layout of every layer's buffer (1, H_kv, S_max, Dh):

    [ committed tokens (accepted, in order) | scratch (tree nodes of this step) | free ]
      0 ............................ committed ................... seen ....... S_max

A forward writes its keys/values at `seen` and advances it (the model calls `update` once per
layer). After verification, `commit(keep)` moves the accepted nodes of the scratch region
next to the committed tokens and drops the rest (`compact_scratch`, shared with the static
cache), so the prefix is never recomputed. RoPE was applied with each node's true position
(prefix length + depth), so a moved entry stays valid. The cache follows the `TreeCache`
protocol (backends/base.py); `SdpaBackend` and `FlashBackend` make it.

The buffers grow as the generation needs them: a layer's first write allocates room for it
rounded up to INITIAL_SLOTS, and a write past the end reallocates to twice the size (at most
`capacity`) and copies what is there, so memory follows the tokens actually generated, not
max_new_tokens (amortised: each entry is copied about once). This cache is never captured in a
CUDA graph, so reallocating is safe; the graph backends use the fixed-capacity
StaticTreeKVCache (backends/static_cache.py) instead.

Dimension letters: docs/dimensions.md (H_kv key/value heads, S cache slots, Dh head size).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from treespec.backends.base import cache_full, compact_scratch

INITIAL_SLOTS = 256  # the first allocation of a layer (or the prompt, when longer), in slots


class TreeKVLayer(CacheLayerMixin):
    """One attention layer's keys and values, grown by doubling up to `capacity` slots."""

    is_compileable = False

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.committed = 0  # slots holding accepted tokens
        self.seen = 0  # committed + scratch slots written this step

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, n, d = key_states.shape
        slots = min(self.capacity, max(INITIAL_SLOTS, n))
        self.keys = key_states.new_zeros(b, h, slots, d)  # (1, H_kv, S_alloc, Dh), S_alloc <= S_max
        self.values = value_states.new_zeros(b, h, slots, value_states.shape[-1])
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write (1, H_kv, n, Dh) new entries at `seen`; return all entries written so far."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        end = self.seen + n
        if end > self.capacity:
            raise cache_full(self.capacity, self.seen, n)
        if end > self.keys.shape[2]:
            self._grow(end)
        self.keys[:, :, self.seen : end] = key_states
        self.values[:, :, self.seen : end] = value_states
        self.seen = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def _grow(self, needed: int) -> None:
        """Reallocate to max(needed, twice the current slots), at most capacity; keep the written entries."""
        slots = min(self.capacity, max(needed, 2 * self.keys.shape[2]))
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], slots, old.shape[3])
            new[:, :, : self.seen] = old[:, :, : self.seen]
            setattr(self, name, new)

    @property
    def allocated(self) -> int:
        """Slots allocated so far (0 before the first write)."""
        return self.keys.shape[2] if self.is_initialized else 0

    def commit(self, keep: torch.Tensor, count: int, retain: int = 0) -> None:
        """Keep scratch entries `keep[:count]` (offsets into the scratch region) and drop the
        rest, but for keep[count : count + retain], which become the new scratch's first
        entries. keep: LongTensor (M,), padded past `count + retain`."""
        if count + retain:
            compact_scratch(self.keys, 2, self.committed, keep[: count + retain])
            compact_scratch(self.values, 2, self.committed, keep[: count + retain])
        self.committed += count
        self.seen = self.committed + retain

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.capacity


class TreeKVCache(Cache):
    """KV cache of one model for one generation (batch size 1)."""

    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[TreeKVLayer(capacity) for _ in range(num_layers)])
        self.capacity = capacity

    @classmethod
    def for_model(cls, model: PreTrainedModel, capacity: int) -> "TreeKVCache":
        config = model.config.get_text_config()
        return cls(config.num_hidden_layers, capacity)

    @property
    def committed(self) -> int:
        """Tokens accepted into the cache (the prefix every new node attends to)."""
        return self.layers[0].committed

    @property
    def scratch(self) -> int:
        """Entries written since the last commit (tree nodes of this step)."""
        return self.layers[0].seen - self.layers[0].committed

    def begin_forward(self, n: int) -> None:
        """Check room for n more entries (the layers write them at `seen` as the model runs)."""
        seen = self.layers[0].seen
        if seen + n > self.capacity:
            raise cache_full(self.capacity, seen, n)

    def committed_index(self, device: torch.device) -> torch.Tensor:
        """C as LongTensor (1,) on `device`."""
        return torch.full((1,), self.committed, dtype=torch.long, device=device)

    def sdpa_mask(self, block_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (1, 1, n, C + s): every committed entry, plus the scratch entries
        block_mask (n, s) allows."""
        n, s = block_mask.shape
        committed = self.committed
        mask = torch.zeros(1, 1, n, committed + s, dtype=dtype, device=block_mask.device)  # (1, 1, n, C+s)
        mask[0, 0, :, committed:].masked_fill_(~block_mask, torch.finfo(dtype).min)
        return mask

    def commit(self, keep: torch.Tensor, count: int, retain: int = 0) -> None:
        """Move scratch entries keep[:count] into place after the committed tokens, and
        keep[count : count + retain] right after them as the new scratch (TreeCache.commit)."""
        for layer in self.layers:
            layer.commit(keep, count, retain)

    def commit_all(self) -> None:
        """Accept every scratch entry (prefill, or tokens known to be accepted)."""
        for layer in self.layers:
            layer.committed = layer.seen
