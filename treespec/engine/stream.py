"""What a generation hands back: `TokenStream` (the steps, as they come) and `GenerationResult`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from treespec.engine.loop import SpeculativeEngine
from treespec.stats import GenerationStats


@dataclass
class GenerationResult:
    """sequences: LongTensor (1, T + new) prompt followed by the generated tokens, as in
    transformers. stats: what it cost (tau, forwards, time split, time to first token)."""

    sequences: torch.Tensor
    stats: GenerationStats


class TokenStream:
    """Iterator over the token ids each step emits (a list of 1..D+1 ints per step).
    After the last step, `result` holds the whole GenerationResult."""

    def __init__(self, engine: SpeculativeEngine, input_ids: torch.Tensor, streamer=None):
        self.engine, self.input_ids, self.streamer = engine, input_ids, streamer
        self.result: GenerationResult | None = None
        self._started = False

    def __iter__(self) -> Iterator[list[int]]:
        # the engine's caches hold this generation: a second pass would overrun them
        if self._started:
            raise RuntimeError(
                "this stream was iterated already (one stream is one generation); call treespec.stream(...) "
                "again for a new one, or read stream.result for this one's output"
            )
        self._started = True
        return self._steps()

    def run(self) -> GenerationResult:
        """Run every step; returns the result."""
        for _ in self:
            pass
        return self.result

    def _steps(self) -> Iterator[list[int]]:
        engine, stats = self.engine, self.engine.stats
        t0 = time.perf_counter()
        with torch.no_grad():
            engine.prefill(self.input_ids)
        if self.streamer is not None:
            self.streamer.put(self.input_ids.cpu())
        finished = False
        while not finished:
            with torch.no_grad():  # per step, not across the yield: the caller's grad mode stays theirs
                step = engine.step()
            finished = step.finished
            if self.streamer is not None and step.tokens:
                self.streamer.put(torch.tensor(step.tokens))
            stats.time_total = time.perf_counter() - t0
            if not stats.time_to_first_token:  # the step's host sync has the tokens on the host
                stats.time_to_first_token = stats.time_total
            yield step.tokens
        stats.new_tokens = engine.new_tokens
        stats.time_total = time.perf_counter() - t0
        if self.streamer is not None:
            self.streamer.end()
        self.result = GenerationResult(sequences=engine.sequences, stats=stats)
