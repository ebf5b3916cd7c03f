"""The acceptance profile of a draft/target pair, its estimation from generation stats, and
what it predicts for a tree.

Model (positional acceptance, as in Sequoia, Chen et al. 2024, arXiv:2402.12374): whether the
rank-r child of an accepted node at depth d is accepted depends only on (d, r). The profile
stores the *conditional* rates

    probs[d][r] = P(rank-r child accepted | its parent accepted, children of rank < r rejected)

so the probability that the rank-r child is *the* accepted one (greedy verification accepts at
most one child, children are tried best first) is

    q[d][r] = probs[d][r] * prod_{r' < r} (1 - probs[d][r'])          (Sequoia's p_r)

A node is accepted with the product of q over its path, and the expected number of accepted
draft tokens of a tree is the sum of that over its non-root nodes (tau adds the bonus token).
treespec.tree.sequoia finds the tree that maximises it; docs/tree_optimizer.md has the details.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from treespec.tree.topology import TreeTopology

__all__ = [
    "PROFILE_FORMAT",
    "AcceptanceProfile",
    "acceptance_reach",
    "count_acceptances",
    "expected_accepted_length",
    "expected_tau",
    "profile_from_stats",
    "reach_of",
]

PROFILE_FORMAT = "treespec.acceptance_profile/v1"


# --------------------------------------------------------------------------- the profile
@dataclass(frozen=True)
class AcceptanceProfile:
    """Positional acceptance rates of a draft/target pair.

    probs[d][r]: P(the rank-r child of an accepted depth-d node is accepted | the children of
    rank < r were rejected); d = 0 is the root's children. Rows may differ in length; a rank
    past the end of its row is never accepted (probability 0). Depths past the last row reuse
    the last row (a depth-independent profile is a single row, as in Sequoia).
    """

    probs: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        rows = self.probs
        if isinstance(rows, (str, bytes)) or not isinstance(rows, Iterable):
            raise ValueError(f"probs must be a sequence of rows (one per depth), got {type(rows).__name__}")
        rows = list(rows)
        if not rows:
            raise ValueError("probs needs at least one row (the acceptance rates of the root's children)")
        clean = []
        for d, row in enumerate(rows):
            if isinstance(row, (str, bytes)) or not isinstance(row, Iterable):
                raise ValueError(f"probs[{d}] must be a sequence of probabilities, got {row!r}")
            row = list(row)
            if not row:
                raise ValueError(f"probs[{d}] is empty; give at least the rank-0 rate (0.0 if never accepted)")
            vals = []
            for r, p in enumerate(row):
                if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)):
                    raise ValueError(f"probs[{d}][{r}] must be a number, got {p!r}")
                p = float(p)
                if not math.isfinite(p) or not 0.0 <= p <= 1.0:
                    raise ValueError(f"probs[{d}][{r}] = {p} is not a probability in [0, 1]")
                vals.append(p)
            clean.append(tuple(vals))
        object.__setattr__(self, "probs", tuple(clean))

    # ------------------------------------------------------------- constructors
    @classmethod
    def uniform(cls, row: Sequence[float]) -> "AcceptanceProfile":
        """A depth-independent profile (Sequoia's acceptance vector, in conditional form)."""
        return cls((tuple(row),))

    @classmethod
    def from_marginals(cls, rows: Sequence[Sequence[float]]) -> "AcceptanceProfile":
        """From marginal rates q[d][r] = P(the accepted child has rank r) (Sequoia's p_r, which
        sum to at most 1 per row) instead of the conditional ones."""
        out = []
        for d, row in enumerate(rows):
            left, cond = 1.0, []
            total = float(sum(row))
            if total > 1.0 + 1e-9:
                raise ValueError(f"marginal rates of depth {d} sum to {total:.6g} > 1")
            for q in row:
                q = float(q)
                if not 0.0 <= q <= 1.0:
                    raise ValueError(f"marginal rate {q} at depth {d} is not in [0, 1]")
                cond.append(min(1.0, q / left) if left > 1e-300 else 0.0)
                left = max(0.0, left - q)
            out.append(tuple(cond))
        return cls(tuple(out))

    # ------------------------------------------------------------- views
    @property
    def depths(self) -> int:
        """How many depth rows the profile stores (later depths reuse the last one)."""
        return len(self.probs)

    def row(self, d: int) -> tuple[float, ...]:
        """Conditional rates of the children of a depth-d node."""
        if d < 0:
            raise ValueError(f"depth must be >= 0, got {d}")
        return self.probs[min(d, len(self.probs) - 1)]

    def marginals(self, d: int) -> tuple[float, ...]:
        """q[d][r] = P(the accepted child of an accepted depth-d node has rank r)."""
        out, left = [], 1.0
        for p in self.row(d):
            out.append(left * p)
            left *= 1.0 - p
        return tuple(out)

    # ------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return {"format": PROFILE_FORMAT, "probs": [list(r) for r in self.probs]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "AcceptanceProfile":
        if not isinstance(data, Mapping) or "probs" not in data:
            raise ValueError("an acceptance profile needs a 'probs' entry (a list of rows, one per depth)")
        fmt = data.get("format", PROFILE_FORMAT)
        if fmt != PROFILE_FORMAT:
            raise ValueError(f"unknown acceptance-profile format {fmt!r} (expected {PROFILE_FORMAT!r})")
        return cls(data["probs"])

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_json(cls, text: str) -> "AcceptanceProfile":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "AcceptanceProfile":
        return cls.from_json(Path(path).read_text())


# --------------------------------------------------------------------------- estimation
def _ranks_of(stats) -> tuple[list[list[int]], list[int] | None]:
    if isinstance(stats, Mapping):
        ranks, lengths = stats.get("accepted_ranks"), stats.get("accepted_lengths")
    else:
        ranks, lengths = getattr(stats, "accepted_ranks", None), getattr(stats, "accepted_lengths", None)
    if ranks is None:
        raise ValueError(f"{type(stats).__name__} has no accepted_ranks; pass GenerationStats (or their as_dict())")
    return ranks, lengths


def count_acceptances(stats_list: Iterable, topo: TreeTopology) -> tuple[np.ndarray, np.ndarray]:
    """Tries and acceptances per (depth, rank) from stats collected with the tree `topo`.

    Per step, walk the accepted ranks from the root: at a depth-d node that had an accepted
    child of rank r, ranks 0..r were tried and r was accepted; at the last accepted node, all
    of its children in `topo` were tried and none accepted (nothing is counted when it is a
    leaf of `topo`). Returns float arrays (tries, accepts) of shape (topo.max_depth, K).
    """
    depth_rows = max(topo.max_depth, 1)
    width = topo.children.shape[1]
    tries = np.zeros((depth_rows, width))
    accepts = np.zeros((depth_rows, width))
    children = topo.children.tolist()
    n_kids = [sum(1 for c in row if c >= 0) for row in children]
    for k, stats in enumerate(stats_list):
        all_ranks, lengths = _ranks_of(stats)
        if lengths is not None and len(lengths) and len(all_ranks) != len(lengths):
            if not all_ranks:
                raise ValueError(
                    f"stats #{k} have accepted_lengths but no accepted_ranks (the engine did not record them)"
                )
            raise ValueError(f"stats #{k}: {len(all_ranks)} steps of accepted_ranks but {len(lengths)} accepted_lengths")
        for s, ranks in enumerate(all_ranks):
            if lengths is not None and len(lengths) and len(ranks) != lengths[s]:
                raise ValueError(f"stats #{k} step {s}: {len(ranks)} accepted ranks but accepted length {lengths[s]}")
            node = 0
            for d, r in enumerate(ranks):
                if not (isinstance(r, (int, np.integer)) and 0 <= r < n_kids[node]):
                    raise ValueError(
                        f"stats #{k} step {s}: rank {r!r} at depth {d + 1} is not a child in the collection tree "
                        f"({topo.describe()}); were these stats collected with another tree?"
                    )
                tries[d, : r + 1] += 1
                accepts[d, r] += 1
                node = children[node][r]
            d = len(ranks)
            if n_kids[node]:
                tries[d, : n_kids[node]] += 1
    return tries, accepts


def profile_from_stats(
    stats_list: Iterable,
    topo: TreeTopology,
    *,
    prior: float = 1.0,
    min_tries: int = 1,
    depth_dependent: bool = True,
) -> AcceptanceProfile:
    """Estimate an AcceptanceProfile from GenerationStats collected with the (wide) tree `topo`.

    stats_list: GenerationStats objects (or their as_dict()) whose accepted_ranks come from
        generations that used exactly `topo`.
    prior: smoothing strength. Each rate is the posterior mean under a Beta(prior/2, prior/2)
        prior, (accepts + prior/2) / (tries + prior); prior=1 is Jeffreys' prior, prior=0 the
        raw frequency.
    min_tries: a (depth, rank) tried fewer times than this gets probability 0 (conservative:
        the optimizer never spends nodes on positions the data say nothing about). Ranks the
        collection tree never drafts are therefore 0, and so are depths it never reached.
    depth_dependent: False pools all depths into one row (Sequoia's depth-independent vector).

    The returned profile has topo.max_depth rows (one per parent depth); optimizing deeper
    than the collection tree reuses its last row.
    """
    if prior < 0 or not math.isfinite(prior):
        raise ValueError(f"prior must be a finite number >= 0, got {prior}")
    if min_tries < 1:
        raise ValueError(f"min_tries must be >= 1, got {min_tries}")
    if topo.num_drafts == 0:
        raise ValueError("the collection tree has no draft nodes")
    tries, accepts = count_acceptances(stats_list, topo)
    if not depth_dependent:
        tries, accepts = tries.sum(0, keepdims=True), accepts.sum(0, keepdims=True)
    rows = []
    for t_row, a_row in zip(tries, accepts):
        row = [
            (a + prior / 2) / (t + prior) if t >= min_tries and t + prior > 0 else 0.0
            for t, a in zip(t_row.tolist(), a_row.tolist())
        ]
        rows.append(tuple(row))
    return AcceptanceProfile(tuple(rows))


# --------------------------------------------------------------------------- evaluation
def acceptance_reach(topo: TreeTopology, profile: AcceptanceProfile) -> list[float]:
    """P(node i is accepted) for every node of `topo` under `profile` (1.0 for the root)."""
    return reach_of(topo.parents, topo.ranks, profile)[0]


def reach_of(parents: Sequence[int], ranks: Sequence[int], profile: AcceptanceProfile) -> tuple[list[float], list[int]]:
    """(P(node i is accepted), depth of node i) for the tree of breadth-first `parents`/`ranks`,
    without building a TreeTopology (the tree chooser prices hundreds of trees)."""
    n = len(parents)
    depth = [0] * n
    marg: dict[int, tuple[float, ...]] = {}
    reach = [1.0] * n
    for i in range(1, n):
        p = parents[i]
        depth[i] = depth[p] + 1
        if depth[p] not in marg:
            marg[depth[p]] = profile.marginals(depth[p])
        q, r = marg[depth[p]], ranks[i]
        reach[i] = reach[p] * (q[r] if r < len(q) else 0.0)
    return reach, depth


def expected_accepted_length(topo: TreeTopology, profile: AcceptanceProfile) -> float:
    """Expected number of accepted draft tokens per step of `topo` under `profile` (no bonus)."""
    return sum(acceptance_reach(topo, profile)[1:])


def expected_tau(topo: TreeTopology, profile: AcceptanceProfile) -> float:
    """Expected tokens per target forward: 1 (the bonus token) + expected accepted length."""
    return 1.0 + expected_accepted_length(topo, profile)
