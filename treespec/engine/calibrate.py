"""Measure this machine's forward costs for a model pair, cache them, and resolve tree="auto".

`calibrated_costs` times one forward of n new tokens of the target and of the draft at the sizes
a step can take (verification of n tree nodes; one draft level of n nodes), through the
generation's own backend and the caches it makes, after a short context. Each size's minimum
over a few rounds is kept (rounds are round-robin over the sizes, so a busy moment of a shared
machine touches every size alike). On the CPU every small size is measured: the cost of n
tokens is not monotone there (matmul kernels are chosen by shape; 4 and 8 tokens can cost less
than 3 and 7), so the chooser must not interpolate across them.

The table is cached on disk as JSON under cache_dir()/calibration/, one file per key
(device name, torch threads on the CPU, each model's class and config, dtype, backend class and
name, this module's format): a second generation with the same pair on the same machine reads it
instead of measuring. `resolve_auto` turns an AutoTreeConfig into the static tree
treespec.tree.auto.choose_tree picks under those costs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Sequence, TextIO

import torch
from transformers import PreTrainedModel

from treespec.backends.base import Backend
from treespec.drafting.static import StaticTree
from treespec.errors import CacheError
from treespec.loading.cache import atomic_write, cache_dir, move_aside
from treespec.tree.auto import AutoTreeConfig, CostTable, TreeChoice
from treespec.tree.topology import TreeTopology

__all__ = ["calibrated_costs", "calibration_key", "measure_costs", "resolve_auto"]

CALIBRATION_VERSION = 1  # part of the key: a change to what is measured invalidates old tables
CONTEXT = 128  # committed tokens before the timed forwards (attention cost grows with it; slowly at this size)
# sizes n of one forward: verification of 1 + drafts (target); one draft level (draft)
CPU_TARGET_SIZES = (*range(1, 13), 16, 24, 32)  # larger trees never pay on a CPU: extrapolated
CPU_DRAFT_SIZES = (1, 2, 3, 4, 6, 8, 12, 16)
GPU_TARGET_SIZES = (1, 2, 4, 8, 16, 32, 65)  # each new shape is a CUDA graph capture (and a compilation)
GPU_DRAFT_SIZES = (1, 2, 4, 8, 16, 32)
ROUNDS = 2  # at least this many timed rounds per model...
MIN_SECONDS = 1.0  # ...and more (up to MAX_ROUNDS) until this long: a fast forward's minimum needs more samples
MAX_ROUNDS = 8


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU's model and torch's thread count (costs follow both)."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{device.type}: {model}, {torch.get_num_threads()} threads"


def _model_identity(model: PreTrainedModel) -> dict:
    config = model.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "_commit_hash"):
        config.pop(key, None)  # where it came from is not what it costs
    return {"class": type(model).__name__, "config": config, "dtype": str(model.dtype)}


def calibration_key(target: PreTrainedModel, draft: PreTrainedModel, backend: Backend) -> dict:
    """What the costs depend on: device, pair, dtype, backend (the cache file's name is its hash)."""
    return {
        "version": CALIBRATION_VERSION,
        "device": device_name(target.device),
        "target": _model_identity(target),
        "draft": _model_identity(draft),
        "backend": f"{type(backend).__name__}:{backend.name}",
    }


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


class _CurrentStderr:
    """sys.stderr as it is when written to (a default bound at import would keep a stream that
    a caller has since replaced and closed)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


STDERR = _CurrentStderr()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_sizes(model: PreTrainedModel, backend: Backend, role: str, sizes: Sequence[int], rounds: int,
                report) -> dict[int, float]:  # fmt: skip
    """{n: min seconds of one forward of n new tokens after CONTEXT committed ones}, over `rounds`
    rounds, or more (up to MAX_ROUNDS) until MIN_SECONDS have passed. On CUDA an untimed round
    first: a shape's first forwards compile and capture it."""
    device = model.device
    cache = backend.make_cache(model, CONTEXT + max(sizes) + 8, role)
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, CONTEXT), generator=gen).to(device)
    causal = torch.ones(CONTEXT, CONTEXT, dtype=torch.bool, device=device).tril()
    best = {n: float("inf") for n in sizes}
    with torch.no_grad():
        backend.forward(model, cache, prompt, torch.arange(CONTEXT, device=device)[None], causal, last_only=True)
        cache.commit_all()
        drop = torch.zeros(max(sizes), dtype=torch.long, device=device)
        warm, t0 = int(device.type == "cuda"), time.perf_counter()
        r = -warm
        while r < rounds or (r < MAX_ROUNDS and time.perf_counter() - t0 < MIN_SECONDS):
            r += 1
            for n in sizes:
                ids = torch.randint(0, vocab, (1, n), generator=gen).to(device)
                pos = torch.arange(CONTEXT, CONTEXT + n, device=device)[None]
                mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()
                _sync(device)
                start = time.perf_counter()
                backend.forward(model, cache, ids, pos, mask)
                _sync(device)
                if r > 0:
                    best[n] = min(best[n], time.perf_counter() - start)
                cache.commit(drop[:n], 0)  # drop the timed entries: every forward sees the same context
                report(f"{role} round {r}, {n} tokens")
    return best


def measure_costs(target: PreTrainedModel, draft: PreTrainedModel, backend: Backend, *,
                  target_sizes: Sequence[int] | None = None, draft_sizes: Sequence[int] | None = None,
                  rounds: int = ROUNDS, progress: TextIO | None = STDERR) -> CostTable:  # fmt: skip
    """Time the pair's forwards now (no cache); see the module docstring. progress: where the
    one progress line goes (None: silent)."""
    cuda = target.device.type == "cuda"
    target_sizes = tuple(target_sizes or (GPU_TARGET_SIZES if cuda else CPU_TARGET_SIZES))
    draft_sizes = tuple(draft_sizes or (GPU_DRAFT_SIZES if cuda else CPU_DRAFT_SIZES))
    name = device_name(target.device)
    t0 = time.perf_counter()

    def report(where: str) -> None:
        if progress is not None:
            progress.write(f"\rtree='auto': measuring forward costs on {name} (once per machine and model pair): "
                           f"{where}, {time.perf_counter() - t0:.0f} s   ")  # fmt: skip
            progress.flush()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if progress is not None and not cuda and load > (os.cpu_count() or 1):
        progress.write(f"tree='auto': this machine is busy (load {load:.1f} on {os.cpu_count()} cores): the costs measured "
                       "now will be pessimistic: they are kept as provisional and measured again on a quieter run\n")  # fmt: skip
    t = _time_sizes(target, backend, "target", target_sizes, rounds, report)
    d = _time_sizes(draft, backend, "draft", draft_sizes, rounds, report)
    if progress is not None:
        progress.write("done\n")
    return CostTable(t, d, overhead=0.0, device=name)


# Costs measured where the cache cannot keep them (a read-only or full cache directory), by key
# hash: later generations of this process reuse them instead of measuring again.
_IN_MEMORY: dict[str, CostTable] = {}
_ANNOUNCED: set[str] = set()  # tables whose provenance line this process has printed


def _loadavg() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _busy(load: float | None, cores: int) -> bool:
    """Over one runnable process per core: multi-threaded forwards stall, costs come out high."""
    return load is not None and load > cores


def _quiet(cores: int) -> bool:
    load = _loadavg()
    return load is not None and load < cores / 2


def calibrated_costs(target: PreTrainedModel, draft: PreTrainedModel, backend: Backend, *,
                     refresh: bool = False, progress: TextIO | None = STDERR) -> CostTable:  # fmt: skip
    """The pair's CostTable on this machine: read from cache_dir()/calibration/ when a table with
    the same calibration_key is there (and not `refresh`), else measured and written there.

    Every process that uses a cached table says once where it comes from: when it was measured
    and under what load. A table measured on a CPU while other processes loaded it above one
    per core is pessimistic (a descheduled thread stalls the others at every barrier): it is
    marked provisional and measured again by the first run that finds the load below half the
    cores. An unreadable table is moved aside (one line) and measured again. When the cache
    cannot be written (read-only, disk full) the measurement is kept in memory for this
    process, with one line saying so. Delete the file, or pass refresh=True, to measure again."""
    key = calibration_key(target, draft, backend)
    digest = _key_hash(key)
    if not refresh and digest in _IN_MEMORY:
        return _IN_MEMORY[digest]
    path = cache_dir() / "calibration" / f"{digest}.json"
    data = None if refresh else _read_table(path, key)
    cpu = target.device.type != "cuda"
    cores = os.cpu_count() or 1
    if data is not None:
        provisional = cpu and bool(data.get("provisional", _busy(data.get("loadavg"), cores)))
        if not (provisional and _quiet(cores)):
            _announce(path, data, provisional, progress)
            return CostTable.from_dict(data["costs"])
        if progress is not None:
            progress.write(f"tree='auto': the costs in {path} were measured under load {data.get('loadavg')}; this "
                           f"machine is quiet now (load {_loadavg():.1f}): measuring them again\n")  # fmt: skip
    before = _loadavg()
    costs = measure_costs(target, draft, backend, progress=progress)
    loads = [x for x in (before, _loadavg()) if x is not None]
    load = max(loads) if loads else None  # the 1-minute average, over the measurement
    record = {"key": key, "costs": costs.to_dict(), "loadavg": load, "cores": cores,
              "provisional": cpu and _busy(load, cores), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    try:
        with atomic_write(path, suffix=".json") as tmp:
            tmp.write_text(json.dumps(record, indent=1, default=str))
    except OSError as err:
        _IN_MEMORY[digest] = costs
        if progress is not None:
            progress.write(f"tree='auto': cannot save the measured costs in {path.parent} ({err.strerror or err}); "
                           "keeping them in memory for this process (a new process measures again; point "
                           "TREESPEC_CACHE at a writable directory to keep them)\n")  # fmt: skip
    _ANNOUNCED.add(digest)  # the measurement has said what it did
    return costs


def _read_table(path: Path, key: dict) -> dict | None:
    """The cached record for `key`, or None (absent; or unreadable, then moved aside)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        data = json.loads(text)
        if data.get("key") != json.loads(json.dumps(key, default=str)):
            raise ValueError("its key is not this pair's")
        CostTable.from_dict(data["costs"])
        return data
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        try:
            move_aside(path, f"unreadable: {type(err).__name__}: {err}"[:200])
        except CacheError:
            pass  # a read-only cache: measured again and kept in memory
        return None


def _announce(path: Path, data: dict, provisional: bool, progress: TextIO | None) -> None:
    """One line per process and table: where the costs come from, when and under what load."""
    if progress is None or path.stem in _ANNOUNCED:
        return
    _ANNOUNCED.add(path.stem)
    load, cores = data.get("loadavg"), data.get("cores")
    under = ""
    if isinstance(load, (int, float)):
        under = f" at load {load:.1f}" + (f" on {cores} cores" if cores else "")
    note = " (provisional: measured under load; measured again on a quieter run)" if provisional else ""
    progress.write(f"tree='auto': using forward costs measured {data.get('date', 'at an unknown date')}{under}{note}, "
                   f"from {path} (delete it to measure again)\n")  # fmt: skip


def resolve_auto(config: AutoTreeConfig, target: PreTrainedModel, draft: PreTrainedModel,
                 backend: Backend) -> tuple[StaticTree, TreeChoice]:  # fmt: skip
    """The static tree tree="auto" stands for (the root alone when the target alone is
    predicted fastest), and the choice with its reason."""
    costs = config.costs or calibrated_costs(target, draft, backend)
    choice = config.choose(costs)
    topo = choice.topology or TreeTopology((-1,), (0,))
    return StaticTree(topo), choice
