"""Statistics of one generation."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch


class SpeculationRates:
    """tau, acceptance rate and tokens/s from the counters a dataclass carries (new_tokens,
    target_forwards, accepted_lengths, draft_tokens_proposed, time_total); shared by
    `GenerationStats` and the benchmark's per-prompt `PromptRecord` so the two cannot disagree."""

    new_tokens: int
    target_forwards: int
    accepted_lengths: list[int]
    draft_tokens_proposed: int
    time_total: float

    @property
    def tau(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / draft tokens proposed (Spec-Bench's definition)."""
        return sum(self.accepted_lengths) / self.draft_tokens_proposed if self.draft_tokens_proposed else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.time_total if self.time_total else 0.0

    def rates(self) -> dict:
        """The derived values, for as_dict()."""
        return {"tau": self.tau, "acceptance_rate": self.acceptance_rate, "tokens_per_second": self.tokens_per_second}


@dataclass
class GenerationStats(SpeculationRates):
    """What a generation cost and how much the speculation saved.

    target_forwards: target forwards in the decode loop (one per step; the prompt's prefill
        forwards are counted separately in prefill_forwards).
    accepted_lengths: per step, how many draft tokens the target accepted (0..D).
    accepted_ranks: per step, the sibling rank (0 = the draft's best child) of each accepted
        node from depth 1 down; the tree optimizer estimates acceptance profiles from these.
    accepted_from_model, accepted_from_lookup: accepted draft tokens proposed by the draft model
        and by prompt lookup (a lookup token that equals a model node is merged into it and
        counts as the model's); they sum to sum(accepted_lengths).
    tree_choice: with tree='auto', what treespec.tree.auto.choose_tree picked: the chosen shape,
        its predicted tau, step seconds, tokens/s and speedup, the alternatives it beat and
        `reason` (one sentence); empty otherwise.
    tau: new_tokens / target_forwards, the mean tokens emitted per target forward, bonus token
        included (1.0 for the target alone).
    draft_forwards: draft forwards on the critical path (before each verification).
    With overlap (drafting/ahead.py): ahead_steps steps drafted ahead, ahead_hits of them ended
        where the draft guessed; draft_forwards_ahead ran beside verification (a second CUDA
        stream), and draft_forwards_saved were skipped on the critical path thanks to hits.
    time_ahead: host time spent queuing the ahead work (on the CPU: running it).
    time_to_first_token: seconds from the call to the first emitted token on the host (the
        prefill and the first step).
    """

    method: str = "tree"
    tree: str = ""
    backend: str = "sdpa"
    new_tokens: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    prefill_forwards: int = 0
    draft_tokens_proposed: int = 0
    accepted_lengths: list[int] = field(default_factory=list)
    accepted_ranks: list[list[int]] = field(default_factory=list)
    accepted_from_model: int = 0
    accepted_from_lookup: int = 0
    tree_choices: list[int] = field(default_factory=list)
    tree_choice: dict = field(default_factory=dict)
    ahead_steps: int = 0
    ahead_hits: int = 0
    draft_forwards_ahead: int = 0
    draft_forwards_saved: int = 0
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_ahead: float = 0.0
    time_verify: float = 0.0
    time_other: float = 0.0
    time_total: float = 0.0
    time_to_first_token: float = 0.0

    @property
    def ahead_hit_rate(self) -> float:
        """Steps whose next tree was drafted ahead / steps that drafted ahead."""
        return self.ahead_hits / self.ahead_steps if self.ahead_steps else 0.0

    @property
    def acceptance_by_depth(self) -> list[float]:
        """acceptance_by_depth[d-1] = P(a depth-d draft is accepted | depth d-1 was reached)."""
        depth = max((len(r) for r in self.accepted_ranks), default=0)
        depth = max(depth, max(self.accepted_lengths, default=0))
        rates = []
        for d in range(1, depth + 1):
            reached = sum(1 for a in self.accepted_lengths if a >= d - 1)
            rates.append(sum(1 for a in self.accepted_lengths if a >= d) / reached if reached else 0.0)
        return rates

    def as_dict(self) -> dict:
        return asdict(self) | self.rates() | {"acceptance_by_depth": self.acceptance_by_depth,
                                              "ahead_hit_rate": self.ahead_hit_rate}

    def summary(self) -> str:
        return (
            f"{self.new_tokens} tokens in {self.target_forwards} target forwards: tau {self.tau:.2f}, "
            f"{self.tokens_per_second:.2f} tokens/s ({self.time_total:.2f} s: prefill {self.time_prefill:.2f}, "
            f"draft {self.time_draft:.2f}, verify {self.time_verify:.2f}, other {self.time_other:.2f}"
            + (f", ahead {self.time_ahead:.2f}" if self.ahead_steps else "") + f"; first token {self.time_to_first_token:.3f} s); "
            f"method {self.method}, tree {self.tree}, backend {self.backend}"
            + (f"; drafted ahead: {self.ahead_hits}/{self.ahead_steps} hits, {self.draft_forwards_ahead} draft "
               f"forwards beside verification, {self.draft_forwards_saved} saved" if self.ahead_steps else "")
        ) + (f"\ntree='auto': {self.tree_choice['reason']}" if self.tree_choice else "")


class Stopwatch:
    """Adds wall time to a stats field. With `sync_cuda` it synchronises the GPU around each
    phase so that the split is honest; that costs extra host syncs, so it is off unless asked
    for (the total time is always exact: the loop syncs once per step anyway)."""

    def __init__(self, stats: GenerationStats, sync_cuda: bool = False):
        self.stats = stats
        self.cuda = sync_cuda

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            setattr(self.stats, name, getattr(self.stats, name) + time.perf_counter() - t0)
