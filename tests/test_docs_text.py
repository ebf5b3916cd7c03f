"""README.md and docs/ speak of the software only: no issue numbers, no words about how it was
developed (sessions, device budgets, staging), no internal staging folders, no absolute paths of
the machines it was developed on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FORBIDDEN = {
    "an issue number": r"\bissues? #?\d+|(?<![\w&/])#\d+\b",
    "the development process": r"\bsessions?\b|\bdevice budget\b|\bstaging\b|\bstage\.sh\b|\bthe lead\b|\bengineers?\b",
    "an internal staging folder": r"\.xfer\b|\.\./shared\b|\bshared/(device|wheels)\b|/tmp/(xfer|site)\b",
    "an absolute machine path": r"(?<![\w.~:/])/(work|home|tmp|opt|root|mnt|scratch)/",
}


def findings(text: str) -> list[str]:
    """'line N: <what>: <the match>' for every forbidden phrase in text."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        for what, pattern in FORBIDDEN.items():
            for m in re.finditer(pattern, line, re.IGNORECASE):
                out.append(f"line {n}: {what}: {m.group(0)!r}")
    return out


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_docs_speak_of_the_software_only(path):
    assert findings(path.read_text()) == []


@pytest.mark.parametrize(
    "line",
    [
        "as issue 13 asked", "see #13", "Issues 15, 16", "the session's device budget", "after staging the pair",
        "bash ../shared/device/stage.sh", "carry .xfer/tp", "export PYTHONPATH=/tmp/site", "in /work/main",
        "the lead's probe", "other engineers' jobs",
    ],
)
def test_the_check_catches_each_kind(line):
    assert findings(line), line


@pytest.mark.parametrize(
    "line",
    [
        "`tree=[4, 2, 2, 1]` at a node budget of 16", "~/.cache/treespec/gguf", "https://download.pytorch.org/whl/cpu",
        "docs/sampling.md §4b", "| 1.5b | verify N=16 |", "outputs/report",
    ],
)
def test_the_check_passes_ordinary_text(line):
    assert findings(line) == []
