"""`Speculator`: the generation object a user keeps.

Everything that is expensive to make is made once per Speculator and kept across its calls:
the resolved plan (argument checks, the tree policy, tree="auto"'s calibrated choice, the
acceptance scheme, lookup and overlap settings), the attention backend with its static KV
caches, and, on a GPU, its compiled forwards and captured CUDA graphs. Each call only checks
its prompt, builds the small per-generation objects (drafter, acceptor, engine) around the kept
caches, and runs. So a loop of calls compiles and captures nothing after the first:

    spec = treespec.Speculator(target, draft, tree=[4, 2, 2, 1], max_context=4096)
    for ids in prompts:
        out = spec.generate(ids, max_new_tokens=256)
    spec.close()                       # frees the caches and graphs (or: with Speculator(...) as spec)

Setup is one step, `resolve_plan`: checks, policy resolution, calibration and capacity in one
place, before any cache is made. The capacity is explicit: `max_context` bounds prompt +
max_new_tokens of every call (a call beyond it is refused before any work), and the static caches
are sized for it once. `treespec.generate` / `treespec.stream` keep one Speculator per (models,
options) in `KEPT` (at most `KEPT_MAX`, least recently used first out) and reuse it;
`treespec.release()` closes them all.

Dimension letters: docs/dimensions.md.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from transformers import PreTrainedModel

from treespec.acceptance.sampling import SamplingConfig
from treespec.acceptance.schemes import check_acceptance
from treespec.backends.base import Backend
from treespec.backends.cuda_graphs import GraphedBackend
from treespec.backends.factory import make_backend
from treespec.backends.fusable import can_fuse
from treespec.backends.fused import fuse
from treespec.drafting.ahead import AheadPlan, OverlapConfig
from treespec.drafting.base import Drafter, GreedyProposer, SampledProposer
from treespec.drafting.head import check_head_use, is_head, make_head_drafter
from treespec.drafting.lookup import LookupConfig, LookupDrafter
from treespec.drafting.policy import TreePolicy, resolve_policy
from treespec.drafting.static import StaticTree
from treespec.engine.calibrate import STDERR, resolve_auto
from treespec.engine.checks import (
    ArgumentError, as_int, check_inputs, check_lookup, check_max_new_tokens, check_method, check_overlap, check_pair, check_prompt,
    check_prompt_for, eos_ids, generator_for, resolve_switch,
)
from treespec.backends.base import PREFILL_CHUNKS
from treespec.acceptance.acceptors import GreedyAcceptor, SampledAcceptor
from treespec.engine.loop import SpeculativeEngine
from treespec.engine.stream import GenerationResult, TokenStream
from treespec.stats import GenerationStats
from treespec.tree.auto import AutoTreeConfig

DEFAULT_MAX_CONTEXT = 4096  # what generate() sizes a kept object for when a call fits (grows past it)
KEPT_MAX = 4  # kept objects generate() holds at once; the least recently used is closed first


@dataclass(frozen=True)
class SpeculatorOptions:
    """The options that fix a Speculator's plan, caches and compiled shapes (per-call settings,
    sampling and max_new_tokens, are arguments of `generate` / `stream`)."""

    method: str = "tree"
    tree: Any = None
    max_context: int | None = None
    attention: Any = "auto"
    compile: bool | None = None
    lookup: bool | LookupConfig = False
    acceptance: str = "rejection"
    overlap: bool | OverlapConfig = False
    fuse: bool = False


@dataclass
class Plan:
    """What setup resolved, once per Speculator.

    spec: the tree policy (tree="auto" already resolved to its static tree); choice: tree="auto"'s
    TreeChoice (None otherwise); ahead: the drafting-ahead plan (overlap on, drafts present);
    scratch: cache slots beyond the context (one step's tree in either sampling mode, the padding
    of the last prefill chunk, lookup's extras); the draft's cache has ahead.slots_used more.
    target / draft: what the forwards run: the models, or their fused forms (fuse=True)."""

    method: str
    spec: TreePolicy
    choice: Any
    lookup: LookupConfig | None
    overlap: OverlapConfig | None
    ahead: AheadPlan | None
    acceptance: str
    backend: Backend
    max_context: int
    scratch: int
    target: PreTrainedModel
    draft: PreTrainedModel | None

    @property
    def fixed_shapes(self) -> bool:
        """Compiled or captured forwards: caches sized once for max_context, fixed prefill chunks."""
        return isinstance(self.backend, GraphedBackend)

    def capacities(self, context: int) -> tuple[int, int]:
        """(target, draft) cache slots for `context` tokens (max_context with fixed shapes)."""
        target = (self.max_context if self.fixed_shapes else context) + self.scratch
        return target, target + (self.ahead.slots_used if self.ahead is not None else 0)


def resolve_plan(target: PreTrainedModel, draft: PreTrainedModel | None, options: SpeculatorOptions) -> Plan:
    """Every check that does not depend on a prompt, then the policy, the backend, tree="auto"'s
    calibration (the first real work, after every check) and the cache capacities."""
    check_inputs(target, draft, compile=options.compile, streamer=None, eos_token_id=None)
    check_method(options.method)
    max_context = as_int(options.max_context) if options.max_context is not None else _default_context(target)
    if max_context is None or max_context < 2:
        raise ArgumentError("max_context", f"max_context must be a whole number >= 2 (prompt + max_new_tokens of "
                            f"the longest call), got {options.max_context!r}")
    spec = resolve_policy(options.tree, options.method)
    if spec.has_drafts:
        if draft is None:
            raise ArgumentError("draft", f"method={options.method!r} needs a draft model; pass draft=... or use "
                                "method='autoregressive'")
        check_pair(target, draft)
    _check_context(target, draft if spec.has_drafts else None, max_context)
    check_acceptance(options.acceptance, spec.topology if isinstance(spec, StaticTree) else spec)
    lookup = resolve_switch(options.lookup, LookupConfig, "lookup")
    check_lookup(lookup, has_drafts=spec.has_drafts, greedy=True, acceptance=options.acceptance)
    overlap = resolve_switch(options.overlap, OverlapConfig, "overlap")
    check_overlap(overlap, spec, lookup)
    if spec.has_drafts and is_head(draft):  # a draft head (drafting/head.py)
        check_head_use(target, draft, lookup=lookup, overlap=overlap)
    backend = make_backend(options.attention, target.device, target.dtype, compile=options.compile,
                           context_length=max_context)
    for model in (target, draft) if spec.has_drafts else (target,):
        backend.check_model(model)
    if not isinstance(options.fuse, bool):
        raise ArgumentError("fuse", f"fuse must be True or False, got {options.fuse!r}")
    run_target, run_draft = target, draft if spec.has_drafts else None
    if options.fuse:  # built once; the user's models are not changed (a head reads the target's own layers)
        run_target = fused(target, backend)
        if run_draft is not None and not is_head(run_draft):
            run_draft = fused(run_draft, backend)
    choice = None
    if isinstance(spec, AutoTreeConfig):  # calibrating is the first work done, after every check
        spec, choice = resolve_auto(spec, run_target, run_draft, backend)
    ahead = None
    if overlap is not None and spec.has_drafts:  # tree='auto' may choose the target alone: nothing to draft below
        if choice is not None:  # and a tree shallower than the levels asked for
            overlap = replace(overlap, levels=min(overlap.levels, spec.topology.max_depth))
        ahead = spec.ahead_plan(overlap, target.device)
    # one step's scratch (the tree in either sampling mode, padded pending tokens), or the padding
    # of the last prefill chunk
    scratch = max(spec.max_nodes(True) + 2, spec.max_nodes(False) + 2, max(PREFILL_CHUNKS))
    if lookup is not None:  # extra tree slots, and accepted lookup tokens fed to the draft next step
        scratch += lookup.slots + lookup.length
    return Plan(options.method, spec, choice, lookup, overlap, ahead, options.acceptance, backend, max_context,
                scratch, run_target, run_draft)


def fused(model: PreTrainedModel, backend: Backend) -> PreTrainedModel:
    """The fused form of `model` (backends/fused.py), or ArgumentError saying why it has none."""
    if backend.name != "sdpa":
        raise ArgumentError("fuse", f"fuse=True runs on the sdpa backends; this one is {backend.name!r}: pass "
                            "attention='sdpa' or fuse=False")
    reason = can_fuse(model)
    if reason is not None:
        raise ArgumentError("fuse", f"fuse=True cannot fuse {type(model).__name__}: {reason}; pass fuse=False")
    return fuse(model)


def _default_context(target: PreTrainedModel) -> int:
    """DEFAULT_MAX_CONTEXT, or the target's positions when it has fewer."""
    limit = getattr(target.config.get_text_config(), "max_position_embeddings", None)
    return min(DEFAULT_MAX_CONTEXT, limit) if limit else DEFAULT_MAX_CONTEXT


def _check_context(target: PreTrainedModel, draft: PreTrainedModel | None, max_context: int) -> None:
    """max_context within what each model's positions allow."""
    for name, model in (("target", target), ("draft", draft)):
        if model is None:
            continue
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if limit is not None and max_context > limit:
            raise ArgumentError("max_context", f"max_context={max_context} exceeds the {name} model's context of "
                                f"{limit} tokens; pass max_context <= {limit}")


class Speculator:
    """Speculative decoding with one target (and draft) and fixed options, kept across calls.

    Args: target, draft, and the options of `treespec.generate` that shape the computation:
    method, tree, attention, compile, lookup, acceptance, overlap (see `treespec.generate`), and
    max_context: the most tokens (prompt + max_new_tokens) one call may hold; the KV caches are
    allocated for it once (default: 4096, or the target's positions when it has fewer).
    fuse: run fused forwards (backends/fused.py: one q/k/v and one gate/up matmul per layer,
    weights concatenated once here; the models themselves are not changed); sdpa backends and
    the families backends/fusable.py serves.
    """

    def __init__(self, target: PreTrainedModel, draft: PreTrainedModel | None = None, *, method: str = "tree",
                 tree=None, max_context: int | None = None, attention="auto", compile: bool | None = None,
                 lookup: bool | LookupConfig = False, acceptance: str = "rejection",
                 overlap: bool | OverlapConfig = False, fuse: bool = False):  # fmt: skip
        self.options = SpeculatorOptions(method, tree, max_context, attention, compile, lookup, acceptance, overlap,
                                         fuse)
        self.target, self.draft = target, draft
        self.plan: Plan | None = resolve_plan(target, draft, self.options)
        self.warm = False  # every forward shape compiled and captured (`warm_up`)
        self.warmup_seconds = 0.0
        self._drafter: Drafter | None = None  # kept across calls while it can restart on the same cache

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Free the KV caches and CUDA graphs (and, for a backend this object made, the compiled
        forwards); the object cannot generate afterwards."""
        backend = self.plan.backend if self.plan is not None else None
        if isinstance(backend, GraphedBackend):
            for model in (self.plan.target, self.plan.draft):
                if model is not None:
                    backend.release(model)
            if self.options.attention is not backend:  # a caller's backend object keeps its compiled forwards
                backend.reset()
        self.plan = None
        self._drafter = None

    def __enter__(self) -> "Speculator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def backend(self) -> Backend:
        return self._plan().backend

    def _plan(self) -> Plan:
        if self.plan is None:
            raise RuntimeError("this Speculator was closed; make a new one")
        return self.plan

    # ---------------------------------------------------------------- calls
    def generate(self, input_ids: torch.Tensor, *, max_new_tokens: int, **sampling) -> GenerationResult:
        """Like `treespec.generate` with this object's models and options; sampling: temperature,
        top_k, top_p, eos_token_id, generator, streamer."""
        token_stream = self.stream(input_ids, max_new_tokens=max_new_tokens, **sampling)
        for _ in token_stream:
            pass
        return token_stream.result

    def stream(self, input_ids: torch.Tensor, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
               generator: torch.Generator | None = None, streamer=None) -> TokenStream:  # fmt: skip
        """Like `treespec.stream`: an iterator over the token ids each step emits."""
        plan = self._plan()
        check_inputs(self.target, self.draft, compile=None, streamer=streamer, eos_token_id=eos_token_id)
        check_prompt(input_ids)
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        models = [("target", self.target)] + ([("draft", self.draft)] if plan.spec.has_drafts else [])
        check_prompt_for(input_ids, models, max_new_tokens)
        self.check_fits(input_ids.shape[1], max_new_tokens)
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
        check_lookup(plan.lookup, has_drafts=plan.spec.has_drafts, greedy=sampling.greedy, acceptance=plan.acceptance)
        eos = eos_ids(self.target, eos_token_id)
        if sampling.greedy:
            proposer, acceptor = GreedyProposer(), GreedyAcceptor()
        else:
            generator = generator_for(self.target.device, generator)
            proposer, acceptor = SampledProposer(sampling, generator), SampledAcceptor(sampling, generator, plan.acceptance)
        if not self.warm:
            self.warm_up()
        engine = self._engine(plan, proposer, acceptor, input_ids.shape[1], max_new_tokens, eos)
        return TokenStream(engine, input_ids, streamer)

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        """ArgumentError, before any work, when prompt + max_new_tokens exceed max_context."""
        limit = self._plan().max_context
        if prompt_len + max_new_tokens > limit:
            raise ArgumentError(
                "max_new_tokens",
                f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceed this Speculator's max_context of "
                f"{limit} tokens: lower max_new_tokens to at most {max(limit - prompt_len, 0)}, or make a Speculator "
                f"with a larger max_context (its caches are allocated for it)",
            )

    def _engine(self, plan: Plan, proposer, acceptor, prompt_len: int, max_new_tokens: int,
                eos: set[int]) -> SpeculativeEngine:  # fmt: skip
        """The per-call objects around the kept backend and caches."""
        stats = GenerationStats(method=plan.method, backend=plan.backend.name,
                                tree_choice=plan.choice.as_dict() if plan.choice else {})
        capacity, draft_capacity = plan.capacities(prompt_len + max_new_tokens)
        drafter = None
        if plan.spec.has_drafts:
            drafter = self._drafter_for(plan, plan.backend.make_cache(plan.draft, draft_capacity, "draft"), proposer,
                                        stats)
        stats.tree = drafter.describe() if drafter is not None else "root only"
        engine = SpeculativeEngine(
            plan.target, plan.backend.make_cache(plan.target, capacity, "target"), drafter, plan.backend,
            acceptor, stats, prompt_len=prompt_len, max_new_tokens=max_new_tokens, eos_token_ids=eos,
            ahead=drafter if plan.ahead is not None else None, fixed_shapes=plan.fixed_shapes,
        )
        if isinstance(drafter, LookupDrafter):
            drafter.attach(engine.out)  # the n-gram match reads the engine's token buffer
        return engine

    def _drafter_for(self, plan: Plan, cache, proposer, stats: GenerationStats) -> Drafter:
        """The last call's drafter when it can restart on this cache (a graphed backend hands
        out the same cache every call: the drafter's buffers, which a captured draft graph
        reads and writes, stay too), else a new one."""
        kept = self._drafter
        if kept is not None and kept.cache is cache and kept.restart(proposer, stats):
            return kept
        if is_head(plan.draft):  # the policy's drafter over the head, with its feature bookkeeping
            drafter = make_head_drafter(plan.spec, plan.draft, plan.backend, cache, proposer, stats)
        else:
            drafter = plan.spec.make_drafter(plan.draft, plan.backend, cache, proposer, stats)
        if plan.ahead is not None:
            drafter.enable_ahead(plan.ahead)
        if plan.lookup is not None:
            drafter = LookupDrafter(drafter, plan.lookup)
        self._drafter = drafter
        return drafter

    # ---------------------------------------------------------------- warm-up
    def warm_up(self, progress=STDERR) -> float:
        """Compile and capture every forward shape of this plan before the first real call, so
        that no later call compiles or captures: two short greedy generations on a synthetic
        prompt that spans every prefill chunk size (the first compiles each shape, the second
        captures it). A no-op for eager backends. Returns the seconds it took."""
        plan = self._plan()
        self.warm = True
        if not plan.fixed_shapes:
            return 0.0
        t0 = time.perf_counter()
        new = 4
        length = min(sum(PREFILL_CHUNKS) + 1, plan.max_context - new)
        ids = torch.arange(length, device=self.target.device)[None] % _vocab(self.target)  # (1, T)
        for i, what in enumerate(("compiling", "capturing")):
            if progress is not None:
                progress.write(f"treespec: warm-up {i + 1}/2 ({what} {_describe(plan)} forwards)...\n")
                progress.flush()
            engine = self._engine(plan, GreedyProposer(), GreedyAcceptor(), length, new, set())
            TokenStream(engine, ids).run()
        self.warmup_seconds = time.perf_counter() - t0
        if progress is not None:
            progress.write(f"treespec: warm-up done in {self.warmup_seconds:.1f} s\n")
        return self.warmup_seconds


def _vocab(model: PreTrainedModel) -> int:
    return model.get_input_embeddings().weight.shape[0]


def _describe(plan: Plan) -> str:
    return "target-only" if not plan.spec.has_drafts else f"{plan.method} ({type(plan.spec).__name__})"


# -------------------------------------------------------------------- kept objects of generate()
KEPT: "OrderedDict[tuple, Speculator]" = OrderedDict()  # the Speculator holds its models: their ids stay theirs


def _key_part(value) -> Any:
    """A hashable stand-in for an option value (lists of widths, configs, backend objects)."""
    if isinstance(value, (list, tuple)):
        return tuple(_key_part(v) for v in value)
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.tolist()))
    try:
        hash(value)
        return value
    except TypeError:
        return ("id", id(value))


def kept_speculator(target: PreTrainedModel, draft: PreTrainedModel | None, options: SpeculatorOptions,
                    needed: int) -> Speculator:  # fmt: skip
    """The Speculator generate() reuses for these models and options, made (or remade larger)
    when no kept one has room for `needed` tokens (prompt + max_new_tokens)."""
    key = (id(target), id(draft), *(_key_part(getattr(options, f)) for f in
                                   ("method", "tree", "attention", "compile", "lookup", "acceptance", "overlap",
                                    "fuse")))
    kept = KEPT.get(key)
    if kept is not None and kept.plan is not None and kept.plan.max_context >= needed:
        KEPT.move_to_end(key)
        return kept
    if kept is not None:
        kept.close()
        del KEPT[key]
    max_context = max(_default_context(target), 1 << (needed - 1).bit_length())
    limit = getattr(target.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None:
        max_context = min(max_context, limit)
    speculator = Speculator(target, draft, **{**options.__dict__, "max_context": max(max_context, needed)})
    KEPT[key] = speculator
    while len(KEPT) > KEPT_MAX:
        KEPT.popitem(last=False)[1].close()
    return speculator


def release() -> None:
    """Close every Speculator that treespec.generate / stream keep (frees their caches, CUDA
    graphs and compiled forwards, and drops their references to the models)."""
    while KEPT:
        KEPT.popitem()[1].close()
