"""Compiled forwards (treespec/backends/compiled.py) on the CPU.

The compiled path is the model's forward under torch.compile(fullgraph=True, dynamic=False)
over treespec's static caches and tree masks. These tests use the 'aot_eager' backend: the same
dynamo trace (fullgraph: any graph break fails) and the same functionalised cache writes that
inductor receives, without inductor's C++ builds, which take minutes per shape on a small CPU.
inductor itself is exercised on the GPU (tests/test_gpu.py).
"""

import logging

import pytest
import torch

import treespec
from treespec.backends.compiled import CompiledForwards
from treespec.backends.cuda_graphs import GraphedBackend
from treespec.backends.flash import FlashBackend, reference_prefix_attention
from treespec.backends.factory import FLASH_MIN_CONTEXT, make_backend
from treespec.backends.sdpa import SdpaBackend
from treespec.backends.static_cache import StaticSdpaBackend
from treespec.testing import tiny_model

PROMPT = torch.tensor([[5, 9, 2, 33, 17, 4, 40, 12, 8, 3, 21]])


def compiled_backend(inner: str) -> GraphedBackend:
    wrapped = FlashBackend(prefix_attention=reference_prefix_attention) if inner == "flash" else StaticSdpaBackend()
    return GraphedBackend(wrapped, compile=True, compile_backend="aot_eager")


@pytest.fixture(scope="module")
def pair():
    return tiny_model(0), tiny_model(7, hidden_size=16, num_layers=1)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """dynamo's compiled graphs are process-wide (and do not guard on which model of the same
    architecture runs): start every test from none, so that what it compiles is its own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "inner,method,tree",
    [("sdpa", "autoregressive", None), ("sdpa", "tree", [3, 2, 1]), ("sdpa", "tree", "dynamic"), ("flash", "linear", "chain-3")],
)
def test_compiled_generation_equals_target_greedy(pair, inner, method, tree, caplog):
    """Greedy decoding through compiled forwards is token for token the target's own greedy
    output, for every forward shape of the loop, on one backend across two generations."""
    target, draft = pair
    backend = compiled_backend(inner)
    with caplog.at_level(logging.INFO, logger="treespec"):
        for prompt in (PROMPT, PROMPT[:, :6]):
            ref = target.generate(prompt, do_sample=False, max_new_tokens=20, eos_token_id=None, pad_token_id=0)
            out = treespec.generate(
                target, None if method == "autoregressive" else draft, prompt,
                max_new_tokens=20, method=method, tree=tree, attention=backend, eos_token_id=[],
            )  # fmt: skip
            assert torch.equal(out.sequences, ref)
    # the forwards really went through torch.compile (a silent eager fallback would pass above)
    stats = backend.compiler.stats
    assert stats.shapes >= 1 and len(stats.log) == stats.shapes
    assert any("compiled Qwen2ForCausalLM forward" in r.getMessage() for r in caplog.records)


def test_compile_off_and_cpu_default(pair):
    target, _ = pair
    for backend in (GraphedBackend(StaticSdpaBackend(), compile=False), GraphedBackend(StaticSdpaBackend())):
        out = treespec.generate(target, None, PROMPT, max_new_tokens=4, method="autoregressive", attention=backend, eos_token_id=[])
        assert out.sequences.shape[1] == PROMPT.shape[1] + 4
    assert GraphedBackend(StaticSdpaBackend(), compile=False).compiler is None
    # compile=None compiles on CUDA only: nothing was compiled on the CPU
    assert backend.compiler.stats.shapes == 0


def test_make_backend_compile_and_auto_context():
    assert make_backend("sdpa", "cpu", compile=False).__class__ is SdpaBackend
    compiled = make_backend("sdpa", "cpu", compile=True)
    assert isinstance(compiled, GraphedBackend) and compiled.compile and not compiled.graphs
    assert isinstance(compiled.inner, StaticSdpaBackend)
    # 'auto' never picks flash on the CPU, whatever the context
    assert make_backend("auto", "cpu", context_length=FLASH_MIN_CONTEXT * 4).name == "sdpa"


def test_cudagraph_modes_are_refused():
    with pytest.raises(ValueError, match="captures its own CUDA graphs"):
        CompiledForwards("reduce-overhead")
