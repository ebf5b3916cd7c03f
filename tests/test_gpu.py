"""GPU path on CUDA: the flash tree backend against sdpa in bf16, and CUDA-graph replay against
eager execution. Skipped without CUDA (conftest.py); the flash cases also without flash_attn.

Models are random-weight decoders with the attention shapes of real ones (heads, kv heads,
head size) and only 2 layers, so that prefixes of 8000 tokens stay cheap.
"""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import treespec
from treespec.backends.factory import FLASH_MIN_CONTEXT, make_backend
from treespec.backends.cuda_graphs import GraphedBackend
from treespec.backends.flash import FlashBackend, flash_available
from treespec.backends.kv_cache import TreeKVCache
from treespec.backends.static_cache import StaticSdpaBackend, StaticTreeKVCache
from treespec.engine.speculator import DEFAULT_MAX_CONTEXT
from treespec.tree.topology import TreeTopology

pytestmark = pytest.mark.gpu
needs_flash = pytest.mark.skipif(not flash_available(), reason="flash_attn is not installed")

# attention shapes of real models: (arch, hidden, heads, kv heads) -> head size hidden / heads
SHAPES = {
    "qwen2.5-0.5b": ("qwen2", 896, 14, 2),  # GQA 7:1, Dh 64
    "qwen2.5-1.5b": ("qwen2", 1536, 12, 2),  # GQA 6:1, Dh 128
    "qwen2.5-7b": ("qwen2", 3584, 28, 4),  # GQA 7:1, Dh 128
    "llama-mha": ("llama", 1024, 8, 8),  # no GQA, Dh 128
}
TREES = {  # N nodes incl. the root
    1: [],
    5: [1, 1, 1, 1],
    16: [15],
    45: [4, 2, 2, 1],
    64: [3, 4, 4],
    128: [127],
    "128-deep": [1] * 127,
}
VOCAB = 2048


def random_model(shape: str, dtype=torch.bfloat16, num_layers: int = 2, seed: int = 0):
    arch, hidden, heads, kv = SHAPES[shape]
    cfg_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    config = cfg_cls(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=16384,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = model_cls(config).to(dtype).eval()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def prefilled(backend, model, cache_cls, prompt):
    """Cache holding prompt[:-1], filled through `backend` in chunks of 512."""
    cache = cache_cls.for_model(model, prompt.shape[1] + 160)
    t = prompt.shape[1] - 1
    for start in range(0, t, 512):
        c = min(512, t - start)
        chunk = prompt[:, start : start + c]
        causal = torch.ones(c, c, dtype=torch.bool, device="cuda").tril()
        backend.forward(model, cache, chunk, torch.arange(start, start + c, device="cuda")[None], causal, last_only=True)
        cache.commit_all()
    return cache


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module", params=list(SHAPES))
def shaped(request):
    return request.param, random_model(request.param)


@needs_flash
@pytest.mark.parametrize("prefix", [0, 1, 1000, 8000])
def test_flash_tree_forward_matches_sdpa(shaped, prefix):
    name, model = shaped
    gen = torch.Generator(device="cuda").manual_seed(prefix)
    prompt = torch.randint(2, VOCAB, (1, prefix + 1), device="cuda", generator=gen)
    flash, sdpa = FlashBackend(), StaticSdpaBackend()
    errors = {}
    with torch.no_grad():
        caches = {
            "flash-dynamic": (flash, prefilled(flash, model, TreeKVCache, prompt)),
            "flash-static": (flash, prefilled(flash, model, StaticTreeKVCache, prompt)),
            "sdpa-static": (sdpa, prefilled(sdpa, model, StaticTreeKVCache, prompt)),
        }
        ref_cache = prefilled(sdpa, model, TreeKVCache, prompt)
        for size, widths in TREES.items():
            topo = TreeTopology.from_widths(widths)
            tokens = torch.randint(2, VOCAB, (topo.num_nodes,), device="cuda", generator=gen)
            tokens[0] = prompt[0, -1]
            pos = (prefix + topo.depth.cuda())[None]
            anc = topo.ancestors.cuda()
            ref = sdpa.forward(model, ref_cache, tokens[None], pos, anc)  # SdpaBackend on TreeKVCache
            ref_cache.commit(torch.zeros(1, dtype=torch.long, device="cuda"), 0)  # drop the tree
            for label, (backend, cache) in caches.items():
                got = backend.forward(model, cache, tokens[None], pos, anc)
                cache.commit(torch.zeros(1, dtype=torch.long, device="cuda"), 0)
                errors[(label, size)] = rel_err(got, ref)
                assert got.shape == ref.shape and torch.isfinite(got).all()
    worst = max(errors.values())
    print(f"{name} prefix {prefix}: worst relative error {worst:.2e} over {len(errors)} cases")
    assert worst < 2e-2, {k: f"{v:.2e}" for k, v in errors.items() if v >= 2e-2}


@pytest.mark.parametrize("backend_name,dtype", [("sdpa", torch.float32), ("sdpa", torch.bfloat16), ("flash", torch.bfloat16)])
@pytest.mark.parametrize("method,tree", [("autoregressive", None), ("linear", "chain-4"), ("tree", [4, 2, 2, 1])])
def test_graph_replay_equals_eager(backend_name, dtype, method, tree):
    """Same kernels in the same order: graph replay must give the very same tokens as eager."""
    if backend_name == "flash" and not flash_available():
        pytest.skip("flash_attn is not installed")
    target = random_model("qwen2.5-1.5b", dtype, seed=1)
    draft = target  # self-drafting: long accepted paths, both caches of one model
    gen = torch.Generator(device="cuda").manual_seed(5)
    graphed = make_backend(backend_name, "cuda", dtype, graphs=True, compile=False)
    assert isinstance(graphed, GraphedBackend)
    # eager on the same static caches, so that both runs have identical shapes (TreeKVCache's
    # shorter key length may round differently): max_graph_tokens=0 captures no forward and
    # capture_runs=False no step's draft levels (run_captured), so nothing is captured at all;
    # compile=False: the forwards run_captured records would otherwise run the compiled model,
    # whose kernels round otherwise in bf16
    eager_backend = GraphedBackend(graphed.inner, max_graph_tokens=0, capture_runs=False, compile=False)
    for i in range(3):  # later generations replay graphs captured by earlier ones
        prompt = torch.randint(2, VOCAB, (1, 40 + 17 * i), device="cuda", generator=gen)
        kwargs = dict(max_new_tokens=48, method=method, tree=tree, eos_token_id=[])
        d = None if method == "autoregressive" else draft
        eager = treespec.generate(target, d, prompt, attention=eager_backend, **kwargs)
        replay = treespec.generate(target, d, prompt, attention=graphed, **kwargs)
        assert torch.equal(replay.sequences, eager.sequences), f"generation {i}"
        if dtype == torch.float32:
            ref = target.generate(prompt, do_sample=False, max_new_tokens=48, eos_token_id=None, pad_token_id=0)
            assert torch.equal(replay.sequences, ref)
    assert graphed.stats.replays > 0 and graphed.stats.captures >= 1


@needs_flash
def test_auto_picks_by_context_on_cuda_and_records_it():
    """'auto' decides by the context a kept object is sized for (its static caches hold that many
    slots, which sdpa reads on every forward): sdpa below FLASH_MIN_CONTEXT, flash from it on;
    treespec.generate sizes its kept object for DEFAULT_MAX_CONTEXT tokens."""
    model = random_model("qwen2.5-0.5b")
    prompt = torch.randint(2, VOCAB, (1, 20), device="cuda")
    kw = dict(method="tree", tree=[2, 1])
    for max_context, name in ((FLASH_MIN_CONTEXT // 2, "sdpa"), (FLASH_MIN_CONTEXT, "flash")):
        spec = treespec.Speculator(model, model, max_context=max_context, **kw)
        assert spec.generate(prompt, max_new_tokens=8, eos_token_id=[]).stats.backend == name
        spec.close()
    out = treespec.generate(model, model, prompt, max_new_tokens=8, eos_token_id=[], **kw)
    assert out.stats.backend == ("flash" if DEFAULT_MAX_CONTEXT >= FLASH_MIN_CONTEXT else "sdpa")
    fp32 = treespec.generate(model.float(), None, prompt, max_new_tokens=8, method="autoregressive", eos_token_id=[])
    assert fp32.stats.backend == "sdpa"  # flash-attn has no fp32 kernels


@pytest.mark.parametrize("method,tree", [("autoregressive", None), ("linear", "chain-4"), ("tree", [4, 2, 2, 1]), ("tree", "dynamic")])
def test_compiled_graphs_equal_target_greedy_fp32(method, tree):
    """inductor-compiled forwards captured in graphs: in float32 the tokens are the target's own
    greedy output, across generations that replay the graphs of earlier ones."""
    target = random_model("qwen2.5-1.5b", torch.float32, seed=1)
    draft = random_model("qwen2.5-0.5b", torch.float32, seed=2)
    backend = make_backend("sdpa", "cuda", torch.float32)
    assert isinstance(backend, GraphedBackend) and backend.compiler is not None  # compiled by default
    gen = torch.Generator(device="cuda").manual_seed(3)
    for i in range(2):
        prompt = torch.randint(2, VOCAB, (1, 30 + 11 * i), device="cuda", generator=gen)
        out = treespec.generate(target, None if method == "autoregressive" else draft, prompt, max_new_tokens=32,
                                method=method, tree=tree, attention=backend, eos_token_id=[])  # fmt: skip
        ref = target.generate(prompt, do_sample=False, max_new_tokens=32, eos_token_id=None, pad_token_id=0)
        assert torch.equal(out.sequences, ref), f"generation {i}"
    assert backend.compiler.stats.shapes >= 1 and backend.stats.replays > 0


@pytest.mark.parametrize("backend_name", ["sdpa", "flash"])
@pytest.mark.parametrize("size", [1, 45])
def test_compiled_graph_forward_matches_eager_bf16(backend_name, size):
    """A compiled + captured tree forward (fused kernels, other reduction orders) against the
    eager forward of the same backend on the same cache state, in bf16; and with fewer kernels."""
    if backend_name == "flash" and not flash_available():
        pytest.skip("flash_attn is not installed")
    model = random_model("qwen2.5-1.5b")
    backend = make_backend(backend_name, "cuda", torch.bfloat16)
    cache = backend.make_cache(model, 512)
    prompt = torch.randint(2, VOCAB, (1, 300), device="cuda")
    causal = torch.ones(299, 299, dtype=torch.bool, device="cuda").tril()
    topo = TreeTopology.from_widths(TREES[size])
    tokens, pos, anc = torch.randint(2, VOCAB, (1, topo.num_nodes), device="cuda"), (299 + topo.depth.cuda())[None], topo.ancestors.cuda()
    drop = torch.zeros(1, dtype=torch.long, device="cuda")
    with torch.no_grad():
        backend.inner.forward(model, cache, prompt[:, :-1], torch.arange(299, device="cuda")[None], causal, last_only=True)
        cache.commit_all()
        ref = backend.inner.forward(model, cache, tokens, pos, anc).clone()
        cache.commit(drop, 0)
        for _ in range(3):  # compile, capture, replay
            got = backend.forward(model, cache, tokens, pos, anc)
            cache.commit(drop, 0)
    assert backend.stats.replays >= 1 and backend.compiler.stats.shapes >= 1
    assert rel_err(got, ref) < 2e-2


@pytest.mark.parametrize("backend_name", ["sdpa", "flash"])
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("tree,overlap", [("chain-4", {"levels": 2}), ([4, 2, 2, 1], {"leaves": 2}), ("dynamic", {"leaves": 2})])
def test_overlap_on_a_second_stream_keeps_greedy_output(backend_name, compile, tree, overlap):
    """Drafting ahead on a second CUDA stream, inside CUDA graphs (compiled or not): fp32 output
    is the target's own greedy output, with a draft that is always right (every step hits) and
    one that is never right; bf16 flash output equals the same run without overlap."""
    if backend_name == "flash" and not flash_available():
        pytest.skip("flash_attn is not installed")
    dtype = torch.float32 if backend_name == "sdpa" else torch.bfloat16
    target = random_model("qwen2.5-1.5b", dtype, seed=1)
    method = "linear" if tree == "chain-4" else "tree"
    backend = make_backend(backend_name, "cuda", dtype, compile=compile)
    config = treespec.OverlapConfig(**overlap)
    gen = torch.Generator(device="cuda").manual_seed(3)
    for i, draft in enumerate([target, random_model("qwen2.5-0.5b", dtype, seed=2)]):
        prompt = torch.randint(2, VOCAB, (1, 30 + 11 * i), device="cuda", generator=gen)
        kwargs = dict(max_new_tokens=40, method=method, tree=tree, attention=backend, eos_token_id=[])
        out = treespec.generate(target, draft, prompt, overlap=config, **kwargs)
        if dtype == torch.float32:
            ref = target.generate(prompt, do_sample=False, max_new_tokens=40, eos_token_id=None, pad_token_id=0)
            assert torch.equal(out.sequences, ref), f"draft {i}"
        else:  # a dynamic tree drafted ahead may verify other nodes, which rounds differently
            ref = treespec.generate(target, draft, prompt, **kwargs).sequences
            assert_equal_but_for_a_near_tie(out.sequences, ref, target, prompt.shape[1])
        if draft is target:
            assert out.stats.ahead_hits > out.stats.ahead_steps // 2  # bf16 near-ties may cost a few


def assert_equal_but_for_a_near_tie(got: torch.Tensor, ref: torch.Tensor, model, start: int) -> None:
    """got, ref: (1, T) bf16 greedy outputs of `model` from one prompt. Equal, or the first new
    token where they part is one the exact (fp32) logits cannot tell from ref's: its fp32 margin
    over ref's token is within twice the bf16 forward's largest logit error at that position."""
    differ = (got[0] != ref[0]).nonzero()
    if len(differ) == 0:
        return
    j = int(differ[0])
    assert j >= start, "the prompt itself differs"
    with torch.no_grad():
        prefix = ref[:, :j]
        p16 = model(prefix).logits[0, -1].float()  # (V,)
        p32 = copy.deepcopy(model).float()(prefix).logits[0, -1]  # (V,)
    margin = (p32[ref[0, j]] - p32[got[0, j]]).abs().item()
    err = (p16 - p32).abs().max().item()
    assert margin <= 2 * err, f"outputs part at token {j - start} where fp32 prefers one by {margin:.3g} (bf16 error {err:.3g})"


def test_generate_loop_compiles_and_captures_nothing_after_the_first_call():
    """10 treespec.generate calls with random prompt and output lengths on CUDA (compiled forwards
    in CUDA graphs, the default): every dynamo graph and every graph capture happens in the first
    call, and fp32 output is the target's own greedy output."""
    import random

    from treespec.engine import speculator as kept

    torch._dynamo.reset()
    treespec.release()
    target = random_model("qwen2.5-1.5b", torch.float32, seed=1)
    draft = random_model("qwen2.5-0.5b", torch.float32, seed=2)
    rng, gen = random.Random(0), torch.Generator(device="cuda").manual_seed(4)
    seen = []
    for _ in range(10):
        prompt = torch.randint(2, VOCAB, (1, rng.randint(1, 600)), device="cuda", generator=gen)
        new = rng.randint(1, 40)
        out = treespec.generate(target, draft, prompt, max_new_tokens=new, tree=[3, 2, 1], eos_token_id=[])
        ref = target.generate(prompt, do_sample=False, max_new_tokens=new, eos_token_id=None, pad_token_id=0)
        assert torch.equal(out.sequences, ref)
        backend = next(iter(kept.KEPT.values())).backend
        seen.append((torch._dynamo.utils.counters["stats"]["unique_graphs"], backend.stats.captures))
    assert seen[0][0] > 0 and seen[0][1] > 0
    assert seen[1:] == [seen[0]] * 9, seen
    treespec.release()


@pytest.mark.parametrize("drafter", ["draft model", "draft head"])
@pytest.mark.parametrize("tree", [[4, 2, 2, 1], "chain-4"])
def test_static_tree_levels_replay_as_one_graph_per_step(drafter, tree):
    """A kept Speculator, greedy, static tree: below the root, the draft levels and the proposals
    between them are one captured run (`run_captured`), replayed once per step from the second
    call on, and the output stays the target's own greedy output (fp32), with a draft model and
    with a draft head (it reads its parents' features inside the same graph)."""
    from treespec.heads.model import DraftHead

    target = random_model("qwen2.5-1.5b", torch.float32, seed=1)
    draft = random_model("qwen2.5-0.5b", torch.float32, seed=2)
    if drafter == "draft head":
        draft = DraftHead.for_target(target, name="random", intermediate_size=256).requires_grad_(False)
    method = "linear" if tree == "chain-4" else "tree"
    gen = torch.Generator(device="cuda").manual_seed(6)
    with treespec.Speculator(target, draft, method=method, tree=tree, max_context=1024) as spec:
        spec.warm_up(progress=None)  # compiles, then captures, every shape (the levels' run too)
        for i in range(3):
            prompt = torch.randint(2, VOCAB, (1, 20 + 37 * i), device="cuda", generator=gen)
            stats = spec.backend.stats
            before = (stats.run_replays, stats.captures)
            out = spec.generate(prompt, max_new_tokens=40, eos_token_id=[])
            ref = target.generate(prompt, do_sample=False, max_new_tokens=40, eos_token_id=None, pad_token_id=0)
            assert torch.equal(out.sequences, ref), f"generation {i}"
            steps = len(out.stats.accepted_lengths)
            assert (stats.run_replays - before[0], stats.captures - before[1]) == (steps, 0), f"generation {i}"


def test_chunked_graphed_prefill_equals_an_eager_prefill():
    """Prefill through fixed-size padded chunks, compiled and captured, leaves the same cache as
    the eager backend's unpadded prefill: the next forward's logits agree (fp32)."""
    from treespec.engine.loop import prefill_chunks

    model = random_model("qwen2.5-1.5b", torch.float32, seed=5)
    prompt = torch.randint(2, VOCAB, (1, 301), device="cuda")
    with torch.no_grad():  # as the engine runs: cache writes are in place
        results = _prefill_both_ways(model, prompt, prefill_chunks)
    assert rel_err(results[1], results[0]) < 1e-4


def _prefill_both_ways(model, prompt, prefill_chunks) -> list:
    """The next token's logits after an eager unpadded prefill and after a graphed padded one."""
    results = []
    for backend in (make_backend("sdpa", "cuda", torch.float32, graphs=False), make_backend("sdpa", "cuda", torch.float32)):
        fixed = isinstance(backend, GraphedBackend)
        cache = backend.make_cache(model, 1024, "target")
        for start, real, size in prefill_chunks(300, fixed):
            ids = torch.cat([prompt[:, start : start + real], prompt.new_zeros(1, size - real)], dim=1)
            pos = torch.arange(start, start + size, device="cuda")[None]
            causal = torch.ones(size, size, dtype=torch.bool, device="cuda").tril()
            backend.forward(model, cache, ids, pos, causal, last_only=True)
            cache.commit(torch.arange(size, device="cuda"), real)
        assert cache.committed == 300
        mask = torch.ones(1, 1, dtype=torch.bool, device="cuda")
        results.append(backend.forward(model, cache, prompt[:, 300:], torch.tensor([[300]], device="cuda"), mask))
    return results


SYNC_DRAFTERS = {  # one step of each must not sync with the host but at the engine's one sync point
    "static": dict(tree=[4, 2, 2, 1]),
    "linear": dict(method="linear", tree="chain-4"),
    "autoregressive": dict(method="autoregressive"),
    "dynamic": dict(tree=treespec.DynamicTreeConfig(width=2, children=2, depth=3, budget=6)),
    "adaptive": dict(tree=treespec.AdaptiveTreeConfig(widths=(2, 1), min_depth=1, max_depth=3)),
    "lookup": dict(tree=[2, 1], lookup=True),
    "overlap": dict(tree=[4, 2, 2, 1], overlap=treespec.OverlapConfig(leaves=2)),
    "dynamic overlap": dict(tree=treespec.DynamicTreeConfig(width=2, children=2, depth=3, budget=6), overlap=True),
}


@pytest.mark.parametrize("attention", ["sdpa", "auto"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("drafter", list(SYNC_DRAFTERS))
def test_a_step_syncs_once_under_sync_debug_mode(drafter, temperature, attention, monkeypatch):
    """One steady-state step of every drafter under torch.cuda.set_sync_debug_mode("error"): any
    synchronising call other than the engine's `_read` (the step's documented sync) raises."""
    from treespec.engine.loop import SpeculativeEngine

    target = random_model("qwen2.5-0.5b", torch.bfloat16, seed=1)
    draft = random_model("qwen2.5-0.5b", torch.bfloat16, num_layers=1, seed=2)
    kwargs = dict(SYNC_DRAFTERS[drafter], temperature=temperature)
    if temperature:
        kwargs["generator"] = torch.Generator(device="cuda").manual_seed(0)
    prompt = torch.randint(2, VOCAB, (1, 40), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    prompt[0, 20:] = prompt[0, :20]  # a repeat: lookup finds matches
    use_draft = kwargs.get("method") != "autoregressive"
    steps = iter(treespec.stream(target, draft if use_draft else None, prompt, max_new_tokens=32, eos_token_id=[],
                                 attention=attention, **kwargs))  # fmt: skip
    next(steps)  # prefill, the first step: buffers made, graphs captured
    next(steps)
    read, reads = SpeculativeEngine._read, []

    def allowed_read(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode(0)
        try:
            reads.append(1)
            return read(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(SpeculativeEngine, "_read", allowed_read)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        next(steps)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert reads == [1]
