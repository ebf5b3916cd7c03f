"""The cheap commands of README.md and docs/ run as written: every command of a ```bash block
that needs no real model (the tiny random pair, the report of committed runs, the tree tool)
runs in a scratch directory, in document order, through the main() its console script or
`python -m` calls, and must exit 0 and print what it promises."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ENTRY_POINTS = {"treespec-bench": "treespec.bench.run", "treespec-demo": "treespec.bench.demo",
                "treespec-report": "treespec.bench.report", "treespec-train-head": "treespec.heads.cli"}  # fmt: skip
HYDRA_APPS = {"treespec.bench.run": "treespec-bench", "treespec.heads.cli": "treespec-train-head"}
CHEAP = re.compile(r"tiny|^treespec-report (benchmarks/runs/\S+|outputs/bench-multirun) |^python3? -m treespec\.bench\.tree_tools ")
# what each kind of command must print (stdout and stderr together)
EXPECT = {
    "treespec.bench.run": "tokens/s",
    "treespec.bench.demo": "tiny random pair",
    "treespec.bench.report": "cells ->",
    "treespec.bench.auto_compare": "| variant | tree | tau |",
    "treespec.bench.tree_tools": "expected tau",
    "treespec.heads.cli": "agreement",
}


def shell_commands(markdown: str) -> list[str]:
    """The commands of the ```bash blocks: continuation lines joined, comments and `nice` dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["nice"]:
                words = words[3:]
            if words:
                out.append(shlex.join(words))
    return out


def cheap_commands() -> list[tuple[str, str]]:
    """(document, command) for every command that runs in seconds without a real model."""
    found = [(doc.relative_to(REPO).as_posix(), cmd) for doc in DOCS for cmd in shell_commands(doc.read_text())
             if CHEAP.search(cmd)]  # fmt: skip
    seen: set[str] = set()
    return [(doc, cmd) for doc, cmd in found if not (cmd in seen or seen.add(cmd))]  # each once, where it first appears


def module_and_args(command: str) -> tuple[str, list[str]]:
    """('treespec.bench.run', [...]) for `treespec-bench ...` or `python -m treespec.bench.run ...`."""
    words = shlex.split(command)
    if words[0] in ENTRY_POINTS:
        return ENTRY_POINTS[words[0]], words[1:]
    assert words[0] in ("python", "python3") and words[1] == "-m", command
    return words[2], words[3:]


def run_in_process(module: str, args: list[str], monkeypatch) -> int:
    """The command's main() in this process (torch and transformers are imported once for all
    of them); the Hydra app through sys.argv, as its console script calls it."""
    import importlib

    from hydra.core.global_hydra import GlobalHydra

    mod = importlib.import_module(module)
    if module in HYDRA_APPS:
        GlobalHydra.instance().clear()
        monkeypatch.setattr(sys, "argv", [HYDRA_APPS[module], *args])
        try:
            mod.main()
        except SystemExit as err:
            return int(err.code or 0)
        finally:
            GlobalHydra.instance().clear()
        return 0
    try:
        return int(mod.main(args) or 0)
    except SystemExit as err:
        return int(err.code or 0)


def test_the_extraction_finds_the_documented_cheap_commands():
    found = [cmd for _, cmd in cheap_commands()]
    assert "treespec-bench model=tiny-random dataset.num_prompts=2 max_new_tokens=16" in found
    assert "treespec-demo --tiny" in found
    assert any(c.startswith("python -m treespec.bench.auto_compare --model tiny-random") for c in found)
    assert any(c.startswith("treespec-report outputs/bench-multirun") for c in found)
    assert any("tree_tools" in c for c in found)
    assert not any("model=tiny-random" not in c and "tiny" not in c and c.startswith("treespec-bench") for c in found)
    assert shell_commands("```bash\nnice -n 10 a b \\\n  c  # note\n```\n") == ["a b c"]


def test_the_cheap_documented_commands_run_as_written(tmp_path, monkeypatch, capfd):
    """One scratch directory for all of them, in document order (README's report reads the
    multirun that its previous line wrote), with the repository's configs and committed runs."""
    import torch

    for name in ("treespec", "benchmarks"):  # the package's configs and the committed runs, by their paths
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    failures = []
    try:
        for doc, command in cheap_commands():
            module, args = module_and_args(command)
            code = run_in_process(module, args, monkeypatch)
            out, err = capfd.readouterr()
            expected = EXPECT.get(module, "")
            if code != 0 or expected not in out + err:
                failures.append(f"{doc}: `{command}` exited {code}; wanted {expected!r}:\n{(out + err)[-2000:]}")
    finally:
        torch.set_num_threads(threads)  # auto_compare sets the process's threads, as its CLI should
    assert not failures, "\n\n".join(failures)
    assert (tmp_path / "outputs" / "report" / "table.md").exists()  # README's report, under outputs/
    assert not (tmp_path / "report").exists()
