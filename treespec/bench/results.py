"""Where a benchmark run's results go while it runs: one JSON document per method, rewritten
atomically after every prompt of every method, so that a run stopped for any reason (an error,
Ctrl-C, a killed process, a full disk) keeps everything it measured.

A document carries `status`: {"complete": bool, "prompts_done": n, "prompts_total": N,
"missing_prompts": [ids], "stopped_by": "KeyboardInterrupt: ..." (when an exception ended the
run)}. Every document written before the last prompt says complete=false, so a process killed
outright leaves records marked incomplete too; treespec-report labels them so.

A write that fails (a directory in the way, a full disk, a read-only folder) is logged with the
run directory and the path and never stops the run or loses another method's results: the
document stays in memory, the next prompt retries the write, and the run ends with an error
listing what could not be written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

from treespec.loading.cache import atomic_write

log = logging.getLogger(__name__)


class ResultsSink(Protocol):
    """Receives each method's results document whenever it changes."""

    def write(self, method: str, doc: dict) -> None: ...


def status(prompt_ids: list[str], done: int, stopped_by: BaseException | None = None) -> dict:
    """The `status` entry of a document whose first `done` prompts of `prompt_ids` are measured."""
    st = {"complete": done >= len(prompt_ids) and stopped_by is None, "prompts_done": done,
          "prompts_total": len(prompt_ids), "missing_prompts": list(prompt_ids[done:])}  # fmt: skip
    if stopped_by is not None:
        st["stopped_by"] = f"{type(stopped_by).__name__}: {stopped_by}".rstrip(": ")
    return st


def is_complete(doc: dict) -> bool:
    """Documents written before the status entry existed were written once, at the end: complete."""
    return bool(doc.get("status", {"complete": True}).get("complete"))


class ResultsWriter:
    """A ResultsSink writing method m's document to paths[m], atomically."""

    def __init__(self, run_dir: Path, paths: dict[str, Path]):
        self.run_dir, self.paths = Path(run_dir), {m: Path(p) for m, p in paths.items()}
        self.failed: dict[str, str] = {}  # method -> the last write error (cleared by a later success)

    def write(self, method: str, doc: dict) -> None:
        path = self.paths[method]
        try:
            with atomic_write(path) as tmp:
                tmp.write_text(json.dumps(doc, indent=1))
        except OSError as err:
            if method not in self.failed:
                log.error("could not write %s's results to %s (run directory %s): %s; the run goes on and "
                          "retries after the next prompt", method, path, self.run_dir, err)  # fmt: skip
            self.failed[method] = f"{path}: {err}"
        else:
            self.failed.pop(method, None)
