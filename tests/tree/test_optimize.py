"""Tests of the static tree optimizer (treespec/tree/profile.py, sequoia.py, presets.py and the
command line in treespec/bench/tree_tools.py).

The brute force enumerates every rooted ordered tree whose children are rank prefixes, with at
most `budget` draft nodes and depth <= max_depth, and scores it with its own recursion (not
with the module's `expected_accepted_length`), so the DP, the evaluator and the estimator are
each checked against something independent.
"""

from __future__ import annotations

import json
import math
import time
from functools import lru_cache
from pathlib import Path

import networkx as nx
import numpy as np
import omegaconf
import pytest

from treespec.bench.tree_tools import main
from treespec.tree.presets import load_preset, write_preset
from treespec.tree.profile import (
    AcceptanceProfile,
    count_acceptances,
    expected_accepted_length,
    expected_tau,
    profile_from_stats,
)
from treespec.tree.sequoia import _build, _dp, optimal_value_curve, optimize_tree
from treespec.stats import GenerationStats
from treespec.tree.topology import TreeTopology

# --------------------------------------------------------------------------- brute force
# A forest is a tuple of trees (the children of one node, by rank); a tree is the forest of
# its own children. The empty tuple is a leaf's (empty) forest.


def _size(forest) -> int:
    return sum(1 + _size(t) for t in forest)


@lru_cache(maxsize=None)
def _forests(n: int, levels: int) -> tuple:
    """Every ordered forest with at most n nodes and at most `levels` levels."""
    if n == 0 or levels == 0:
        return ((),)
    out = [()]
    for first in _forests(n - 1, levels - 1):  # the first tree: a node and its children forest
        for rest in _forests(n - 1 - _size(first), levels):
            out.append((first,) + rest)
    return tuple(out)


def _marg(row):
    out, left = [], 1.0
    for p in row:
        out.append(left * p)
        left *= 1 - p
    return out


def _row(rows, d):
    return rows[min(d, len(rows) - 1)]


def _value(forest, rows, d=0) -> float:
    """Expected accepted count below an accepted depth-d node whose children are `forest`."""
    q = _marg(_row(rows, d))
    return sum((q[r] if r < len(q) else 0.0) * (1.0 + _value(t, rows, d + 1)) for r, t in enumerate(forest))


def _to_topology(forest) -> TreeTopology:
    g = nx.DiGraph()
    g.add_node("root")
    stack = [("root", forest)]
    while stack:
        name, f = stack.pop()
        for r, t in enumerate(f):
            kid = f"{name}.{r}"
            g.add_edge(name, kid, rank=r)
            stack.append((kid, t))
    return TreeTopology.from_networkx(g, root="root")


def brute_force(rows, budget, max_depth):
    best = max(_forests(budget, max_depth), key=lambda f: _value(f, rows))
    return _value(best, rows), best


def test_enumeration_counts():
    # ordered forests with <= n nodes, unbounded depth: sum of Catalan numbers C_0..C_n
    assert [len(_forests(n, n)) for n in range(7)] == [1, 2, 4, 9, 23, 65, 197]
    assert len(_forests(5, 1)) == 6  # stars of 0..5 children


PROFILES = {
    "decreasing": ((0.6, 0.4, 0.3, 0.2),),
    "flat-half": ((0.5, 0.5, 0.5),),
    "chain-wins": ((0.95, 0.1),),
    "wide-wins": ((0.2,) * 7,),
    "zero-rank0": ((0.0, 0.9),),  # the useless rank-0 child must be drafted to reach rank 1
    "certain": ((1.0, 0.5),),  # rank 1 can never be the accepted child
    "depth-dependent": ((0.9, 0.5), (0.3, 0.3, 0.3), (0.8,)),
    "deep-gets-better": ((0.3, 0.3, 0.3), (0.6, 0.2), (0.95, 0.5)),
}


def _random_profile(seed):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(1, 5))
        rows.append(tuple(float(x) for x in np.sort(rng.uniform(0, 1, k))[::-1]))
    return tuple(rows)


CASES = list(PROFILES.items()) + [(f"random-{s}", _random_profile(s)) for s in range(6)]


@pytest.mark.parametrize("name,rows", CASES, ids=[c[0] for c in CASES])
def test_dp_matches_brute_force(name, rows):
    profile = AcceptanceProfile(rows)
    for max_depth in (1, 2, 3, 6):
        curve = optimal_value_curve(profile, 6, max_depth)
        for budget in range(1, 7):
            bf_value, bf_tree = brute_force(rows, budget, max_depth)
            assert curve[budget] == pytest.approx(bf_value, abs=1e-12), (name, budget, max_depth)
            if bf_value == 0.0:  # nothing can be accepted: no tree to return
                with pytest.raises(ValueError, match="no draft node"):
                    optimize_tree(profile, budget, max_depth)
                continue
            topo = optimize_tree(profile, budget, max_depth)
            assert topo.num_drafts <= budget and topo.max_depth <= max_depth
            # the returned tree attains the optimum (scored by the module and by the brute force)
            assert expected_accepted_length(topo, profile) == pytest.approx(bf_value, abs=1e-12)
            assert expected_accepted_length(_to_topology(bf_tree), profile) == pytest.approx(bf_value, abs=1e-12)


def test_known_optima():
    chain = optimize_tree(AcceptanceProfile(PROFILES["chain-wins"]), 6, 6)
    assert chain == TreeTopology.chain(6)
    star = optimize_tree(AcceptanceProfile(PROFILES["wide-wins"]), 6, 6)
    assert star == TreeTopology.from_widths([6])
    # rank 0 is never accepted but must be drafted to reach rank 1 (children are rank prefixes)
    t = optimize_tree(AcceptanceProfile(PROFILES["zero-rank0"]), 2, 1)
    assert t == TreeTopology.from_widths([2])
    # nodes with no value are not spent: rank 1 behind a certain rank 0 is never drafted
    t = optimize_tree(AcceptanceProfile(PROFILES["certain"]), 3, 1)
    assert t.num_drafts == 1


def test_value_curve_is_monotone_and_optimum_is_returned():
    profile = AcceptanceProfile(((0.7, 0.4, 0.3, 0.2, 0.1), (0.5, 0.3)))
    curve = optimal_value_curve(profile, 40, 8)
    assert curve[0] == 0.0 and all(b >= a - 1e-12 for a, b in zip(curve, curve[1:]))
    topo = optimize_tree(profile, 40, 8)
    assert expected_accepted_length(topo, profile) == pytest.approx(curve[40], abs=1e-12)
    assert expected_tau(topo, profile) == pytest.approx(1 + curve[40])


# --------------------------------------------------------------------------- wrong DPs must be caught
def _wrong_dp_value(weights_of, rows, budget, max_depth):
    """Run the module's DP machinery with mis-specified child weights; return the true value of
    the tree it picks."""
    w = [np.asarray(weights_of(d), dtype=float) for d in range(max_depth)]
    _, choices = _dp(w, budget, max_depth)
    return expected_accepted_length(_build(choices, budget, max_depth), AcceptanceProfile(rows))


def test_dp_without_sibling_rejections_fails_brute_force():
    """A DP that forgets the (1 - p) of the earlier siblings (uses probs[d][r] instead of the
    marginal q[d][r]) overvalues wide trees; the brute-force comparison must expose it."""
    mismatches = 0
    for rows in (PROFILES["decreasing"], PROFILES["flat-half"], PROFILES["depth-dependent"]):
        for budget in (3, 5, 6):
            bf_value, _ = brute_force(rows, budget, 6)
            wrong = _wrong_dp_value(lambda d: _row(rows, d), rows, budget, 6)
            assert wrong <= bf_value + 1e-12
            mismatches += wrong < bf_value - 1e-6
    assert mismatches >= 5


def test_dp_ignoring_depth_dependence_fails_brute_force():
    rows = PROFILES["deep-gets-better"]
    bf_value, _ = brute_force(rows, 6, 6)
    wrong = _wrong_dp_value(lambda d: _marg(rows[0]), rows, 6, 6)
    assert wrong < bf_value - 1e-3


# --------------------------------------------------------------------------- the evaluator
def _simulate(topo, profile, n, seed):
    """Greedy acceptance, sampled: at each accepted node the target's token is the draft's
    rank-r candidate with probability q[d][r] (or none of them); it is accepted if the tree
    drafted that rank there."""
    rng = np.random.default_rng(seed)
    children = topo.children.tolist()
    depth = topo.depth.tolist()
    cums = {d: np.cumsum(profile.marginals(d)) for d in range(topo.max_depth + 1)}
    out = np.zeros(n)
    for k in range(n):
        node, acc = 0, 0
        while True:
            cum = cums[depth[node]]
            r = int(np.searchsorted(cum, rng.random(), side="right"))
            if r >= len(cum) or r >= len(children[node]) or children[node][r] < 0:
                break
            node, acc = children[node][r], acc + 1
        out[k] = acc
    return out


def test_expected_length_matches_monte_carlo():
    topo = TreeTopology.from_parents([-1, 0, 0, 0, 1, 1, 2, 4, 4, 5])
    profile = AcceptanceProfile(((0.6, 0.5, 0.3), (0.7, 0.4), (0.5, 0.2)))
    sims = _simulate(topo, profile, 20000, seed=0)
    se = sims.std() / math.sqrt(len(sims))
    e = expected_accepted_length(topo, profile)
    assert abs(sims.mean() - e) < 5 * se, (sims.mean(), e, se)
    # and an exact hand computation: q0 = (.6, .2, .06), q1 = (.7, .12), q2 = (.5, .1)
    by_hand = 0.6 + 0.2 + 0.06 + 0.6 * (0.7 + 0.12) + 0.2 * 0.7 + 0.6 * 0.7 * (0.5 + 0.1) + 0.6 * 0.12 * 0.5
    assert e == pytest.approx(by_hand, abs=1e-12)


def test_expected_length_rank_past_row_is_zero():
    topo = TreeTopology.from_widths([3])
    assert expected_accepted_length(topo, AcceptanceProfile.uniform([0.5, 0.5])) == pytest.approx(0.75)


# --------------------------------------------------------------------------- estimation
def _simulated_stats(topo, rows, steps, seed, per=500):
    rng = np.random.default_rng(seed)
    profile = AcceptanceProfile(rows)
    children = topo.children.tolist()
    depth = topo.depth.tolist()
    out = []
    for start in range(0, steps, per):
        st = GenerationStats()
        for _ in range(min(per, steps - start)):
            node, ranks = 0, []
            while True:
                kids = [c for c in children[node] if c >= 0]
                row = profile.row(depth[node])
                r_acc = None
                for r in range(len(kids)):  # tried best first; accept with probs[d][r]
                    if r < len(row) and rng.random() < row[r]:
                        r_acc = r
                        break
                if r_acc is None:
                    break
                ranks.append(r_acc)
                node = kids[r_acc]
            st.accepted_ranks.append(ranks)
            st.accepted_lengths.append(len(ranks))
        out.append(st)
    return out


def test_counts_by_hand():
    topo = TreeTopology.from_widths([2, 1])  # root -> a, b; a -> c; b -> d
    st = GenerationStats(accepted_lengths=[0, 1, 2, 1], accepted_ranks=[[], [1], [0, 0], [0]])
    tries, accepts = count_acceptances([st], topo)
    # step 1: root tried 0,1, none. step 2: root tried 0,1, rank 1 accepted; b tried 0, none.
    # step 3: root rank 0 accepted (tried 0); a's rank 0 accepted (tried 0); c is a leaf.
    # step 4: root rank 0 accepted; a tried 0, none.
    assert tries.tolist() == [[4, 2], [3, 0]]
    assert accepts.tolist() == [[2, 1], [1, 0]]
    prof = profile_from_stats([st], topo, prior=0)
    assert prof.probs == ((0.5, 0.5), (1 / 3, 0.0))
    smoothed = profile_from_stats([st.as_dict()], topo, prior=1.0)
    assert smoothed.probs[0] == pytest.approx((2.5 / 5, 1.5 / 3))
    assert smoothed.probs[1][1] == 0.0  # never tried: 0, not the prior's 1/2
    pooled = profile_from_stats([st], topo, prior=0, depth_dependent=False)
    assert pooled.probs == ((3 / 7, 0.5),)


def test_profile_from_stats_recovers_profile():
    topo = TreeTopology.from_widths([4, 3, 2])
    rows = ((0.6, 0.3, 0.2, 0.1), (0.5, 0.25, 0.2), (0.4, 0.2))
    stats = _simulated_stats(topo, rows, 20000, seed=1)
    tries, _ = count_acceptances(stats, topo)
    prof = profile_from_stats(stats, topo)
    assert prof.depths == 3
    for d, row in enumerate(rows):
        for r, p in enumerate(row):
            se = math.sqrt(p * (1 - p) / tries[d, r])
            assert abs(prof.probs[d][r] - p) < 5 * se + 1e-3, (d, r, prof.probs[d][r], p)
    # ranks the collection tree never drafts at that depth are 0
    assert prof.probs[1][3] == 0.0 and prof.probs[2][2:] == (0.0, 0.0)
    # end to end: the tree optimized on the estimate is near-optimal under the true profile
    true = AcceptanceProfile(rows)
    est_tree = optimize_tree(prof, 12, 3)
    assert expected_accepted_length(est_tree, true) >= optimal_value_curve(true, 12, 3)[12] - 0.02


def test_profile_from_stats_errors():
    topo = TreeTopology.from_widths([2])
    with pytest.raises(ValueError, match="not a child in the collection tree"):
        count_acceptances([GenerationStats(accepted_lengths=[1], accepted_ranks=[[2]])], topo)
    with pytest.raises(ValueError, match="not a child in the collection tree"):
        count_acceptances([GenerationStats(accepted_lengths=[2], accepted_ranks=[[0, 0]])], topo)
    with pytest.raises(ValueError, match="did not record"):
        count_acceptances([GenerationStats(accepted_lengths=[1, 0])], topo)
    with pytest.raises(ValueError, match="accepted length"):
        count_acceptances([GenerationStats(accepted_lengths=[2], accepted_ranks=[[0]])], topo)
    with pytest.raises(ValueError, match="prior"):
        profile_from_stats([], topo, prior=-1)


# --------------------------------------------------------------------------- the profile type
def test_profile_validation_and_json(tmp_path):
    p = AcceptanceProfile([[0.5, 0.25], [1, 0]])
    assert p.probs == ((0.5, 0.25), (1.0, 0.0))
    assert AcceptanceProfile.from_json(p.to_json()) == p
    p.save(tmp_path / "p.json")
    assert AcceptanceProfile.load(tmp_path / "p.json") == p
    assert json.loads((tmp_path / "p.json").read_text())["probs"] == [[0.5, 0.25], [1.0, 0.0]]
    assert p.row(7) == (1.0, 0.0)  # deeper than the rows: the last row
    assert p.marginals(0) == (0.5, 0.125)
    assert AcceptanceProfile.from_marginals([[0.5, 0.125]]).probs == ((0.5, 0.25),)
    for bad, msg in [
        ([], "at least one row"),
        ([[]], "empty"),
        ([[1.5]], "not a probability"),
        ([[float("nan")]], "not a probability"),
        ([["x"]], "must be a number"),
        (0.5, "sequence of rows"),
    ]:
        with pytest.raises(ValueError, match=msg):
            AcceptanceProfile(bad)
    with pytest.raises(ValueError, match="probs"):
        AcceptanceProfile.from_dict({"rows": []})
    with pytest.raises(ValueError, match="sum to"):
        AcceptanceProfile.from_marginals([[0.7, 0.6]])


def test_optimize_argument_errors():
    p = AcceptanceProfile.uniform([0.5])
    for budget, depth in [(0, 3), (-1, 3), (5, 0), (2.5, 3), (True, 3), (5000, 3)]:
        with pytest.raises(ValueError):
            optimize_tree(p, budget, depth)
    with pytest.raises(ValueError, match="no draft node"):
        optimize_tree(AcceptanceProfile.uniform([0.0, 0.0]), 4, 2)


def test_large_budget_is_fast():
    rows = tuple(tuple(np.linspace(0.8, 0.02, 128) * 0.97**d) for d in range(12))
    profile = AcceptanceProfile(rows)
    t0 = time.perf_counter()
    topo = optimize_tree(profile, 128, 12)
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, elapsed
    assert topo.num_drafts <= 128 and topo.max_depth <= 12
    # any single-node change that keeps the budget cannot beat it: compare to a few presets
    for widths in ([4, 2, 2, 1], [8, 2, 1], [2, 2, 2, 2, 2, 1]):
        other = TreeTopology.from_widths(widths)
        if other.num_drafts <= 128:
            assert expected_accepted_length(topo, profile) >= expected_accepted_length(other, profile)


# --------------------------------------------------------------------------- presets and CLI
def test_preset_round_trip(tmp_path):
    profile = AcceptanceProfile(((0.7, 0.4, 0.3), (0.5, 0.3)))
    topo = optimize_tree(profile, 10, 4)
    for name in ("t.yaml", "t.json"):
        data = write_preset(topo, tmp_path / name, profile, budget=10)
        assert load_preset(tmp_path / name) == topo
        assert data["parents"] == list(topo.parents) and data["num_drafts"] == topo.num_drafts
        assert data["expected_tau"] == pytest.approx(expected_tau(topo, profile), abs=1e-6)
        assert sum(data["level_sizes"]) == topo.num_drafts
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.load(tmp_path / "t.yaml")
    assert list(cfg.parents) == list(topo.parents) and cfg.name == "t"
    assert load_preset(omegaconf.OmegaConf.to_container(cfg)) == topo
    with pytest.raises(ValueError, match="parents"):
        load_preset({"widths": [2, 1]})
    with pytest.raises(ValueError, match="ranks"):
        load_preset({"parents": [-1, 0, 0], "ranks": [0, 1, 0]})


def test_cli(tmp_path, capsys):
    AcceptanceProfile.uniform([0.7, 0.4, 0.3, 0.2]).save(tmp_path / "profile.json")
    out = tmp_path / "configs" / "tree" / "demo.yaml"
    rc = main(["--profile", str(tmp_path / "profile.json"), "--budget", "8", "--max-depth", "4", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "expected tau" in text and out.exists()
    topo = load_preset(out)
    assert topo == optimize_tree(AcceptanceProfile.load(tmp_path / "profile.json"), 8, 4)
    assert main(["--profile", str(tmp_path / "missing.json"), "--budget", "8", "--max-depth", "4"]) == 2
    assert main(["--profile", str(tmp_path / "profile.json"), "--budget", "0", "--max-depth", "4"]) == 2


def test_draw_tree(tmp_path):
    pytest.importorskip("matplotlib")
    from treespec.bench.tree_tools import draw_tree

    profile = AcceptanceProfile.uniform([0.7, 0.4, 0.3])
    draw_tree(optimize_tree(profile, 12, 4), tmp_path / "t.png", profile)
    assert (tmp_path / "t.png").stat().st_size > 1000


SHIPPED_PRESETS = sorted((Path(__file__).resolve().parents[2] / "treespec" / "configs" / "presets").glob("*.yaml"))


def _flow_yaml(path: Path) -> dict:
    """The shipped presets' own format (one `key: <JSON value>` per line), read without any YAML
    library, as a reference independent of load_preset's OmegaConf."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split(": ", 1)
            out[key] = json.loads(value)
    return out


@pytest.mark.parametrize("path", SHIPPED_PRESETS, ids=lambda p: p.name)
def test_shipped_presets_load_as_written(path, tmp_path):
    ref = _flow_yaml(path)
    topo = load_preset(path)
    assert list(topo.parents) == ref["parents"] and list(topo.ranks) == ref["ranks"]
    profile = AcceptanceProfile(ref["profile"])
    # the shipped profile is rounded to 6 digits, so its expectation is recomputed to ~1e-5
    assert expected_tau(topo, profile) == pytest.approx(ref["expected_tau"], abs=1e-4)
    # written again by the OmegaConf writer, every field reads back as in the shipped file
    again = tmp_path / path.name
    write_preset(topo, again, profile, name=ref["name"], budget=ref["budget"])
    reread = omegaconf.OmegaConf.to_container(omegaconf.OmegaConf.load(again))
    assert reread.keys() == ref.keys()
    for key, value in ref.items():
        floats = key.startswith("expected_")  # recomputed from the 6-digit profile
        assert reread[key] == (pytest.approx(value, abs=1e-4) if floats else value), key
    assert load_preset(again) == topo


def test_shipped_presets_exist():
    assert len(SHIPPED_PRESETS) == 6
