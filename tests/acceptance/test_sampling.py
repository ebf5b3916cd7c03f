"""SamplingConfig validation and logits_to_probs against transformers' own warpers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from treespec.acceptance.sampling import SamplingConfig, logits_to_probs


# --------------------------------------------------------------------------- SamplingConfig


def test_defaults_and_greedy():
    cfg = SamplingConfig()
    assert cfg.greedy and cfg.top_k == 0 and cfg.top_p == 1.0 and cfg.without_replacement is True
    assert not SamplingConfig(temperature=0.7).greedy
    cfg = SamplingConfig(temperature=1, top_k=5, top_p=1)
    assert isinstance(cfg.temperature, float) and isinstance(cfg.top_p, float)
    with pytest.raises(AttributeError):  # frozen
        cfg.temperature = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": None}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": "5"}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_p": "0.9"}, "top_p"),
        ({"without_replacement": 1}, "without_replacement"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kwargs)


# --------------------------------------------------------------------------- logits_to_probs


def reference(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """What generate(do_sample=True) samples from: the warpers in generate's order, only the
    active ones, on float32 scores of shape (rows, V)."""
    scores = logits.float()
    if cfg.temperature != 1.0:
        scores = TemperatureLogitsWarper(cfg.temperature)(None, scores)
    if cfg.top_k != 0:
        scores = TopKLogitsWarper(top_k=cfg.top_k, min_tokens_to_keep=1)(None, scores)
    if cfg.top_p < 1.0:
        scores = TopPLogitsWarper(top_p=cfg.top_p, min_tokens_to_keep=1)(None, scores)
    return scores.softmax(dim=-1)


CONFIGS = [
    SamplingConfig(temperature=1.0),
    SamplingConfig(temperature=0.7),
    SamplingConfig(temperature=1.3, top_k=1),
    SamplingConfig(temperature=1.0, top_k=5),
    SamplingConfig(temperature=0.5, top_k=50),  # top_k > V: keeps all
    SamplingConfig(temperature=1.0, top_p=0.9),
    SamplingConfig(temperature=0.8, top_p=0.3),
    SamplingConfig(temperature=2.0, top_p=1e-6),  # keeps exactly one token
    SamplingConfig(temperature=0.6, top_k=10, top_p=0.8),
    SamplingConfig(temperature=1.0, top_k=3, top_p=0.95),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"t{c.temperature}-k{c.top_k}-p{c.top_p}" for c in CONFIGS])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_matches_transformers_warpers(cfg, ties):
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(64, 32, generator=gen)
    if ties:  # coarse grid: many equal logits, including at the top-k / top-p boundary
        logits = torch.round(logits)
    got = logits_to_probs(logits, cfg)
    want = reference(logits, cfg)
    assert got.dtype == torch.float32
    assert torch.equal(got == 0, want == 0)  # the same tokens are filtered
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.sum(-1), torch.ones(64))


def test_any_leading_shape_and_low_precision_input():
    cfg = SamplingConfig(temperature=0.9, top_k=7, top_p=0.85)
    logits = torch.randn(3, 5, 20, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = logits_to_probs(logits, cfg)
    assert got.shape == (3, 5, 20) and got.dtype == torch.float32
    want = reference(logits.reshape(15, 20), cfg).reshape(3, 5, 20)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_greedy_is_one_hot_argmax():
    logits = torch.tensor([[0.0, 2.0, 2.0, -1.0], [5.0, 1.0, 0.0, 0.0]])
    got = logits_to_probs(logits, SamplingConfig(temperature=0.0, top_k=3, top_p=0.5))
    assert got.tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
