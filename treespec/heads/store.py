"""Head files: one safetensors file per head under `cache_dir()/heads/`, found by name or by target.

The file holds the head's own tensors only (`fc.*`, `layer.*`; the embedding, norm and LM head
are the target's) and, as safetensors metadata (strings), what it belongs to and how it was made:

    format          FORMAT
    target_name     the name the target was loaded by (e.g. qwen2.5-coder-1.5b-instruct)
    target_hash     target_fingerprint(target): checked against the target before any work
    hidden_size, vocab_size, layer_class, intermediate_size, head_config (JSON)
    data            JSON: sources used and their token counts
    training        JSON: steps, minutes, held-out agreement and acceptance

`load_head(target)` finds the head trained for `target` (matching hash); `load_head(target,
name)` loads `heads/<name>.safetensors` or a path, and refuses it (HeadMismatchError) when it
was trained for another target.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from treespec.heads.model import (
    DraftHead, HeadIdentity, HeadMismatchError, check_identity, decoder_layer_class, head_config, target_fingerprint,
)
from treespec.loading.cache import atomic_write, cache_dir

FORMAT = "treespec-draft-head/1"


def heads_dir() -> Path:
    return cache_dir() / "heads"


def head_path(name: str) -> Path:
    """Where the head called `name` is kept."""
    return heads_dir() / f"{name}.safetensors"


def save_head(head: DraftHead, path: Path, *, dtype: torch.dtype = torch.bfloat16, data: dict | None = None,
              training: dict | None = None) -> Path:
    """Write `head` (its own tensors, cast to dtype) with its metadata to `path`, atomically."""
    ident = head.identity
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in head.state_dict().items()}
    meta = {
        "format": FORMAT,
        "target_name": ident.target_name,
        "target_hash": ident.target_hash,
        "hidden_size": str(ident.hidden_size),
        "vocab_size": str(ident.vocab_size),
        "layer_class": type(head.layer).__name__,
        "intermediate_size": str(head.config.intermediate_size),
        "head_config": head.config.to_json_string(use_diff=False),
        "data": json.dumps(data or {}),
        "training": json.dumps(training or {}),
    }
    with atomic_write(Path(path), suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise HeadMismatchError(f"{path} is not a treespec draft head file (format {meta.get('format')!r}, expected {FORMAT!r})")
    return meta


def _identity(meta: dict[str, str]) -> HeadIdentity:
    return HeadIdentity(meta["target_name"], meta["target_hash"], int(meta["hidden_size"]), int(meta["vocab_size"]))


def find_head(target: PreTrainedModel, fingerprint: str | None = None) -> Path:
    """The newest head file under heads_dir() trained for `target` (same weights hash)."""
    fingerprint = fingerprint or target_fingerprint(target)
    files = sorted(heads_dir().glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in files:
        try:
            if read_metadata(path)["target_hash"] == fingerprint:
                return path
        except (HeadMismatchError, OSError, KeyError):
            continue
    have = ", ".join(p.stem for p in files) or "none"
    raise FileNotFoundError(
        f"no draft head in {heads_dir()} was trained for this target (weights hash {fingerprint}; heads there: "
        f"{have}). Train one with `treespec-train-head target=<this target's name>`"
    )


def load_head(target: PreTrainedModel, name: str | Path | None = None) -> DraftHead:
    """The draft head for `target`, bound to it, in its dtype and on its device.

    name: a head name (heads_dir()/<name>.safetensors), a path to a head file, or None for the
    newest head trained for this target. Raises HeadMismatchError, before building anything,
    when the file was trained for another target (other weights or another hidden size).
    """
    fingerprint = target_fingerprint(target)
    if name is None:
        path = find_head(target, fingerprint)
    else:
        path = Path(name)
        if not path.is_file():
            path = head_path(str(name))
        if not path.is_file():
            raise FileNotFoundError(f"no draft head {name!r} (looked for {Path(name)} and {head_path(str(name))}); "
                                    "train one with `treespec-train-head`")
    meta = read_metadata(path)
    identity = _identity(meta)
    check_identity(identity, target, fingerprint)
    layer_cls = decoder_layer_class(target)
    if meta["layer_class"] != layer_cls.__name__:
        raise HeadMismatchError(f"{path} holds a {meta['layer_class']} but the target's layers are {layer_cls.__name__}")
    head = DraftHead(head_config(target, int(meta["intermediate_size"])), layer_cls, identity)
    head.load_state_dict(load_file(str(path)), strict=True)
    head.to(device=target.device, dtype=target.dtype).eval()
    head.requires_grad_(False)
    return head.bind(target, fingerprint)
