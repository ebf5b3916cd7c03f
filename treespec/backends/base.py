"""What a backend and a KV cache promise: the two protocols the engine and the drafters use.

A `Backend` runs a model over n new tokens against a `TreeCache` with a tree mask, and makes
the caches it can run against (`make_cache`): a backend and its caches come as a pair, so no
caller chooses a cache class. Implementations:

    backend                                  its cache (make_cache)
    SdpaBackend        (backends/sdpa.py)    TreeKVCache        (backends/kv_cache.py)
    StaticSdpaBackend  (backends/static_cache.py)  StaticTreeKVCache (backends/static_cache.py)
    FlashBackend       (backends/flash.py)   TreeKVCache (runs on StaticTreeKVCache too)
    GraphedBackend     (backends/cuda_graphs.py)   one persistent StaticTreeKVCache per (model, role)

`make_backend` (backends/factory.py) picks one from a name.

Cache layout, shared by both caches: `[committed | scratch | free]` along the slot axis. A
forward writes its n entries after the scratch; `commit(keep, count, retain)` moves the accepted
scratch entries next to the committed ones with `compact_scratch`, keeps `retain` more after
them as the next step's first scratch entries, and drops the rest.

Dimension letters: docs/dimensions.md (n new tokens, C committed, s scratch incl. the new ones,
S_max cache capacity, M kept-index length, V vocabulary).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from transformers import PreTrainedModel

from treespec.errors import CacheFullError, UnsupportedModelError  # noqa: F401  (re-exported)


# the fixed sizes a prompt is cut into (the last chunk padded): every prefill forward has one of
# these shapes, so that compiled and captured prefill serves any prompt length
PREFILL_CHUNKS = (32, 256)


def cache_full(capacity: int, used: int, asked: int) -> CacheFullError:
    return CacheFullError(
        f"KV cache full ({capacity} slots, {used} used, {asked} more asked): "
        "prompt + max_new_tokens + tree exceed the budget it was allocated for"
    )


@runtime_checkable
class TreeCache(Protocol):
    """The KV cache of one model for one generation (batch size 1); also a transformers `Cache`
    (the model calls its `update` once per layer)."""

    capacity: int  # S_max slots

    @property
    def committed(self) -> int:
        """C: tokens accepted into the cache (host int)."""

    @property
    def scratch(self) -> int:
        """Entries written since the last commit (this step's tree nodes)."""

    def begin_forward(self, n: int) -> None:
        """Make room for the n entries the coming forward writes; CacheFullError when there is none."""

    def committed_index(self, device: torch.device) -> torch.Tensor:
        """C as a LongTensor (1,) on `device` (a device-side counter where the cache keeps one,
        so that a CUDA graph reads the current value on every replay)."""

    def sdpa_mask(self, block_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (1, 1, n, K) over the K keys the cache hands the model (C + s for
        TreeKVCache, S_max for StaticTreeKVCache): every committed entry, plus the scratch
        entries block_mask (n, s) allows; 0 where visible, dtype's min where not."""

    def commit(self, keep: torch.Tensor, count: int, retain: int = 0) -> None:
        """Keep scratch entries keep[:count] (offsets into the scratch) right after the
        committed ones; keep[count : count + retain] follow them as the new scratch's first
        entries (a tree drafted ahead, drafting/ahead.py); drop the rest. keep: LongTensor (M,),
        padded past count + retain."""

    def commit_all(self) -> None:
        """Accept every scratch entry (prefill, or tokens known to be accepted)."""


@dataclass
class ForwardOutput:
    """What a forward asked for `hidden=True` returns: the logits and the model's last hidden
    states, after its final norm (what the LM head reads; a draft head's features, docs/heads.md).

    logits: FloatTensor (n, V), or (1, V) with last_only. hidden: (n, Hm), every new token's.
    """

    logits: torch.Tensor
    hidden: torch.Tensor


@runtime_checkable
class Backend(Protocol):
    """Runs a model over a block of tree nodes (one forward of the decode loop)."""

    name: str  # 'sdpa' or 'flash': recorded in GenerationStats.backend

    def check_model(self, model: PreTrainedModel) -> None:
        """Raise UnsupportedModelError, saying what to do, for a model this backend cannot run."""

    def make_cache(self, model: PreTrainedModel, capacity: int, role: str = "target") -> TreeCache:
        """An empty cache of `model` with `capacity` slots that `forward` runs against.
        role: 'target' or 'draft' (a backend that keeps its caches holds one per role)."""

    def forward(self, model: PreTrainedModel, cache: TreeCache, input_ids: torch.Tensor, position_ids: torch.Tensor,
                block_mask: torch.Tensor, last_only: bool = False, hidden: bool = False) -> torch.Tensor | ForwardOutput:
        """Run `model` on n new tokens and return their logits.

        input_ids, position_ids: LongTensor (1, n).
        block_mask: BoolTensor (n, s) which scratch entries (the s - n written earlier this
            step, then the n new ones) each new token sees; committed entries are always seen.
        Returns FloatTensor (n, V), or (1, V) with last_only; with hidden, a `ForwardOutput`
        that also holds the last hidden states (n, Hm) of the same forward (no second pass).
        """

    def run_captured(self, cache: TreeCache, key: object, fn: Callable[[], None]) -> None:
        """Run fn: several forwards of this backend against `cache` and the tensor work between
        them, with fixed shapes, every input read from and every output written to tensors that
        outlive the call (a static tree's draft levels, drafting/static.py). A graphed backend
        captures it as one CUDA graph the second time `key` comes and replays it after; the
        others just call fn."""


def compact_scratch(buffer: torch.Tensor, dim: int, committed: int | torch.Tensor, keep: torch.Tensor) -> None:
    """The accepted-path commit of both caches: slot committed + keep[i] moves to committed + i
    along `dim`, for every i < M. buffer: any tensor whose `dim` is the slot axis (one layer's
    keys, or the static cache's buffer of all layers); committed: C as an int or a LongTensor (1,)
    on the device (no host sync); keep: LongTensor (M,) ascending offsets into the scratch."""
    m = keep.shape[0]
    src = committed + keep  # (M,)
    dst = committed + torch.arange(m, device=keep.device)  # (M,)
    # gather first, then scatter: sources and destinations may overlap
    buffer.index_copy_(dim, dst, buffer.index_select(dim, src))
