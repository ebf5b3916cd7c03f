"""treespec's cache directory: the one way of writing into it, and of trusting what is read back.

Everything treespec keeps between runs (assembled GGUF files, converted checkpoints, extracted
prompt sets, forward-cost tables) lives under `cache_dir()`.

- Writing: every file or directory there is written through `atomic_write`: built under a
  temporary name next to its final place (the name carries the host and pid of its writer) and
  renamed into place only when complete, so a reader never sees half of one.
- Sharing: `cache_lock` holds an exclusive flock on `<final>.lock` while a file is fetched or
  built, so a second process waits for the first instead of repeating the work; under the lock,
  leftovers of that file's killed writers are removed (`remove_leftovers`), whatever their age.
- Trusting: a file is checked against a sha256 recorded when it was written. The full hash
  (1-3 s per GB, by the CPU) is needed once; a `.verified` record then binds the hash to the
  file's size, mtime, ctime and inode, so later reads only stat it. Any write to the file, even one
  that restores its mtime, changes its ctime, and the next read hashes it again.
- Repairing: a file that fails its check is moved aside (`move_aside`, to `<name>.bad-<time>`,
  with one line on stderr) and rebuilt by its owner.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from treespec.errors import CacheError

try:
    import fcntl
except ImportError:  # not on Windows: the cache then works unlocked
    fcntl = None

log = logging.getLogger(__name__)

_CHUNK = 8 << 20  # 8 MiB reads: hashing runs at disk speed, memory stays flat
CHECKSUMS = "checksums.json"  # inside a cached directory: {file name: {"size", "sha256"}}
VERIFIED = ".verified.json"  # inside a cached directory: the stat binding of each checked file


def cache_dir() -> Path:
    """Root of treespec's cache: $TREESPEC_CACHE, else $XDG_CACHE_HOME/treespec, else ~/.cache/treespec."""
    if os.environ.get("TREESPEC_CACHE"):
        return Path(os.environ["TREESPEC_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "treespec"
    return Path.home() / ".cache" / "treespec"


def notice(message: str) -> None:
    """One line on stderr about the cache (a rebuild, a wait): treespec says what it does."""
    print(f"treespec: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Writing


def writer_tag() -> str:
    """`<host>-pid<pid>`: names a temporary entry's writer, so leftovers of dead ones are found."""
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"
    return f"{host}-pid{os.getpid()}"


@contextmanager
def atomic_write(final: Path, *, directory: bool = False, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `final` to be filled (an empty file, or with directory=True
    an empty directory); when the block ends without an exception it is made world-readable and
    renamed to `final`. On any exception (KeyboardInterrupt included) it is deleted instead.

    The temporary name is `.<final name>.<host>-pid<pid>.<random><suffix>` in the same folder
    (one filesystem, so the rename is atomic). Renaming a directory onto an existing non-empty
    one raises OSError: the caller decides whether the copy already there is as good.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.{writer_tag()}."
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


# ---------------------------------------------------------------------------------------------
# Sharing between processes


@contextmanager
def cache_lock(final: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `<final>.lock` for the block (fcntl.flock; released by the OS
    when the process dies, so a killed holder never blocks the next run). When another process
    holds it, say so in one line and wait. A cache where the lock file cannot be created
    (read-only) is used unlocked: nothing is written there anyway."""
    final = Path(final)
    lock = final.with_name(final.name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                notice(f"waiting for another process that is {what} (lock {lock})")
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as err:  # a filesystem without locks (some network mounts): go on unlocked
                log.warning("cannot lock %s (%s); going on without the lock", lock, err)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _pid_alive(host: str, pid: int) -> bool:
    if host != writer_tag().rsplit("-pid", 1)[0]:
        return True  # another machine's writer (a shared network cache): not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(directory: Path, stem: str, *, locked: bool, max_age_s: float = 3600.0) -> list[Path]:
    """Delete the temporary entries (`.<stem>.*`, `.download-<stem>-*`) of writers that died.

    locked: the caller holds `cache_lock` on `stem`, so every such entry is a leftover whatever
    its age or writer. Unlocked, an entry goes when its writer's pid is gone (this host), or,
    for entries without a writer tag, when it is older than max_age_s. Returns what was removed.
    """
    removed, now = [], time.time()
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        name = path.name
        if not (name.startswith(f".{stem}.") or name.startswith(f".download-{stem}-")) or name == f".{stem}.lock":
            continue
        tag = re.search(r"(?:^|[.-])([A-Za-z0-9_]+)-pid(\d+)[.-]", name)
        try:
            stale = locked or (not _pid_alive(tag[1], int(tag[2])) if tag else now - path.stat().st_mtime > max_age_s)
            if not stale:
                continue
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
            log.info("removed leftover %s of a killed writer", path)
        except OSError:
            pass  # gone already, or a read-only cache
    return removed


# ---------------------------------------------------------------------------------------------
# Trusting what is read back


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_identity(path: Path) -> dict:
    """What changes whenever the file's bytes are written: size, mtime, ctime, inode."""
    st = Path(path).stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def vouches(record: object, path: Path, sha256: str) -> bool:
    """True when a stored record says `path`, exactly as it is on disk now, hashed to `sha256`."""
    try:
        return isinstance(record, dict) and record.get("sha256") == sha256 and \
            {k: record.get(k) for k in ("size", "mtime_ns", "ctime_ns", "inode")} == file_identity(path)  # fmt: skip
    except OSError:
        return False


def write_checksums(directory: Path) -> dict:
    """Record size and sha256 of every file in `directory` in its checksums.json (called on
    the temporary directory, before atomic_write renames it into place); returns the record."""
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(Path(directory).iterdir()) if p.is_file() and p.name not in (CHECKSUMS, VERIFIED)}  # fmt: skip
    (Path(directory) / CHECKSUMS).write_text(json.dumps({"files": files}, indent=1) + "\n")
    return files


def vouch_for_new_directory(directory: Path) -> None:
    """Right after a directory written with write_checksums was renamed into place (under its
    lock): record the stat binding of its files without hashing them again, so the next load
    only stats them (the rename and chmod changed their ctime since they were hashed)."""
    directory = Path(directory)
    try:
        files = json.loads((directory / CHECKSUMS).read_text())["files"]
        record = {name: {"sha256": want["sha256"], **file_identity(directory / name)} for name, want in files.items()}
        with atomic_write(directory / VERIFIED) as tmp:
            tmp.write_text(json.dumps(record) + "\n")
    except (OSError, ValueError, KeyError, TypeError):
        pass  # the next load hashes the files once instead


def check_directory(directory: Path, required: tuple[str, ...]) -> str | None:
    """None when every file checksums.json lists is there with its size and sha256 (and the
    `required` ones are among them); else what is wrong, in words. Files whose `.verified.json`
    entry vouches for them are only stat'ed; the others are hashed and their entries renewed."""
    directory = Path(directory)
    try:
        files = json.loads((directory / CHECKSUMS).read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError
    except FileNotFoundError:
        return f"{CHECKSUMS} is missing (an interrupted or older copy)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{CHECKSUMS} is unreadable ({type(err).__name__})"
    for name in required:
        if name not in files or not (directory / name).is_file():
            return f"{name} is missing"
    try:
        verified = json.loads((directory / VERIFIED).read_text())
    except (OSError, ValueError):
        verified = {}
    renewed = {}
    for name, want in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want.get("size"):
            return f"{name} has {size} bytes, {want.get('size')} were written (truncated or overwritten)"
        if vouches(verified.get(name), path, want.get("sha256")):
            renewed[name] = verified[name]
            continue
        if sha256_file(path) != want.get("sha256"):
            return f"{name} does not match the sha256 recorded when it was written (overwritten or corrupted)"
        renewed[name] = {"sha256": want["sha256"], **file_identity(path)}
    if renewed != verified:
        try:
            with atomic_write(directory / VERIFIED) as tmp:
                tmp.write_text(json.dumps(renewed) + "\n")
        except OSError:
            pass  # a read-only cache still works; it hashes again next time
    return None


def move_aside(path: Path, problem: str, fix: str = "") -> Path:
    """Rename a damaged cached file or directory to `<name>.bad-<time>` and say so in one line;
    returns the new path. Raises CacheError (naming the path and what fixes it) when it cannot
    be moved (a read-only cache)."""
    path = Path(path)
    bad = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%S')}")
    if bad.exists():
        bad = bad.with_name(f"{bad.name}-{writer_tag()}")
    try:
        os.rename(path, bad)
    except OSError as err:
        raise CacheError(
            f"{path} is damaged ({problem}) and cannot be moved aside ({err.strerror or err}). "
            f"Delete it (rm -r '{path}'), or point TREESPEC_CACHE at a writable directory, then run again{fix}."
        ) from err
    notice(f"{path} is damaged ({problem}): moved it aside to {bad.name} and rebuilding it (delete that copy when done)")
    return bad


def is_disk_full(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, errno.EDQUOT)
