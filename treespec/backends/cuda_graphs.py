"""CUDA graphs for the decode loop's fixed-shape forwards.

An eager transformers forward on the GPU machine costs 20-27 ms of host time (Python, module
calls, one kernel launch per op) whatever the model size, while a 1.5B bf16 forward needs about
1 ms of memory traffic. Every forward inside a decode step has a shape fixed by the tree (the
draft's first forward over m = 1 or 2 pending tokens, one per draft level at that level's
width F_d, the verification over N nodes), so each is captured once as a CUDA graph and replayed:
one launch instead of hundreds.

`GraphedBackend` wraps a backend whose forward is graph-safe with a `StaticTreeKVCache`
(`FlashBackend`, `StaticSdpaBackend`: all positions and masks come from device tensors):

- the first call of a shape (model, cache, n, s, last_only) copies its inputs into the shape's
  static buffers (ids (1, n), positions (1, n), block mask (n, s)) and runs on them outside
  any capture: it warms up lazy initialisation (cuBLAS handles, flash-attn's module load) and
  compiles the shape, which a capture cannot do;
- the second call captures the forward on the same buffers (so a compiled forward's guards
  hold and nothing recompiles mid-capture), keeps its output logits, then replays it;
- later calls copy their inputs into the static buffers, advance the cache's host counter,
  and replay. The returned logits are the graph's output buffer: valid until the same shape
  is replayed again (the engine consumes them at once). A forward asked for its hidden states
  (`hidden=True`, what a draft head reads) is its own shape, captured with both outputs.

A run of several forwards with the tensor work between them (a static tree's draft levels:
propose children, run the level, propose again) is captured as one graph by `run_captured`,
on the same first-call-warms, second-call-captures protocol: one launch for the whole run
instead of a launch per forward plus the host's Python and small kernels between them, which on
a GPU cost more than a small draft forward itself (docs/gpu.md). Its forwards run the compiled
model directly inside that capture; the host halves of their cache writes (`reserve`) are
recorded and redone at each replay.

Prompt chunks of the fixed PREFILL_CHUNKS sizes are captured like every other shape; other
prompt-sized forwards and forwards with more than `max_graph_tokens` new tokens run eagerly
through the wrapped backend; forwards on the CPU run without graphs.

With compilation on (the default on CUDA) every graphed forward is the model's torch.compile'd forward
(treespec/backends/compiled.py: inductor, fullgraph, static shapes): the warm-up call of a shape
compiles it, the capture records the fused kernels. On the CPU, compile=True runs the compiled
forward without graphs (inductor's C++ backend; what the CPU tests use); compile=False turns
it off everywhere.

Graphs hold raw pointers to the cache buffers, so the backend owns the caches: `make_cache`
hands out one persistent StaticTreeKVCache per (model, role), reset for each generation, and
reallocates it (dropping its graphs) only when a generation needs more room. Create one
GraphedBackend and pass it to every `generate` call to capture each shape once.

Dimension letters: docs/dimensions.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from treespec.backends.base import PREFILL_CHUNKS, Backend, ForwardOutput, TreeCache
from treespec.backends.compiled import CompiledForwards
from treespec.backends.static_cache import StaticTreeKVCache

CAPACITY_ROUNDING = 256  # static caches are allocated in steps of this many slots
# last_only forwards in the decode loop: the draft's first of a step, over its pending tokens padded
# to a power of two (drafting/base.py feed_pending), and prompt chunks of the PREFILL_CHUNKS sizes;
# any other last_only forward (a caller's own prompt) runs eagerly, since capturing or compiling it
# would cost a capture (and a compilation) per length
MAX_PENDING = 16
# captured runs kept at once (run_captured): a kept Speculator's drafter needs one (an adaptive
# tree one per depth); each holds its graph and its caller's buffers
MAX_RUNS = 16


@dataclass
class CapturedForward:
    """One captured forward: static inputs, the graph, and its output buffer."""

    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor  # (1, n)
    position_ids: torch.Tensor  # (1, n)
    block_mask: torch.Tensor  # (n, s)
    logits: torch.Tensor  # (n, V) or (1, V)
    hidden: torch.Tensor | None = None  # (n, Hm): last hidden states, for a shape captured with hidden=True
    mask_source: torch.Tensor | None = None  # the caller's mask last copied in, and its version
    mask_version: int = -1

    def feed(self, input_ids: torch.Tensor, position_ids: torch.Tensor, block_mask: torch.Tensor) -> None:
        self.input_ids.copy_(input_ids)
        self.position_ids.copy_(position_ids)
        # the engine passes the same mask tensor every step (ancestor rows of a level): copy it
        # only when it is another tensor or was modified in place since (its _version moved)
        if block_mask is not self.mask_source or block_mask._version != self.mask_version:
            self.block_mask.copy_(block_mask)
            self.mask_source, self.mask_version = block_mask, block_mask._version


@dataclass
class CapturedRun:
    """A captured `run_captured` function: the graph, and the host counters its forwards moved
    (redone at each replay, since a replay runs no Python)."""

    fn: Callable[[], None]  # held: its tensors (the graph's raw pointers) live as long as the graph
    graph: torch.cuda.CUDAGraph | None = None  # None after the warm-up call, before the capture
    reserves: list[tuple[StaticTreeKVCache, int]] = field(default_factory=list)  # (cache, n) per forward


@dataclass
class GraphStats:
    captures: int = 0  # per-forward graphs and captured runs
    capture_seconds: float = 0.0
    replays: int = 0  # per-forward graphs and captured runs
    run_replays: int = 0  # of which captured runs (run_captured)
    eager_calls: int = 0


class GraphedBackend:
    """Replays captured CUDA graphs of `inner.forward` for every fixed shape of the decode loop.

    inner: a backend whose forward is graph-safe with StaticTreeKVCache.
    max_graph_tokens: forwards with more new tokens than this run eagerly (prefill chunks).
    min_capacity: smallest static cache to allocate (size it for the longest prompt + new
        tokens of a benchmark so that caches, and their graphs, are made once).
    max_graphs: shapes beyond this many run eagerly (trees whose shape changes every step
        would otherwise capture without end; each graph holds its own activation memory).
    compile: run the model's torch.compile'd forward in the graphs (compiled.py); False keeps
        the eager forward (the graphs then record transformers' own kernels); None (default)
        compiles on CUDA only, True on the CPU too (inductor's C++ backend, no graphs).
    compile_mode: inductor mode for compile=True (None: inductor's default).
    compile_backend: torch.compile backend ('inductor'; CPU tests use 'aot_eager').
    graphs: False runs every forward without capturing (compiled or eager, over the static
        caches): what make_backend(graphs=False, compile=True) gives.
    capture_runs: False captures each forward of a `run_captured` function as its own graph
        instead of the whole function as one (what the one graph saves, measured).
    """

    def __init__(
        self,
        inner: Backend,
        *,
        max_graph_tokens: int = 256,
        min_capacity: int = 0,
        max_graphs: int = 128,
        compile: bool | None = None,
        compile_mode: str | None = None,
        compile_backend: str = "inductor",
        graphs: bool = True,
        capture_runs: bool = True,
    ):
        self.inner = inner
        self.graphs = graphs
        self.capture_runs = capture_runs
        self.compile = compile
        self.compiler = CompiledForwards(compile_mode, compile_backend) if compile is not False else None
        self.max_graph_tokens = max_graph_tokens
        self.min_capacity = min_capacity
        self.max_graphs = max_graphs
        self.stats = GraphStats()
        self._graphs: dict[tuple, CapturedForward] = {}
        self._static: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # warmed-up inputs
        self._caches: dict[tuple[int, str], tuple[PreTrainedModel, StaticTreeKVCache]] = {}
        self._capture_streams: dict[int, torch.cuda.Stream] = {}
        self._runs: dict[tuple, CapturedRun] = {}  # run_captured's, by (id(cache), key)
        self._recording: list[tuple[StaticTreeKVCache, int]] | None = None  # inside run_captured

    @property
    def name(self) -> str:
        return self.inner.name

    def check_model(self, model: PreTrainedModel) -> None:
        self.inner.check_model(model)

    def make_cache(self, model: PreTrainedModel, capacity: int, role: str = "target") -> StaticTreeKVCache:
        """The persistent static cache of (model, role), emptied, with room for `capacity`."""
        key = (id(model), role)
        held = self._caches.get(key)
        if held is None or held[0] is not model or held[1].capacity < capacity:
            if held is not None:
                self._drop_graphs(held[1])
            size = -(-max(capacity, self.min_capacity) // CAPACITY_ROUNDING) * CAPACITY_ROUNDING
            held = (model, StaticTreeKVCache.for_model(model, size))
            self._caches[key] = held  # the model is held too, so its id() cannot be reused
        held[1].reset()
        return held[1]

    def reset(self) -> None:
        """Drop every graph and cache (frees their GPU memory)."""
        if self.compiler is not None:
            self.compiler.reset()
        self._graphs.clear()
        self._static.clear()
        self._runs.clear()
        self._caches.clear()
        self._capture_streams.clear()

    def release(self, model: PreTrainedModel) -> None:
        """Drop the caches of `model` (every role) and their graphs (frees their GPU memory); the
        compiled forwards stay (they hold no cache)."""
        for key in [k for k, (m, _) in self._caches.items() if m is model]:
            self._drop_graphs(self._caches.pop(key)[1])

    def _drop_graphs(self, cache: StaticTreeKVCache) -> None:
        for key in [k for k in self._graphs if k[0] == id(cache)]:
            del self._graphs[key]
        for key in [k for k in self._static if k[0] == id(cache)]:
            del self._static[key]
        for key in [k for k in self._runs if k[0] == id(cache)]:
            del self._runs[key]

    def forward(
        self,
        model: PreTrainedModel,
        cache: TreeCache,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        block_mask: torch.Tensor,
        last_only: bool = False,
        hidden: bool = False,
    ) -> torch.Tensor | ForwardOutput:
        """Same contract as the wrapped backend's forward: input_ids, position_ids LongTensor
        (1, n), block_mask BoolTensor (n, s) -> logits (n, V), or (1, V) with last_only; with
        hidden, a ForwardOutput whose hidden states (n, Hm) are the graph's second output buffer.
        Only static caches (the ones make_cache hands out) are captured; any other runs eagerly."""
        extra = {"hidden": True} if hidden else {}  # the default call stays the inner backend's plain one
        n, s = block_mask.shape
        if self._recording is not None:  # inside run_captured: part of its one graph, no graph of its own
            self._recording.append((cache, n))
            return self._run(model, cache, input_ids, position_ids, block_mask, last_only, hidden)
        prompt_chunk = last_only and n > MAX_PENDING and n not in PREFILL_CHUNKS
        if not isinstance(cache, StaticTreeKVCache) or n > self.max_graph_tokens or prompt_chunk:
            self.stats.eager_calls += 1
            return self.inner.forward(model, cache, input_ids, position_ids, block_mask, last_only, **extra)
        if input_ids.device.type != "cuda" or not self.graphs:
            self.stats.eager_calls += 1
            if self.compile or (self.compile is None and input_ids.device.type == "cuda"):  # the CPU only when asked
                return self._run(model, cache, input_ids, position_ids, block_mask, last_only, hidden)
            return self.inner.forward(model, cache, input_ids, position_ids, block_mask, last_only, **extra)
        key = (id(cache), id(model), n, s, last_only, hidden)
        captured = self._graphs.get(key)
        if captured is None:
            if len(self._graphs) >= self.max_graphs:
                self.stats.eager_calls += 1
                return self._run(model, cache, input_ids, position_ids, block_mask, last_only, hidden)
            static = self._static.get(key)
            if static is None:
                # warm-up, outside any capture: lazy initialisation, and the compilation of the
                # shape. It runs on the very buffers the capture will use, so that the compiled
                # forward's guards (shapes, strides) hold then and nothing compiles mid-capture.
                static = self._static[key] = tuple(x.clone(memory_format=torch.contiguous_format) for x in (input_ids, position_ids, block_mask))
                self.stats.eager_calls += 1
                return self._run(model, cache, *static, last_only, hidden)
            captured = self._capture(model, cache, *static, last_only, hidden)
            self._graphs[key] = captured
        captured.feed(input_ids, position_ids, block_mask)
        cache.reserve(n)  # the host half of begin_forward; the device half is in the graph
        captured.graph.replay()
        self.stats.replays += 1
        return ForwardOutput(captured.logits, captured.hidden) if hidden else captured.logits

    def run_captured(self, cache: TreeCache, key: object, fn: Callable[[], None]) -> None:
        """See `Backend.run_captured`. fn's forwards must all write `cache`, a static cache this
        backend made, on CUDA; otherwise (and with graphs off) fn just runs."""
        if not (self.graphs and self.capture_runs and isinstance(cache, StaticTreeKVCache)
                and cache.kv.device.type == "cuda"):
            fn()
            return
        full_key = (id(cache), key)
        run = self._runs.get(full_key)
        if run is None:
            if len(self._runs) >= MAX_RUNS:  # drop the oldest (a drafter made per call, not kept): its graph and buffers go
                del self._runs[next(iter(self._runs))]
            # first call: compiles each forward's shape, outside any capture. fn is held from
            # here on, so its tensors outlive the graph and a key made of an id() stays unique
            self._runs[full_key] = CapturedRun(fn)
            self.stats.eager_calls += len(self._record(fn))
            return
        if run.graph is None:
            run.graph, run.reserves = self._capture_run(cache, fn)
        for c, n in run.reserves:  # before the replay: a full cache raises with nothing written
            c.reserve(n)
        run.graph.replay()
        self.stats.replays += 1
        self.stats.run_replays += 1

    def _record(self, fn: Callable[[], None]) -> list[tuple[StaticTreeKVCache, int]]:
        """Run fn with every forward going straight to the (compiled) model; returns (cache, n)
        per forward."""
        if self._recording is not None:
            raise RuntimeError("run_captured calls do not nest")
        self._recording = []
        try:
            fn()
            return self._recording
        finally:
            self._recording = None

    def _capture_run(self, cache: StaticTreeKVCache, fn: Callable[[], None]
                     ) -> tuple[torch.cuda.CUDAGraph, list[tuple[StaticTreeKVCache, int]]]:
        """Capture fn as one graph (see `_captured`); returns the graph and the (cache, n) of its forwards."""
        graph, reserves = self._captured(cache, lambda: self._record(fn))
        if any(c is not cache for c, _ in reserves):
            raise RuntimeError("a run_captured function may only run forwards against the cache it names")
        return graph, reserves

    def _captured(self, cache: StaticTreeKVCache, body: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
        """Capture body() as a graph on `cache`'s capture stream; returns the graph and body's result.
        One capture stream per cache (per model and role): cuBLAS keeps a workspace per stream, and
        graphs captured on one stream share it, so a draft graph replayed beside the target's
        (drafting ahead, engine/streams.py) must not share the target's."""
        t0 = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        host = cache.host_state()
        torch.cuda.synchronize()
        stream = self._capture_streams.get(id(cache))
        if stream is None:
            stream = self._capture_streams[id(cache)] = torch.cuda.Stream(cache.kv.device)
        with torch.cuda.graph(graph, stream=stream):
            out = body()
        # capturing ran the Python once (host counters moved) but no kernel: undo the host side;
        # the caller replays the graph for real next
        cache.set_host_state(host)
        torch.cuda.synchronize()
        self.stats.captures += 1
        self.stats.capture_seconds += time.perf_counter() - t0
        return graph, out

    def _run(self, model, cache, input_ids, position_ids, block_mask, last_only, hidden=False):
        """One forward of the wrapped backend, through the compiled model when compiling."""
        if self.compiler is None:
            extra = {"hidden": True} if hidden else {}
            return self.inner.forward(model, cache, input_ids, position_ids, block_mask, last_only, **extra)
        return self.compiler.forward(self.inner, model, cache, input_ids, position_ids, block_mask, last_only, hidden)

    def _capture(self, model, cache: StaticTreeKVCache, static_ids, static_pos, static_mask, last_only,
                 hidden: bool = False) -> CapturedForward:
        """Capture the forward on the static input buffers the warm-up call ran on."""
        graph, out = self._captured(cache, lambda: self._run(model, cache, static_ids, static_pos, static_mask,
                                                             last_only, hidden))
        if hidden:  # both outputs are the graph's buffers, rewritten by every replay
            return CapturedForward(graph, static_ids, static_pos, static_mask, out.logits, out.hidden)
        return CapturedForward(graph, static_ids, static_pos, static_mask, out)
