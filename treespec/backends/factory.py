"""`make_backend`: the backend an `attention=` argument names (docs/gpu.md has the table)."""

from __future__ import annotations

import torch

from treespec.errors import ArgumentError
from treespec.backends.base import Backend
from treespec.backends.cuda_graphs import GraphedBackend
from treespec.backends.flash import FLASH_DTYPES, FlashBackend, flash_available
from treespec.backends.sdpa import SdpaBackend
from treespec.backends.static_cache import StaticSdpaBackend

NAMES = ("auto", "sdpa", "flash")

# attention='auto' on CUDA: flash from this many context tokens (prompt + new tokens) on, sdpa
# below, where flash's cascade (prefix + block + merge) costs more kernels than sdpa's masked
# read of the whole static cache saves. Measured on the H200 (docs/gpu.md, "Choosing the backend").
FLASH_MIN_CONTEXT = 4096


def make_backend(
    name: str | Backend,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    *,
    graphs: bool | None = None,
    compile: bool | None = None,
    context_length: int | None = None,
) -> Backend:
    """The backend called `name`: 'auto', 'sdpa' or 'flash' (or a backend object, returned as is,
    so that one GraphedBackend and its captured graphs serve many generations).

    'auto' is 'flash' on CUDA when flash_attn imports, dtype (if given) is fp16/bf16 and the
    context (prompt + new tokens, if given) reaches FLASH_MIN_CONTEXT; else 'sdpa'.
    graphs (default: on for CUDA) wraps the backend in a GraphedBackend, which replays CUDA graphs
    over static caches (StaticSdpaBackend for sdpa); its forwards are torch.compile'd unless
    compile=False (compile=True compiles on the CPU too, over static caches, without graphs).
    Without graphs or compile the backend runs eagerly on TreeKVCaches (SdpaBackend, FlashBackend).
    """
    if not isinstance(name, str):
        return name
    if name not in NAMES:
        raise ArgumentError("attention", f"unknown attention backend {name!r}; choose 'auto', 'sdpa' or 'flash'")
    device = torch.device(device)
    cuda = device.type == "cuda"
    graphed = cuda if graphs is None else graphs
    wrapped = graphed or bool(compile)  # a GraphedBackend: static caches, graphs and/or compiled forwards
    if name == "auto":
        long_context = context_length is None or context_length >= FLASH_MIN_CONTEXT
        name = "flash" if cuda and flash_available() and dtype in (None, *FLASH_DTYPES) and long_context else "sdpa"
    if name == "flash":
        inner: Backend = FlashBackend()
    else:
        inner = StaticSdpaBackend() if wrapped else SdpaBackend()
    return GraphedBackend(inner, compile=compile, graphs=graphed) if wrapped else inner
