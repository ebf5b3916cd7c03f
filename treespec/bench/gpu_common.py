"""Shared pieces of the GPU benchmarks: real-architecture random-weight models, timers, and a
backend wrapper that times each forward on the device.

Timers come from treespec/bench/timing.py. Dimension letters: docs/dimensions.md.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

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
}  # fmt: skip
VOCAB = 151936
# GPU_BENCH_DEVICE=cpu (with --targets tiny) smoke-tests the scripts' logic without a GPU
DEVICE = os.environ.get("GPU_BENCH_DEVICE", "cuda")
QWEN25_SHAPES["tiny"] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class _HostEvent:
    """torch.cuda.Event stand-in for CPU smoke runs."""

    def __init__(self, **kwargs):
        self.t = 0.0

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other) -> float:
        return (other.t - self.t) * 1e3


def event():
    return torch.cuda.Event(enable_timing=True) if DEVICE == "cuda" else _HostEvent()


def random_qwen(shape: str, seed: int, dtype: torch.dtype = torch.bfloat16) -> Qwen2ForCausalLM:
    """A Qwen2.5-shaped model on CUDA with N(0, 0.02) weights drawn from a seeded generator."""
    config = Qwen2Config(
        vocab_size=VOCAB, max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=151643,
        eos_token_id=151645, pad_token_id=151643, **QWEN25_SHAPES[shape],
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    with torch.device(DEVICE):
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype).eval()
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=gen)
    model.generation_config.eos_token_id = None  # random weights: never stop early
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
    """Wraps a backend; records a CUDA event pair (and the model) around every forward, with no
    host sync."""

    inner: object
    events: list = field(default_factory=list)
    models: list = field(default_factory=list)  # id() of the model of each forward

    @property
    def name(self) -> str:
        return self.inner.name

    def check_model(self, model) -> None:
        self.inner.check_model(model)

    def __getattr__(self, attr):  # make_cache and friends, when the inner backend has them
        if attr in ("inner", "events", "models"):
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def forward(self, model, *args, **kwargs):
        a, b = event(), event()
        a.record()
        out = self.inner.forward(model, *args, **kwargs)
        b.record()
        self.events.append((a, b))
        self.models.append(id(model))
        return out

    def forward_ms(self, start: int = 0) -> float:
        sync()
        return sum(a.elapsed_time(b) for a, b in self.events[start:])

    def forward_ms_of(self, model, skip: int = 0) -> float:
        """Device ms in forwards of `model`, after the first `skip` forwards (prefill)."""
        sync()
        return sum(a.elapsed_time(b) for (a, b), m in list(zip(self.events, self.models))[skip:] if m == id(model))


def out_dir() -> Path:
    path = Path(os.environ.get("OUT", "outputs/gpu"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_json(name: str, data) -> None:
    (out_dir() / name).write_text(json.dumps(data, indent=1, default=str))


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


def hf_generate(target, ids: list[int], new_tokens: int, eos: list[int], **generate_kwargs) -> dict:
    """transformers' greedy `generate` on one prompt, timed, with its target forwards counted:
    dict(tokens, seconds, new, forwards, tau). generate_kwargs: assistant_model=...,
    cache_implementation=..., prompt_lookup_num_tokens=..."""
    prompt = torch.tensor([ids], device=DEVICE)
    calls = [0]
    hook = target.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    try:
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            seq = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, temperature=None,
                                  top_p=None, top_k=None, max_new_tokens=new_tokens, eos_token_id=eos,
                                  pad_token_id=eos[-1], **generate_kwargs)  # fmt: skip
        sync()
        seconds = time.perf_counter() - t0
    finally:
        hook.remove()
    new = seq.shape[1] - len(ids)
    return dict(tokens=seq[0, len(ids):].tolist(), seconds=seconds, new=new, forwards=calls[0], tau=new / max(calls[0], 1))
