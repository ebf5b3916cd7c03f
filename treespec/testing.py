"""Tiny random-weight models for tests and smoke runs (no download, fp32, CPU)."""

from __future__ import annotations

import functools

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


def cycle_order(vocab_size: int, seed: int) -> list[int]:
    """The token cycle of `tiny_cycle_model(seed, vocab_size=...)`: order[i] is followed by
    order[(i + 1) % V] with high probability."""
    return torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed)).tolist()


def tiny_cycle_model(
    seed: int,
    *,
    vocab_size: int = 8,
    confidence: float = 3.0,
    noise: float = 0.5,
    order_seed: int | None = None,
) -> PreTrainedModel:
    """A 2-layer Qwen2 whose next token depends on the current token only, and is mostly its
    successor on a cycle through the whole vocabulary: an output that repeats with high
    probability but not with certainty at temperature > 0 (the setting prompt lookup is for).

    The attention and MLP output projections are zero, so the residual stream at every position
    is the current token's embedding: one-hot (hidden size = V), which the final RMSNorm scales
    to sqrt(V). lm_head then reads logits L[i] = confidence * onehot(succ(i)) + noise * N(0, 1)
    (drawn from `seed`), so p(succ(i) | i) is about e^c / (e^c + V - 1) at temperature 1 (0.74
    for c = 3, V = 8) and the other tokens get unequal, nonzero mass. The cycle is
    `cycle_order(V, order_seed)` (order_seed defaults to seed): a second model with another
    order_seed proposes the wrong successor with the same confidence (a useless draft), one with
    the same order_seed and a lower confidence a useful one.
    """
    v = vocab_size
    model = tiny_model(seed, vocab_size=v, hidden_size=v, num_heads=2, num_kv_heads=1)
    order = cycle_order(v, seed if order_seed is None else order_seed)
    succ = torch.empty(v, dtype=torch.long)
    succ[order] = torch.tensor(order[1:] + order[:1])
    gen = torch.Generator().manual_seed(seed + 1)
    logits = noise * torch.randn(v, v, generator=gen)  # (V, V) row i: logits after token i
    logits[torch.arange(v), succ] += confidence
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(v))
        model.lm_head.weight.copy_(logits.T / v**0.5)  # the final norm scales the one-hot to sqrt(V)
    return model


def sabotaged(target: PreTrainedModel, period: int) -> PreTrainedModel:
    """The target itself, except that its greedy choice for every position that is a multiple
    of `period` is pushed to second place: drafts are right for exactly period-1 tokens, then wrong."""
    cls = type(target)

    class Sabotaged(cls):
        @functools.wraps(cls.forward)  # keeps the signature, by which generate() names the cache keyword
        def forward(self, *args, position_ids=None, **kwargs):
            out = super().forward(*args, position_ids=position_ids, **kwargs)
            logits = out.logits.clone()  # (1, n, V)
            pos = position_ids[0, -logits.shape[1]:] + 1  # position each logit predicts
            bad = pos % period == 0
            top = logits[0].argmax(-1)
            logits[0, bad, top[bad]] = -1e9
            out.logits = logits
            return out

    model = Sabotaged(target.config).eval()
    model.load_state_dict(target.state_dict())
    return model
