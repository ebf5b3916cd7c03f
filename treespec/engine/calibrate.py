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
from treespec.loading.cache import atomic_write, cache_dir
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
                  rounds: int = ROUNDS, progress: TextIO | None = sys.stderr) -> CostTable:  # fmt: skip
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
                       f"now will be pessimistic; to measure again later, delete {cache_dir() / 'calibration'}\n")  # fmt: skip
    t = _time_sizes(target, backend, "target", target_sizes, rounds, report)
    d = _time_sizes(draft, backend, "draft", draft_sizes, rounds, report)
    if progress is not None:
        progress.write("done\n")
    return CostTable(t, d, overhead=0.0, device=name)


def calibrated_costs(target: PreTrainedModel, draft: PreTrainedModel, backend: Backend, *,
                     refresh: bool = False, progress: TextIO | None = sys.stderr) -> CostTable:  # fmt: skip
    """The pair's CostTable on this machine: read from cache_dir()/calibration/ when a table with
    the same calibration_key is there (and not `refresh`), else measured and written there.
    Measured while other processes load the machine, the table is pessimistic for multi-thread
    forwards (a descheduled thread stalls the others at every barrier): a table measured with a
    CPU load above the core count is measured again once the load is below half of it; delete
    the file, or pass refresh=True, to measure again at any time."""
    key = calibration_key(target, draft, backend)
    path = cache_dir() / "calibration" / f"{_key_hash(key)}.json"
    if path.exists() and not refresh:
        try:
            data = json.loads(path.read_text())
            if data.get("key") == json.loads(json.dumps(key, default=str)) and not _busy_then_quiet_now(data):
                return CostTable.from_dict(data["costs"])
        except (ValueError, KeyError, TypeError):
            pass  # unreadable or from another format: measure again and overwrite
    costs = measure_costs(target, draft, backend, progress=progress)
    with atomic_write(path, suffix=".json") as tmp:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # a busy machine inflates the costs
        tmp.write_text(json.dumps({"key": key, "costs": costs.to_dict(), "loadavg": load,
                                   "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1, default=str))  # fmt: skip
    return costs


def _busy_then_quiet_now(data: dict) -> bool:
    """A table measured while the CPU was overloaded, now that it is quiet: worth measuring again
    (a busy machine inflates multi-threaded forward costs several times over)."""
    cores, then = os.cpu_count() or 1, data.get("loadavg")
    if then is None or not hasattr(os, "getloadavg") or not data.get("key", {}).get("device", "").startswith("cpu"):
        return False
    return then > cores and os.getloadavg()[0] < cores / 2


def resolve_auto(config: AutoTreeConfig, target: PreTrainedModel, draft: PreTrainedModel,
                 backend: Backend) -> tuple[StaticTree, TreeChoice]:  # fmt: skip
    """The static tree tree="auto" stands for (the root alone when the target alone is
    predicted fastest), and the choice with its reason."""
    costs = config.costs or calibrated_costs(target, draft, backend)
    choice = config.choose(costs)
    topo = choice.topology or TreeTopology((-1,), (0,))
    return StaticTree(topo), choice
