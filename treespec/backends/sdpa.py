"""Attention backends: how a model is run over a block of tree nodes with a tree mask.

Every forward the engine makes (prefill chunk, draft level, target verification) has the same
shape: n new tokens that see every committed token of the cache, plus a subset of the scratch
entries written earlier this step and of themselves, given as a `block_mask`. A backend turns
that into whatever the model's attention needs; the model code itself is never forked.

- `SdpaBackend` builds an additive 4D mask (1, 1, n, C + s), which transformers passes through
  unchanged to its sdpa (or eager) attention: any model that follows transformers' attention
  interface (Llama, Qwen2, Mistral, Gemma, ...) works.
- `FlashBackend` (treespec/flash.py, GPU) registers its own attention function and sends the
  mask's two parts separately: the committed prefix unmasked to flash-attn, the block as a small
  masked attention, merged by log-sum-exp. On CUDA, `make_backend` wraps either backend in a
  `GraphedBackend` (treespec/cuda_graphs.py) that replays CUDA graphs (docs/gpu.md).

Dimension letters: docs/dimensions.md (n new tokens, C committed, s scratch incl. new, V vocab).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from treespec.backends.compat import FULL, SLIDING, accepts_mask_mapping, cache_kwargs, layer_types, sliding_window
from treespec.backends.kv_cache import TreeKVCache

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
        # not config.is_decoder: GPT-NeoX's config says False although it is a causal LM
        if model.config.is_encoder_decoder or not model.can_generate():
            raise UnsupportedModelError(
                f"{type(model).__name__} is not a decoder-only causal LM (an ...ForCausalLM model); only those are supported"
            )
        check_layer_types(model)

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
            attention_mask=layer_masks(model, mask, position_ids, block_mask, committed),
            **cache_kwargs(model, cache),
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
        )
        return out.logits[0]  # (n, V)


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


def make_backend(name, device: torch.device | str, dtype: torch.dtype | None = None, *, graphs: bool | None = None):
    """The backend called `name`: 'auto', 'sdpa' or 'flash' (or a backend object, returned as is,
    so that one GraphedBackend and its captured graphs serve many generations).

    'auto' is 'flash' on CUDA when flash_attn imports (and dtype, if given, is fp16/bf16), else
    'sdpa'. On CUDA the backend is wrapped in a GraphedBackend (CUDA graphs over static caches)
    unless graphs=False. docs/gpu.md describes the GPU path.
    """
    if not isinstance(name, str):
        return name
    device = torch.device(device)
    cuda = device.type == "cuda"
    if name == "auto":
        from treespec.backends.flash import FLASH_DTYPES, flash_available  # lazy: flash.py imports this module

        name = "flash" if cuda and flash_available() and dtype in (None, *FLASH_DTYPES) else "sdpa"
    if name == "sdpa":
        from treespec.backends.static_cache import StaticSdpaBackend

        inner = StaticSdpaBackend() if cuda else SdpaBackend()
    elif name == "flash":
        from treespec.backends.flash import FlashBackend

        inner = FlashBackend()
    else:
        raise ValueError(f"unknown attention backend {name!r}; choose 'auto', 'sdpa' or 'flash'")
    if cuda if graphs is None else graphs:
        from treespec.backends.cuda_graphs import GraphedBackend

        return GraphedBackend(inner)
    return inner
