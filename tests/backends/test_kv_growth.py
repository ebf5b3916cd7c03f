"""The eager KV cache grows with the generation: max_new_tokens alone allocates nothing unused,
and growing (reallocating, copying) keeps the output exact."""

from __future__ import annotations

import pytest
import torch

import treespec
from treespec.backends import kv_cache
from treespec.backends.kv_cache import TreeKVCache
from treespec.testing import tiny_model

P = torch.tensor([[3, 17, 42, 8, 25, 11]])
LIMIT = 50 << 20


def _cache_bytes(cache: TreeKVCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers if layer.is_initialized for t in (layer.keys, layer.values))


def test_a_huge_max_new_tokens_allocates_little_before_the_first_token():
    big = dict(hidden_size=64, num_heads=4, num_kv_heads=4, num_layers=4, max_positions=200_000)
    target, draft = tiny_model(0, **big), tiny_model(1, **big)
    stream = treespec.stream(target, draft, P, max_new_tokens=100_000, tree=[2, 1], eos_token_id=[], attention="sdpa")
    first = next(iter(stream))  # the prefill and the first step
    assert first
    caches = [stream.engine.target_cache, stream.engine.drafter.cache]
    used = sum(_cache_bytes(c) for c in caches) + stream.engine.out.numel() * stream.engine.out.element_size()
    assert used < LIMIT, f"{used / 2**20:.1f} MiB allocated before the first token"
    # the bound means something: allocated for the whole capacity, the same caches would exceed it
    per_slot = sum(_cache_bytes(c) / c.layers[0].allocated for c in caches)
    assert per_slot * caches[0].capacity > LIMIT


def test_growth_doubles_up_to_the_capacity_and_then_reports_a_full_cache():
    model = tiny_model(0)
    cache = TreeKVCache.for_model(model, 40)
    layer = cache.layers[0]
    k = torch.randn(1, 2, 3, 8)
    layer.update(k, k)
    assert layer.allocated == 40  # the capacity is below INITIAL_SLOTS: never more than it
    cache = TreeKVCache.for_model(model, 10_000)
    layer = cache.layers[0]
    written = []
    for i in range(300):
        x = torch.full((1, 2, 1, 8), float(i))
        keys, _ = layer.update(x, x)
        written.append(float(i))
        layer.committed = layer.seen
    assert layer.allocated == 2 * kv_cache.INITIAL_SLOTS  # doubled once, past 256 entries
    assert keys[0, 0, :, 0].tolist() == written  # nothing lost in the copy
    small = TreeKVCache.for_model(model, 4)
    small.layers[0].update(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8))
    with pytest.raises(treespec.CacheFullError, match="KV cache full"):
        small.layers[0].update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))


@pytest.mark.parametrize("tree", [[2, 1], "dynamic"])
def test_growing_caches_keep_greedy_exactness(monkeypatch, tree):
    monkeypatch.setattr(kv_cache, "INITIAL_SLOTS", 4)  # grow many times within a short generation
    target, draft = tiny_model(0), tiny_model(7, hidden_size=16, num_layers=1)
    want = target.generate(P, do_sample=False, max_new_tokens=40, eos_token_id=None, pad_token_id=0)
    got = treespec.generate(target, draft, P, max_new_tokens=40, tree=tree, eos_token_id=[], attention="sdpa")
    assert torch.equal(got.sequences, want)
