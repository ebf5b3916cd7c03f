"""The benchmark tools of the package (python -m treespec.bench.<tool>) and the study scripts beside
it (benchmarks/studies/, benchmarks/gpu/), which run through the package's harness."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from treespec.tree.presets import load_preset

REPO = Path(__file__).resolve().parents[2]
STUDIES = sorted((REPO / "benchmarks" / "studies").glob("*.py"))
GPU_SCRIPTS = sorted(p for p in (REPO / "benchmarks" / "gpu").glob("*.py") if p.name != "gpu_common.py")
PACKAGE_TOOLS = ["auto_compare", "tree_tools"]


def load_script(path: Path, monkeypatch):
    """A study script as a module, its folder on sys.path as when it runs (gpu_common)."""
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(f"study_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", PACKAGE_TOOLS)
def test_package_tool_is_a_python_m_entry(name, monkeypatch, capsys):
    module = importlib.import_module(f"treespec.bench.{name}")
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"]) if name == "tree_tools" else module.main()
    assert exit_.value.code == 0
    assert f"python -m treespec.bench.{name}" in capsys.readouterr().out


@pytest.mark.parametrize("path", STUDIES + GPU_SCRIPTS, ids=lambda p: p.name)
def test_study_script_runs_as_a_script(path, monkeypatch, capsys):
    module = load_script(path, monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    assert f"python {path.relative_to(REPO).as_posix()}" in capsys.readouterr().out


def test_no_scripts_left_in_benchmarks_or_the_package():
    assert sorted(p.name for p in (REPO / "benchmarks").glob("*.py")) == []
    bench = {p.stem for p in (REPO / "treespec" / "bench").glob("*.py")}
    assert not bench & {p.stem for p in STUDIES + GPU_SCRIPTS}
    assert len(STUDIES) == 6 and len(GPU_SCRIPTS) == 6


def test_tree_policies_presets_rebuild_the_shipped_trees(tmp_path, monkeypatch):
    tree_policies = load_script(REPO / "benchmarks" / "studies" / "tree_policies.py", monkeypatch)
    results = REPO / "benchmarks" / "results" / "tree_policies" / "tree_policies.json"
    tree_policies.main(["presets", str(results), "--out-dir", str(tmp_path)])
    shipped = REPO / "treespec" / "configs" / "presets"
    written = sorted(p.name for p in tmp_path.glob("*.yaml"))
    assert written == sorted(p.name for p in shipped.glob("*.yaml"))
    for name in written:
        assert load_preset(tmp_path / name) == load_preset(shipped / name), name


def test_tree_sweep_replay_counts_greedy_steps(monkeypatch):
    replay = load_script(REPO / "benchmarks" / "studies" / "tree_sweep.py", monkeypatch).replay
    # ranks of the 6 generated tokens under the draft; chain of 2: steps accept 2, 0, 1 (+1 bonus each)
    assert replay([0, 0, 0, 1, 0, 0], [1, 1]) == (3, [2, 0, 1])
    # a width-2 first level also accepts the rank-1 token
    assert replay([0, 0, 0, 1, 0, 0], [2, 1]) == (2, [2, 2])


def test_tree_policies_run_on_tiny_models(tmp_path, monkeypatch):
    """The device run end to end on the CPU: collection, profile, optimized tree, every policy cell."""
    from treespec.bench.harness import domain_datasets

    tree_policies = load_script(REPO / "benchmarks" / "studies" / "tree_policies.py", monkeypatch)
    datasets = domain_datasets()
    prompts = {datasets[d]: [{"id": f"{d}/{i}", "ids": [2 + i, 3, 4]} for i in range(2)] for d in tree_policies.DOMAINS}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    tree_policies.main(["run", "--model", "tiny-random", "--device", "cpu", "--dtype", "float32", "--prompts",
                        str(tmp_path / "prompts.json"), "--per-domain", "2", "--collect", "1", "--new-tokens", "4",
                        "--budgets", "16", "--ignore-eos", "--out-dir", str(tmp_path / "out"), "--name", "tp.json"])  # fmt: skip
    res = json.loads((tmp_path / "out" / "tp.json").read_text())
    assert res["incomplete"] == [] and set(res["domains"]) == set(tree_policies.DOMAINS)
    for d in res["domains"].values():
        row = d["budgets"]["16"]
        assert {"dynamic", "adaptive", "optimized"} <= set(row) and row["optimized"]["num_drafts"] <= 16
        assert all(cell["new_tokens"] == 4 and cell["tau"] >= 1.0 for cell in row.values())


# ------------------------------------------------------------------------------------ the GPU comparison's rows
@pytest.fixture
def gpu_compare(monkeypatch):
    return load_script(REPO / "benchmarks" / "gpu" / "gpu_compare.py", monkeypatch)


def test_every_gpu_method_row_loads_against_its_schema(gpu_compare):
    rows = gpu_compare.load_methods()
    names = {r.name for r in rows}
    assert len(rows) == len(list(gpu_compare.METHODS_DIR.glob("*.yaml"))) and gpu_compare.REFERENCE in names
    assert len({r.label for r in rows}) == len(rows) and [r.order for r in rows] == sorted(r.order for r in rows)
    assert set(gpu_compare.BASELINES) <= names
    assert {r.kind for r in rows} == {"treespec", "hf"} and any(r.temperature > 0 for r in rows)


def test_gpu_method_rows_are_picked_by_name_and_checked(gpu_compare, tmp_path):
    picked = gpu_compare.load_methods(["tree_4221_overlap"])
    assert [r.name for r in picked] == [gpu_compare.REFERENCE, "tree_4221_overlap"]
    assert picked[1].overlap == {"leaves": 2} and picked[1].tree == [4, 2, 2, 1]
    with pytest.raises(ValueError, match="no such rows"):
        gpu_compare.load_methods(["tree_4221_overlap", "nonesuch"])
    (tmp_path / "typo.yaml").write_text("label: typo\nmethd: tree\n")
    with pytest.raises(Exception, match="methd"):
        gpu_compare.load_methods(directory=tmp_path)


def test_gpu_compare_runs_on_the_cpu_with_tiny_models(gpu_compare, monkeypatch, tmp_path):
    """The comparison's logic end to end (GPU_BENCH_DEVICE=cpu's smoke run): treespec rows, a
    transformers baseline and a sampled row, every output compared with the reference."""
    for module in (gpu_compare, sys.modules["gpu_common"]):
        monkeypatch.setattr(module, "DEVICE", "cpu")
    prompts = {d: [{"id": f"{d}/{i}", "ids": [2 + i, 3, 4, 5]} for i in range(2)] for d in ("humaneval", "mtbench")}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    gpu_compare.main(["--model", "tiny-random", "--prompts", str(tmp_path / "prompts.json"), "--out-dir", str(tmp_path),
                      "--new-tokens", "6", "--hf-prompts", "1", "--sampled-prompts", "1", "--ignore-eos",
                      "--methods", "tree_4221,linear_chain4_overlap,hf_generate,t07_tree_4221"])  # fmt: skip
    summary = json.loads((tmp_path / "compare_humaneval_mtbench.json").read_text())["summary"]
    assert summary["humaneval|tree [4,2,2,1]"]["identical_to_autoregressive"] == "2/2"
    assert summary["humaneval|linear chain-4 + overlap"]["identical_to_autoregressive"] == "2/2"
    assert summary["humaneval|hf generate"]["prompts"] == 1 and summary["humaneval|hf generate"]["identical_to_autoregressive"] == "1/1"
    assert summary["mtbench|T0.7 tree [4,2,2,1]"]["new_tokens"] == 6
    assert summary["humaneval|tree [4,2,2,1]"]["speedup_vs_autoregressive (graphs)"] > 0


def test_acceptance_tau_scores_every_scheme_through_the_public_option(monkeypatch):
    """The study's verifier goes in as acceptance= (no engine internals): one record per sampled
    step, every scheme's expected accepted length within the tree's depth."""
    import torch

    import treespec
    from treespec.testing import tiny_pair

    study = load_script(REPO / "benchmarks" / "studies" / "acceptance_tau.py", monkeypatch)
    target, _ = tiny_pair(0)
    verifier = study.RecordingVerifier(chain_depth=3)
    out = treespec.generate(target, target, torch.tensor([[3, 5, 7, 9]]), max_new_tokens=10, tree=[2, 1, 1],
                            temperature=0.8, eos_token_id=[], acceptance=verifier,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert len(verifier.records) == out.stats.target_forwards
    for rec in verifier.records:
        assert set(rec) == set(study.SCHEMES) and all(0.0 <= v <= 3.0 for v in rec.values())
    summary = study.scheme_summary([{"tokens": out.stats.new_tokens, "forwards": out.stats.target_forwards,
                                     "steps": verifier.records}])  # fmt: skip
    # the draft is the target: every scheme accepts (almost) the whole tree
    assert summary["steps"] == len(verifier.records) and summary["tau_chain_block"] > 3.5


def test_user_api_runs_on_the_cpu_with_tiny_models(monkeypatch, tmp_path):
    """The public-API GPU bench end to end (GPU_BENCH_DEVICE=cpu's smoke run): every row, an
    untrained head's rows, and the extras, with no row or extra failing; fp32 rows equal the
    target alone's output."""
    user_api = load_script(REPO / "benchmarks" / "gpu" / "user_api.py", monkeypatch)
    for module in (user_api, sys.modules["gpu_common"]):
        monkeypatch.setattr(module, "DEVICE", "cpu")
    rows = ("AR;tree [4,2,2,1];chain-4;generate() tree [4,2,2,1];head tree [4,2,2,1,1];head chain-5;AR fused;"
            "tree [4,2,2,1] fused;HF static;HF assisted")
    user_api.main(["--random", "--per-set", "2", "--new-tokens", "6", "--hf-per-set", "1", "--out", str(tmp_path),
                   "--head", "random", "--rows", rows, "--extras", "costs,attention,ttft,context"])  # fmt: skip
    res = json.loads((tmp_path / "user_api.json").read_text())
    assert all(isinstance(v, float) for v in res["first_call_s"].values()), res["first_call_s"]
    assert len(res["first_call_s"]) == len(rows.split(";"))
    assert "failed" not in res["extras"], res["extras"]
    forwards = {f"{m} n={n}" for m in ("draft", "draft fused", "head") for n in (1, 16)} | {"target n=1", "target fused n=1"}
    assert set(res["extras"]["forward_ms_at_512"]) == forwards
    sizes = {"target": (1, 16, 64, 256), "draft": (1, 8)}
    attention = {f"{m} fused, {way} n={n}" for way in ("sdpa", "matmul") for m in sizes for n in sizes[m]}
    assert set(res["extras"]["attention_ms_at_512"]) == attention
    assert set(res["extras"]) >= {"ttft_500_ms", "max_context_tok_s"}
    assert set(res["extras"]["max_context_tok_s"]) == {"1024 (sdpa)", "8192 (sdpa)", "8192 sdpa (sdpa)"}  # no flash on the CPU
    summary = res["summary"]
    for label in rows.split(";"):
        prompts = 1 if label.startswith("HF") else 2  # the transformers rows run fewer prompts, the others all
        assert summary[f"synthetic | {label}"]["prompts"] == prompts, (label, summary)
        assert summary[f"synthetic | {label}"]["same_as_AR"] == f"{prompts}/{prompts}", (label, summary)
        assert len(res["per_prompt"]["synthetic"][label]) == prompts
