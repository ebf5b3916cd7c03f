"""The benchmark modules of treespec.bench (ex benchmarks/*.py scripts) and their one timing helper."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import pytest

from treespec.bench.timing import Wall
from treespec.tree.presets import load_preset

REPO = Path(__file__).resolve().parents[1]
MODULES = ["auto_compare", "forward_costs", "linear_vs_hf_assisted", "tree_policies", "tree_sweep", "tree_tools"]


def test_wall_block_and_start_stop_measure_the_span():
    with Wall() as w:
        time.sleep(0.02)
    assert w.seconds >= 0.02 and w.cpu_seconds >= 0.0
    span = Wall().start()
    time.sleep(0.02)
    assert span.stop() >= 0.02 and span.seconds >= 0.02


@pytest.mark.parametrize("name", MODULES)
def test_bench_module_is_a_python_m_entry(name, monkeypatch, capsys):
    module = importlib.import_module(f"treespec.bench.{name}")
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"]) if name == "tree_tools" else module.main()
    assert exit_.value.code == 0
    assert f"python -m treespec.bench.{name}" in capsys.readouterr().out


def test_no_scripts_left_in_benchmarks():
    # benchmarks/ holds results and data; its gpu_*.py scripts are issue 15's to move
    left = sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("gpu_"))
    assert left == []


def test_tree_policies_presets_rebuild_the_shipped_trees(tmp_path, monkeypatch):
    from treespec.bench import tree_policies

    results = REPO / "benchmarks" / "results" / "tree_policies" / "tree_policies.json"
    monkeypatch.setattr(sys, "argv", ["tree_policies", "presets", str(results), "--out-dir", str(tmp_path)])
    tree_policies.main()
    written = sorted(p.name for p in tmp_path.glob("*.yaml"))
    assert written == sorted(p.name for p in (REPO / "treespec" / "configs" / "presets").glob("*.yaml"))
    for name in written:
        assert load_preset(tmp_path / name) == load_preset(REPO / "treespec" / "configs" / "presets" / name), name


def test_tree_sweep_replay_counts_greedy_steps():
    from treespec.bench.tree_sweep import replay

    # ranks of the 6 generated tokens under the draft; chain of 2: steps accept 2, 0, 1 (+1 bonus each)
    assert replay([0, 0, 0, 1, 0, 0], [1, 1]) == (3, [2, 0, 1])
    # a width-2 first level also accepts the rank-1 token
    assert replay([0, 0, 0, 1, 0, 0], [2, 1]) == (2, [2, 2])


def test_tree_policies_run_on_tiny_models(tmp_path, monkeypatch):
    """The device run end to end on the CPU: collection, profile, optimized tree, every policy cell."""
    import json

    from treespec.bench import tree_policies
    from treespec.testing import tiny_model

    # draft = a copy of the target, so drafts are accepted and the profile is not all zeros
    monkeypatch.setattr(tree_policies, "_load", lambda spec, gguf_dir, device: tiny_model(0))
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    prompts = {"eos": []} | {d: [{"id": f"{d}/{i}", "ids": [2 + i, 3, 4]} for i in range(2)] for d in tree_policies.DOMAINS}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    argv = ["tree_policies", "run", "--device", "cpu", "--prompts", str(tmp_path / "prompts.json"), "--per-domain", "2",
            "--collect", "1", "--new-tokens", "4", "--budgets", "16", "--name", "tp.json"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    tree_policies.main()
    res = json.loads((tmp_path / "out" / "tp.json").read_text())
    assert res["incomplete"] == [] and set(res["domains"]) == set(tree_policies.DOMAINS)
    for d in res["domains"].values():
        row = d["budgets"]["16"]
        assert {"dynamic", "adaptive", "optimized"} <= set(row) and row["optimized"]["num_drafts"] <= 16
        assert all(cell["new_tokens"] == 4 and cell["tau"] >= 1.0 for cell in row.values())
