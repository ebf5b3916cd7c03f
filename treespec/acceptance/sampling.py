"""Sampling settings and the logits -> probabilities step shared by the target and the draft.

Speculative sampling is lossless with respect to the *processed* target distribution p: the
distribution after temperature, top-k and top-p. The draft's q must be processed with the same
`SamplingConfig` (q may then have zeros where p has mass; the verifier's residual covers that).

`logits_to_probs` reproduces what `transformers`' `generate(do_sample=True)` samples from:
TemperatureLogitsWarper, then TopKLogitsWarper, then TopPLogitsWarper (the order in which
`GenerationMixin._get_logits_processor` appends them, with min_tokens_to_keep=1), then softmax,
all in float32 (`generate` upcasts the last-position logits to float32 before processing).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from treespec.errors import ConfigError

__all__ = ["SamplingConfig", "logits_to_probs"]


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are sampled from logits.

    temperature: 0 = greedy (argmax); otherwise logits are divided by it (> 0, finite; a
        vanishing one such as 1e-40 samples the argmax, the limit, where transformers' NaN
        probabilities raise).
    top_k: keep the top_k highest logits (ties with the k-th are kept, as in transformers);
        0 = off.
    top_p: nucleus sampling, keep the smallest set of top tokens whose mass reaches top_p
        (in (0, 1]; 1 = off).
    without_replacement: how a node's children are drafted and verified when sampling:
        True (default) = k distinct children by Gumbel-top-k, verified by recursive rejection
        sampling (RSD / Sequoia); False = k i.i.d. children, verified by SpecInfer's multi-step
        speculative sampling. Both are lossless; without replacement never wastes a branch on a
        duplicate token, so it accepts at least as often in practice. See docs/sampling.md.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    without_replacement: bool = True

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, numbers.Real):
            raise ConfigError(f"temperature must be a number >= 0 (0 = greedy), got {t!r}", "temperature")
        if math.isnan(t) or t < 0 or math.isinf(t):
            raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}", "temperature")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise ConfigError(f"top_k must be a whole number >= 0 (0 = off), got {k!r}", "top_k")
        if k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {k!r}", "top_k")
        if isinstance(p, bool) or not isinstance(p, numbers.Real):
            raise ConfigError(f"top_p must be a number in (0, 1] (1 = off), got {p!r}", "top_p")
        if math.isnan(p) or not 0 < p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {p!r}", "top_p")
        if not isinstance(self.without_replacement, bool):
            raise ConfigError(f"without_replacement must be True or False, got {self.without_replacement!r}",
                              "without_replacement")
        # store plain Python numbers (numpy scalars etc. would otherwise leak into the warpers)
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_k", int(k))
        object.__setattr__(self, "top_p", float(p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def logits_to_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """FloatTensor (..., V) logits -> float32 FloatTensor (..., V) probabilities.

    Sampling (temperature > 0): the distribution `generate(do_sample=True, temperature=...,
    top_k=..., top_p=...)` samples from. Greedy (temperature 0): the one-hot of the argmax (the
    first index on ties, like `argmax`), so that sampling from it is greedy decoding.
    """
    scores = logits.float()
    shape = scores.shape
    vocab = shape[-1]
    scores = scores.reshape(-1, vocab)  # the warpers' scatter works on 2-D (rows, V)
    if cfg.greedy:
        probs = torch.zeros_like(scores).scatter_(-1, scores.argmax(dim=-1, keepdim=True), 1.0)
        return probs.reshape(shape)
    if cfg.temperature != 1.0:  # TemperatureLogitsWarper (generate skips it at 1.0)
        # Shifted by the row maximum first (softmax does not change): logits / T overflows to inf,
        # and softmax to NaN, once T < max|logit| / 3.4e38 (T = 1e-40 does); the shifted scores
        # are <= 0 and at worst -inf, so every T > 0 works and a vanishing T gives the greedy
        # limit (the argmax, shared evenly on exact ties) instead of garbage.
        scores = (scores - scores.amax(dim=-1, keepdim=True)) / cfg.temperature
    if cfg.top_k > 0:  # TopKLogitsWarper(top_k, min_tokens_to_keep=1)
        k = min(max(cfg.top_k, 1), vocab)
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if cfg.top_p < 1.0:  # TopPLogitsWarper(top_p, min_tokens_to_keep=1)
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - cfg.top_p)
        remove_sorted[..., -1:] = False  # keep at least one token
        remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
        scores = scores.masked_fill(remove, -float("inf"))
    return scores.softmax(dim=-1).reshape(shape)
