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


# attention='auto' on CUDA: flash from this many context tokens (prompt + new tokens) on, sdpa
# below, where flash's cascade (prefix + block + merge) costs more kernels than sdpa's masked
# read of the whole static cache saves. Measured on the H200 (docs/gpu.md, "Choosing the backend").
FLASH_MIN_CONTEXT = 4096


def make_backend(
    name,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    *,
    graphs: bool | None = None,
    compile: bool | None = None,
    context_length: int | None = None,
):
    """The backend called `name`: 'auto', 'sdpa' or 'flash' (or a backend object, returned as is,
    so that one GraphedBackend and its captured graphs serve many generations).

    'auto' is 'flash' on CUDA when flash_attn imports, dtype (if given) is fp16/bf16 and the
    context (prompt + new tokens, if given) reaches FLASH_MIN_CONTEXT; else 'sdpa'. On CUDA the
    backend is wrapped in a GraphedBackend (CUDA graphs over static caches) unless graphs=False;
    its forwards are torch.compile'd unless compile=False (compile=True compiles on the CPU too,
    over static caches, without graphs). docs/gpu.md describes the GPU path.
    """
    if not isinstance(name, str):
        return name
    device = torch.device(device)
    cuda = device.type == "cuda"
    if name == "auto":
        from treespec.backends.flash import FLASH_DTYPES, flash_available  # lazy: flash.py imports this module

        long_context = context_length is None or context_length >= FLASH_MIN_CONTEXT
        name = "flash" if cuda and flash_available() and dtype in (None, *FLASH_DTYPES) and long_context else "sdpa"
    static = cuda or bool(graphs) or bool(compile)  # a static cache: graph-safe and fixed-shape
    if name == "sdpa":
        from treespec.backends.static_cache import StaticSdpaBackend

        inner = StaticSdpaBackend() if static else SdpaBackend()
    elif name == "flash":
        from treespec.backends.flash import FlashBackend

        inner = FlashBackend()
    else:
        raise ValueError(f"unknown attention backend {name!r}; choose 'auto', 'sdpa' or 'flash'")
    if (cuda if graphs is None else graphs) or compile:
        from treespec.backends.cuda_graphs import GraphedBackend

        return GraphedBackend(inner, compile=compile, graphs=cuda if graphs is None else graphs)
    return inner
