"""A tree whose depth adapts to the acceptance: static trees of several depths, one chosen
between steps.

`AdaptiveDrafter` chooses the depth that maximises expected tokens per unit of cost from the
acceptance per depth measured over a sliding window of steps (docs/dynamic_trees.md). Its
choices are logged in the stats (`GenerationStats.tree_choices`).
"""

from __future__ import annotations

import numbers
from collections import deque
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from treespec.backends.base import Backend, TreeCache
from treespec.drafting.base import ChildProposer, Drafter, TreeConfigError, check_count
from treespec.drafting.static import TreeDrafter
from treespec.stats import GenerationStats
from treespec.tree.draft import DraftTree
from treespec.tree.topology import TreeTopology


@dataclass(frozen=True)
class AdaptiveTreeConfig:
    """Static trees `widths[:depth]` for depth in [min_depth, max_depth] (widths past its end
    repeat its last entry). Every step uses the depth that maximises
    (1 + expected accepted) / (1 + draft_cost * depth), the expectation computed from the
    acceptance per depth over the last `window` steps; draft_cost is one draft forward's cost
    in target forwards (about 0.4 for the Qwen2.5-Coder pair on a CPU).
    The tree policy of `tree='adaptive'` (drafting/policy.py)."""

    widths: tuple[int, ...] = (2, 2, 1)
    min_depth: int = 1
    max_depth: int = 8
    window: int = 16
    draft_cost: float = 0.4

    def __post_init__(self) -> None:
        for name in ("min_depth", "max_depth", "window"):
            check_count("adaptive", name, getattr(self, name))
        if self.max_depth < self.min_depth:
            raise TreeConfigError("max_depth", f"adaptive tree needs 1 <= min_depth <= max_depth, got "
                                  f"{self.min_depth}, {self.max_depth}")
        cost = self.draft_cost
        if isinstance(cost, bool) or not isinstance(cost, numbers.Real) or not cost >= 0:
            raise TreeConfigError("draft_cost", f"adaptive tree draft_cost must be a number >= 0, got {cost!r}")
        if not self.widths:
            raise TreeConfigError("widths", "adaptive tree widths must list at least one level")
        for i, w in enumerate(self.widths):
            check_count("adaptive", f"widths[{i}]", w)

    def topology(self, depth: int) -> TreeTopology:
        widths = [self.widths[min(i, len(self.widths) - 1)] for i in range(depth)]
        return TreeTopology.from_widths(widths)

    # the tree policy (drafting/policy.py): the deepest tree bounds every step
    has_drafts = True

    def draft_nodes(self, greedy: bool) -> int:
        return self.topology(self.max_depth).num_drafts

    def max_nodes(self, greedy: bool) -> int:
        return self.topology(self.max_depth).num_nodes

    def make_drafter(self, model: PreTrainedModel, backend: Backend, cache: TreeCache,
                     proposer: ChildProposer, stats: GenerationStats) -> Drafter:
        return AdaptiveDrafter(model, self, backend, cache, proposer, stats)


class AdaptiveDrafter:
    """Chooses the tree depth between steps from the acceptance measured over a window."""

    def __init__(self, model: PreTrainedModel, config: AdaptiveTreeConfig, backend: Backend,
                 cache: TreeCache, proposer: ChildProposer, stats: GenerationStats):
        self.model, self.config, self.cache, self.stats = model, config, cache, stats
        self.drafters = {
            d: TreeDrafter(model, config.topology(d), backend, cache, proposer)
            for d in range(config.min_depth, config.max_depth + 1)
        }
        self.max_nodes = max(t.max_nodes for t in self.drafters.values())
        self.max_depth = config.max_depth
        self.depth = self.first_depth
        self.window: deque[tuple[int, int]] = deque(maxlen=config.window)  # (tree depth, accepted)

    @property
    def first_depth(self) -> int:
        """The depth a generation starts from: halfway between the bounds."""
        return self.config.min_depth + (self.config.max_depth - self.config.min_depth) // 2

    @property
    def forwards_per_step(self) -> int:
        return self.depth

    def describe(self) -> str:
        c = self.config
        return f"adaptive: widths {list(c.widths)}, depth {c.min_depth}..{c.max_depth}, window {c.window}"

    def draft(self, pending: torch.Tensor, root_pos: int) -> DraftTree:
        return self.drafters[self.depth].draft(pending, root_pos)

    def commit(self, tree: DraftTree, path: torch.Tensor, num_accepted: int, kept: int,
               emitted: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return self.drafters[self.depth].commit(tree, path, num_accepted, kept, emitted)

    def restart(self, proposer: ChildProposer, stats: GenerationStats) -> bool:
        """See `Drafter.restart`: each depth's drafter starts again; the window starts empty."""
        for drafter in self.drafters.values():
            drafter.restart(proposer, stats)
        self.stats = stats
        self.depth = self.first_depth
        self.window.clear()
        return True

    def observe(self, num_accepted: int) -> None:
        self.window.append((self.depth, num_accepted))
        self.depth = choose_depth(self.window, self.config)
        self.stats.tree_choices.append(self.depth)


def acceptance_per_depth(window, max_depth: int, prior: float = 1.0) -> list[float]:
    """alpha[d-1] = P(depth d accepted | depth d-1 reached), from (tree depth, accepted) pairs;
    a depth never tried borrows the deepest estimate (optimism that lets depth grow again)."""
    alphas = []
    for d in range(1, max_depth + 1):
        tried = sum(1 for depth, a in window if depth >= d and a >= d - 1)
        hits = sum(1 for depth, a in window if depth >= d and a >= d)
        if tried:
            alphas.append((hits + prior / 2) / (tried + prior))
        else:
            alphas.append(alphas[-1] if alphas else 0.5)
    return alphas


def choose_depth(window, config: AdaptiveTreeConfig) -> int:
    alphas = acceptance_per_depth(window, config.max_depth)
    best, best_value, reach, expected = config.min_depth, -1.0, 1.0, 0.0
    for d in range(1, config.max_depth + 1):
        reach *= alphas[d - 1]
        expected += reach
        value = (1 + expected) / (1 + config.draft_cost * d)
        if d >= config.min_depth and value > best_value:
            best, best_value = d, value
    return best
