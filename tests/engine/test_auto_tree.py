"""tree="auto": the chooser (treespec.tree.auto) on synthetic cost and acceptance tables, the
calibration cache (treespec.engine.calibrate), and exactness end to end with a tiny pair."""

from __future__ import annotations

import io
import itertools
import json

import pytest
import torch

import treespec
from treespec.backends.sdpa import SdpaBackend
from treespec.engine import calibrate
from treespec.testing import tiny_model, tiny_pair
from treespec.tree.auto import AutoTreeConfig, CostTable, choose_tree, interp, step_seconds
from treespec.tree.profile import AcceptanceProfile, expected_tau
from treespec.tree.topology import TreeTopology

# a good draft: its best guess is right 90% of the time, its second guess half the time after that
GOOD = AcceptanceProfile.uniform([0.9, 0.5, 0.5, 0.5])
SIZES = range(1, 66)


def steep() -> CostTable:
    """Every extra verified token costs half a one-token step (a CPU); drafts almost free."""
    return CostTable({n: 1.0 + 0.5 * (n - 1) for n in SIZES}, {n: 1e-3 for n in SIZES})


def flat() -> CostTable:
    """Verifying 65 tokens costs what one does (a GPU at small batch); drafts cheap."""
    return CostTable({n: 1.0 for n in SIZES}, {n: 1e-3 for n in SIZES})


def test_interp_is_exact_at_measured_sizes_and_linear_between():
    table = {1: 1.0, 4: 0.5, 8: 2.0}  # not monotone, as CPU costs are
    assert [interp(table, n) for n in (1, 4, 8)] == [1.0, 0.5, 2.0]
    assert interp(table, 6) == pytest.approx(1.25)
    assert interp(table, 10) == pytest.approx(2.75)  # the last slope continues


def test_steep_verification_picks_the_best_chain():
    # tau(chain-k) = sum_{i<=k} 0.9^i, step = 1 + k/2 (+ k drafts at 1 ms): chain-3 wins, and a
    # sibling (0.1 * 0.5 = 5% more tau for 0.5 more cost) never pays
    choice = choose_tree(GOOD, steep(), budget=16, max_depth=8)
    assert choice.best.kind == "chain" and choice.best.name == "chain-3"
    rates = {k: (1 - 0.9 ** (k + 1)) / 0.1 / step_seconds([1] * k, steep(), 0.9**k) for k in range(1, 9)}
    assert max(rates, key=rates.get) == 3
    assert choice.best.tokens_per_second == pytest.approx(rates[3])
    assert {c.kind for c in choice.alternatives} == {"tree", "target"}
    assert "a chain was chosen" in choice.reason and "verifies 4 tokens for 2.5x the cost of one" in choice.reason


def test_flat_verification_picks_a_wide_tree_that_uses_the_budget():
    choice = choose_tree(GOOD, flat(), budget=16, max_depth=8)
    topo = choice.topology
    assert choice.best.kind == "tree" and topo.num_drafts == 16
    assert topo.level_width(0) >= 2  # wide: the root has several children
    assert choice.best.tau == pytest.approx(expected_tau(topo, GOOD))
    assert choice.best.tau > max(c.tau for c in choice.alternatives)  # the chain it beat accepts less
    assert "a tree was chosen" in choice.reason


def test_flat_choice_is_the_best_of_every_small_tree():
    """Brute force over every ordered tree of up to 6 drafts and depth 4: nothing beats the pick."""
    costs = flat()
    choice = choose_tree(GOOD, costs, budget=6, max_depth=4)
    best = choice.best.tokens_per_second
    for n in range(1, 7):
        for parents in itertools.product(*(range(i) for i in range(1, n + 1))):
            parents = (-1, *parents)
            if list(parents[1:]) != sorted(parents[1:]):
                continue  # breadth-first order only
            topo = TreeTopology.from_parents(parents)
            if topo.max_depth > 4:
                continue
            levels = [topo.level_starts[d + 1] - topo.level_starts[d] for d in range(1, topo.max_depth + 1)]
            full = sum(r for r, d in zip(treespec.tree.profile.acceptance_reach(topo, GOOD), topo.depth.tolist())
                       if d == topo.max_depth)  # fmt: skip
            assert expected_tau(topo, GOOD) / step_seconds(levels, costs, full) <= best + 1e-12


@pytest.mark.parametrize("profile", [AcceptanceProfile.uniform([0.02, 0.01]), AcceptanceProfile.uniform([0.0])])
def test_useless_drafts_leave_the_target_alone(profile):
    choice = choose_tree(profile, steep(), budget=16, max_depth=8)
    assert choice.best.kind == "target" and choice.topology is None and choice.speedup == 1.0
    assert choice.reason.endswith("so the target runs alone.")


def test_chains_only_for_linear():
    choice = AutoTreeConfig(costs=flat(), profile=GOOD).for_method("linear").choose(flat())
    assert choice.best.kind == "chain" and choice.best.name == "chain-8"  # flat: the deepest chain allowed


def test_cost_table_round_trips_and_refuses_bad_values():
    table = steep()
    assert CostTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table
    with pytest.raises(ValueError, match="CostTable.target"):
        CostTable({1: 0.0}, {1: 1.0})
    with pytest.raises(ValueError, match="budget"):
        AutoTreeConfig(budget=0)


# ------------------------------------------------------------------------- calibration cache
@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and a shared machine's load cannot stall them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_calibration(monkeypatch, tmp_path, one_thread):
    """The cache in tmp_path, few sizes (tiny models: milliseconds)."""
    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path))
    monkeypatch.setattr(calibrate, "CPU_TARGET_SIZES", (1, 2, 4))
    monkeypatch.setattr(calibrate, "CPU_DRAFT_SIZES", (1, 2))
    return tmp_path / "calibration"


def test_calibration_is_measured_once_then_read_from_disk(small_calibration, monkeypatch):
    target, draft = tiny_pair(0)
    log = io.StringIO()
    costs = calibrate.calibrated_costs(target, draft, SdpaBackend(), progress=log)
    assert "measuring forward costs" in log.getvalue() and log.getvalue().endswith("done\n")
    assert set(costs.target) == {1, 2, 4} and set(costs.draft) == {1, 2}
    (path,) = small_calibration.iterdir()
    assert json.loads(path.read_text())["key"]["backend"] == "SdpaBackend:sdpa"

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(calibrate, "measure_costs", no_measuring)
    assert calibrate.calibrated_costs(target, draft, SdpaBackend(), progress=None) == costs
    # another draft (a different config), or another thread count: another key, measured again
    with pytest.raises(AssertionError, match="measured again"):
        calibrate.calibrated_costs(target, tiny_model(5, hidden_size=24, num_layers=1), SdpaBackend(), progress=None)
    torch.set_num_threads(2)
    with pytest.raises(AssertionError, match="measured again"):
        calibrate.calibrated_costs(target, draft, SdpaBackend(), progress=None)


def test_a_table_measured_on_a_busy_cpu_is_measured_again_when_it_is_quiet(small_calibration, monkeypatch):
    target, draft = tiny_pair(0)
    calibrate.calibrated_costs(target, draft, SdpaBackend(), progress=None)
    (path,) = small_calibration.iterdir()
    data = json.loads(path.read_text())
    calls = []
    monkeypatch.setattr(calibrate, "measure_costs", lambda *a, **k: calls.append(1) or CostTable({1: 1.0}, {1: 1.0}))
    monkeypatch.setattr(calibrate.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    path.write_text(json.dumps(dict(data, loadavg=0.5, provisional=False)))  # measured on a quiet machine: kept
    calibrate.calibrated_costs(target, draft, SdpaBackend(), progress=None)
    assert calls == []
    path.write_text(json.dumps(dict(data, loadavg=100.0, provisional=True)))  # measured on a busy one: measured again
    assert calibrate.calibrated_costs(target, draft, SdpaBackend(), progress=None).target == {1: 1.0}
    assert calls == [1]


def test_the_key_names_device_pair_dtype_and_backend():
    target, draft = tiny_pair(0)
    key = calibrate.calibration_key(target, draft, SdpaBackend())
    assert key["device"].startswith("cpu: ") and key["device"].endswith(f"{torch.get_num_threads()} threads")
    assert key["target"]["dtype"] == "torch.float32" and key["target"]["config"]["hidden_size"] == 32
    assert key["draft"]["config"]["hidden_size"] == 16
    same_shape_other_weights = calibrate.calibration_key(*tiny_pair(7), SdpaBackend())
    assert same_shape_other_weights == key  # costs follow the shapes, not the weights
    half = calibrate.calibration_key(target.to(torch.bfloat16), draft, SdpaBackend())
    assert half != key
    target.to(torch.float32)


# ------------------------------------------------------------------------- end to end
def _reference(target, ids, n):
    return target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, pad_token_id=0)  # fmt: skip


@pytest.mark.parametrize(
    "tree, kind",
    [
        (AutoTreeConfig(profile=GOOD, costs=flat(), budget=12), "tree"),
        (AutoTreeConfig(profile=GOOD, costs=steep()), "chain"),
        (AutoTreeConfig(profile=AcceptanceProfile.uniform([0.0]), costs=steep()), "target"),
    ],
)
def test_auto_is_exact_whatever_it_chooses(tree, kind, one_thread):
    target, draft = tiny_pair(3)
    ids = torch.randint(2, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    result = treespec.generate(target, draft, ids, max_new_tokens=24, tree=tree, eos_token_id=[])
    assert result.stats.tree_choice["chosen"]["kind"] == kind
    assert (result.stats.draft_forwards > 0) == (kind != "target")
    assert torch.equal(result.sequences, _reference(target, ids, 24))
    assert "tree='auto': " in result.stats.summary()


def test_auto_string_calibrates_and_stays_exact(small_calibration):
    target, draft = tiny_pair(4)
    ids = torch.randint(2, 64, (1, 9), generator=torch.Generator().manual_seed(2))
    stream = treespec.stream(target, draft, ids, max_new_tokens=16, tree="auto", eos_token_id=[])
    tokens = [t for step in stream for t in step]
    assert len(list(small_calibration.iterdir())) == 1  # calibrated, and cached
    assert torch.equal(stream.result.sequences, _reference(target, ids, 16))
    assert tokens == stream.result.sequences[0, 9:].tolist()
    assert stream.result.stats.tree_choice["reason"]


def test_auto_compare_runs_on_the_tiny_pair(tmp_path, small_calibration, capsys):
    """The interleaved comparison tool end to end (a smoke run: its numbers mean nothing here)."""
    from treespec.bench import auto_compare

    out = tmp_path / "compare.json"
    argv = ["--model", "tiny-random", "--threads", "1", "--domains", "demo,code", "--prompts", "2",
            "--max-new-tokens", "6", "--variants", "auto,small,linear", "--out", str(out)]  # fmt: skip
    assert auto_compare.main(argv) == 0
    doc = json.loads(out.read_text())
    code = doc["domains"]["code"]
    assert list(code["variants"]) == ["auto", "small", "linear", "autoregressive"] and len(code["prompts"]) == 2
    assert all(v["identical_to_target"] for d in doc["domains"].values() for v in d["variants"].values())
    # the target alone has no speedup over itself, nor does tree=auto when it chose the target alone
    assert code["variants"]["autoregressive"]["speedup"] is None and code["variants"]["autoregressive"]["target_alone"]
    auto = code["variants"]["auto"]
    assert (auto["speedup"] is None) == auto["target_alone"] == (auto["tree_choice"]["chosen"]["kind"] == "target")
    assert auto["tree_choice"]["reason"] in capsys.readouterr().out


def test_learning_from_the_generations_own_stats_moves_the_choice():
    """A profile learnt online: steps that never accept a draft pull the chooser to the target
    alone, steps that accept whole chains push it deeper; positions never tried keep the prior."""
    config = AutoTreeConfig(profile=AcceptanceProfile.uniform([0.6, 0.3]), costs=steep())
    first = config.choose(steep())
    assert first.best.kind == "chain"
    k = first.topology.max_depth
    as_run = {"tree_choice": first.as_dict()}
    rejected = [dict(as_run, accepted_ranks=[[]] * 200, accepted_lengths=[0] * 200)]
    assert config.learn(rejected).choose(steep()).best.kind == "target"
    accepted = [dict(as_run, accepted_ranks=[[0] * k] * 200, accepted_lengths=[k] * 200)]
    learnt = config.learn(accepted)
    assert learnt.profile.row(0)[0] > 0.95 and learnt.profile.row(0)[1] == pytest.approx(0.3)  # rank 1: never tried
    assert learnt.choose(steep()).topology.max_depth > k
    with pytest.raises(ValueError, match="not from a tree='auto' generation"):
        config.learn([{"accepted_ranks": [], "tree_choice": {}}])
