"""Benchmark metrics, with Spec-Bench's definitions.

Per prompt, a `PromptRecord`; per cell, `aggregate(records)`:

    tau              tokens emitted per target forward of the decode loop (accepted drafts + the
                     bonus token; 1.00 for the target alone) = sum(new_tokens) / sum(target_forwards).
                     The prompt's prefill forwards are not counted (transformers' assisted
                     generation prefills inside its first verification forward, which is counted
                     once, as a step). Equivalently: the mean accepted length per step + 1.
    acceptance_rate  accepted draft tokens / draft tokens proposed (every draft node of a tree is
                     a proposed token, so wide trees have low rates by construction).
    tokens_per_second  sum(new_tokens) / sum(wall time of the generate call), prefill, drafting
                     and verification all included.
    speedup          tokens_per_second of a method / tokens_per_second of the target alone
                     (method=autoregressive) on the same prompts and machine; computed by the
                     report from the autoregressive cell of the same sweep (`speedup` below).

Pooled ratios (sums over prompts), not means of per-prompt ratios, so long answers weigh more;
`tau_mean_per_prompt` gives the other average for comparison.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from treespec.stats import SpeculationRates


@dataclass
class PromptRecord(SpeculationRates):
    """What one prompt's generation cost (times in seconds)."""

    id: str
    prompt_tokens: int
    new_tokens: int
    target_forwards: int
    draft_forwards: int = 0
    prefill_forwards: int = 0
    draft_tokens_proposed: int = 0
    accepted_lengths: list[int] = field(default_factory=list)
    accepted_from_lookup: int = 0  # of the accepted drafts, those copied from the context
    time_total: float = 0.0
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_other: float = 0.0
    output_ids: list[int] | None = None
    output_text: str | None = None
    loadavg: float | None = None  # 1-minute load average of the machine when the prompt started
    tree: str | None = None  # the tree treespec ran (GenerationStats.tree)
    tree_choice: dict | None = None  # tree=auto: what was chosen and why (GenerationStats.tree_choice)

    @property
    def accepted_tokens(self) -> int:
        return sum(self.accepted_lengths)

    def as_dict(self) -> dict:
        return asdict(self) | self.rates() | {"accepted_tokens": self.accepted_tokens}

    @classmethod
    def from_dict(cls, d: dict) -> "PromptRecord":
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in d.items() if k in names})


def aggregate(records: list[PromptRecord]) -> dict:
    """Cell-level metrics from its prompts' records (see the module docstring)."""
    n = len(records)
    new = sum(r.new_tokens for r in records)
    fwd = sum(r.target_forwards for r in records)
    proposed = sum(r.draft_tokens_proposed for r in records)
    accepted = sum(r.accepted_tokens for r in records)
    total = sum(r.time_total for r in records)
    steps = [a for r in records for a in r.accepted_lengths]
    hist = Counter(steps)
    return {
        "prompts": n,
        "new_tokens": new,
        "prompt_tokens": sum(r.prompt_tokens for r in records),
        "target_forwards": fwd,
        "draft_forwards": sum(r.draft_forwards for r in records),
        "draft_tokens_proposed": proposed,
        "accepted_tokens": accepted,
        "accepted_from_lookup": sum(r.accepted_from_lookup for r in records),
        "tau": new / fwd if fwd else 0.0,
        "tau_mean_per_prompt": sum(r.tau for r in records) / n if n else 0.0,
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "mean_accepted_length": sum(steps) / len(steps) if steps else 0.0,
        "accepted_length_histogram": {str(k): hist[k] for k in sorted(hist)},
        "time_total": total,
        "time_prefill": sum(r.time_prefill for r in records),
        "time_draft": sum(r.time_draft for r in records),
        "time_verify": sum(r.time_verify for r in records),
        "time_other": sum(r.time_other for r in records),
        "tokens_per_second": new / total if total else 0.0,
        "mean_loadavg": _mean([r.loadavg for r in records if r.loadavg is not None]),
        "seconds_per_step": (total - sum(r.time_prefill for r in records)) / fwd if fwd else 0.0,
    }


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def speedup(tokens_per_second: float, baseline_tokens_per_second: float) -> float | None:
    """tokens/s of a method over tokens/s of the target alone (None without a baseline)."""
    if not baseline_tokens_per_second:
        return None
    return tokens_per_second / baseline_tokens_per_second
