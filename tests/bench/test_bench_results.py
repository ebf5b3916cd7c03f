"""Benchmark results survive faults: written after every prompt of every method, atomically;
a failed write keeps the other methods' results; a run stopped mid-way keeps what it measured,
marked incomplete, and treespec-report says so."""

from __future__ import annotations

import json
import sys

import pytest
from hydra.core.global_hydra import GlobalHydra

from treespec.bench import runner
from treespec.bench.config import default_config
from treespec.bench.report import build_report, main as report_main
from treespec.bench.results import ResultsWriter, is_complete


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path / "cache"))


def _config(prompts: int = 3):
    cfg = default_config(max_new_tokens=4, interleave=["autoregressive", "tree"])
    cfg.dataset.num_prompts = prompts
    return cfg


def _stop_after(monkeypatch, calls: int, exc: BaseException):
    """Make the k-th generate_one call (1-based) raise `exc`, as Ctrl-C or a crash would."""
    real, n = runner.generate_one, [0]

    def flaky(*args, **kwargs):
        n[0] += 1
        if n[0] == calls:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "generate_one", flaky)


def _writer(tmp_path):
    run = tmp_path / "run"
    return ResultsWriter(run, {m: run / m / "results.json" for m in ("autoregressive", "tree")})


class Recorder:
    """A ResultsSink that keeps every document it is given."""

    def __init__(self):
        self.docs: list[tuple[str, dict]] = []

    def write(self, method, doc):
        self.docs.append((method, json.loads(json.dumps(doc))))


def test_every_document_before_the_last_prompt_is_marked_incomplete():
    """So that a process killed outright (SIGKILL: no handler runs) leaves incomplete records."""
    sink = Recorder()
    runner.run_interleaved(_config(prompts=2), sink=sink)
    assert len(sink.docs) == 2 + 2 * 2 + 2  # the empty start, after each prompt of each method, the end
    for _, doc in sink.docs:  # complete exactly when every prompt of that method is in
        assert is_complete(doc) == (len(doc["prompts"]) == 2)
    first = dict(sink.docs[:2])
    assert first["tree"]["status"]["missing_prompts"] == ["synthetic/synthetic/0", "synthetic/synthetic/1"]
    assert [len(d["prompts"]) for m, d in sink.docs if m == "tree"] == [0, 1, 2, 2]


def test_a_run_stopped_mid_way_keeps_its_records_marked_incomplete(tmp_path, monkeypatch, capsys):
    writer = _writer(tmp_path)
    _stop_after(monkeypatch, 3, KeyboardInterrupt())  # prompt 0: both methods; prompt 1: the first one
    with pytest.raises(KeyboardInterrupt):
        runner.run_interleaved(_config(prompts=3), sink=writer)
    for method in ("autoregressive", "tree"):
        doc = json.loads((tmp_path / "run" / method / "results.json").read_text())
        st = doc["status"]
        assert st["complete"] is False and st["prompts_done"] == 1 and st["prompts_total"] == 3
        assert st["missing_prompts"] == ["synthetic/synthetic/1", "synthetic/synthetic/2"]
        assert st["stopped_by"] == "KeyboardInterrupt"
        assert len(doc["prompts"]) == 1 and doc["aggregate"]["new_tokens"] > 0  # what was measured is kept

    assert report_main([str(tmp_path / "run"), "--out", str(tmp_path / "report"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: 2 of 2 runs are INCOMPLETE" in out
    assert out.count("INCOMPLETE: 1/3 prompts (stopped by KeyboardInterrupt)") == 2 * 2  # the table and the warning
    rows = build_report([tmp_path / "run"], tmp_path / "report2", plots=True)
    assert {r["status"] for r in rows} == {"INCOMPLETE: 1/3 prompts (stopped by KeyboardInterrupt)"}


def test_a_complete_run_is_reported_complete(tmp_path, capsys):
    runner.run_interleaved(_config(prompts=1), sink=_writer(tmp_path))
    assert report_main([str(tmp_path / "run"), "--out", str(tmp_path / "report"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "INCOMPLETE" not in out and out.count("| complete |") == 2


def test_a_failed_write_keeps_the_other_methods_results(tmp_path, monkeypatch, caplog):
    """A directory where the tree's results.json should go: its writes fail, the run goes on, the
    target alone's results are complete on disk, and the run ends with an error naming the run
    directory (exit 1)."""
    run = tmp_path / "run"
    (run / "tree" / "results.json").mkdir(parents=True)  # in the way of tree's results
    monkeypatch.chdir(tmp_path)
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["treespec-bench", "model=tiny-random", "tree=preset", "dataset.num_prompts=2",
                                      "max_new_tokens=4", "warmup_tokens=0", "threads=1", "progress=false",
                                      "interleave=[tree,autoregressive]", f"hydra.run.dir={run}"])  # fmt: skip
    from treespec.bench import run as bench_run

    try:
        with pytest.raises(SystemExit) as info:
            bench_run.main()
    finally:
        GlobalHydra.instance().clear()
    assert info.value.code == 1
    ar = json.loads((run / "autoregressive" / "results.json").read_text())
    assert is_complete(ar) and len(ar["prompts"]) == 2
    log = (run / "run.log").read_text()
    assert f"could not write tree's results to {run / 'tree' / 'results.json'} (run directory {run})" in log
    assert "results NOT written" in log and "prompt 2/2" in log  # run.log holds the run's progress too
    assert not [p for p in (run / "tree").iterdir() if p.name.startswith(".results.json.")]  # no temporary left


def test_a_later_write_that_succeeds_clears_the_failure(tmp_path):
    writer = _writer(tmp_path)
    blocker = tmp_path / "run" / "tree" / "results.json"
    blocker.mkdir(parents=True)
    writer.write("tree", {"x": 1})
    assert "tree" in writer.failed
    blocker.rmdir()
    writer.write("tree", {"x": 2})
    assert writer.failed == {} and json.loads(blocker.read_text()) == {"x": 2}


def test_the_run_table_gives_no_speedup_to_the_target_alone(tmp_path):
    """tree='auto' that chose the target alone ran the same computation as autoregressive: the
    table says what ran and prints no speedup for it; a tree that ran gets one."""
    from treespec.bench.run import results_table

    def doc(method, tps, kind=None):
        choice = {"chosen": {"name": "the target alone" if kind == "target" else "chain-3", "kind": kind},
                  "reason": "because"} if kind else None  # fmt: skip
        cell = {"model": "m", "domain": "code", "dataset": "humaneval", "temperature": 0.0, "max_new_tokens": 8,
                "tree": "auto", "dataset_replaced": None}  # fmt: skip
        agg = {"prompts": 1, "new_tokens": 8, "tau": 1.0, "acceptance_rate": 0.0, "tokens_per_second": tps}
        return {"cell": cell, "aggregate": agg, "prompts": [{"tree_choice": choice}]}

    rows = {line.split()[0]: line for line in results_table(
        {"autoregressive": doc("autoregressive", 2.0), "tree": doc("tree", 2.2, "target")}, {}).splitlines()
        if line.startswith(("autoregressive ", "tree "))}  # fmt: skip
    assert rows["tree"].rstrip().endswith("-") and "auto: the target alone" in rows["tree"]
    assert rows["autoregressive"].rstrip().endswith("base")
    chain = results_table({"autoregressive": doc("autoregressive", 2.0), "tree": doc("tree", 3.0, "chain")}, {})
    assert "1.50x" in chain


def test_the_report_labels_what_ran(tmp_path):
    """A tiny run: its prompts are synthetic, and tree='auto' that chose the target alone is
    labelled so, with no draft tokens per step; one that chose a chain names it."""
    cfg = default_config(max_new_tokens=4, interleave=["autoregressive", "tree"])
    cfg.dataset.name = "humaneval"  # the tiny pair has no tokenizer: synthetic prompts replace it
    cfg.dataset.num_prompts = 1
    docs = runner.run_interleaved(cfg)
    choice = {"chosen": {"name": "the target alone", "kind": "target", "draft_nodes": 0}, "reason": "r"}
    chain = {"chosen": {"name": "chain-3", "kind": "chain", "draft_nodes": 3}, "reason": "r"}
    for name, tree_choice in (("alone", choice), ("chain", chain)):
        for method, doc in docs.items():
            doc = json.loads(json.dumps(doc))
            if method == "tree":
                doc["prompts"][0]["tree_choice"] = tree_choice
            path = tmp_path / name / method / "results.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(doc))
    rows = {(r["run"].split("/")[0], r["method"]): r for r in build_report([tmp_path], tmp_path / "report", plots=False)}
    assert {r["dataset"] for r in rows.values()} == {"synthetic prompts"}
    alone, chained = rows[("alone", "tree")], rows[("chain", "tree")]
    assert alone["label"] == "target alone (tree=auto)" and alone["draft_nodes"] == 0 and alone["target_alone"]
    assert alone["tree"] == "auto chose the target alone"
    assert chained["label"] == "tree auto: chain-3" and chained["draft_nodes"] == 3 and not chained["target_alone"]
