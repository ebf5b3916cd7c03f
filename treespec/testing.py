"""Tiny random-weight models for tests and smoke runs (no download, fp32, CPU)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

ARCHITECTURES = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}


def tiny_model(
    seed: int,
    *,
    arch: str = "qwen2",
    vocab_size: int = 64,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_positions: int = 512,
    init_std: float = 0.02,
) -> PreTrainedModel:
    """A 2-layer decoder with random weights drawn from `seed` (GQA by default).

    A larger `init_std` gives peakier, more varied next-token distributions, which is what
    distribution tests want; the default keeps transformers' own initialisation scale.
    """
    config_cls, model_cls = ARCHITECTURES[arch]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        initializer_range=init_std,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    gen = torch.Generator().manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * init_std)
    return model


def tiny_pair(seed: int = 0, *, arch: str = "qwen2", **kwargs) -> tuple[PreTrainedModel, PreTrainedModel]:
    """(target, draft): two unrelated tiny models sharing one vocabulary; the draft is smaller."""
    target = tiny_model(seed, arch=arch, **kwargs)
    draft_kwargs = dict(kwargs, hidden_size=max(16, kwargs.get("hidden_size", 32) // 2), num_layers=1)
    draft = tiny_model(seed + 1000, arch=arch, **draft_kwargs)
    return target, draft
