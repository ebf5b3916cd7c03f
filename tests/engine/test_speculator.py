"""The kept generation object (treespec.Speculator) and the kept objects of treespec.generate:
nothing compiles again after the first call, caches are freed on close, and a call that does not
fit the object's max_context is refused before any work."""

import random

import pytest
import torch

import treespec
from treespec.backends.cuda_graphs import GraphedBackend
from treespec.backends.static_cache import StaticSdpaBackend
from treespec.engine import speculator as kept_module
from treespec.engine.checks import ArgumentError
from treespec.engine.loop import prefill_chunks
from treespec.testing import tiny_model


def compiled_backend() -> GraphedBackend:
    # aot_eager: dynamo's real trace and guards (a new shape is a new graph) without inductor's C++ builds
    return GraphedBackend(StaticSdpaBackend(), compile=True, compile_backend="aot_eager")


def dynamo_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def pair():
    return tiny_model(0), tiny_model(7, hidden_size=16, num_layers=1)


@pytest.fixture(autouse=True)
def fresh():
    torch._dynamo.reset()
    treespec.release()
    yield
    treespec.release()
    torch._dynamo.reset()


def reference(target, prompt, new):
    return target.generate(prompt, do_sample=False, max_new_tokens=new, eos_token_id=None, pad_token_id=0)


@pytest.mark.parametrize("method,tree", [("tree", [2, 1]), ("autoregressive", None)])
def test_generate_loop_compiles_nothing_after_the_first_call(pair, method, tree):
    """10 generate calls with random prompt and output lengths: every dynamo graph is made in the
    first call (its warm-up), and every output is the target's own greedy output."""
    target, draft = pair
    backend = compiled_backend()
    rng = random.Random(0)
    draft = draft if method == "tree" else None
    graphs = []
    for i in range(10):
        prompt = torch.randint(2, 64, (1, rng.randint(1, 150)), generator=torch.Generator().manual_seed(i))
        new = rng.randint(1, 20)
        out = treespec.generate(target, draft, prompt, max_new_tokens=new, method=method, tree=tree,
                                attention=backend, eos_token_id=[])  # fmt: skip
        assert torch.equal(out.sequences, reference(target, prompt, new))
        graphs.append(dynamo_graphs())
    assert graphs[0] > 0  # the first call compiled
    assert graphs[1:] == [graphs[0]] * 9, graphs  # and no later call compiled anything
    assert len(kept_module.KEPT) == 1  # one kept object served every call


def test_kept_object_frees_its_caches_when_closed(pair):
    target, draft = pair
    backend = compiled_backend()
    spec = treespec.Speculator(target, draft, tree=[2, 1], max_context=128, attention=backend)
    prompt = torch.tensor([[5, 9, 2, 33, 17]])
    out = spec.generate(prompt, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(out.sequences, reference(target, prompt, 6))
    assert backend._caches and out.stats.time_to_first_token > 0
    spec.close()
    assert not backend._caches and not backend._graphs  # the static caches and their graphs are gone
    with pytest.raises(RuntimeError, match="closed"):
        spec.generate(prompt, max_new_tokens=2)
    # and through the kept objects of generate(): release() closes them
    treespec.generate(target, draft, prompt, max_new_tokens=2, tree=[2, 1], attention=compiled_backend())
    kept = next(iter(kept_module.KEPT.values()))
    treespec.release()
    assert kept.plan is None and not kept_module.KEPT


def test_call_beyond_max_context_is_refused_before_any_work(pair, monkeypatch):
    target, draft = pair
    spec = treespec.Speculator(target, draft, tree=[2, 1], max_context=64)
    calls = []
    monkeypatch.setattr(spec, "_engine", lambda *a, **k: calls.append(a))
    with pytest.raises(ArgumentError, match=r"max_context of 64 .* at most 24"):
        spec.generate(torch.ones(1, 40, dtype=torch.long), max_new_tokens=30)
    assert not calls
    with pytest.raises(ArgumentError, match="max_context"):
        treespec.Speculator(target, draft, max_context=10_000)  # past the models' 512 positions
    with pytest.raises(ArgumentError, match="max_context must be a whole number"):
        treespec.Speculator(target, draft, max_context="big")


def test_generate_remakes_a_larger_kept_object_when_a_call_needs_it(pair):
    target, draft = pair
    kept_module_max = kept_module.DEFAULT_MAX_CONTEXT
    assert kept_module_max >= 512  # the tiny models' 512 positions cap it
    treespec.generate(target, draft, torch.tensor([[3, 4]]), max_new_tokens=4, tree=[2])
    spec = next(iter(kept_module.KEPT.values()))
    assert spec.plan.max_context == 512


def test_prefill_chunks_have_fixed_sizes():
    for t in (1, 31, 32, 33, 96, 97, 255, 256, 257, 600):
        chunks = prefill_chunks(t, fixed=True)
        assert sum(real for _, real, _ in chunks) == t
        assert {size for *_, size in chunks} <= {32, 256}
        assert [start for start, *_ in chunks] == [sum(c[2] for c in chunks[:i]) for i in range(len(chunks))]
    assert prefill_chunks(600, fixed=False) == [(0, 512, 512), (512, 88, 88)]


def test_fused_speculator_equals_target_greedy_and_leaves_the_models_alone(pair):
    target, draft = pair
    before = {k: v.clone() for k, v in target.state_dict().items()}
    spec = treespec.Speculator(target, draft, tree=[2, 2, 1], fuse=True, attention=compiled_backend())
    assert type(spec.plan.target).__name__ == "FusedModel" and type(spec.plan.draft).__name__ == "FusedModel"
    prompt = torch.tensor([[5, 9, 2, 33, 17, 4, 40]])
    out = spec.generate(prompt, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(out.sequences, reference(target, prompt, 12))
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    with pytest.raises(ArgumentError, match="fuse must be True or False"):
        treespec.Speculator(target, draft, fuse="yes")
    with pytest.raises(ValueError, match="attention='sdpa'"):  # no flash here; with it, fuse refuses flash
        treespec.Speculator(target, draft, fuse=True, attention="flash")


def test_fixed_size_padded_prefill_leaves_the_cache_an_eager_prefill_leaves():
    """Prefill through padded PREFILL_CHUNKS-sized chunks over a static cache (compiled) leaves
    the cache the eager unpadded prefill leaves: the next forward's logits agree."""
    from treespec.backends.sdpa import SdpaBackend

    model = tiny_model(0, vocab_size=256, hidden_size=32, num_layers=2)
    prompt = torch.randint(2, 256, (1, 301), generator=torch.Generator().manual_seed(0))
    backends = (SdpaBackend(), GraphedBackend(StaticSdpaBackend(), compile=True, compile_backend="aot_eager",
                                              graphs=False))  # fmt: skip
    results = []
    for backend in backends:
        fixed = isinstance(backend, GraphedBackend)
        cache = backend.make_cache(model, 1024, "target")
        with torch.no_grad():
            for start, real, size in prefill_chunks(300, fixed):
                ids = torch.cat([prompt[:, start : start + real], prompt.new_zeros(1, size - real)], dim=1)
                causal = torch.ones(size, size, dtype=torch.bool).tril()
                backend.forward(model, cache, ids, torch.arange(start, start + size)[None], causal, last_only=True)
                cache.commit(torch.arange(size), real)
            assert cache.committed == 300
            results.append(backend.forward(model, cache, prompt[:, 300:], torch.tensor([[300]]),
                                           torch.ones(1, 1, dtype=torch.bool)))  # fmt: skip
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tree,lookup,keeps", [([2, 1], False, True), ("adaptive", False, True), ([2, 1], True, True),
                                               ("dynamic", False, False)])
def test_a_kept_speculator_keeps_its_drafter_across_calls(pair, tree, lookup, keeps):
    """On a GPU a static tree's draft levels are one captured graph that reads and writes the
    drafter's buffers, so a kept Speculator keeps that drafter (also under lookup, and one per
    depth of an adaptive tree), restarted each call with the call's proposer; greedy output stays
    the target's after a sampled call. A dynamic tree's drafter is made per call."""
    target, draft = pair
    temperatures = [0.0, 0.0, 0.0] if lookup else [0.0, 0.9, 0.0]
    drafters = []
    with treespec.Speculator(target, draft, tree=tree, lookup=lookup, attention=compiled_backend()) as spec:
        for i, temperature in enumerate(temperatures):
            prompt = torch.randint(2, 64, (1, 10 + 7 * i), generator=torch.Generator().manual_seed(i))
            sampling = dict(temperature=temperature, generator=torch.Generator().manual_seed(i)) if temperature else {}
            out = spec.generate(prompt, max_new_tokens=12, eos_token_id=[], **sampling)
            if not temperature:
                assert torch.equal(out.sequences, reference(target, prompt, 12)), f"call {i}"
            drafters.append(spec._drafter)
    assert (drafters[0] is drafters[1] is drafters[2]) == keeps
