"""The second CUDA stream that drafting ahead runs on, beside the target's verification.

On the GPU, a draft forward is bound by kernel latency, not by the GPU's width, so it can run
while the target verifies on the main stream (docs/overlap.md has the measurements). `mark()`
records where the main stream stands once the tree is drafted; the verification is queued next
on the main stream, and then `side(mark)` routes the ahead work to the side stream, which waits
for the mark only (not for the verification). `join()` makes the main stream wait for the side
stream before anything reads the ahead work or the draft cache. Neither waits on the host: the one host
synchronisation of a step stays the commit's. Without CUDA both are no-ops and the ahead work
runs in order, so the CPU tests exercise the same schedule.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class SideStream:
    """A second stream on `device` (None on the CPU)."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def mark(self) -> torch.cuda.Event | None:
        """An event at this point of the main stream (what the side work will wait for)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.stream.device))
        return event

    @contextmanager
    def side(self, after: torch.cuda.Event | None):
        """Run the block's GPU work on the side stream, once the main stream reached `after`
        (work queued on the main stream since, the verification, runs beside it)."""
        if self.stream is None:
            yield
            return
        self.stream.wait_event(after)
        with torch.cuda.stream(self.stream):
            yield

    def join(self) -> None:
        """The main stream waits for everything queued on the side stream."""
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
