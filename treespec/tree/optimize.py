"""Static tree optimizer: the draft-tree shape that maximises the expected accepted length.

Model (positional acceptance, as in Sequoia, Chen et al. 2024, arXiv:2402.12374): whether the
rank-r child of an accepted node at depth d is accepted depends only on (d, r). The profile
stores the *conditional* rates

    probs[d][r] = P(rank-r child accepted | its parent accepted, children of rank < r rejected)

so the probability that the rank-r child is *the* accepted one (greedy verification accepts at
most one child, children are tried best first) is

    q[d][r] = probs[d][r] * prod_{r' < r} (1 - probs[d][r'])          (Sequoia's p_r)

A node is accepted with the product of q over its path, and the expected number of accepted
draft tokens of a tree is the sum of that over its non-root nodes (tau adds the bonus token).

The optimizer is a dynamic program over (depth, node budget): children of one node are always
the ranks 0..k-1 (a prefix), and the best subtree below a node depends only on the node's depth
and how many nodes it may use. See docs/tree_optimizer.md for the recurrence and complexity.

Command line::

    python -m treespec.optimize --profile profile.json --budget 32 --max-depth 6 \
        --out configs/tree/code-32.yaml [--png tree.png]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np

from treespec.tree.topology import MAX_NODES, TreeTopology

__all__ = [
    "AcceptanceProfile",
    "count_acceptances",
    "draw_tree",
    "expected_accepted_length",
    "expected_tau",
    "load_preset",
    "optimal_value_curve",
    "optimize_tree",
    "preset_dict",
    "profile_from_stats",
    "write_preset",
]

PROFILE_FORMAT = "treespec.acceptance_profile/v1"
PRESET_FORMAT = "treespec.tree_preset/v1"


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
def expected_accepted_length(topo: TreeTopology, profile: AcceptanceProfile) -> float:
    """Expected number of accepted draft tokens per step of `topo` under `profile` (no bonus)."""
    depth = topo.depth.tolist()
    marg: dict[int, tuple[float, ...]] = {}
    reach = [1.0] * topo.num_nodes
    total = 0.0
    for i in range(1, topo.num_nodes):
        p = topo.parents[i]
        dp = depth[p]
        if dp not in marg:
            marg[dp] = profile.marginals(dp)
        q = marg[dp]
        r = topo.ranks[i]
        reach[i] = reach[p] * (q[r] if r < len(q) else 0.0)
        total += reach[i]
    return total


def expected_tau(topo: TreeTopology, profile: AcceptanceProfile) -> float:
    """Expected tokens per target forward: 1 (the bonus token) + expected accepted length."""
    return 1.0 + expected_accepted_length(topo, profile)


# --------------------------------------------------------------------------- the DP
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


def _build(choices, budget: int, max_depth: int) -> TreeTopology:
    """Assemble the optimal tree from the DP choices as a networkx DiGraph."""
    g = nx.DiGraph()
    g.add_node(0, depth=0)
    stack = [(0, 0, int(budget))]  # (graph node, its depth, nodes it may use below it)
    while stack:
        node, d, n = stack.pop()
        if d >= max_depth:
            continue
        ch = choices[d]
        i, m = 0, n
        while i < ch.shape[0] and ch[i, m] > 0:
            size = int(ch[i, m])
            kid = g.number_of_nodes()
            g.add_node(kid, depth=d + 1)
            g.add_edge(node, kid, rank=i)
            stack.append((kid, d + 1, size - 1))
            m -= size
            i += 1
    if g.number_of_nodes() == 1:
        raise ValueError("every acceptance rate the tree could use is 0: no draft node can ever be accepted")
    return TreeTopology.from_networkx(g, root=0)


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


# --------------------------------------------------------------------------- presets
def _level_sizes(topo: TreeTopology) -> list[int]:
    return [topo.level_starts[d + 1] - topo.level_starts[d] for d in range(1, topo.max_depth + 1)]


def preset_dict(
    topo: TreeTopology,
    profile: AcceptanceProfile | None = None,
    *,
    name: str | None = None,
    budget: int | None = None,
) -> dict:
    """The preset as plain data: parents/ranks (breadth-first), a widths summary and, with a
    profile, the expected accepted length and tau."""
    out: dict = {"format": PRESET_FORMAT}
    if name:
        out["name"] = name
    out.update(
        num_drafts=topo.num_drafts,
        max_depth=topo.max_depth,
        level_sizes=_level_sizes(topo),  # nodes at depth 1..D
        level_widths=[topo.level_width(d) for d in range(topo.max_depth)],  # top-k drafted below depth 0..D-1
        parents=list(topo.parents),
        ranks=list(topo.ranks),
    )
    if budget is not None:
        out["budget"] = int(budget)
    if profile is not None:
        e = expected_accepted_length(topo, profile)
        out["expected_accepted_length"] = round(e, 6)
        out["expected_tau"] = round(1.0 + e, 6)
        out["profile"] = [list(r) for r in profile.probs]
    return out


def _yaml_value(v) -> str:
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid YAML scalar
    if isinstance(v, list):
        return "[" + ", ".join(_yaml_value(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(round(v, 6))
    return str(v)


def write_preset(
    topo: TreeTopology,
    path: str | Path,
    profile: AcceptanceProfile | None = None,
    *,
    name: str | None = None,
    budget: int | None = None,
) -> dict:
    """Write the tree as a preset file: JSON when `path` ends in .json, YAML otherwise (flow
    lists, loadable by Hydra/OmegaConf and by `load_preset`). Returns the written data."""
    path = Path(path)
    data = preset_dict(topo, profile, name=name or path.stem, budget=budget)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(data, indent=1) + "\n")
        return data
    lines = [
        "# Static draft tree found by treespec.optimize (positional-acceptance DP, as in Sequoia).",
        "# parents/ranks: breadth-first, node 0 = root; level_widths: top-k drafted below each depth.",
    ]
    lines += [f"{k}: {_yaml_value(v)}" for k, v in data.items()]
    path.write_text("\n".join(lines) + "\n")
    return data


def load_preset(path_or_data: str | Path | Mapping) -> TreeTopology:
    """The TreeTopology of a preset written by `write_preset` (a path or the loaded mapping,
    e.g. a Hydra/OmegaConf node converted to a dict)."""
    if isinstance(path_or_data, Mapping):
        data = path_or_data
    else:
        path = Path(path_or_data)
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    if not isinstance(data, Mapping) or "parents" not in data:
        raise ValueError("a tree preset needs a 'parents' list (breadth-first, parents[0] = -1)")
    topo = TreeTopology.from_parents([int(p) for p in data["parents"]])
    if "ranks" in data and [int(r) for r in data["ranks"]] != list(topo.ranks):
        raise ValueError("the preset's ranks do not follow its parents' sibling order")
    return topo


# --------------------------------------------------------------------------- drawing
def draw_tree(
    topo: TreeTopology,
    path_png: str | Path,
    profile: AcceptanceProfile | None = None,
    title: str | None = None,
) -> None:
    """Draw the tree level by level (root on top) to a PNG; with a profile, colour each node by
    the probability that it is accepted. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = topo.to_networkx()
    # layered layout: y = -depth; leaves take consecutive x in depth-first rank order and each
    # parent sits centred over its children, so siblings read best (rank 0) to worst, left to right
    kids = [[c for c in row if c >= 0] for row in topo.children.tolist()]
    x: dict[int, float] = {}
    next_leaf = 0.0
    stack = [(0, False)]
    while stack:
        node, done = stack.pop()
        if not kids[node]:
            x[node], next_leaf = next_leaf, next_leaf + 1.0
        elif done:
            x[node] = (x[kids[node][0]] + x[kids[node][-1]]) / 2
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in reversed(kids[node]))
    depth = topo.depth.tolist()
    pos = {i: (x[i], -float(depth[i])) for i in range(topo.num_nodes)}
    colors = None
    if profile is not None:
        reach = [1.0] * topo.num_nodes
        for i in range(1, topo.num_nodes):
            q = profile.marginals(int(topo.depth[topo.parents[i]]))
            r = topo.ranks[i]
            reach[i] = reach[topo.parents[i]] * (q[r] if r < len(q) else 0.0)
        colors = reach
    n_leaves = sum(1 for k in kids if not k)
    fig, ax = plt.subplots(figsize=(min(40.0, max(5.0, 0.3 * n_leaves + 2.0)), 1.5 + 0.9 * topo.max_depth))
    nx.draw_networkx_edges(g, pos, ax=ax, arrows=False, edge_color="#888888")
    nodes = nx.draw_networkx_nodes(
        g, pos, ax=ax, node_size=120, node_color=colors if colors is not None else "#4c72b0",
        cmap="viridis", vmin=0.0, vmax=1.0,
    )
    nx.draw_networkx_labels(g, pos, labels={i: str(topo.ranks[i]) if i else "" for i in g}, font_size=6, font_color="white", ax=ax)
    if colors is not None:
        fig.colorbar(nodes, ax=ax, label="P(node accepted)")
    head = title or topo.describe()
    if profile is not None:
        head += f"\nexpected tau {expected_tau(topo, profile):.3f}"
    ax.set_title(head, fontsize=9)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path_png, dpi=150)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m treespec.optimize",
        description="Optimal static draft tree for a measured acceptance profile (Sequoia-style DP).",
    )
    ap.add_argument("--profile", required=True, help="acceptance profile JSON ({'probs': [[...], ...]})")
    ap.add_argument("--budget", type=int, required=True, help="max draft nodes (root excluded)")
    ap.add_argument("--max-depth", type=int, required=True, help="max tree depth")
    ap.add_argument("--out", help="preset file to write (.yaml, or .json)")
    ap.add_argument("--name", help="preset name (default: the output file's stem)")
    ap.add_argument("--png", help="also draw the tree to this PNG")
    args = ap.parse_args(argv)
    try:
        profile = AcceptanceProfile.load(args.profile)
        topo = optimize_tree(profile, args.budget, args.max_depth)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    e = expected_accepted_length(topo, profile)
    print(f"{topo.describe()}; level widths {[topo.level_width(d) for d in range(topo.max_depth)]}")
    print(f"expected accepted length {e:.4f}, expected tau {1 + e:.4f}")
    print(f"parents {list(topo.parents)}")
    if args.out:
        write_preset(topo, args.out, profile, name=args.name, budget=args.budget)
        print(f"wrote {args.out}")
    if args.png:
        draw_tree(topo, args.png, profile)
        print(f"drew {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
