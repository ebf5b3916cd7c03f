"""treespec-demo on the tiny pair: it says what ran, and prints a speedup only when a tree ran,
from interleaved runs with their spread."""

import re

import pytest

from treespec.bench import demo
from treespec.tree.auto import AutoTreeConfig, CostTable

ARGS = ["--tiny", "--max-new-tokens", "6", "--runs", "2"]
SPEEDUP = re.compile(r"speedup \d+\.\d\dx \(min \d+\.\d\d, max \d+\.\d\d over 2 runs\)")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path / "cache"))


def _forced_auto(draft_cost: float):
    """tree='auto' with given costs: a draft forward of `draft_cost` seconds against a target
    forward of 1 s for any width (expensive drafts: the target alone wins; cheap ones: a tree)."""
    costs = CostTable({1: 1.0, 256: 1.0}, {1: draft_cost, 256: draft_cost}, 0.0, "test")
    return lambda text, domain: AutoTreeConfig(costs=costs)


def test_target_alone_prints_no_speedup_and_says_what_would_pay(monkeypatch, capsys):
    monkeypatch.setattr(demo, "parse_tree", _forced_auto(draft_cost=10.0))
    assert demo.main(ARGS) == 0
    out = capsys.readouterr().out
    assert "chose the target alone" in out
    assert "why: no draft tree is predicted to beat the target alone" in out
    assert "what would pay" in out and "GPU" in out and "draft head" in out
    assert "speedup" not in out
    assert "tree speculation" not in out and "accepted drafts per step" not in out


def test_chosen_tree_prints_tree_tau_and_a_speedup_with_spread(monkeypatch, capsys):
    monkeypatch.setattr(demo, "parse_tree", _forced_auto(draft_cost=1e-4))
    assert demo.main(ARGS) == 0
    out = capsys.readouterr().out
    assert "--- tree speculation with " in out
    assert re.search(r"^tree: .+; tau \d+\.\d\d$", out, re.M)
    assert SPEEDUP.search(out), out
    assert out.count("run 1/2: ") == 2 and out.count("run 2/2: ") == 2  # both methods, both runs
    assert "identical output in every run: True" in out
    assert "why: " in out and "what would pay" not in out


def test_forced_widths_run_that_tree(capsys):
    assert demo.main(ARGS + ["--tree", "2,1"]) == 0
    out = capsys.readouterr().out
    assert "tree speculation with --tree 2,1" in out
    assert re.search(r"^tree: 4 draft nodes, depth 2", out, re.M)
    assert SPEEDUP.search(out)


def test_no_baseline_prints_no_speedup(capsys):
    assert demo.main(ARGS + ["--tree", "2,1", "--no-baseline", "--no-warmup"]) == 0
    out = capsys.readouterr().out
    assert "tree speculation" in out and "speedup" not in out


def test_without_warmup_the_first_run_streams_and_then_says_what_ran(monkeypatch, capsys):
    monkeypatch.setattr(demo, "parse_tree", _forced_auto(draft_cost=10.0))
    assert demo.main(ARGS + ["--no-warmup"]) == 0
    out = capsys.readouterr().out
    assert out.index("--- streaming") < out.index("chose the target alone") and "speedup" not in out
