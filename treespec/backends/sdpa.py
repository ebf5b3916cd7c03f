"""Attention backends: how a model is run over a block of tree nodes with a tree mask.

Every forward the engine makes (prefill chunk, draft level, target verification) has the same
shape: n new tokens that see every committed token of the cache, plus a subset of the scratch
entries written earlier this step and of themselves, given as a `block_mask`. A backend turns
that into whatever the model's attention needs; the model code itself is never forked.

- `SdpaBackend` passes an additive 4D mask, which transformers hands unchanged to its sdpa (or
  eager) attention: any model that follows transformers' attention interface (Llama, Qwen2,
  Mistral, Gemma, ...) works. The cache builds the mask (`TreeCache.sdpa_mask`), because the
  keys it hands the model decide its width: C + s for `TreeKVCache`, S_max for the static cache.
- `FlashBackend` (backends/flash.py, GPU) registers its own attention function and sends the
  mask's two parts separately: the committed prefix unmasked to flash-attn, the block as a small
  masked attention, merged by log-sum-exp. `GraphedBackend` (backends/cuda_graphs.py) replays
  either as CUDA graphs (docs/gpu.md); `make_backend` (backends/factory.py) picks one by name.

Dimension letters: docs/dimensions.md (n new tokens, C committed, s scratch incl. new, V vocab).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from treespec.backends.base import TreeCache, UnsupportedModelError
from treespec.backends.kv_cache import TreeKVCache

SUPPORTED_ATTN = ("sdpa", "eager")


@dataclass(frozen=True)
class SdpaBackend:
    """Tree attention through transformers' own sdpa/eager attention and a 4D additive mask;
    runs against either cache (each builds the mask for its own layout). Makes TreeKVCaches."""

    name: str = "sdpa"

    def make_cache(self, model: PreTrainedModel, capacity: int, role: str = "target") -> TreeCache:
        return TreeKVCache.for_model(model, capacity)

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
        cache: TreeCache,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        block_mask: torch.Tensor,
        last_only: bool = False,
    ) -> torch.Tensor:
        """`Backend.forward`: input_ids, position_ids LongTensor (1, n); block_mask BoolTensor
        (n, s) -> logits FloatTensor (n, V), or (1, V) with last_only."""
        cache.begin_forward(block_mask.shape[0])
        out = model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=cache.sdpa_mask(block_mask, model.dtype),  # (1, 1, n, K)
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
        )
        return out.logits[0]  # (n, V)
