"""Attention backends: how a model is run over a block of tree nodes with a tree mask.

Every forward the engine makes (prefill chunk, draft level, target verification) has the same
shape: n new tokens that see every committed token of the cache, plus a subset of the scratch
entries written earlier this step and of themselves, given as a `block_mask`. A backend turns
that into whatever the model's attention needs; the model code itself is never forked.

- `SdpaBackend` builds an additive 4D mask (1, 1, n, C + s), which transformers passes through
  unchanged to its sdpa (or eager) attention: any model that follows transformers' attention
  interface (Llama, Qwen2, Mistral, Gemma, ...) works.
- A flash-attn backend (GPU) will register its own attention function and send the mask's two
  parts separately: the committed prefix unmasked to flash-attn, the block as a small masked
  attention, merged by log-sum-exp (see docs/architecture.md).

Dimension letters: docs/dimensions.md (n new tokens, C committed, s scratch incl. new, V vocab).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from .kv_cache import TreeKVCache

SUPPORTED_ATTN = ("sdpa", "eager")


class UnsupportedModelError(ValueError):
    """A model this backend cannot drive."""


@dataclass(frozen=True)
class SdpaBackend:
    """Tree attention through transformers' own sdpa/eager attention and a 4D additive mask."""

    name: str = "sdpa"

    def check_model(self, model: PreTrainedModel) -> None:
        impl = model.config._attn_implementation
        if impl not in SUPPORTED_ATTN:
            raise UnsupportedModelError(
                f"{type(model).__name__} uses attn_implementation={impl!r}; the sdpa backend needs one of "
                f"{SUPPORTED_ATTN}. Load it with attn_implementation='sdpa' or call "
                "model.set_attn_implementation('sdpa')."
            )
        if not getattr(model.config.get_text_config(), "is_decoder", True) or model.config.is_encoder_decoder:
            raise UnsupportedModelError("only decoder-only causal LMs are supported")

    def forward(
        self,
        model: PreTrainedModel,
        cache: TreeKVCache,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        block_mask: torch.Tensor,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Run `model` on n new tokens and return their logits.

        input_ids, position_ids: LongTensor (1, n).
        block_mask: BoolTensor (n, s) which scratch entries (the s - n written earlier this
            step, then the n new ones) each new token sees; committed tokens are always seen.
        Returns FloatTensor (n, V), or (1, V) with last_only.
        """
        n, s = block_mask.shape
        committed = cache.committed
        dtype = model.dtype
        mask = torch.zeros(1, 1, n, committed + s, dtype=dtype, device=input_ids.device)  # (1, 1, n, C+s)
        mask[0, 0, :, committed:].masked_fill_(~block_mask, torch.finfo(dtype).min)
        out = model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
        )
        return out.logits[0]  # (n, V)


def make_backend(name: str, device: torch.device) -> SdpaBackend:
    """The backend called `name` ('auto' or 'sdpa'; 'flash' arrives with the GPU path)."""
    if name in ("auto", "sdpa"):
        return SdpaBackend()
    raise ValueError(f"unknown attention backend {name!r}; choose 'auto' or 'sdpa'")
