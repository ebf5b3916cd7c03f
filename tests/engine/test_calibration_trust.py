"""tree='auto''s cached forward costs are trusted only as far as they deserve: each run says where
they come from, costs measured under load are provisional, an unreadable table is moved aside,
and a cache that cannot be written never fails a generation."""

from __future__ import annotations

import errno
import io
import json

import pytest
import torch

import treespec
from treespec.backends.sdpa import SdpaBackend
from treespec.engine import calibrate
from treespec.testing import tiny_pair

P = torch.tensor([[3, 17, 42, 8, 25, 11]])


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A cache of its own, few sizes, one thread, and no memory of earlier tables."""
    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path))
    monkeypatch.setattr(calibrate, "CPU_TARGET_SIZES", (1, 2, 4))
    monkeypatch.setattr(calibrate, "CPU_DRAFT_SIZES", (1, 2))
    monkeypatch.setattr(calibrate, "_IN_MEMORY", {})
    monkeypatch.setattr(calibrate, "_ANNOUNCED", set())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path / "calibration"
    torch.set_num_threads(threads)


def _load(monkeypatch, value: float) -> None:
    monkeypatch.setattr(calibrate.os, "getloadavg", lambda: (value, value, value))


def _counting(monkeypatch) -> list:
    calls = []
    real = calibrate.measure_costs
    monkeypatch.setattr(calibrate, "measure_costs", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_a_run_using_cached_costs_says_when_and_under_what_load_once(fresh, monkeypatch):
    target, draft = tiny_pair(0)
    _load(monkeypatch, 0.25)
    calibrate.calibrated_costs(target, draft, SdpaBackend(), progress=None)
    monkeypatch.setattr(calibrate, "_ANNOUNCED", set())  # a new process
    log = io.StringIO()
    calibrate.calibrated_costs(target, draft, SdpaBackend(), progress=log)
    calibrate.calibrated_costs(target, draft, SdpaBackend(), progress=log)
    (line,) = log.getvalue().splitlines()  # one line, not one per generation
    date = json.loads(next(fresh.iterdir()).read_text())["date"]
    assert f"using forward costs measured {date} at load 0.2 on" in line and "provisional" not in line


def test_costs_measured_under_load_are_provisional_and_measured_again_when_quiet(fresh, monkeypatch):
    target, draft = tiny_pair(0)
    cores = calibrate.os.cpu_count()
    calls = _counting(monkeypatch)
    _load(monkeypatch, 4.0 * cores)
    log = io.StringIO()
    calibrate.calibrated_costs(target, draft, SdpaBackend(), progress=log)
    assert "this machine is busy" in log.getvalue() and "provisional" in log.getvalue()
    (path,) = fresh.iterdir()
    assert json.loads(path.read_text())["provisional"] is True and calls == [1]

    monkeypatch.setattr(calibrate, "_ANNOUNCED", set())
    log = io.StringIO()
    calibrate.calibrated_costs(target, draft, SdpaBackend(), progress=log)  # still busy: reused, and said so
    assert calls == [1] and "(provisional: measured under load; measured again on a quieter run)" in log.getvalue()

    _load(monkeypatch, 0.1 * cores)  # quiet now: measured again, no longer provisional
    log = io.StringIO()
    calibrate.calibrated_costs(target, draft, SdpaBackend(), progress=log)
    assert calls == [1, 1] and "quiet now" in log.getvalue()
    assert json.loads(path.read_text())["provisional"] is False


def test_an_older_table_without_the_flag_is_judged_by_its_load(fresh, monkeypatch):
    target, draft = tiny_pair(0)
    calls = _counting(monkeypatch)
    _load(monkeypatch, 0.0)
    calibrate.calibrated_costs(target, draft, SdpaBackend(), progress=None)
    (path,) = fresh.iterdir()
    data = json.loads(path.read_text())
    del data["provisional"], data["cores"]
    path.write_text(json.dumps(dict(data, loadavg=1000.0)))
    calibrate.calibrated_costs(target, draft, SdpaBackend(), progress=None)
    assert calls == [1, 1]


def test_an_unreadable_table_is_moved_aside_and_measured_again(fresh, monkeypatch, capsys):
    target, draft = tiny_pair(0)
    calls = _counting(monkeypatch)
    calibrate.calibrated_costs(target, draft, SdpaBackend(), progress=None)
    (path,) = fresh.iterdir()
    path.write_text(path.read_text()[:40])  # truncated
    calibrate.calibrated_costs(target, draft, SdpaBackend(), progress=None)
    assert calls == [1, 1]
    assert f"{path} is damaged (unreadable: JSONDecodeError" in capsys.readouterr().err
    assert len(list(fresh.glob("*.json.bad-*"))) == 1 and json.loads(path.read_text())["costs"]


@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "Permission denied"),
                                   OSError(errno.ENOSPC, "No space left on device")])  # fmt: skip
def test_tree_auto_generates_when_the_cache_cannot_be_written(fresh, monkeypatch, error):
    """Tests run as root, where a chmod'ed directory stays writable: the write is made to fail."""
    target, draft = tiny_pair(0)
    calls = _counting(monkeypatch)

    def cannot_write(*args, **kwargs):
        raise error

    monkeypatch.setattr(calibrate, "atomic_write", cannot_write)
    log = io.StringIO()
    monkeypatch.setattr(calibrate.sys, "stderr", log)
    monkeypatch.setattr(calibrate.calibrated_costs, "__kwdefaults__", {"refresh": False, "progress": log})
    want = target.generate(P, do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    for _ in range(2):
        got = treespec.generate(target, draft, P, max_new_tokens=8, tree="auto", eos_token_id=[])
        assert torch.equal(got.sequences, want)
    assert calls == [1]  # the second generation reuses the costs kept in memory
    assert log.getvalue().count("cannot save the measured costs") == 1
    assert error.strerror in log.getvalue() and "keeping them in memory" in log.getvalue()
    assert not fresh.exists() or not list(fresh.iterdir())
