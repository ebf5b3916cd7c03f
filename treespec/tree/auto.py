"""The tree that pays on this machine: expected tokens per step over predicted seconds per step.

Pure code (no torch work): a `CostTable` of measured forward costs (seconds per forward of n new
tokens, for the target and for the draft; treespec.engine.calibrate measures one), an
`AcceptanceProfile` (treespec.tree.profile), and `choose_tree`, which prices every candidate

    the target alone     tau 1,                 step = target(1) + overhead
    chains 1..max_depth  tau = expected_tau,    step as below
    Sequoia's trees      the optimal tree (treespec.tree.sequoia) of every node budget up to
                         budget and every depth limit up to max_depth

    step(T) = target(N) + draft(m) + sum_{d=1}^{D-1} draft(F_d) + overhead

(N nodes verified, root included; the draft's first forward over the m = 1 pending token, or 2
after a step that accepted the whole deepest path, probability p_full; then one forward per level
but the last, F_d nodes each) and keeps the one with the most predicted tokens per second,
tau / step. This is Sequoia's hardware-aware choice (Chen et al. 2024, arXiv:2402.12374, sec. 3.3:
tree size picked from measured verification cost, tree shape from the DP) applied at run time;
docs/auto_tree.md has the derivation and its limits. `tree="auto"` of generate/stream resolves
through here (treespec.engine.calibrate.resolve_auto).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

from treespec.errors import ConfigError
from treespec.tree.profile import AcceptanceProfile, count_acceptances, reach_of
from treespec.tree.sequoia import optimal_shapes
from treespec.tree.topology import MAX_NODES, TreeTopology

__all__ = [
    "COSTS_FORMAT",
    "DEFAULT_PROFILE",
    "AutoTreeConfig",
    "Candidate",
    "CostTable",
    "TreeChoice",
    "choose_tree",
    "interp",
    "learn_profile",
    "level_sizes",
    "nodes_per_level",
    "step_seconds",
]

COSTS_FORMAT = "treespec.forward_costs/v1"

# The profile tree="auto" assumes when it is given none: the real Qwen2.5-Coder 0.5B -> 1.5B
# pair's on MT-Bench/GSM8K text (treespec/configs/presets/optimized_text.yaml, estimated by
# profile_from_stats from a wide collection tree), the least favourable of the three domains
# measured: a tree that pays under it pays on code and structured output too.
DEFAULT_PROFILE = AcceptanceProfile(
    (
        (0.676887, 0.456522, 0.381579, 0.3125),
        (0.670918, 0.392308, 0.4125, 0.0),
        (0.679191, 0.401786, 0.0, 0.0),
        (0.732143, 0.513158, 0.0, 0.0),
        (0.766393, 0.0, 0.0, 0.0),
        (0.654255, 0.0, 0.0, 0.0),
    )
)


# --------------------------------------------------------------------------- costs
def interp(table: Mapping[int, float], n: float) -> float:
    """Piecewise-linear interpolation of `table` (size -> seconds) at n; past the largest size,
    the last segment's slope continues (below the smallest, its value)."""
    xs = sorted(table)
    if n <= xs[0] or len(xs) == 1:
        return table[xs[0]]
    for a, b in zip(xs, xs[1:]):
        if n <= b:
            return table[a] + (table[b] - table[a]) * (n - a) / (b - a)
    a, b = xs[-2], xs[-1]
    return table[b] + (table[b] - table[a]) * (n - b) / (b - a)


def _clean_table(name: str, table: Mapping) -> dict[int, float]:
    if not isinstance(table, Mapping) or not table:
        raise ValueError(f"CostTable.{name} must map forward sizes to seconds, got {table!r}")
    out = {}
    for k, v in table.items():
        n, s = int(k), float(v)
        if n < 1 or not math.isfinite(s) or s <= 0:
            raise ValueError(f"CostTable.{name}[{k!r}] = {v!r}: sizes are >= 1 tokens and costs > 0 seconds")
        out[n] = s
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class CostTable:
    """What one forward of n new tokens costs on a machine, after a short context.

    target: {n: seconds} for the target (verification of n tree nodes, all logits).
    draft: {n: seconds} for the draft (one tree level of n nodes).
    overhead: seconds per step outside the forwards (acceptance, commit, Python).
    device: where it was measured (for messages and the cache key), e.g. 'cpu (2 threads)'.
    """

    target: Mapping[int, float]
    draft: Mapping[int, float]
    overhead: float = 0.0
    device: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", _clean_table("target", self.target))
        object.__setattr__(self, "draft", _clean_table("draft", self.draft))
        if not math.isfinite(self.overhead) or self.overhead < 0:
            raise ValueError(f"CostTable.overhead must be >= 0 seconds, got {self.overhead}")

    def target_seconds(self, n: float) -> float:
        return interp(self.target, n)

    def draft_seconds(self, n: float) -> float:
        return interp(self.draft, n)

    def to_dict(self) -> dict:
        return {"format": COSTS_FORMAT, "device": self.device, "overhead": self.overhead,
                "target": {str(k): v for k, v in self.target.items()},
                "draft": {str(k): v for k, v in self.draft.items()}}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping) -> "CostTable":
        if data.get("format") != COSTS_FORMAT:
            raise ValueError(f"not a forward-cost table of format {COSTS_FORMAT!r}: {data.get('format')!r}")
        return cls(data["target"], data["draft"], float(data.get("overhead", 0.0)), str(data.get("device", "")))


def nodes_per_level(widths: Sequence[int]) -> list[int]:
    """F_1..F_D of the tree whose every depth-d node has widths[d] children."""
    out, f = [], 1
    for w in widths:
        f *= w
        out.append(f)
    return out


def level_sizes(topo: TreeTopology) -> list[int]:
    """F_1..F_D of `topo` (nodes at each depth below the root)."""
    s = topo.level_starts
    return [s[d + 1] - s[d] for d in range(1, topo.max_depth + 1)]


def step_seconds(levels: Sequence[int], costs: CostTable, p_full: float = 0.0) -> float:
    """Predicted seconds of one step of a tree with F_d = levels[d-1] nodes at depth d (empty:
    the target alone). p_full: probability that a step accepts a whole deepest path, after
    which the draft's first forward takes 2 pending tokens instead of 1."""
    if not levels:
        return costs.target_seconds(1) + costs.overhead
    first = (1 - p_full) * costs.draft_seconds(1) + p_full * costs.draft_seconds(2)
    drafts = first + sum(costs.draft_seconds(f) for f in levels[:-1])
    return costs.target_seconds(1 + sum(levels)) + drafts + costs.overhead


# --------------------------------------------------------------------------- the choice
@dataclass(frozen=True)
class Candidate:
    """One priced option: the tree of breadth-first `parents`/`ranks` (empty: the target alone,
    no draft model runs)."""

    name: str
    parents: tuple[int, ...]
    ranks: tuple[int, ...]
    tau: float
    step_seconds: float

    @property
    def num_drafts(self) -> int:
        return max(len(self.parents) - 1, 0)

    @property
    def kind(self) -> str:
        """'target' (alone), 'chain' or 'tree'."""
        if not self.parents:
            return "target"
        return "tree" if any(self.ranks) else "chain"

    @cached_property
    def topology(self) -> TreeTopology | None:
        """The TreeTopology (None for the target alone); built on demand: the chooser prices
        hundreds of candidates and builds one."""
        return TreeTopology(self.parents, self.ranks) if self.parents else None

    @property
    def tokens_per_second(self) -> float:
        return self.tau / self.step_seconds

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "tau": round(self.tau, 4),
                "step_seconds": round(self.step_seconds, 6), "tokens_per_second": round(self.tokens_per_second, 4),
                "draft_nodes": self.num_drafts, "parents": list(self.parents), "ranks": list(self.ranks)}  # fmt: skip


@dataclass(frozen=True)
class TreeChoice:
    """What choose_tree picked, what it beat, and why (one sentence)."""

    best: Candidate
    target_alone: Candidate
    alternatives: tuple[Candidate, ...]  # the best chain and the best tree it beat, the target alone
    reason: str

    @property
    def topology(self) -> TreeTopology | None:
        return self.best.topology

    @property
    def speedup(self) -> float:
        """Predicted tokens/s over the target alone's."""
        return self.best.tokens_per_second / self.target_alone.tokens_per_second

    def as_dict(self) -> dict:
        return {"chosen": self.best.as_dict(), "predicted_speedup": round(self.speedup, 4), "reason": self.reason,
                "alternatives": [c.as_dict() for c in self.alternatives]}  # fmt: skip


@dataclass(frozen=True)
class AutoTreeConfig:
    """tree="auto": let choose_tree pick the topology for this machine before the generation.

    profile: the pair's acceptance profile (None: DEFAULT_PROFILE); e.g. a domain preset's, or
        profile_from_stats over earlier generations of the same kind.
    costs: forward costs (None: measured once per device, model pair, dtype and backend by
        treespec.engine.calibrate, and cached on disk).
    budget, max_depth: the largest trees considered (draft nodes, levels).
    chains_only: consider chains (and the target alone) only; method='linear' sets it.
    """

    profile: AcceptanceProfile | None = None
    costs: CostTable | None = None
    budget: int = 64
    max_depth: int = 8
    chains_only: bool = False

    def __post_init__(self) -> None:
        for name, lo, hi in (("budget", 1, MAX_NODES - 1), ("max_depth", 1, MAX_NODES - 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not lo <= v <= hi:
                raise ConfigError(f"AutoTreeConfig.{name} must be a whole number in {lo}..{hi}, got {v!r}", name)
            object.__setattr__(self, name, int(v))
        # a tree of `budget` drafts is at most `budget` deep: a larger max_depth (the default 8
        # with a small budget) changes nothing, so it is capped rather than refused
        object.__setattr__(self, "max_depth", min(self.max_depth, self.budget))

    def for_method(self, method: str) -> "AutoTreeConfig":
        return replace(self, chains_only=True) if method == "linear" else self

    # the TreePolicy protocol (treespec.drafting.policy), as an upper bound until it is resolved
    @property
    def has_drafts(self) -> bool:
        return True

    def draft_nodes(self, greedy: bool) -> int:
        return self.budget

    def max_nodes(self, greedy: bool) -> int:
        return self.budget + 1

    def make_drafter(self, *args, **kwargs):
        raise RuntimeError("tree='auto' is resolved to a static tree first: treespec.engine.calibrate.resolve_auto")

    def learn(self, stats_list: Sequence, weight: float = 20.0) -> "AutoTreeConfig":
        """This config with its profile updated from generations it chose the tree of (their
        GenerationStats, or as_dict()s, all with the same choice): see learn_profile."""
        chosen = {tuple(_chosen(st)["parents"]) for st in stats_list}
        if len(chosen) != 1:
            raise ValueError(f"learn() takes stats of one chosen tree; these used {len(chosen)} different ones")
        first = _chosen(stats_list[0])
        if not first["parents"]:
            return self  # the target alone drafted nothing: nothing to learn from
        topo = TreeTopology(tuple(first["parents"]), tuple(first["ranks"]))
        return replace(self, profile=learn_profile(self.profile or DEFAULT_PROFILE, stats_list, topo, weight))

    def choose(self, costs: CostTable) -> "TreeChoice":
        return choose_tree(self.profile or DEFAULT_PROFILE, costs, budget=self.budget,
                           max_depth=self.max_depth, chains_only=self.chains_only)  # fmt: skip


def _chosen(stats) -> dict:
    choice = stats.get("tree_choice") if isinstance(stats, Mapping) else getattr(stats, "tree_choice", None)
    if not choice:
        raise ValueError("these stats are not from a tree='auto' generation (their tree_choice is empty)")
    return choice["chosen"]


def learn_profile(prior: AcceptanceProfile, stats_list: Sequence, topo: TreeTopology, weight: float = 20.0) -> AcceptanceProfile:
    """`prior` updated with the acceptances that generations with the tree `topo` observed: each
    (depth, rank) rate becomes (accepts + weight * prior rate) / (tries + weight), a Beta prior
    worth `weight` observations. Positions the tree never tried keep the prior's rate, so
    learning from a chain does not teach the chooser that wider trees are useless."""
    if weight <= 0:
        raise ValueError(f"weight must be > 0 (observations the prior is worth), got {weight}")
    tries, accepts = count_acceptances(stats_list, topo)
    depths, width = max(prior.depths, tries.shape[0]), max(max(len(r) for r in prior.probs), tries.shape[1])
    rows = []
    for d in range(depths):
        base = prior.row(d)
        row = []
        for r in range(width):
            p0 = base[r] if r < len(base) else 0.0
            t, a = (tries[d, r], accepts[d, r]) if d < tries.shape[0] and r < tries.shape[1] else (0.0, 0.0)
            row.append((a + weight * p0) / (t + weight))
        rows.append(tuple(row))
    return AcceptanceProfile(tuple(rows))


def _price(parents: tuple[int, ...], ranks: tuple[int, ...], profile: AcceptanceProfile, costs: CostTable) -> Candidate:
    reach, depth = reach_of(parents, ranks, profile)
    deepest = max(depth)
    levels = [0] * deepest
    for d in depth[1:]:
        levels[d - 1] += 1
    p_full = sum(r for r, d in zip(reach, depth) if d == deepest)  # at most one node per depth is accepted
    name = f"chain-{deepest}" if not any(ranks) else f"tree of {len(parents) - 1} drafts, nodes per level {levels}"
    return Candidate(name, parents, ranks, 1.0 + sum(reach[1:]), step_seconds(levels, costs, p_full))


def choose_tree(
    profile: AcceptanceProfile,
    costs: CostTable,
    *,
    budget: int = 64,
    max_depth: int = 8,
    chains_only: bool = False,
) -> TreeChoice:
    """The candidate with the most predicted tokens per second (module docstring): the target
    alone, a chain of 1..max_depth drafts, or (unless chains_only) Sequoia's optimal tree for a
    node budget <= budget and a depth limit <= max_depth. Ties go to the smaller candidate."""
    alone = Candidate("the target alone", (), (), 1.0, step_seconds([], costs))
    cands = [alone]
    shapes = {(tuple([-1] + list(range(k))), (0,) * (k + 1)) for k in range(1, max_depth + 1)}  # the chains
    if not chains_only:
        for depth in range(1, max_depth + 1):
            shapes.update(optimal_shapes(profile, budget, depth).values())
    cands += [_price(parents, ranks, profile, costs) for parents, ranks in shapes]
    ranked = sorted(cands, key=lambda c: (-c.tokens_per_second, c.num_drafts, c.parents))
    best = ranked[0]
    others = [next((c for c in ranked if c.kind == kind), None) for kind in ("chain", "tree", "target")]
    alternatives = tuple(c for c in others if c is not None and c is not best)
    return TreeChoice(best, alone, alternatives, _reason(best, alone, alternatives, costs))


def _reason(best: Candidate, alone: Candidate, alternatives: Sequence[Candidate], costs: CostTable) -> str:
    where = {"cpu": "this CPU", "cuda": "this GPU"}.get(costs.device.split(":")[0], "this machine")

    def verify(c: Candidate) -> str:
        n = len(c.parents)
        return f"verifies {n} tokens for {costs.target_seconds(n) / costs.target_seconds(1):.1f}x the cost of one"

    def vs(c: Candidate) -> str:
        return f"{c.name} ({c.tokens_per_second / alone.tokens_per_second:.2f}x)"

    beaten = [c for c in alternatives if c.kind != "target"]
    if not best.parents:
        top = beaten[0] if beaten else None
        why = f"; the best draft option, {vs(top)}, {verify(top)} on {where}" if top else ""
        return f"no draft tree is predicted to beat the target alone{why}, so the target runs alone."
    lost = ", ".join(vs(c) for c in beaten)
    kind = "a chain" if best.kind == "chain" else "a tree"
    return (f"{where} {verify(best)} and {best.name} is expected to emit {best.tau:.2f} tokens per step, "
            f"so {kind} was chosen: predicted {best.tokens_per_second / alone.tokens_per_second:.2f}x the target alone"
            + (f" (beat {lost})." if lost else "."))  # fmt: skip
