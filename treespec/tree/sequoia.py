"""Sequoia's dynamic program: the static draft tree that maximises the expected accepted length
of an AcceptanceProfile for a node budget (Chen et al. 2024, arXiv:2402.12374).

The program runs over (depth, node budget): children of one node are always the ranks 0..k-1 (a
prefix), and the best subtree below a node depends only on the node's depth and how many nodes
it may use. docs/tree_optimizer.md has the recurrence and its complexity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from treespec.tree.profile import AcceptanceProfile
from treespec.tree.topology import MAX_NODES, TreeTopology

__all__ = ["optimal_shapes", "optimal_value_curve", "optimize_tree"]


def _check_budget(budget: int, max_depth: int) -> None:
    for name, v in (("budget", budget), ("max_depth", max_depth)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be a whole number, got {v!r}")
    if not 1 <= budget <= MAX_NODES - 1:
        raise ValueError(f"budget must be between 1 and {MAX_NODES - 1} draft nodes, got {budget}")
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1, got {max_depth}")


def _weights(profile: AcceptanceProfile, max_depth: int) -> list[np.ndarray]:
    return [np.asarray(profile.marginals(d), dtype=np.float64) for d in range(max_depth)]


def _dp(weights: Sequence[np.ndarray], budget: int, max_depth: int):
    """Solve the DP for per-depth child weights (weights[d][r]: the factor a rank-r child of a
    depth-d node multiplies its path by). Returns (values, choices):

    values[d][n]: best expected accepted count strictly below an accepted depth-d node that may
        use n more nodes (values[max_depth] = 0).
    choices[d][i, m]: with ranks i.. still to place and m nodes left, the size of the rank-i
        child's subtree (0 = place no child of rank >= i).
    """
    B = int(budget)
    s = np.arange(1, B + 1)  # subtree size of the child being placed (it included)
    rest = np.arange(B + 1)[:, None] - s[None, :]  # nodes left for the later ranks
    valid = rest >= 0
    rest = np.where(valid, rest, 0)
    values: list[np.ndarray] = [np.zeros(B + 1) for _ in range(max_depth + 1)]
    choices: list[np.ndarray] = [np.zeros((0, B + 1), dtype=np.int64) for _ in range(max_depth)]
    for d in reversed(range(max_depth)):
        w = np.asarray(weights[d], dtype=np.float64)
        nz = np.flatnonzero(w > 0)
        k = min(int(nz[-1]) + 1 if nz.size else 0, B)  # trailing zero-weight ranks never help
        below = values[d + 1]
        h = np.zeros(B + 1)  # h[m]: best with the ranks after the current one and m nodes
        ch = np.zeros((k, B + 1), dtype=np.int64)
        for i in reversed(range(k)):
            child = w[i] * (1.0 + below[:B])  # child[s-1]: rank-i child whose subtree has s nodes
            cand = np.where(valid, child[None, :] + h[rest], -np.inf)
            best_s = cand.argmax(axis=1)  # first maximum: the smallest subtree among ties
            best = cand[np.arange(B + 1), best_s]
            take = best > 0.0  # ties with "no child" keep the nodes unused
            ch[i] = np.where(take, best_s + 1, 0)
            h = np.where(take, best, 0.0)
        values[d] = h
        choices[d] = ch
    return values, choices


def _shape(choices, budget: int, max_depth: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Parents and ranks (breadth first, siblings by rank: TreeTopology's order) of the optimal
    tree from the DP choices."""
    parents, ranks = [-1], [0]
    queue = [(0, 0, int(budget))]  # (node index, its depth, nodes it may use below it)
    for node, d, n in queue:  # the queue grows while it is walked: breadth first
        if d >= max_depth:
            continue
        ch = choices[d]
        i, m = 0, n
        while i < ch.shape[0] and ch[i, m] > 0:
            size = int(ch[i, m])
            queue.append((len(parents), d + 1, size - 1))
            parents.append(node)
            ranks.append(i)
            m -= size
            i += 1
    return tuple(parents), tuple(ranks)


def _build(choices, budget: int, max_depth: int) -> TreeTopology:
    parents, ranks = _shape(choices, budget, max_depth)
    if len(parents) == 1:
        raise ValueError("every acceptance rate the tree could use is 0: no draft node can ever be accepted")
    return TreeTopology(parents, ranks)


def optimize_tree(profile: AcceptanceProfile, budget: int, max_depth: int) -> TreeTopology:
    """The tree with at most `budget` draft nodes (root excluded) and depth <= `max_depth` that
    maximises expected_accepted_length under `profile` (Sequoia-style dynamic program).

    Nodes that add no expected value are not placed, so the tree may use fewer than `budget`
    nodes (e.g. when the profile has zero rates). Raises ValueError for a bad budget/depth or
    when no node can ever be accepted.
    """
    _check_budget(budget, max_depth)
    max_depth = min(int(max_depth), int(budget))  # a deeper tree needs more nodes than the budget
    _, choices = _dp(_weights(profile, max_depth), budget, max_depth)
    return _build(choices, budget, max_depth)


def optimal_value_curve(profile: AcceptanceProfile, budget: int, max_depth: int) -> list[float]:
    """Best expected accepted length for every budget 0..`budget` at depth <= `max_depth` (one
    DP run), e.g. to trade tree size against verification cost."""
    _check_budget(budget, max_depth)
    max_depth = min(int(max_depth), int(budget))
    values, _ = _dp(_weights(profile, max_depth), budget, max_depth)
    return values[0].tolist()


def optimal_shapes(profile: AcceptanceProfile, budget: int, max_depth: int) -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
    """{n: (parents, ranks) of the optimize_tree answer for budget n} (TreeTopology(parents,
    ranks) builds it) for every budget 1..`budget` at which one more node still adds expected
    value, from one DP run (a budget that adds nothing gives the same tree as the one below it,
    so it is left out; empty when no node can ever be accepted). treespec.tree.auto prices each
    of them against the machine's forward costs."""
    _check_budget(budget, max_depth)
    max_depth = min(int(max_depth), int(budget))
    values, choices = _dp(_weights(profile, max_depth), budget, max_depth)
    curve = values[0]
    return {n: _shape(choices, n, max_depth) for n in range(1, int(budget) + 1) if curve[n] > curve[n - 1] + 1e-12}
