"""The model-family matrix (docs/models.md): greedy exactness of tree, linear and autoregressive
decoding against each target's own generate(do_sample=False), on tiny random configs (2 layers,
vocabulary 64, fp32, CPU) of every decoder family transformers' attention interface serves,
sliding windows and soft-capping included; families treespec cannot serve fail with a clear error
before any work. Also: a forward passes the cache by the keyword the installed transformers wants
(no deprecation warning)."""

import warnings

import pytest
import torch
import transformers

import treespec
from treespec.backends.flash import FlashBackend
from treespec.backends.sdpa import UnsupportedModelError

PROMPT = torch.tensor([[3, 17, 42, 8, 25, 11, 5, 9, 30, 31, 2, 40]])  # 12 tokens: longer than every window
NEW = 16
SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=0, eos_token_id=1)  # fmt: skip
W = dict(sliding_window=4)  # a window shorter than the prompt: a mask that ignores it changes the output
ALTERNATING = ["sliding_attention", "full_attention"]

# family -> (config class, model class, attention implementation, extra config)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "sdpa", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "sdpa", {}),
    "qwen2-windowed": ("Qwen2Config", "Qwen2ForCausalLM", "sdpa", dict(use_sliding_window=True, max_window_layers=1, **W)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "sdpa", dict(head_dim=8)),
    "mistral-windowed": ("MistralConfig", "MistralForCausalLM", "sdpa", W),
    "mixtral-windowed": ("MixtralConfig", "MixtralForCausalLM", "sdpa", dict(num_local_experts=4, **W)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", "sdpa", dict(head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "eager", dict(head_dim=8, layer_types=ALTERNATING, **W)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "eager", dict(head_dim=8, layer_types=ALTERNATING, **W)),
    "gemma3-sdpa": ("Gemma3TextConfig", "Gemma3ForCausalLM", "sdpa", dict(head_dim=8, layer_types=ALTERNATING, **W)),
    "phi3-windowed": ("Phi3Config", "Phi3ForCausalLM", "sdpa", W),
    "phi": ("PhiConfig", "PhiForCausalLM", "sdpa", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", "sdpa", {}),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", "sdpa", dict(layer_types=ALTERNATING, **W)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", "sdpa", {}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", "sdpa", {}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", "sdpa", {}),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", "sdpa", dict(layer_types=ALTERNATING, **W)),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", "sdpa", {}),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", "sdpa", dict(head_dim=8)),
}


def build(family: str, seed: int):
    config_cls, model_cls, attn, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**SIZES, **extra})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # larger than the default init: varied greedy choices, partial acceptance
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target, draft = build(request.param, 0), build(request.param, 1)
        ref = target.generate(PROMPT, do_sample=False, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0,
                              attention_mask=torch.ones_like(PROMPT))  # fmt: skip
    return target, draft, ref


@pytest.mark.parametrize("method,tree", [("autoregressive", None), ("linear", "chain-3"), ("tree", [3, 2, 2, 1])])
def test_greedy_is_exact(family, method, tree):
    target, draft, ref = family
    out = treespec.generate(target, draft, PROMPT, max_new_tokens=NEW, method=method, tree=tree, eos_token_id=[])
    assert torch.equal(out.sequences, ref)


def test_a_mask_that_ignores_the_window_is_caught(monkeypatch):
    """The window test can fail: with the window dropped from treespec's masks (or off by one),
    the windowed families no longer match their own generate."""
    import treespec.backends.sdpa as sdpa

    target = build("mistral-windowed", 0)
    ref = target.generate(PROMPT, do_sample=False, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0,
                          attention_mask=torch.ones_like(PROMPT))  # fmt: skip
    keep = sdpa.window_keep
    for broken in (lambda *a: keep(*a[:-1], 10**6), lambda *a: keep(*a[:-1], a[-1] + 1), lambda *a: keep(*a[:-1], a[-1] - 1)):
        monkeypatch.setattr(sdpa, "window_keep", broken)
        out = treespec.generate(target, None, PROMPT, max_new_tokens=NEW, method="autoregressive", eos_token_id=[])
        assert not torch.equal(out.sequences, ref)


def test_no_deprecation_warning_from_a_forward(family):
    target, draft, _ = family
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        treespec.generate(target, draft, PROMPT, max_new_tokens=4, tree=[2, 1], eos_token_id=[])
    bad = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not bad, [str(w.message) for w in bad]


@pytest.mark.parametrize(
    "config_cls,model_cls,extra,match",
    [
        ("Llama4TextConfig", "Llama4ForCausalLM", dict(head_dim=8), r"\['chunked_attention'\] layers"),
        ("BertConfig", "BertForMaskedLM", {}, "not a decoder-only causal LM"),
    ],
)
def test_families_it_cannot_serve_are_refused(config_cls, model_cls, extra, match):
    sizes = {k: v for k, v in SIZES.items() if k != "num_key_value_heads"} if config_cls == "BertConfig" else SIZES
    config = getattr(transformers, config_cls)(**{**sizes, **extra})
    config._attn_implementation = "sdpa"
    model = getattr(transformers, model_cls)(config).eval()
    with pytest.raises(UnsupportedModelError, match=match):
        treespec.generate(model, None, PROMPT, max_new_tokens=2, method="autoregressive")


def test_flash_refuses_windowed_models_and_names_sdpa():
    for family in ("mistral-windowed", "gemma3"):
        with pytest.raises(UnsupportedModelError, match="use attention='sdpa', which honours each layer's window"):
            FlashBackend().check_model(build(family, 0))


@pytest.mark.parametrize("name", ["mistral-windowed", "gemma3", "qwen2-windowed"])
def test_windows_with_the_static_cache(name):
    """The static cache's device-built mask (the GPU path, run here without graph capture)."""
    from treespec.backends.cuda_graphs import GraphedBackend
    from treespec.backends.static_cache import StaticSdpaBackend

    target, draft = build(name, 0), build(name, 1)
    ref = target.generate(PROMPT, do_sample=False, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0,
                          attention_mask=torch.ones_like(PROMPT))  # fmt: skip
    backend = GraphedBackend(StaticSdpaBackend())
    for method, tree in (("autoregressive", None), ("tree", [3, 2, 2, 1])):
        out = treespec.generate(target, draft, PROMPT, max_new_tokens=NEW, method=method, tree=tree,
                                attention=backend, eos_token_id=[])  # fmt: skip
        assert torch.equal(out.sequences, ref), (name, method)
