"""torch.compile'd model forwards for the decode loop's fixed shapes.

Inside a CUDA graph, a transformers forward is bound by its kernel count, not by memory: a 1.5B
forward launches about 1,400 small kernels (RMSNorm, RoPE, bias adds, residuals, ... per layer) at
2-3 µs each, against about 0.6 ms of weight traffic on an H200. inductor fuses those elementwise
chains into a few Triton kernels per layer (about 2.5x fewer launches), and the fused forward is
still one fixed-shape computation over treespec's own static caches and tree masks, so
`GraphedBackend` captures it in its CUDA graph exactly as it captures the eager forward.

What is compiled: the model's own forward (`torch.compile(model, backend="inductor",
fullgraph=True, dynamic=False)`), called by the wrapped backend (StaticSdpaBackend or
FlashBackend) in place of the model. The backend's own work around it (the static cache's write
slots, the mask built from the device-side counters) stays eager and is captured in the same
graph. Each (model, n new tokens, s scratch, last_only) shape is compiled once, on its first
call (the graph runner's warm-up call), and logged; later calls of the shape are graph replays
that never enter Python. Static shapes mean one compilation per shape: a tree configuration has
a handful (the draft's first forward, one per distinct level width, the verification).

inductor keeps compiled kernels on disk (its FX-graph and autotuning caches under
TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_$USER), so a new process recompiles a
known shape from cache: dynamo still traces the model, inductor does not rebuild kernels.

Why not transformers' own `generate(cache_implementation="static")` compilation: it compiles the
forward with its own StaticCache and cudagraph trees; treespec's forwards write tree nodes into
a cache with device-side write positions and attend through tree masks, which its static cache
does not express (docs/gpu.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

log = logging.getLogger("treespec")

# every (model, shape) is one dynamo cache entry of the same code object (the model class's
# forward): a tree configuration of two models has 10-20, more than dynamo's default limit of 8,
# past which it would silently run the forward eagerly. Raised only around treespec's own calls.
RECOMPILE_LIMIT = 512
# inductor modes that leave CUDA graphs to GraphedBackend ('reduce-overhead' and 'max-autotune'
# would capture their own, around treespec's capture)
GRAPH_FREE_MODES = (None, "default", "max-autotune-no-cudagraphs")


@dataclass
class CompileStats:
    """What compiling cost: shapes compiled and the wall time of their first (compiling) calls."""

    shapes: int = 0
    seconds: float = 0.0
    log: list[str] = field(default_factory=list)


def install_output_hooks(model: PreTrainedModel) -> None:
    """Install transformers' output-capturing hooks (what `output_hidden_states` reads) now, in
    eager code: transformers installs them on the first forward that asks for hidden states,
    under a threading lock dynamo cannot trace, so a compiled forward asked for its hidden
    states (a draft head's features) would fail to compile on a model never run that way.
    Versions without these hooks have nothing to install."""
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            maybe_install_capturing_hooks(module)


class CompiledForwards:
    """One torch.compile'd module per model; call `forward(inner, model, ...)` in place of
    `inner.forward(model, ...)`.

    The compiled module (torch's OptimizedModule) hands attribute reads (config, dtype, device)
    to the model, so a backend uses it exactly like the model itself.
    mode: inductor mode (None: default; 'max-autotune-no-cudagraphs' autotunes matmuls, slower
        to warm up). Never a cudagraph mode: GraphedBackend captures the graphs itself.
    backend: torch.compile backend; 'inductor' except in CPU tests, which use 'aot_eager' (the
        same fullgraph trace and functionalised cache writes, without minutes of C++ builds).
    """

    def __init__(self, mode: str | None = None, backend: str = "inductor"):
        if mode not in GRAPH_FREE_MODES:
            raise ValueError(
                f"compile mode {mode!r} captures its own CUDA graphs (or is unknown); use one of {GRAPH_FREE_MODES}"
            )
        self.mode, self.backend = mode, backend
        self.stats = CompileStats()
        self._modules: dict[int, tuple[PreTrainedModel, torch.nn.Module]] = {}

    def compiled(self, model: PreTrainedModel) -> torch.nn.Module:
        held = self._modules.get(id(model))
        if held is None or held[0] is not model:
            install_output_hooks(model)
            module = torch.compile(model, backend=self.backend, mode=self.mode, fullgraph=True, dynamic=False)
            held = (model, module)
            self._modules[id(model)] = held  # the model is held too, so its id() cannot be reused
        return held[1]

    def forward(self, inner, model: PreTrainedModel, cache, input_ids, position_ids, block_mask, last_only: bool,
                hidden: bool = False):
        """`inner.forward` with the model compiled; same contract (logits (n, V) or (1, V), or a
        ForwardOutput with hidden).
        A shape seen before is a cache hit of dynamo's guards; a new one compiles, and is logged."""
        graphs_before = _compiled_graphs()
        t0 = time.perf_counter()
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, accumulated_recompile_limit=RECOMPILE_LIMIT):
            # hidden only when asked: the default call (and its compiled graph) stays the plain forward
            extra = {"hidden": True} if hidden else {}
            logits = inner.forward(self.compiled(model), cache, input_ids, position_ids, block_mask, last_only, **extra)
        if _compiled_graphs() != graphs_before:
            if input_ids.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            n, s = block_mask.shape
            line = (
                f"compiled {type(model).__name__} forward ({inner.name} attention, n={n} new tokens, s={s} scratch, "
                f"last_only={last_only}{', hidden' if hidden else ''}) with torch.compile({self.backend}, fullgraph, static shapes) in {seconds:.1f} s"
            )
            log.info(line)
            self.stats.shapes += 1
            self.stats.seconds += seconds
            self.stats.log.append(line)
        return logits

    def reset(self) -> None:
        """Forget the compiled modules (dynamo's own caches stay until torch._dynamo.reset())."""
        self._modules.clear()


def _compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (grows by one per new shape)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]
