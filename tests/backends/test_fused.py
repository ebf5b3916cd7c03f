"""Fused forwards (treespec/backends/fused.py): for every family they serve, the same logits as
the model's own forward through treespec's caches and tree masks, the same greedy generation
through `treespec.generate`, the user's model untouched, a clear reason for every model they
do not serve, and a fullgraph trace under torch.compile with 4 projection matmuls per layer
where the model runs 7.

Tiny random configs (2 layers, vocabulary 64, fp32, CPU), built with transformers' own config
classes; windows shorter than the prompt so that a per-layer mask mix-up changes the output.
"""

import warnings

import pytest
import torch
import transformers
from torch._functorch.aot_autograd import aot_module_simplified

import treespec
from treespec.backends.base import UnsupportedModelError
from treespec.backends.cuda_graphs import GraphedBackend
from treespec.backends.fused import MATMUL_ATTENTION_ROWS, FusedModel, can_fuse, fuse
from treespec.backends.sdpa import SdpaBackend
from treespec.backends.static_cache import StaticSdpaBackend, StaticTreeKVCache
from treespec.testing import sabotaged

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=0, eos_token_id=1)  # fmt: skip
W = dict(sliding_window=4)
ALTERNATING = ["sliding_attention", "full_attention"]
FAMILIES = {  # name -> (config class, model class, attention implementation, extra config)
    "llama": ("LlamaConfig", "LlamaForCausalLM", "sdpa", {}),
    "llama-mha-biases": ("LlamaConfig", "LlamaForCausalLM", "sdpa",
                         dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),  # fmt: skip
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM", "sdpa",  # RoPE scaling, and its attention factor
                   dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=10000.0,
                                             original_max_position_embeddings=8))),  # fmt: skip
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "sdpa", {}),
    "qwen2-windowed": ("Qwen2Config", "Qwen2ForCausalLM", "sdpa", dict(use_sliding_window=True, max_window_layers=1, **W)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "sdpa", dict(head_dim=8)),
    "mistral-windowed": ("MistralConfig", "MistralForCausalLM", "sdpa", W),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", "sdpa", dict(head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "eager", dict(head_dim=8, layer_types=ALTERNATING, **W)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "sdpa", dict(head_dim=8, layer_types=ALTERNATING, **W)),
}
PROMPT = torch.tensor([[3, 17, 42, 8, 25, 11, 5, 9, 30, 31, 2, 40]])  # 12 tokens: longer than every window
# a tree step after the prompt: root, two children of the root, one grandchild of the first child
TREE_IDS, TREE_DEPTHS = torch.tensor([[7, 21, 33, 50]]), torch.tensor([0, 1, 1, 2])
TREE_MASK = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)


def build(family: str, seed: int, **overrides):
    config_cls, model_cls, attn, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**SIZES, **extra, **overrides})
    config._attn_implementation = attn
    gen = torch.Generator().manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # larger than the default init: varied greedy choices, partial acceptance
        for name, p in model.named_parameters():
            if p.dim() > 1 or name.endswith("bias") or "norm" in name:  # norms and biases away from their init too
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.1) + (p if p.dim() == 1 else 0))
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, build(request.param, 0)


def run_prompt_and_tree(backend, model, last_only: bool = False, **kwargs):
    """Logits of a prompt (causal) and then of a tree step against the committed prompt."""
    cache = backend.make_cache(model, 64)
    t = PROMPT.shape[1]
    with torch.no_grad():
        prompt = backend.forward(model, cache, PROMPT, torch.arange(t)[None], torch.ones(t, t, dtype=torch.bool).tril(),
                                 last_only=last_only)  # fmt: skip
        cache.commit_all()
        tree = backend.forward(model, cache, TREE_IDS, (t + TREE_DEPTHS)[None], TREE_MASK)
    return prompt, tree


@pytest.mark.parametrize("rows", [MATMUL_ATTENTION_ROWS, 0], ids=["matmul-attention", "sdpa-attention"])
@pytest.mark.parametrize("backend", [SdpaBackend(), StaticSdpaBackend()], ids=["TreeKVCache", "StaticTreeKVCache"])
def test_logits_equal_the_models_own(family, backend, rows):
    _, model = family
    fused = fuse(model, rows)
    for ours, theirs in zip(run_prompt_and_tree(backend, fused), run_prompt_and_tree(backend, model)):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    last, _ = run_prompt_and_tree(backend, fused, last_only=True)
    torch.testing.assert_close(last, run_prompt_and_tree(backend, model)[0][-1:], atol=1e-5, rtol=0)


def test_a_broken_fusion_is_caught():
    """The logit comparison detects a wrong weight order in the concatenation (k and v swapped)."""
    model = build("qwen2", 0)
    fused = fuse(model)
    layer, kv = fused.layers[0], fused.layers[0].kv_heads * fused.layers[0].head_dim
    with torch.no_grad():
        k, v = layer.w_qkv[-2 * kv : -kv].clone(), layer.w_qkv[-kv:].clone()
        layer.w_qkv[-2 * kv : -kv], layer.w_qkv[-kv:] = v, k
    ours, theirs = run_prompt_and_tree(SdpaBackend(), fused)[1], run_prompt_and_tree(SdpaBackend(), model)[1]
    assert (ours - theirs).abs().max() > 1e-3


def test_flash_backends_call_is_refused():
    """FlashBackend hands the model a boolean block mask and its own attention metadata; a fused
    forward would misread them (with one key, silently), so it refuses the call."""
    fused, backend = fuse(build("qwen2", 0)), SdpaBackend()
    cache = backend.make_cache(fused, 64)
    with pytest.raises(UnsupportedModelError, match="attention='flash'"):
        fused(input_ids=PROMPT[:, :1], position_ids=torch.zeros(1, 1, dtype=torch.long),
              attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool), cache=cache, tree_attention=object())  # fmt: skip


def test_hidden_states_are_the_final_norms_output():
    model = build("qwen3", 0)
    fused = fuse(model)
    backend = SdpaBackend()
    n = PROMPT.shape[1]
    outputs = []
    for m in (fused, model):
        cache = backend.make_cache(m, 64)
        with torch.no_grad():
            outputs.append(m(input_ids=PROMPT, position_ids=torch.arange(n)[None],
                             attention_mask=cache.sdpa_mask(torch.ones(n, n, dtype=torch.bool).tril(), torch.float32),
                             cache=cache, use_cache=True, logits_to_keep=1, output_hidden_states=True))  # fmt: skip
    ours, theirs = outputs
    assert ours.hidden_states[-1].shape == (1, n, SIZES["hidden_size"])
    torch.testing.assert_close(ours.hidden_states[-1], theirs.hidden_states[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)


def test_greedy_generation_is_exact(family):
    name, target = family
    draft = build(name, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = target.generate(PROMPT, do_sample=False, max_new_tokens=16, eos_token_id=None, pad_token_id=0,
                              attention_mask=torch.ones_like(PROMPT))  # fmt: skip
    fused_target = fuse(target)
    for fused_draft in (fuse(draft), fuse(target)):  # an unrelated draft, and one that is always right
        out = treespec.generate(fused_target, fused_draft, PROMPT, max_new_tokens=16, tree=[2, 2, 1], eos_token_id=[])
        assert torch.equal(out.sequences, ref)


def test_greedy_generation_through_the_compiled_engine_is_exact():
    """The GPU engine's path on the CPU: static caches, every forward shape compiled (aot_eager,
    fullgraph) from the fused models, as `GraphedBackend` compiles the models it is given."""
    torch._dynamo.reset()
    target, draft = build("qwen2-windowed", 0), build("qwen2-windowed", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = target.generate(PROMPT, do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0,
                              attention_mask=torch.ones_like(PROMPT))  # fmt: skip
    backend = GraphedBackend(StaticSdpaBackend(), compile=True, compile_backend="aot_eager")
    out = treespec.generate(fuse(target), fuse(draft), PROMPT, max_new_tokens=12, tree=[2, 1], attention=backend,
                            eos_token_id=[])  # fmt: skip
    assert torch.equal(out.sequences, ref)
    assert backend.compiler.stats.shapes > 0 and "FusedModel" in backend.compiler.stats.log[0]
    torch._dynamo.reset()


def _snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "ids": {k: id(p) for k, p in model.named_parameters()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "attrs": {name: sorted(vars(m)) for name, m in model.named_modules()},
        "modules": [name for name, _ in model.named_modules()],
    }


def test_the_users_model_is_unchanged():
    model = build("gemma3", 0)
    before = _snapshot(model)
    fused = fuse(model)
    run_prompt_and_tree(StaticSdpaBackend(), fused)
    after = _snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["ids"] == before["ids"] and after["grad"] == before["grad"]
    assert after["attrs"] == before["attrs"] and after["modules"] == before["modules"]
    # the weights that are not concatenated are the model's own tensors, not copies
    layer, source = fused.layers[0], model.model.layers[0]
    assert layer.w_o is source.self_attn.o_proj.weight and layer.w_down is source.mlp.down_proj.weight
    assert fused.w_head.data_ptr() == model.lm_head.weight.data_ptr()
    assert layer.w_qkv.data_ptr() != source.self_attn.q_proj.weight.data_ptr()


def test_attributes_are_read_from_the_model():
    model = build("llama", 0)
    fused = fuse(model)
    assert fused.wrapped is model and isinstance(fused, FusedModel)
    assert fused.config is model.config and fused.dtype == model.dtype and fused.device == model.device
    assert fused.can_generate() and fused.generation_config is model.generation_config
    with pytest.raises(AttributeError):
        fused.no_such_attribute


def _hooked(model):
    model.model.layers[0].mlp.register_forward_hook(lambda *args: None)
    return model


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(**SIZES, num_local_experts=4)),
         "MixtralForCausalLM is not one of the families"),
        (lambda: sabotaged(build("qwen2", 0), 3), "Sabotaged is not one of the families"),
        (lambda: build("llama", 0, rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0)),
         "dynamic RoPE"),
        (lambda: build("qwen2", 0, attention_dropout=0.1).train(), "training mode with attention dropout"),
        (lambda: _hooked(build("qwen2", 0)), "forward hooks on model.layers.0.mlp"),
    ],
    ids=["moe", "subclass", "dynamic-rope", "dropout", "hook"],
)
def test_unsupported_models_give_the_reason(make, reason):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make()
    assert reason in can_fuse(model)
    with pytest.raises(UnsupportedModelError, match="cannot fuse: .*Run the model itself"):
        fuse(model)


def test_supported_families_need_no_fallback(family):
    assert can_fuse(family[1]) is None


def test_transformers_own_output_recording_hooks_do_not_block_fusing():
    """A model once asked for its hidden states carries transformers' (inactive) recording hooks."""
    model = build("qwen2", 0)
    with torch.no_grad():
        model(PROMPT, output_hidden_states=True)
    assert any(m._forward_hooks for m in model.modules())
    assert can_fuse(model) is None


def _aten_graphs(graphs: list):
    """A torch.compile backend that keeps each forward's aten graph (aot_eager with a look)."""

    def backend(gm, inputs):
        def keep(graph, _):
            graphs.append(graph)
            return graph.forward

        return aot_module_simplified(gm, inputs, fw_compiler=keep)

    return backend


def _matmuls(graph) -> int:
    """Projection matmuls (attention's own products are bmm or sdpa, not counted)."""
    return sum(str(node.target) in ("aten.mm.default", "aten.addmm.default") for node in graph.graph.nodes)


@pytest.mark.parametrize("name", ["qwen2-windowed", "qwen3", "gemma2", "gemma3"])
def test_compiles_to_one_graph_with_fused_matmuls(name):
    """fullgraph=True, dynamic=False traces without a break (a break raises), gives the eager
    logits, and has 4 projection matmuls per layer (q|k|v, o, gate|up, down)."""
    torch._dynamo.reset()
    fused = fuse(build(name, 0))
    graphs = []
    compiled = torch.compile(fused, backend=_aten_graphs(graphs), fullgraph=True, dynamic=False)
    backend = StaticSdpaBackend()
    eager = run_prompt_and_tree(backend, fused)
    with torch._dynamo.config.patch(recompile_limit=16):
        traced = run_prompt_and_tree(backend, compiled)
    for ours, theirs in zip(traced, eager):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert len(graphs) == 2  # one per shape (prompt, tree step), no break
    assert _matmuls(graphs[1]) == 4 * SIZES["num_hidden_layers"] + 1  # + the LM head


def test_the_models_own_forward_runs_three_matmuls_more_per_layer():
    """The count above can tell fused from unfused: the model's own forward has 7 per layer."""
    torch._dynamo.reset()
    model = build("qwen2", 0)
    counts = []
    for m in (fuse(model), model):
        graphs = []
        compiled = torch.compile(m, backend=_aten_graphs(graphs), fullgraph=True, dynamic=False)
        backend, cache = StaticSdpaBackend(), StaticSdpaBackend().make_cache(m, 64)
        with torch.no_grad():
            backend.forward(compiled, cache, TREE_IDS, TREE_DEPTHS[None], TREE_MASK)
        counts.append(_matmuls(graphs[0]))
    assert counts == [4 * SIZES["num_hidden_layers"] + 1, 7 * SIZES["num_hidden_layers"] + 1]


def test_static_cache_writes_land_in_the_models_layout():
    """The fused forward writes keys through the cache's own update: the static cache holds the
    same keys and values after a fused forward as after the model's own."""
    model = build("qwen2", 0)
    caches = []
    for m in (fuse(model), model):
        backend = StaticSdpaBackend()
        cache = backend.make_cache(m, 64)
        t = PROMPT.shape[1]
        with torch.no_grad():
            backend.forward(m, cache, PROMPT, torch.arange(t)[None], torch.ones(t, t, dtype=torch.bool).tril())
        assert isinstance(cache, StaticTreeKVCache)
        caches.append(cache.kv)
    torch.testing.assert_close(caches[0], caches[1], atol=1e-5, rtol=0)
