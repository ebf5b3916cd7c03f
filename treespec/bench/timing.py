"""The one timing helper of every benchmark: wall time with the device synchronised, so that a
number is the latency a decode loop with one host sync per step sees (on a CPU, plain wall time).

    with Wall(device) as w: ...          w.seconds
    median_ms(fn, iters, device=...)     median over calls, each synchronised before and after
    device_ms(fn, iters)                 median CUDA-event time (launch gaps included, no host sync)
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Wall:
    """Context manager: seconds between entry and exit, the device synchronised at both ends."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device, self.seconds = device, 0.0

    def __enter__(self) -> "Wall":
        synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._t0


def median_ms(fn: Callable[[], object], iters: int, *, warmup: int = 2, device: torch.device | str = "cpu") -> float:
    """Median wall time of fn() in ms over `iters` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        with Wall(device) as w:
            fn()
        times.append(w.seconds * 1e3)
    return statistics.median(times)


def device_ms(fn: Callable[[], object], iters: int) -> float:
    """Median device time of fn() in ms between two CUDA events (CUDA only)."""
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)
