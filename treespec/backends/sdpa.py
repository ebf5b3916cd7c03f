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

from treespec.backends.base import ForwardOutput, TreeCache, UnsupportedModelError
from treespec.backends.compat import (
    FULL, SLIDING, accepts_mask_mapping, cache_kwargs, hidden_kwargs, layer_types, sliding_window, with_hidden,
)
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
        # not config.is_decoder: GPT-NeoX's config says False although it is a causal LM
        if model.config.is_encoder_decoder or not model.can_generate():
            raise UnsupportedModelError(
                f"{type(model).__name__} is not a decoder-only causal LM (an ...ForCausalLM model); only those are supported"
            )
        check_layer_types(model)

    def run_captured(self, cache: TreeCache, key: object, fn) -> None:
        """See `Backend.run_captured`: nothing to capture here."""
        fn()

    def forward(
        self,
        model: PreTrainedModel,
        cache: TreeCache,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        block_mask: torch.Tensor,
        last_only: bool = False,
        hidden: bool = False,
    ) -> torch.Tensor | ForwardOutput:
        """`Backend.forward`: input_ids, position_ids LongTensor (1, n); block_mask BoolTensor
        (n, s) -> logits FloatTensor (n, V), or (1, V) with last_only; with hidden, a
        ForwardOutput with the last hidden states (n, Hm) too."""
        cache.begin_forward(block_mask.shape[0])
        out = model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=layer_masks(  # (1, 1, n, K), or one per layer type
                model, cache.sdpa_mask(block_mask, model.dtype), position_ids, block_mask,
                cache.committed_index(input_ids.device),
            ),
            **cache_kwargs(model, cache),
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
            **hidden_kwargs(hidden),
        )
        return with_hidden(out, hidden)



def check_layer_types(model: PreTrainedModel) -> None:
    """Refuse layers the tree mask cannot express (chunked attention, state-space layers) and
    per-layer windows the model would not take one mask for each."""
    types = set(layer_types(model))
    if not types <= {FULL, SLIDING}:
        raise UnsupportedModelError(
            f"{type(model).__name__} has {sorted(types - {FULL, SLIDING})} layers; treespec's tree mask serves "
            "full and sliding-window attention layers only"
        )
    if types == {FULL, SLIDING} and not accepts_mask_mapping(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} mixes full and sliding-window layers but its forward does not take one mask per "
            "layer type (a dict keyed by layer type), so its windows cannot be honoured"
        )


def window_keep(position_ids: torch.Tensor, block_mask: torch.Tensor, committed, slots: int, window: int) -> torch.Tensor:
    """BoolTensor (n, slots): which cache slots lie inside each new token's sliding window
    (key position > query position - window, as transformers' `sliding_window_overlay`).

    position_ids: LongTensor (1, n); block_mask: BoolTensor (n, s); committed: int or LongTensor
    (1,) (device-side, static cache). Committed slot j holds position j. A scratch entry a token
    sees is one of its ancestors, and the ones it sees form a chain of consecutive positions
    ending at its own (a tree path, or a causal block), so its distance from the token is the
    number of entries the token sees after it. Slots outside both parts come out True: the
    caller's mask hides them already.
    """
    n, s = block_mask.shape
    pos = position_ids[0, :, None]  # (n, 1)
    slot = torch.arange(slots, device=block_mask.device)  # (slots,)
    rel = slot - committed  # (slots,) offset into the scratch region
    seen = block_mask.long()
    after = seen.flip(-1).cumsum(-1).flip(-1) - seen  # (n, s) entries seen after each scratch entry
    dist = torch.where(rel < 0, pos - slot, after[:, rel.clamp(0, s - 1)])  # (n, slots)
    return (dist < window) | (rel >= s)


def layer_masks(model: PreTrainedModel, mask: torch.Tensor, position_ids: torch.Tensor, block_mask: torch.Tensor, committed):
    """The attention_mask argument for `model`: the additive tree mask (1, 1, n, K) itself when no
    layer is windowed; with a window, the mask with keys outside it hidden (every layer windowed,
    as Mistral), or {layer type: mask} when full and windowed layers alternate (Gemma 2/3, Qwen2):
    the models pick each layer's mask from such a mapping, which they skip building when given."""
    window = sliding_window(model)
    if window is None:
        return mask
    keep = window_keep(position_ids, block_mask, committed, mask.shape[-1], window)  # (n, K)
    windowed = mask.masked_fill(~keep, torch.finfo(mask.dtype).min)
    if FULL not in layer_types(model):
        return windowed
    return {FULL: mask, SLIDING: windowed}

