"""What the installed transformers and a model's config say about how to call the model.

- The cache keyword: transformers 5.24 renamed `past_key_values` to `cache` (the old name warns
  on every forward and goes away in 5.40); 5.17 only knows `past_key_values`. The model's own
  forward signature says which one it takes (transformers' `deprecate_kwarg` keeps the
  signature of the wrapped function), read once per model class.
- The hidden states: asked for with `output_hidden_states` only when a caller wants them
  (`Backend.forward(..., hidden=True)`), read from the output's last entry.
- The attention layout: which attention type each layer has ('full_attention' or
  'sliding_attention', from `config.layer_types`, or every layer windowed when only
  `config.sliding_window` is set, as Mistral does) and the window size.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import PreTrainedModel

from treespec.backends.base import ForwardOutput

FULL, SLIDING = "full_attention", "sliding_attention"


@functools.cache
def _cache_keyword(model_cls: type) -> str:
    params = inspect.signature(model_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: PreTrainedModel, cache) -> dict:
    """{keyword: cache} with the keyword this model's forward takes (no deprecation warning)."""
    return {_cache_keyword(type(model)): cache}


def layer_types(model: PreTrainedModel) -> tuple[str, ...]:
    """The attention type of every layer, as the model's own mask mapping keys them."""
    config = model.config.get_text_config()
    types = getattr(config, "layer_types", None)
    if types:
        return tuple(types)
    window = getattr(config, "sliding_window", None)
    return (SLIDING if window else FULL,) * config.num_hidden_layers


def sliding_window(model: PreTrainedModel) -> int | None:
    """The window of the model's sliding layers (None when every layer attends fully): a query at
    position i sees keys at positions j with i - window < j <= i, as transformers'
    `sliding_window_overlay` (kv_idx > q_idx - sliding_window)."""
    if SLIDING not in layer_types(model):
        return None
    return model.config.get_text_config().sliding_window


@functools.cache
def _takes_mask_mapping(model_cls: type) -> bool:
    try:
        source = inspect.getsource(model_cls.forward)
    except (OSError, TypeError):
        return False
    return "attention_mask, dict)" in source


def accepts_mask_mapping(model: PreTrainedModel) -> bool:
    """Whether the model's decoder stack takes attention_mask as {layer type: mask} (transformers'
    `if not isinstance(causal_mask_mapping := attention_mask, dict)` in every model with per-layer
    attention types), read once per class from its source."""
    return _takes_mask_mapping(type(model.base_model))


def hidden_kwargs(hidden: bool) -> dict:
    """The forward keyword that makes a model also return its hidden states (none by default,
    so that the default path is the model's plain forward)."""
    return {"output_hidden_states": True} if hidden else {}


def with_hidden(out, hidden: bool) -> torch.Tensor | ForwardOutput:
    """A model output -> logits (n, V), or with hidden a ForwardOutput whose hidden is the last
    entry of the model's hidden_states (transformers ties it to the final norm's output)."""
    if not hidden:
        return out.logits[0]  # (n, V)
    return ForwardOutput(out.logits[0], out.hidden_states[-1][0])  # (n, V), (n, Hm)


def vocab_size(model) -> int:
    """Rows of the model's output embedding: the ids it has a logit for."""
    return model.get_output_embeddings().weight.shape[0]
