"""docs/architecture.md's module table lists exactly the .py files under treespec/."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURE = REPO / "docs" / "architecture.md"


def module_table(markdown: str) -> list[str]:
    """First-column paths of the table in the '## Modules' section, in order."""
    section = markdown.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [re.match(r"\| `([^`]+)` \|", row).group(1) for row in rows]


def package_files() -> set[str]:
    root = REPO / "treespec"
    return {p.relative_to(root).as_posix() for p in root.rglob("*.py") if "__pycache__" not in p.parts}


def table_problems(listed: list[str], files: set[str]) -> list[str]:
    problems = [f"listed twice: {name}" for name in sorted({n for n in listed if listed.count(n) > 1})]
    problems += [f"in the table but not in treespec/: {name}" for name in sorted(set(listed) - files)]
    problems += [f"in treespec/ but not in the table: {name}" for name in sorted(files - set(listed))]
    return problems


def test_module_table_lists_exactly_the_package_files():
    assert table_problems(module_table(ARCHITECTURE.read_text()), package_files()) == []


def test_the_check_catches_a_missing_extra_or_repeated_row():
    listed = module_table(ARCHITECTURE.read_text())
    files = package_files()
    assert len(listed) == len(files) > 10
    assert table_problems(listed[1:], files) == [f"in treespec/ but not in the table: {listed[0]}"]
    assert table_problems(listed + ["ghost.py"], files) == ["in the table but not in treespec/: ghost.py"]
    assert table_problems(listed + listed[:1], files) == [f"listed twice: {listed[0]}"]
