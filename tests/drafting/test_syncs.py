"""One host sync per step, for every drafter (CPU check).

On CUDA, a device-to-host read (`.item()`, `.tolist()`, `bool(t)`, `int(t)`), an op whose output
size depends on the data (`nonzero`, `masked_select`, `unique`, a boolean-mask index) or a tensor
made from Python data (a host-to-device copy) stalls the host until the device catches up. The
engine allows itself one per step, in `SpeculativeEngine._read`. `count_syncs` patches those
entry points to count their calls, so that a CPU run catches what
`torch.cuda.set_sync_debug_mode("error")` catches on the GPU (tests/test_gpu.py), where an index
by a 0-dim tensor (read as a host int) and a Python number assigned into a tensor (copied from
the host) sync too.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import treespec
from treespec.testing import tiny_pair

LOOP = str(Path(treespec.__file__).parent / "engine" / "loop.py")
TREESPEC = str(Path(treespec.__file__).parent)
ALLOWED = (LOOP, "_read")  # the step's documented sync point
ORIGINAL_GETITEM = torch.Tensor.__getitem__


@dataclass
class Syncs:
    allowed: int = 0
    calls: list[str] = field(default_factory=list)  # the others: "what at file:line"


def _syncing_index(index) -> bool:
    """A boolean mask (its size depends on the data) or a 0-dim integer tensor (read as a host
    int) among the indices."""
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and (i.dtype == torch.bool or i.dim() == 0) for i in items)


def _syncing_assignment(self, index, value) -> bool:
    """A syncing index, or a Python number assigned by a tensor index or to a single element (on
    CUDA, the number is copied from the host first; a slice of several elements is filled)."""
    if _syncing_index(index):
        return True
    if not isinstance(value, (bool, int, float)):
        return False
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, (torch.Tensor, list)) for i in items) or ORIGINAL_GETITEM(self, index).dim() == 0


@contextlib.contextmanager
def count_syncs():
    """Count host syncs while the block runs: Syncs.allowed (those from the engine's `_read`)
    and Syncs.calls (every other one, with where it was made)."""
    syncs = Syncs()
    saved = []

    def record(what: str) -> None:
        frame = sys._getframe(2)
        if frame.f_code is _IndexSyncs.__torch_function__.__code__:
            return  # a patched method called again by the mode's handler: counted at its first call
        if (frame.f_code.co_filename, frame.f_code.co_name) == ALLOWED:
            syncs.allowed += 1
        else:
            syncs.calls.append(f"{what} at {frame.f_code.co_filename}:{frame.f_lineno}")

    def patch(owner, name, when=lambda *a, **k: True, label=None):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if when(*args, **kwargs):
                record(label or name)
            return original(*args, **kwargs)

        saved.append((owner, name, original))
        setattr(owner, name, wrapper)

    def from_treespec(*_a, **_k) -> bool:  # a tensor from Python data, made by treespec's own code
        return sys._getframe(2).f_code.co_filename.startswith(TREESPEC)

    for name in ("item", "tolist", "nonzero", "masked_select", "unique", "unique_consecutive", "numpy",
                 "__bool__", "__int__", "__float__", "__index__"):
        patch(torch.Tensor, name)
    # indexing through a torch function mode, not by patching: a __getitem__ set on torch.Tensor
    # (even set back) gives the class a sequence slot for good, and torch.tensor([t, 4]) then
    # takes a 0-dim t for a sequence (len() of a 0-d tensor) in every later test of the process
    indexing = _IndexSyncs(record)
    for name in ("nonzero", "masked_select", "unique", "unique_consecutive", "argwhere"):
        patch(torch, name)
    patch(torch, "where", lambda *args, **kwargs: len(args) + len(kwargs) == 1, "where(condition)")
    patch(torch, "repeat_interleave", lambda x, repeats=None, *a, **k: isinstance(repeats, torch.Tensor)
          and k.get("output_size") is None, "repeat_interleave(tensor repeats)")  # fmt: skip
    patch(torch, "tensor", from_treespec, "torch.tensor(data)")
    try:
        with indexing:
            yield syncs
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


class _IndexSyncs(torch.overrides.TorchFunctionMode):
    """Records an index or an assignment that syncs (see `_syncing_index`, `_syncing_assignment`);
    torch runs a mode's handler with the mode off, so the handler's own indexing is not seen."""

    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and _syncing_index(args[1]):
            self.record("index by mask or 0-dim tensor")
        elif func is torch.Tensor.__setitem__ and _syncing_assignment(*args):
            self.record("assignment by mask or 0-dim tensor, or of a number")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(0, vocab_size=64)


PROMPT = torch.tensor([[3, 5, 7, 9, 11, 3, 5, 7, 9, 11, 3, 5]])  # repeats: lookup finds matches
DRAFTERS = {
    "static": dict(tree=[2, 2, 1]),
    "linear": dict(method="linear", tree=[1, 1, 1]),
    "autoregressive": dict(method="autoregressive"),
    "dynamic": dict(tree=treespec.DynamicTreeConfig(width=2, children=2, depth=3, budget=6)),
    "adaptive": dict(tree=treespec.AdaptiveTreeConfig(widths=(2, 1), min_depth=1, max_depth=3)),
    "lookup": dict(tree=[2, 1], lookup=True),
    "overlap": dict(tree=[2, 2, 1], overlap=True),
    "dynamic overlap": dict(tree=treespec.DynamicTreeConfig(width=2, children=2, depth=3, budget=6), overlap=True),
}
SAMPLING = {"greedy": {}, "sampling": dict(temperature=0.8)}


def second_step(pair, kwargs: dict, sampling: dict):
    """An iterator of a generation whose prefill and first step have run: its next step is a
    steady-state one (buffers made, caches warm)."""
    target, draft = pair
    kwargs = dict(kwargs, **sampling)
    if sampling:
        kwargs["generator"] = torch.Generator().manual_seed(0)
    if kwargs.get("lookup") and sampling:
        kwargs["acceptance"] = "rejection"
    use_draft = kwargs.get("method") != "autoregressive"
    steps = iter(treespec.stream(target, draft if use_draft else None, PROMPT, max_new_tokens=24,
                                 eos_token_id=[], attention="sdpa", **kwargs))  # fmt: skip
    next(steps)
    return steps


@pytest.mark.parametrize("sampling", list(SAMPLING))
@pytest.mark.parametrize("drafter", list(DRAFTERS))
def test_a_step_syncs_with_the_host_once(pair, drafter, sampling):
    steps = second_step(pair, DRAFTERS[drafter], SAMPLING[sampling])
    with count_syncs() as syncs:
        next(steps)
    assert syncs.calls == [] and syncs.allowed == 1


def test_the_check_catches_an_item_in_a_drafter_step(pair, monkeypatch):
    """The check can fail: a drafter step that reads one value on the host is caught."""
    from treespec.drafting.static import TreeDrafter

    original = TreeDrafter.draft

    def reads_a_value(self, *args, **kwargs):
        tree = original(self, *args, **kwargs)
        tree.tokens[0].item()
        return tree

    monkeypatch.setattr(TreeDrafter, "draft", reads_a_value)
    steps = second_step(pair, DRAFTERS["static"], {})
    with count_syncs() as syncs:
        next(steps)
    assert syncs.allowed == 1 and len(syncs.calls) == 1 and syncs.calls[0].startswith("item at " + __file__)


SYNCS = {
    "mask index": lambda x: x[x > 1],
    "mask assignment": lambda x: x.__setitem__(x > 1, 0),
    "0-dim tensor index": lambda x: x[x.argmax()],
    "number into one element": lambda x: x.__setitem__(0, 5),
    "number by tensor index": lambda x: x.__setitem__(torch.tensor([0, 1]), 5),
    "nonzero": lambda x: torch.nonzero(x),
    "bool": lambda x: bool(x.any()),
    "tensor from data": lambda x: _from_data_in_treespec(),
}
NOT_SYNCS = {  # fixed shapes, nothing read or copied from the host
    "number into a slice": lambda x: x.__setitem__(slice(0, 1), 5),
    "index_select": lambda x: x.index_select(0, x.argmax().view(1)),
    "index_fill_": lambda x: x.index_fill_(0, x[:2].clone(), 5),
    "where": lambda x: torch.where(x > 1, x, 0),
}


@pytest.mark.parametrize("sync", list(SYNCS))
def test_the_check_catches_each_kind_of_sync(sync):
    with count_syncs() as syncs:
        SYNCS[sync](torch.arange(4))
    assert len(syncs.calls) == 1 and syncs.allowed == 0


@pytest.mark.parametrize("op", list(NOT_SYNCS))
def test_the_check_passes_fixed_shape_ops(op):
    with count_syncs() as syncs:
        NOT_SYNCS[op](torch.arange(4))
    assert syncs.calls == [] and syncs.allowed == 0


def _from_data_in_treespec():
    """torch.tensor(data) as treespec's own code would call it (the check only counts those)."""
    code = compile("torch.tensor([1, 2])", str(Path(TREESPEC) / "fake.py"), "eval")
    return eval(code, {"torch": torch})


@pytest.mark.parametrize("sampling", list(SAMPLING))
@pytest.mark.parametrize("tree", [[2, 2, 1], "chain-3", "dynamic"], ids=str)
def test_a_step_with_a_draft_head_syncs_with_the_host_once(pair, tree, sampling):
    """A draft head (drafting/head.py) in the draft's place: its feature bookkeeping (parent
    features per level, the accepted path's features, its prefill) adds no host sync."""
    from treespec.heads.model import DraftHead

    target = pair[0]
    head = DraftHead.for_target(target, name="tiny", seed=3)
    method = "linear" if tree == "chain-3" else "tree"
    steps = second_step((target, head), dict(method=method, tree=tree), SAMPLING[sampling])
    with count_syncs() as syncs:
        next(steps)
    assert syncs.calls == [] and syncs.allowed == 1
