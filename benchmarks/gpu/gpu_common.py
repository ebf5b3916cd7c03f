"""Shared pieces of the GPU studies: real-architecture random-weight models, the device, the
GPU-only timers (CUDA events, kernel counts) and a backend wrapper that times each forward on
the device, and the analysis of two outputs that differ (bf16 near-ties).

Loading, prompts, the transformers baselines, timing and JSON records are the package's
harness (treespec.bench.harness, treespec.bench.timing). GPU_BENCH_DEVICE=cpu (with the tiny
shapes / --model tiny-random) smoke-tests the scripts' logic without a GPU.
Dimension letters: docs/dimensions.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from treespec.bench import timing

# Qwen2.5 / Qwen2.5-Coder architecture shapes (config.json of the published checkpoints). The
# 7B's vocabulary is set to the small models' 151936 (it has 152064) so that it can be paired
# with the real 0.5B draft for the projection; the difference is 0.1% of its lm_head.
QWEN25_SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
}  # fmt: skip
VOCAB = 151936
DEVICE = os.environ.get("GPU_BENCH_DEVICE", "cuda")


def sync() -> None:
    timing.synchronize(DEVICE)


def random_qwen(shape: str, seed: int, dtype: torch.dtype = torch.bfloat16, vocab_size: int = VOCAB) -> Qwen2ForCausalLM:
    """A Qwen2.5-shaped model on DEVICE with N(0, 0.02) weights drawn from a seeded generator; it
    never stops early (no stop ids: random weights)."""
    config = Qwen2Config(vocab_size=vocab_size, max_position_embeddings=32768, rms_norm_eps=1e-6, **QWEN25_SHAPES[shape])
    config._attn_implementation = "sdpa"
    with torch.device(DEVICE):
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype).eval()
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=gen)
    model.generation_config.eos_token_id = None
    return model


def median_ms(fn, iters: int, warmup: int = 2) -> float:
    """timing.median_ms on DEVICE: median synchronised wall ms of fn()."""
    return timing.median_ms(fn, iters, warmup=warmup, device=DEVICE)


def device_ms(fn, iters: int) -> float:
    """timing.device_ms on CUDA (event time, launch gaps included); wall time on CPU smoke runs."""
    return timing.device_ms(fn, iters) if DEVICE == "cuda" else median_ms(fn, iters, warmup=0)


def kernel_count(fn) -> int | None:
    """CUDA kernels one call of fn() launches (graph replays included), by torch.profiler."""
    if DEVICE != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@dataclass
class TimedBackend:
    """Wraps a backend; times every forward on the device (timing.DeviceSpan: CUDA events, no
    host sync) and records its model."""

    inner: object
    spans: list = field(default_factory=list)
    models: list = field(default_factory=list)  # id() of the model of each forward

    @property
    def name(self) -> str:
        return self.inner.name

    def check_model(self, model) -> None:
        self.inner.check_model(model)

    def __getattr__(self, attr):  # make_cache and friends, when the inner backend has them
        if attr in ("inner", "spans", "models"):
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def forward(self, model, *args, **kwargs):
        span = timing.DeviceSpan(DEVICE).start()
        out = self.inner.forward(model, *args, **kwargs)
        self.spans.append(span.stop())
        self.models.append(id(model))
        return out

    def clear(self) -> None:
        self.spans.clear()
        self.models.clear()

    def forward_ms(self, start: int = 0) -> float:
        return sum(s.ms() for s in self.spans[start:])

    def forward_ms_of(self, model, skip: int = 0) -> float:
        """Device ms in forwards of `model`, after the first `skip` forwards (prefill)."""
        return sum(s.ms() for s, m in list(zip(self.spans, self.models))[skip:] if m == id(model))


def device_info() -> dict:
    if DEVICE != "cuda":
        return dict(gpu=None, torch=torch.__version__)
    props = torch.cuda.get_device_properties(0)
    import transformers

    info = dict(gpu=props.name, memory_gb=round(props.total_memory / 2**30, 1), torch=torch.__version__,
                transformers=transformers.__version__, cuda=torch.version.cuda)  # fmt: skip
    try:
        import flash_attn

        info["flash_attn"] = flash_attn.__version__
    except ImportError:
        info["flash_attn"] = None
    return info


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def divergence_margin(target, ids: torch.Tensor, ref_tokens: list[int], i: int) -> dict:
    """At the first position where two outputs differ: the target's top-2 logits there (one plain
    forward over the prompt (1, T) and the common prefix). A gap of about one bf16 step is a tie."""
    seq = torch.cat([ids, torch.tensor([ref_tokens[:i]], dtype=ids.dtype, device=ids.device)], dim=1)
    with torch.no_grad():
        logits = target(seq, logits_to_keep=1).logits[0, -1].float()
    top = logits.topk(2)
    return dict(position=i, top2=top.indices.tolist(), gap=(top.values[0] - top.values[1]).item(), top1=top.values[0].item())
