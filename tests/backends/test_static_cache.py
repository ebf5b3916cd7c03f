"""The GPU path's pieces checked on the CPU in eager mode: FlashBackend (with the dense stand-in
for flash-attn), StaticTreeKVCache and GraphedBackend (which runs its wrapped backend eagerly
off CUDA) give the same logits as SdpaBackend and the same greedy output as the target alone."""

import pytest
import torch

import treespec
from treespec.backends.factory import make_backend
from treespec.backends.sdpa import SdpaBackend
from treespec.backends.cuda_graphs import GraphedBackend
from treespec.backends.flash import FlashBackend, reference_prefix_attention
from treespec.backends.kv_cache import TreeKVCache
from treespec.backends.base import CacheFullError
from treespec.backends.static_cache import StaticSdpaBackend, StaticTreeKVCache
from treespec.testing import tiny_model
from treespec.tree.topology import TreeTopology

PROMPT = torch.tensor([[5, 9, 33, 2, 61, 14, 7, 19, 3, 44, 12]])


def cpu_flash():
    return FlashBackend(prefix_attention=reference_prefix_attention)


def prefill(backend, model, cache, prompt):
    t = prompt.shape[1] - 1
    if t:
        backend.forward(model, cache, prompt[:, :-1], torch.arange(t)[None], torch.ones(t, t, dtype=torch.bool).tril())
    cache.commit_all()


def tree_logits(backend, cache_cls, model, prompt, topo, tokens):
    cache = cache_cls.for_model(model, 128)
    with torch.no_grad():
        prefill(backend, model, cache, prompt)
        root = prompt.shape[1] - 1
        return backend.forward(model, cache, tokens[None], (root + topo.depth)[None], topo.ancestors)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("prefix", [0, 1, 10])  # committed tokens before the tree
@pytest.mark.parametrize("widths", [[], [3, 2, 2], [1, 1, 1, 1], [7]])
def test_flash_and_static_paths_equal_sdpa(arch, prefix, widths):
    model = tiny_model(3, arch=arch)
    topo = TreeTopology.from_widths(widths)
    gen = torch.Generator().manual_seed(prefix)
    tokens = torch.randint(0, 64, (topo.num_nodes,), generator=gen)
    prompt = PROMPT[:, : prefix + 1]
    tokens[0] = prompt[0, -1]
    ref = tree_logits(SdpaBackend(), TreeKVCache, model, prompt, topo, tokens)
    for backend, cache_cls in [
        (cpu_flash(), TreeKVCache),
        (cpu_flash(), StaticTreeKVCache),
        (StaticSdpaBackend(), StaticTreeKVCache),
    ]:
        got = tree_logits(backend, cache_cls, model, prompt, topo, tokens)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored after every forward


def test_draft_levels_with_earlier_scratch_entries():
    """A forward whose block sees scratch entries written by an earlier forward of the step."""
    model = tiny_model(5)
    topo = TreeTopology.from_widths([2, 2])
    tokens = torch.tensor([PROMPT[0, -1], 4, 8, 15, 16, 23, 42])
    root = PROMPT.shape[1] - 1
    results = []
    for backend, cache_cls in [(SdpaBackend(), TreeKVCache), (cpu_flash(), StaticTreeKVCache), (StaticSdpaBackend(), StaticTreeKVCache)]:
        cache = cache_cls.for_model(model, 64)
        with torch.no_grad():
            prefill(backend, model, cache, PROMPT)
            backend.forward(model, cache, tokens[None, :1], torch.tensor([[root]]), torch.ones(1, 1, dtype=torch.bool))
            cache.commit_all()  # the root is accepted
            lvl1 = backend.forward(model, cache, tokens[None, 1:3], torch.full((1, 2), root + 1), topo.ancestors[1:3, 1:3])
            lvl2 = backend.forward(model, cache, tokens[None, 3:7], torch.full((1, 4), root + 2), topo.ancestors[3:7, 1:7])
        results.append(torch.cat([lvl1, lvl2]))
    for got in results[1:]:
        torch.testing.assert_close(got, results[0], atol=1e-5, rtol=1e-5)


def test_static_commit_matches_tree_cache_commit():
    gen = torch.Generator().manual_seed(0)
    dyn, sta = TreeKVCache(2, 32), StaticTreeKVCache(2, 32, 3, 4, torch.float32, "cpu")
    for step, (n, keep, count) in enumerate([(5, [0, 2, 4], 3), (4, [0, 3, 3], 2), (6, [0, 1, 5, 5], 1), (3, [1, 1], 0)]):
        k, v = torch.randn(1, 3, n, 4, generator=gen), torch.randn(1, 3, n, 4, generator=gen)
        sta.begin_forward(n)
        for layer in range(2):
            dyn.update(k + layer, v - layer, layer)
            sta.update(k + layer, v - layer, layer)
        keep = torch.tensor(keep)
        dyn.commit(keep, count)
        sta.commit(keep, count)
        c = dyn.committed
        assert sta.committed == c and int(sta.committed_dev) == c and int(sta.seen_dev) == c and sta.scratch == 0
        for layer in range(2):
            torch.testing.assert_close(sta.layers[layer].keys[:, :, :c], dyn.layers[layer].keys[:, :, :c])
            torch.testing.assert_close(sta.layers[layer].values[:, :, :c], dyn.layers[layer].values[:, :, :c])


def test_static_cache_refuses_to_overflow():
    cache = StaticTreeKVCache(1, 8, 1, 4, torch.float32, "cpu")
    cache.begin_forward(6)
    with pytest.raises(CacheFullError, match="8 slots"):
        cache.begin_forward(3)


@pytest.mark.parametrize("inner", ["flash", "sdpa"])
@pytest.mark.parametrize("method,tree", [("autoregressive", None), ("linear", "chain-3"), ("tree", [3, 2, 1])])
def test_graphed_backend_generation_equals_target_greedy(inner, method, tree):
    """On the CPU GraphedBackend runs eagerly but hands out static caches: the whole GPU code
    path except capture. One backend object serves several generations (caches reused)."""
    target = tiny_model(0)
    draft = tiny_model(7, hidden_size=16, num_layers=1)
    backend = GraphedBackend(cpu_flash() if inner == "flash" else StaticSdpaBackend())
    for prompt in (PROMPT, PROMPT[:, :4], PROMPT):
        ref = target.generate(prompt, do_sample=False, max_new_tokens=24, eos_token_id=None, pad_token_id=0)
        out = treespec.generate(
            target, None if method == "autoregressive" else draft, prompt,
            max_new_tokens=24, method=method, tree=tree, attention=backend, eos_token_id=[],
        )
        assert torch.equal(out.sequences, ref)
        assert out.stats.backend == inner
    assert len(backend._caches) == (1 if method == "autoregressive" else 2)


def test_tree_cache_refuses_to_overflow():
    """Both caches raise the one CacheFullError, before the forward writes anything."""
    model = tiny_model(0)
    cache = SdpaBackend().make_cache(model, 8)
    with torch.no_grad(), pytest.raises(CacheFullError, match="8 slots"):
        prefill(SdpaBackend(), model, cache, PROMPT)  # 10 prompt tokens


def test_make_backend_choices():
    assert isinstance(make_backend("auto", "cpu"), SdpaBackend)
    assert type(make_backend("sdpa", "cpu")) is SdpaBackend
    # exactly what the arguments say: eager sdpa on TreeKVCache without graphs, on any device
    assert type(make_backend("sdpa", "cuda", graphs=False)) is SdpaBackend
    graphed = make_backend("sdpa", "cpu", graphs=True)
    assert isinstance(graphed, GraphedBackend) and graphed.name == "sdpa"
    assert type(graphed.inner) is StaticSdpaBackend  # graphs need static caches
    model = tiny_model(0)
    assert type(SdpaBackend().make_cache(model, 16)) is TreeKVCache
    assert type(StaticSdpaBackend().make_cache(model, 16)) is StaticTreeKVCache
    assert type(graphed.make_cache(model, 16)) is StaticTreeKVCache
    assert make_backend(graphed, "cpu") is graphed
    assert make_backend("flash", "cpu").name == "flash"
    with pytest.raises(ValueError, match="'auto', 'sdpa' or 'flash'"):
        make_backend("magic", "cpu")


def test_flash_backend_explains_what_it_needs():
    model = tiny_model(0)
    with pytest.raises(ValueError, match="flash"):
        FlashBackend().check_model(model)  # no flash_attn here, or the model is on the CPU in fp32
