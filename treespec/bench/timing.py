"""The one timing helper of every benchmark: wall time with the device synchronised, so that a
number is the latency a decode loop with one host sync per step sees (on a CPU, plain wall time).

    with Wall(device) as w: ...          w.seconds (and w.cpu_seconds: this process's CPU time)
    w = Wall(device); w.start(); ...; w.stop()   the same, for spans that a block cannot enclose (hooks)
    median_ms(fn, iters, device=...)     median over calls, each synchronised before and after
    device_ms(fn, iters)                 median CUDA-event time (launch gaps included, no host sync)
    s = DeviceSpan(device); s.start(); ...; s.stop()   one span without a host sync; s.ms() reads it later
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
    """Seconds between start and stop (or entry and exit), the device synchronised at both ends.

    cpu_seconds is the process's CPU time over the same span: on a shared machine the wall time
    of a multi-threaded CPU forward depends on the other processes, a single thread's CPU time
    does not (and equals its wall time on an idle core)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device, self.seconds, self.cpu_seconds = device, 0.0, 0.0

    def start(self) -> "Wall":
        synchronize(self.device)
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        return self

    def stop(self) -> float:
        """End the span; returns (and keeps) its wall seconds."""
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._t0
        self.cpu_seconds = time.process_time() - self._c0
        return self.seconds

    def __enter__(self) -> "Wall":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


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


class DeviceSpan:
    """One span timed without a host sync: two CUDA events on CUDA (ms() waits for the end event),
    the wall clock elsewhere (where nothing runs asynchronously)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            self._a, self._b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self) -> "DeviceSpan":
        if self.cuda:
            self._a.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def stop(self) -> "DeviceSpan":
        if self.cuda:
            self._b.record()
        else:
            self._t1 = time.perf_counter()
        return self

    def ms(self) -> float:
        if self.cuda:
            self._b.synchronize()
            return self._a.elapsed_time(self._b)
        return (self._t1 - self._t0) * 1e3
