"""A fixed-shape KV cache whose write positions live on the device, for CUDA graphs.

Same layout and commit semantics as `TreeKVCache` (`[committed | scratch | free]`, commit keeps
accepted scratch entries next to the committed ones), but everything a forward or a commit does
to it is a fixed-shape device operation driven by device-side counters:

- one buffer for all layers, (L, 2, H_kv, S_max, Dh), allocated once; each layer's keys and
  values are views of it, and the model always gets the full (1, H_kv, S_max, Dh) buffers;
- `committed_dev` / `seen_dev` (LongTensor (1,)) say where the prefix ends and where the next
  forward writes; `begin_forward(n)` turns them into the n write slots with device arithmetic,
  so a captured graph writes to the right place on every replay;
- `commit(keep, count)` gathers the M kept scratch entries of every layer at once and scatters
  them after the prefix (one index_select + one index_copy_, M fixed by the tree), then adds
  `count` to the device counter: no host synchronisation, no shape that depends on `count`.

The host mirrors the counters as ints (`committed`, `scratch`): the engine knows `count` anyway
(it is the one value it reads per step), and the host copy lets `begin_forward` refuse a write
past the end of the buffer, which a graph replay could not report.

Unwritten slots are zeros, never uninitialised memory: the sdpa path multiplies hidden slots by
a probability of 0, and 0 * NaN would poison the output.

`StaticSdpaBackend` is the sdpa backend that makes this cache (its additive mask covers all
S_max slots and is built on the device from the counters, by `sdpa_mask`). Both caches follow
the `TreeCache` protocol (backends/base.py) and share its commit (`compact_scratch`).

Dimension letters: docs/dimensions.md (L layers, H_kv kv heads, S_max capacity, Dh head size,
n new tokens, s scratch incl. new, M kept-index length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from treespec.backends.base import CacheFullError, TreeCache, cache_full, compact_scratch
from treespec.backends.sdpa import SdpaBackend

__all__ = ["CacheFullError", "StaticSdpaBackend", "StaticTreeKVCache"]


class StaticTreeKVLayer(CacheLayerMixin):
    """One layer's view of the shared buffer; writes at the owner's device-side slots."""

    is_compileable = False

    def __init__(self, owner: "StaticTreeKVCache", layer_idx: int):
        super().__init__()
        self.owner = owner
        self.keys = owner.kv[layer_idx, 0][None]  # (1, H_kv, S_max, Dh) view
        self.values = owner.kv[layer_idx, 1][None]
        self.device, self.dtype = owner.kv.device, owner.kv.dtype
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # allocated up front: a graph must see the same buffer on every replay

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write (1, H_kv, n, Dh) at the slots `begin_forward` chose; return the full buffers."""
        slots = self.owner.write_slots  # (n,)
        self.keys.index_copy_(2, slots, key_states.to(self.dtype))
        self.values.index_copy_(2, slots, value_states.to(self.dtype))
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.owner.capacity, 0

    def get_seq_length(self) -> int:
        return self.owner._seen

    def get_max_length(self) -> int:
        return self.owner.capacity


class StaticTreeKVCache(Cache):
    """KV cache of one model, batch size 1, fixed capacity, device-side positions."""

    def __init__(
        self,
        num_layers: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.capacity = capacity
        self.kv = torch.zeros(num_layers, 2, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.committed_dev = torch.zeros(1, dtype=torch.long, device=device)  # (1,)
        self.seen_dev = torch.zeros(1, dtype=torch.long, device=device)  # (1,)
        self.write_slots = torch.zeros(0, dtype=torch.long, device=device)  # (n,) set per forward
        self._arange = torch.arange(capacity, device=device)  # (S_max,)
        self._committed = 0  # host mirrors of the device counters
        self._seen = 0
        super().__init__(layers=[StaticTreeKVLayer(self, i) for i in range(num_layers)])

    @classmethod
    def for_model(cls, model: PreTrainedModel, capacity: int) -> "StaticTreeKVCache":
        config = model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, capacity, kv_heads, head_dim, model.dtype, model.device)

    # ----------------------------------------------------------------- host view
    @property
    def committed(self) -> int:
        """Tokens accepted into the cache (host mirror of committed_dev)."""
        return self._committed

    @property
    def scratch(self) -> int:
        """Entries written since the last commit."""
        return self._seen - self._committed

    def host_state(self) -> tuple[int, int]:
        return self._committed, self._seen

    def set_host_state(self, state: tuple[int, int]) -> None:
        self._committed, self._seen = state

    def reserve(self, n: int) -> None:
        """Host half of `begin_forward`: check room for n entries and advance the host counter."""
        if self._seen + n > self.capacity:
            raise cache_full(self.capacity, self._seen, n)
        self._seen += n

    # ----------------------------------------------------------------- device work
    def begin_forward(self, n: int) -> None:
        """Choose the n slots the coming forward writes (seen .. seen + n - 1) and advance."""
        self.reserve(n)
        self.write_slots = self.seen_dev + self._arange[:n]  # (n,)
        self.seen_dev += n

    def commit(self, keep: torch.Tensor, count: int, retain: int = 0) -> None:
        """Keep scratch entries keep[:count] (offsets into the scratch region) right after the
        committed tokens, and keep[count : count + retain] right after those as the new
        scratch; drop the rest. keep: LongTensor (M,), padded past count + retain with any
        offsets (the whole fixed-size index is copied; slots past count + retain are scratch)."""
        m = min(keep.shape[0], self.capacity - self._committed)
        if count + retain > m:
            raise ValueError(f"commit count {count} + retain {retain} exceeds the {m} kept entries given")
        if m:
            compact_scratch(self.kv, 3, self.committed_dev, keep[:m].clamp(min=0))  # every layer at once
        self.committed_dev += count
        self.seen_dev.copy_(self.committed_dev + retain)
        self._committed += count
        self._seen = self._committed + retain

    def committed_index(self, device: torch.device) -> torch.Tensor:
        """committed_dev, LongTensor (1,): the counter itself, so a graph reads its current value."""
        return self.committed_dev

    def commit_all(self) -> None:
        """Accept every scratch entry (prefill, or tokens known to be accepted)."""
        self.committed_dev.copy_(self.seen_dev)
        self._committed = self._seen

    def reset(self) -> None:
        """Empty the cache for a new generation (the buffers, and graphs that use them, stay)."""
        self.committed_dev.zero_()
        self.seen_dev.zero_()
        self._committed = self._seen = 0

    def sdpa_mask(self, block_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (1, 1, n, S_max) for the coming forward: every committed slot, plus the
        scratch slots block_mask (n, s) allows; built on the device from committed_dev."""
        n, s = block_mask.shape
        rel = self._arange - self.committed_dev  # (S_max,) slot offset into the scratch region
        in_block = (rel >= 0) & (rel < s)
        allowed = (rel < 0) | (in_block & block_mask[:, rel.clamp(0, s - 1)])  # (n, S_max)
        mask = torch.zeros(n, self.capacity, dtype=dtype, device=block_mask.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


@dataclass(frozen=True)
class StaticSdpaBackend(SdpaBackend):
    """SdpaBackend whose caches are StaticTreeKVCaches: with them the forward has one shape per
    (n, s) (the mask covers all S_max slots and is built on the device), so it can be captured
    in a CUDA graph. The forward is SdpaBackend's: the cache builds the mask for its layout."""

    name: str = "sdpa"

    def make_cache(self, model: PreTrainedModel, capacity: int, role: str = "target") -> TreeCache:
        return StaticTreeKVCache.for_model(model, capacity)
