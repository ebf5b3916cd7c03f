"""Training a draft head on the target's own features (EAGLE's recipe, in a wall-clock budget).

Phases, each with a progress bar: data (text -> token blocks, heads/features.py), features (the
target's forward over every block, once), training, evaluation on held-out blocks, saving.

Loss per position t of a block (x_t the token, f_t the target's feature at it, p_t the target's
next-token distribution softmax(lm_head(f_t))), with the head reading (x_t, f_{t-1}) (a zero
feature at t = 0, as at inference):

    feature_weight * SmoothL1(f^_t, f_t)  +  token_weight * CE(p_t, q_t)

(EAGLE's feature regression plus its token loss against the target's distribution). With
`unroll` k > 1, the head runs k passes and pass j reads the features pass j-1 predicted, as the
deeper levels of a tree do (a simple form of EAGLE-3's training-time test); each pass's loss
counts `unroll_decay`^j.

The held-out check reports, per pass: top-1 agreement (argmax q = argmax p) and the acceptance
of one sampled draft at temperature 1, sum_v min(p, q) (what token-level rejection accepts).

Dimension letters: docs/dimensions.md (B batch of blocks, Lb block length, Hm hidden size, V vocabulary).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from treespec.heads.model import DraftHead


@dataclass
class TrainConfig:
    """Optimisation settings of one head training run."""

    steps: int = 4000  # most optimiser steps (the time budget usually ends training first)
    batch_size: int = 16  # blocks per step
    lr: float = 5e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    feature_weight: float = 1.0
    token_weight: float = 0.1
    unroll: int = 1
    unroll_decay: float = 0.8
    feature_noise: float = 0.0  # uniform noise of this half-width on the input features (EAGLE's)
    grad_clip: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.unroll < 1:
            raise ValueError(f"train.steps, train.batch_size and train.unroll must be >= 1, got {self.steps}, "
                             f"{self.batch_size}, {self.unroll}")


@dataclass
class PassMetrics:
    """Held-out metrics of one unroll pass: top-1 agreement and expected acceptance."""

    agreement: float
    acceptance: float


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    held_out: list[PassMetrics] = field(default_factory=list)
    held_out_by_kind: dict[str, list[PassMetrics]] = field(default_factory=dict)  # the same, per kind of text
    stopped_by: str = "steps"  # 'steps' or 'time'

    def as_dict(self) -> dict:
        return {
            "steps": self.steps, "seconds": round(self.seconds, 1), "final_loss": round(self.final_loss, 4),
            "stopped_by": self.stopped_by,
            "held_out": _rounded(self.held_out),
            "held_out_by_kind": {k: _rounded(v) for k, v in self.held_out_by_kind.items()},
        }


def _rounded(metrics: list[PassMetrics]) -> list[dict]:
    return [{"agreement": round(m.agreement, 4), "acceptance": round(m.acceptance, 4)} for m in metrics]


def shifted(features: torch.Tensor) -> torch.Tensor:
    """(B, Lb, Hm) -> (B, Lb, Hm): position t reads the feature at t-1 (zeros at t = 0)."""
    return torch.cat([torch.zeros_like(features[:, :1]), features[:, :-1]], dim=1)


def passes(head: DraftHead, ids: torch.Tensor, feats: torch.Tensor, unroll: int, noise: float = 0.0,
           generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """The head's predicted features for each unroll pass: list of (B, Lb, Hm).
    ids: (B, Lb); feats: (B, Lb, Hm) the target's features at each position."""
    b, length = ids.shape
    pos = torch.arange(length, device=ids.device)[None].expand(b, -1)  # (B, Lb)
    inp = shifted(feats)
    if noise:
        u = torch.rand(inp.shape, generator=generator, device="cpu").to(inp.device, inp.dtype)
        inp = inp + (2 * u - 1) * noise
    out = []
    for _ in range(unroll):
        f_hat = head.step(ids, inp, pos)  # (B, Lb, Hm)
        out.append(f_hat)
        inp = shifted(f_hat)
    return out


def loss_terms(head: DraftHead, f_hat: torch.Tensor, feats: torch.Tensor, p_log: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature loss, token loss), scalars. f_hat, feats: (B, Lb, Hm); p_log: (B, Lb, V) log p."""
    feature = F.smooth_l1_loss(f_hat.float(), feats.float())
    q_log = torch.log_softmax(head.logits(f_hat).float(), dim=-1)  # (B, Lb, V)
    token = -(p_log.exp() * q_log).sum(-1).mean()
    return feature, token


def lr_factor(step: int, config: TrainConfig, progress: float) -> float:
    """Linear warm-up, then cosine decay over `progress` (0..1: the larger of the step and time fractions)."""
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(head: DraftHead, blocks: torch.Tensor, feats: torch.Tensor, config: TrainConfig, *,
          seconds: float | None = None, autocast: torch.dtype | None = None, progress: bool = True) -> TrainResult:
    """Train `head` in place on the target's features.

    blocks: LongTensor (B_t, Lb) token blocks (any device); feats: (B_t, Lb, Hm) the target's
    features on them, on the head's device. seconds: stop when this much time has passed
    (None: run config.steps). autocast: dtype of torch.autocast on CUDA (None: off).
    """
    device = head.device
    gen = torch.Generator().manual_seed(config.seed)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    lm_head = head.get_output_embeddings()
    head.train()
    t0 = time.perf_counter()
    bar = tqdm(total=config.steps, desc="training", disable=not progress)
    step, loss_value, stopped_by = 0, float("nan"), "steps"
    n = blocks.shape[0]
    order = torch.randperm(n, generator=gen)
    cursor = 0
    while step < config.steps:
        elapsed = time.perf_counter() - t0
        if seconds is not None and elapsed >= seconds:
            stopped_by = "time"
            break
        if cursor + config.batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        ids, f = blocks[idx].to(device), feats[idx.to(feats.device)].to(device)
        progress_frac = max(step / config.steps, elapsed / seconds if seconds else 0.0)
        for group in opt.param_groups:
            group["lr"] = config.lr * lr_factor(step, config, progress_frac)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None and device.type == "cuda"):
            with torch.no_grad():
                p_log = torch.log_softmax(lm_head(f.to(lm_head.weight.dtype)).float(), dim=-1)  # (B, Lb, V)
            loss = torch.zeros((), device=device)
            for j, f_hat in enumerate(passes(head, ids, f, config.unroll, config.feature_noise, gen)):
                feature, token = loss_terms(head, f_hat, f, p_log)
                loss = loss + config.unroll_decay**j * (config.feature_weight * feature + config.token_weight * token)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        step += 1
        if step % 10 == 0 or step == config.steps:
            loss_value = loss.item()
            bar.set_postfix(loss=f"{loss_value:.4f}")
        bar.update(1)
    bar.close()
    head.eval()
    if math.isnan(loss_value) and step:
        loss_value = loss.item()
    return TrainResult(steps=step, seconds=time.perf_counter() - t0, final_loss=loss_value, stopped_by=stopped_by)


@torch.no_grad()
def evaluate(head: DraftHead, blocks: torch.Tensor, feats: torch.Tensor, *, unroll: int = 1, batch_size: int = 8,
             autocast: torch.dtype | None = None, progress: bool = True) -> list[PassMetrics]:
    """Held-out top-1 agreement and expected acceptance per unroll pass (see the module docstring).
    blocks: (B_e, Lb); feats: (B_e, Lb, Hm) the target's features."""
    device = head.device
    lm_head = head.get_output_embeddings()
    agree = [0.0] * unroll
    accept = [0.0] * unroll
    count = 0
    for start in tqdm(range(0, blocks.shape[0], batch_size), desc="evaluation", disable=not progress):
        ids = blocks[start : start + batch_size].to(device)
        f = feats[start : start + batch_size].to(device)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None and device.type == "cuda"):
            p = torch.softmax(lm_head(f.to(lm_head.weight.dtype)).float(), dim=-1)  # (B, Lb, V)
            for j, f_hat in enumerate(passes(head, ids, f, unroll)):
                q = torch.softmax(head.logits(f_hat).float(), dim=-1)  # (B, Lb, V)
                agree[j] += (q.argmax(-1) == p.argmax(-1)).float().sum().item()
                accept[j] += torch.minimum(p, q).sum(-1).sum().item()
        count += ids.numel()
    return [PassMetrics(agreement=a / count, acceptance=c / count) for a, c in zip(agree, accept)]


def agreement(head: DraftHead, target, blocks: torch.Tensor) -> float:
    """Top-1 agreement of the head with the target on `blocks` (B, Lb), features computed here."""
    from treespec.heads.features import target_features

    feats = target_features(target, blocks, 64, dtype=head.dtype, progress=False)
    return evaluate(head, blocks, feats, progress=False)[0].agreement
