"""One head training run, end to end: what `treespec-train-head` calls with its typed config.

    load the target  ->  data (heads/features.py)  ->  features  ->  training  ->  evaluation  ->  saving

Everything runs inside `max_minutes` of wall-clock time from the start: training stops early
enough to leave the held-out check and the save their share (`RESERVE_FRACTION`). The head is
checked against `max_file_mb` before any work. Targets are named as everywhere in treespec
(treespec.loading.models: a known GGUF name, a path, a hub id), plus the tiny test models
'tiny-cycle' (treespec.testing.tiny_cycle_model(0)) and 'tiny-random' (tiny_model(0)), which
have no tokenizer and train on their own samples.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from treespec.heads.features import DataConfig, make_blocks, target_features
from treespec.heads.model import DraftHead
from treespec.heads.store import head_path, save_head
from treespec.heads.train import TrainConfig, TrainResult, evaluate, train

RESERVE_FRACTION = 0.08  # of the budget, kept for evaluation and saving
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_TARGETS = ("tiny-cycle", "tiny-random")


@dataclass
class HeadTrainConfig:
    """A whole run (docs/configs.md, `train_head`).

    target: the model to train a head for. name: the head's name (default: the target's).
    device: 'cpu', 'cuda' or 'auto' (cuda when available). dtype: the target's dtype ('auto':
    bfloat16 on CUDA, float32 on the CPU); the head trains in float32 with autocast to it.
    max_minutes: wall-clock budget of the whole run. intermediate_size: the head layer's MLP
    width (None: the target's). save_dtype: dtype of the saved tensors. max_file_mb: refuse a
    head whose file would be larger. out: a file path instead of the cache's heads/<name>.
    """

    target: str = "qwen2.5-coder-1.5b-instruct"
    name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_minutes: float = 8.0
    intermediate_size: int | None = None
    save_dtype: str = "bfloat16"
    max_file_mb: float = 60.0
    out: str | None = None
    feature_batch: int = 16  # blocks per target forward in the features phase
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.save_dtype not in DTYPES:
            raise ValueError(f"save_dtype must be one of {sorted(DTYPES)}, got {self.save_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {self.device!r}")
        if self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")


@dataclass
class RunSummary:
    """What a run did: where the head went, its data, training and held-out metrics."""

    path: Path
    file_mb: float
    data: dict
    training: dict
    minutes: float

    def lines(self) -> list[str]:
        held = self.training.get("held_out", [])
        out = [f"head saved: {self.path} ({self.file_mb:.1f} MB)",
               f"data: {self.data['tokens']:,} tokens from " + ", ".join(f"{k} {v:,}" for k, v in self.data["sources"].items()),
               f"training: {self.training['steps']} steps in {self.training['seconds']:.0f} s (stopped by {self.training['stopped_by']})"]
        for j, m in enumerate(held):
            out.append(f"held-out, depth {j + 1}: top-1 agreement {m['agreement']:.1%}, acceptance at T=1 {m['acceptance']:.1%}")
        for kind, metrics in self.training.get("held_out_by_kind", {}).items():
            out.append(f"  {kind}: " + ", ".join(f"depth {j + 1} {m['agreement']:.1%}" for j, m in enumerate(metrics)))
        out.append(f"total: {self.minutes:.1f} min")
        return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but CUDA is not available here; use device=cpu")
    return device


def load_target(name: str, device: torch.device, dtype: torch.dtype):
    """(target, tokenizer or None) for a target name (see the module docstring)."""
    if name in TINY_TARGETS:
        from treespec.testing import tiny_cycle_model, tiny_model

        model = tiny_cycle_model(0) if name == "tiny-cycle" else tiny_model(0)
        return model.to(device, dtype), None
    from treespec.loading.models import load_model, load_tokenizer

    return load_model(name, dtype=dtype, device=device), load_tokenizer(name)


def head_bytes(head: DraftHead, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in head.state_dict().values()) * torch.empty((), dtype=dtype).element_size()


def run(config: HeadTrainConfig, log=print) -> RunSummary:
    """Train and save a head for config.target (see the module docstring)."""
    t0 = time.perf_counter()
    budget = config.max_minutes * 60
    device = resolve_device(config.device)
    dtype = DTYPES[config.dtype] if config.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    name = config.name or config.target
    path = Path(config.out) if config.out else head_path(name)
    log(f"treespec-train-head: target {config.target} on {device} ({dtype}), budget {config.max_minutes:g} min -> {path}")

    target, tokenizer = load_target(config.target, device, dtype)
    target.eval().requires_grad_(False)
    head = DraftHead.for_target(target, name=name, intermediate_size=config.intermediate_size, seed=config.train.seed)
    save_dtype = DTYPES[config.save_dtype]
    size = head_bytes(head, save_dtype) / 1e6
    if size > config.max_file_mb:
        raise ValueError(f"the head would be a {size:.1f} MB file, over max_file_mb={config.max_file_mb:g}; lower "
                         "intermediate_size (the head layer's MLP width) or save_dtype")
    if tokenizer is None and not config.data.self_samples:
        raise ValueError(f"target {config.target!r} has no tokenizer: set data.self_samples (blocks sampled from it)")

    blocks = make_blocks(config.data, tokenizer, target, config.progress)
    data = {"sources": blocks.sources, "tokens": blocks.tokens, "seq_len": config.data.seq_len,
            "excluded": list(config.data.exclude), "train_blocks": blocks.train.shape[0],
            "held_out_blocks": blocks.held_out.shape[0],
            "held_out_blocks_by_kind": {k: blocks.held_out_kinds.count(k) for k in dict.fromkeys(blocks.held_out_kinds)}}
    log(f"data: {blocks.tokens:,} tokens ({blocks.train.shape[0]} training blocks, {blocks.held_out.shape[0]} held out) "
        f"from {json.dumps(blocks.sources)}; never from {', '.join(config.data.exclude)}")

    with torch.no_grad():
        feats = target_features(target, blocks.train, config.feature_batch, dtype=dtype, desc="features: training",
                                progress=config.progress)
        held_feats = target_features(target, blocks.held_out, config.feature_batch, dtype=dtype,
                                     desc="features: held out", progress=config.progress)

    autocast = dtype if device.type == "cuda" and dtype != torch.float32 else None
    left = budget * (1 - RESERVE_FRACTION) - (time.perf_counter() - t0)
    if left <= 0:
        raise TimeoutError(f"max_minutes={config.max_minutes:g} was spent before training began (data and features "
                           f"took {(time.perf_counter() - t0) / 60:.1f} min); raise it or lower data.max_tokens")
    head.requires_grad_(True)
    result: TrainResult = train(head, blocks.train, feats, config.train, seconds=left, autocast=autocast,
                                progress=config.progress)
    del feats
    check = dict(unroll=max(2, config.train.unroll), batch_size=max(1, config.train.batch_size // 2), autocast=autocast)
    result.held_out = evaluate(head, blocks.held_out, held_feats, progress=config.progress, **check)
    kinds = blocks.held_out_kinds
    if len(set(kinds)) > 1:  # each kind of text on its own: a mix hides a kind the head does poorly on
        for kind in dict.fromkeys(kinds):
            rows = torch.tensor([i for i, k in enumerate(kinds) if k == kind])
            result.held_out_by_kind[kind] = evaluate(head, blocks.held_out[rows], held_feats[rows.to(held_feats.device)],
                                                     progress=False, **check)
    training = result.as_dict() | {"config": asdict(config.train), "intermediate_size": head.config.intermediate_size}
    with tqdm(total=1, desc="saving", disable=not config.progress) as bar:
        save_head(head, path, dtype=save_dtype, data=data, training=training)
        bar.update(1)
    summary = RunSummary(path, path.stat().st_size / 1e6, data, training, (time.perf_counter() - t0) / 60)
    for line in summary.lines():
        log(line)
    return summary
