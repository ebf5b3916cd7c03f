"""`make_backend`: the backend an `attention=` argument names (docs/gpu.md has the table)."""

from __future__ import annotations

import torch

from treespec.backends.base import Backend
from treespec.backends.cuda_graphs import GraphedBackend
from treespec.backends.flash import FLASH_DTYPES, FlashBackend, flash_available
from treespec.backends.sdpa import SdpaBackend
from treespec.backends.static_cache import StaticSdpaBackend

NAMES = ("auto", "sdpa", "flash")


def make_backend(
    name: str | Backend, device: torch.device | str, dtype: torch.dtype | None = None, *, graphs: bool | None = None
) -> Backend:
    """The backend called `name`: 'auto', 'sdpa' or 'flash' (or a backend object, returned as is,
    so that one GraphedBackend and its captured graphs serve many generations).

    'auto' is 'flash' on CUDA when flash_attn imports (and dtype, if given, is fp16/bf16), else
    'sdpa'. graphs (default: on for CUDA) wraps the backend in a GraphedBackend, which replays
    CUDA graphs over static caches (StaticSdpaBackend for sdpa); without graphs the backend runs
    eagerly on TreeKVCaches (SdpaBackend, FlashBackend).
    """
    if not isinstance(name, str):
        return name
    if name not in NAMES:
        raise ValueError(f"unknown attention backend {name!r}; choose 'auto', 'sdpa' or 'flash'")
    device = torch.device(device)
    cuda = device.type == "cuda"
    graphed = cuda if graphs is None else graphs
    if name == "auto":
        name = "flash" if cuda and flash_available() and dtype in (None, *FLASH_DTYPES) else "sdpa"
    if name == "flash":
        inner: Backend = FlashBackend()
    else:
        inner = StaticSdpaBackend() if graphed else SdpaBackend()
    return GraphedBackend(inner) if graphed else inner
