"""A non-editable install works: `pip install .` into a fresh virtual environment gives a
`treespec-bench` that finds its configs (package data) and a `treespec-report` that reads its
output, run from a folder outside the repository.

The environment sees the system's site-packages, so torch, transformers and the other
dependencies already installed are reused (`--no-deps --no-build-isolation`: nothing is
downloaded); its own site-packages come first, so the copy under test is the installed one, not
an editable install of the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a fresh venv with treespec installed from a copy of the repository (not -e)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the repository's git checkout (its tracked files are what is installed)")
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    tracked = subprocess.run(["git", "ls-files", "pyproject.toml", "README.md", "treespec"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    for name in tracked:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    # no pip of its own: the system's pip (seen through the system site-packages) installs into it
    venv.create(root / "venv", system_site_packages=True, with_pip=False)
    bin_dir = root / "venv" / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", PYTHONPATH="")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", src], root, env)
    where = _run([python, "-c", "import treespec.bench.config as c; print(c.__file__); print(c.CONFIG_DIR)"], root, env)
    module, configs = where.stdout.split()
    venv_dir = (root / "venv").resolve()
    assert Path(module).resolve().is_relative_to(venv_dir), f"not the installed copy: {module}"
    assert (Path(configs) / "bench.yaml").is_file() and Path(configs).resolve().is_relative_to(venv_dir)
    return bin_dir


def test_installed_bench_and_report_run(installed, tmp_path):
    env = dict(os.environ, TREESPEC_CACHE=str(tmp_path / "cache"), PYTHONPATH="")
    env.pop("TREESPEC_CONFIG_DIR", None)
    run_dir = tmp_path / "run"
    _run([installed / "treespec-bench", "model=tiny-random", "tree=preset", "dataset.num_prompts=2", "max_new_tokens=4",
          "warmup_tokens=0", "threads=1", "progress=false", f"hydra.run.dir={run_dir}"], tmp_path, env)  # fmt: skip
    res = json.loads((run_dir / "results.json").read_text())
    assert res["cell"]["model"] == "tiny-random" and len(res["prompts"]) == 2 and res["aggregate"]["new_tokens"] > 0
    report = tmp_path / "report"
    done = _run([installed / "treespec-report", run_dir, "--out", report, "--no-plots"], tmp_path, env)
    table = (report / "table.md").read_text().splitlines()
    assert len(table) == 3 and "tiny-random" in table[2]  # header, rule, one cell
    assert "1 cells" in done.stdout


def test_installed_demo_has_its_entry_point(installed):
    # running it needs the real pair (a download); its entry point names the installed module
    script = (installed / "treespec-demo").read_text()
    assert "from treespec.bench.demo import main" in script


def test_the_library_does_without_matplotlib(tmp_path):
    """matplotlib is the [plot] extra: importing the library and the report does not need it, and
    asking for plots without it fails with a message that names the extra."""
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"  # as if not installed: its import fails
        "import treespec, treespec.bench.report as report, treespec.bench.runner\n"
        "try:\n    report.pyplot()\nexcept SystemExit as err:\n    print(err)\n"
    )
    done = _run([sys.executable, "-c", code], tmp_path, dict(os.environ, PYTHONPATH=str(REPO)))
    assert "pip install 'treespec[plot]'" in done.stdout and "--no-plots" in done.stdout


def test_one_place_resolves_the_config_folder(tmp_path):
    """treespec.bench.config.CONFIG_DIR: the package's configs, or TREESPEC_CONFIG_DIR's folder,
    for the Hydra app, the presets and the harness's domain table alike."""
    code = ("from treespec.bench import config, harness, run\n"
            "print(config.CONFIG_DIR, run.CONFIG_DIR, harness.CONFIG_DIR)\n")  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TREESPEC_CONFIG_DIR", None)
    default = _run([sys.executable, "-c", code], tmp_path, env).stdout.split()
    assert set(default) == {str(REPO / "treespec" / "configs")}
    moved = _run([sys.executable, "-c", code], tmp_path, dict(env, TREESPEC_CONFIG_DIR=str(tmp_path))).stdout.split()
    assert set(moved) == {str(tmp_path)}
