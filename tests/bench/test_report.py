"""The report's numbers are the runs' numbers: aggregate small fake result files and check."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from treespec.bench.metrics import PromptRecord, aggregate
from treespec.bench.report import build_report, main, to_csv


def _cell(method, tree=None, k=None, temperature=0.0, domain="code", dataset="humaneval", nodes=0):
    return {
        "model": "fake", "method": method, "dataset": dataset, "domain": domain, "tree": tree, "linear_k": k,
        "draft_nodes": nodes, "sampling": "greedy" if not temperature else "t07", "temperature": temperature,
        "top_k": 0, "top_p": 1.0, "max_new_tokens": 8, "num_prompts": 2, "offset": 0, "ignore_eos": False,
    }  # fmt: skip


def _write(path: Path, cell: dict, records: list[PromptRecord], date="2026-11-22T10:00:00") -> dict:
    path.mkdir(parents=True, exist_ok=True)
    doc = {
        "schema": "treespec-bench/v1",
        "cell": cell,
        "config": {},
        "environment": {"date": date},
        "prompts": [r.as_dict() for r in records],
        "aggregate": aggregate(records),
    }
    (path / "results.json").write_text(json.dumps(doc))
    return doc


AR = [
    PromptRecord("p0", 10, new_tokens=8, target_forwards=8, time_total=4.0, output_ids=[5] * 8),
    PromptRecord("p1", 12, new_tokens=6, target_forwards=6, time_total=3.0, output_ids=[6] * 6),
]
TREE = [
    # 8 tokens in 3 steps: accepted 3, 2, 0 (+1 bonus each); 6 drafts proposed per step
    PromptRecord("p0", 10, new_tokens=8, target_forwards=3, draft_tokens_proposed=18, accepted_lengths=[3, 2, 0],
                 time_total=2.0, time_draft=0.5, output_ids=[5] * 8),
    PromptRecord("p1", 12, new_tokens=6, target_forwards=2, draft_tokens_proposed=12, accepted_lengths=[3, 1],
                 time_total=1.5, time_draft=0.5, output_ids=[6, 6, 6, 7, 6, 6]),
]  # fmt: skip


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    _write(root / "0", _cell("autoregressive"), AR)
    _write(root / "1", _cell("tree", tree=[2, 1, 1], nodes=6), TREE)
    return root


def test_table_has_the_runs_numbers(sweep, tmp_path):
    table = build_report([sweep], tmp_path / "out", plots=False)
    assert len(table) == 2
    ar, tree = table  # autoregressive sorts first
    assert ar["method"] == "autoregressive" and tree["method"] == "tree"
    assert ar["tau"] == 1.0 and ar["new_tokens"] == 14 and ar["tokens_per_second"] == pytest.approx(14 / 7.0)
    assert ar["speedup"] == pytest.approx(1.0)
    assert tree["new_tokens"] == 14 and tree["target_forwards"] == 5
    assert tree["tau"] == pytest.approx(14 / 5)
    assert tree["acceptance_rate"] == pytest.approx(9 / 30)
    assert tree["tokens_per_second"] == pytest.approx(14 / 3.5)
    assert tree["speedup"] == pytest.approx((14 / 3.5) / (14 / 7.0))
    # per prompt: (8/2)/(8/4) = 2 and (6/1.5)/(6/3) = 2
    assert tree["speedup_median"] == pytest.approx(2.0) and ar["speedup_median"] == pytest.approx(1.0)
    assert tree["draft_time_share"] == pytest.approx(1.0 / 3.5)
    assert tree["tree"] == "[2,1,1]" and tree["draft_nodes"] == 6
    assert ar["tree"] == ""
    assert tree["same_as_target"] == "1/2"  # p1 differs from the target alone
    assert tree["accepted_length_histogram"] == {"0": 1, "1": 1, "2": 1, "3": 2}
    assert tree["run"] == "1"

    md = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert len(md) == 2 + 2
    assert "| 2.80 |" in md[3] and "| 2.00 |" in md[3] and "| 30% |" in md[3] and "| 4.00 |" in md[3]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "table.csv").read_text())))
    assert len(rows) == 2
    assert float(rows[1]["tau"]) == pytest.approx(2.8) and float(rows[1]["speedup"]) == pytest.approx(2.0)
    assert json.loads((tmp_path / "out" / "table.json").read_text())[1]["tau"] == pytest.approx(2.8)


def test_baseline_prefers_same_temperature(sweep, tmp_path):
    fast_ar = [PromptRecord(r.id, r.prompt_tokens, r.new_tokens, r.target_forwards, time_total=r.time_total / 2) for r in AR]
    _write(sweep / "2", _cell("autoregressive", temperature=0.7), fast_ar)
    _write(sweep / "3", _cell("linear", tree=[1, 1, 1], k=3, temperature=0.7, nodes=3), TREE)
    table = {(r["method"], r["temperature"]): r for r in build_report([sweep], tmp_path / "out", plots=False)}
    assert table[("linear", 0.7)]["speedup"] == pytest.approx((14 / 3.5) / (14 / 3.5))
    assert table[("tree", 0.0)]["speedup"] == pytest.approx(2.0)
    assert table[("linear", 0.7)]["same_as_target"] == ""  # not compared when sampling


def test_tree_policy_label_is_kept(sweep, tmp_path):
    label = "dynamic: DynamicTreeConfig(width=4, children=4, depth=5, budget=16)"
    _write(sweep / "4", _cell("tree", tree=label, nodes=16), TREE)
    rows = [r for r in build_report([sweep], tmp_path / "out", plots=True) if r["tree"] == label]
    assert len(rows) == 1 and rows[0]["label"] == "tree" + label


def test_cell_without_baseline_has_no_speedup(tmp_path):
    _write(tmp_path / "r", _cell("tree", tree=[2], nodes=2, dataset="bfcl", domain="structured"), TREE)
    (row,) = build_report([tmp_path / "r" / "results.json"], tmp_path / "out", plots=False)
    assert row["speedup"] is None
    assert "| - |" in (tmp_path / "out" / "table.md").read_text()


def test_cli_writes_tables_and_plots(sweep, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main([str(sweep), "--out", str(out)]) == 0
    for name in ("table.md", "table.csv", "tau_tokens_per_second.png", "speedup.png",
                 "acceptance_histogram.png", "speedup_vs_tree_size.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    assert "| tree |" in capsys.readouterr().out


def test_to_csv_empty():
    assert to_csv([]).strip() == ""


def test_no_results_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no results.json"):
        build_report([tmp_path], tmp_path / "out")


def test_median_speedup_ignores_one_disturbed_prompt(tmp_path):
    ar = [PromptRecord(f"p{i}", 10, 10, 10, time_total=10.0) for i in range(3)]
    fast = [PromptRecord(f"p{i}", 10, 10, 4, time_total=t) for i, t in enumerate([5.0, 5.0, 100.0])]
    _write(tmp_path / "s" / "0", _cell("autoregressive") | {"num_prompts": 3}, ar)
    _write(tmp_path / "s" / "1", _cell("linear", tree=[1, 1], k=2, nodes=2) | {"num_prompts": 3}, fast)
    row = [r for r in build_report([tmp_path / "s"], tmp_path / "out", plots=False) if r["method"] == "linear"][0]
    assert row["speedup"] == pytest.approx((30 / 110) / (30 / 30))  # pooled: the slow prompt dominates
    assert row["speedup_median"] == pytest.approx(2.0)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        build_report([tmp_path / "nope"], tmp_path / "out")
