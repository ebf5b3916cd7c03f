"""treespec's cache directory and its one way of writing into it.

Everything treespec keeps between runs (assembled GGUF files, converted checkpoints, extracted
prompt sets) lives under `cache_dir()`, and every file or directory there is written through
`atomic_write`: built under a temporary name next to its final place and renamed into place
only when complete, so a reader (or a second process) never sees half of one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """Root of treespec's cache: $TREESPEC_CACHE, else $XDG_CACHE_HOME/treespec, else ~/.cache/treespec."""
    if os.environ.get("TREESPEC_CACHE"):
        return Path(os.environ["TREESPEC_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "treespec"
    return Path.home() / ".cache" / "treespec"


@contextmanager
def atomic_write(final: Path, *, directory: bool = False, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `final` to be filled (an empty file, or with directory=True
    an empty directory); when the block ends without an exception it is made world-readable and
    renamed to `final`. On any exception (KeyboardInterrupt included) it is deleted instead.

    The temporary name is `.<final name>.<random><suffix>` in the same folder (one filesystem, so
    the rename is atomic). Renaming a directory onto an existing non-empty one raises OSError:
    the caller decides whether the copy already there is as good.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}."
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        _make_readable(tmp)
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _make_readable(path: Path) -> None:
    # mkstemp/mkdtemp (and safetensors) create owner-only entries; a shared cache should be readable.
    if path.is_dir():
        path.chmod(0o755)
        for entry in path.iterdir():
            entry.chmod(0o644)
    else:
        path.chmod(0o644)
