"""The public API: `generate` and `stream`.

Both validate their inputs up front (clear errors, never a stack trace from inside torch),
build a `SpeculativeEngine`, and run its steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch
from transformers import PreTrainedModel

from treespec.engine.calibrate import resolve_auto
from treespec.engine.checks import (
    check_lookup, check_max_new_tokens, check_method, check_overlap, check_pair, check_prompt, check_prompt_for,
    eos_ids, generator_for, resolve_switch, check_inputs,
)
from treespec.drafting.ahead import OverlapConfig
from treespec.drafting.lookup import LookupConfig, LookupDrafter
from treespec.acceptance.sampling import SamplingConfig
from treespec.acceptance.schemes import check_acceptance
from treespec.backends.factory import make_backend
from treespec.drafting.base import GreedyProposer, SampledProposer
from treespec.drafting.policy import TreePolicy, resolve_policy
from treespec.drafting.static import StaticTree
from treespec.engine.loop import GreedyAcceptor, SampledAcceptor, SpeculativeEngine
from treespec.stats import GenerationStats
from treespec.tree.auto import AutoTreeConfig
from treespec.tree.topology import TreeTopology

@dataclass
class GenerationResult:
    """sequences: LongTensor (1, T + new) prompt followed by the generated tokens, as in
    transformers. stats: what it cost (tau, forwards, time split)."""

    sequences: torch.Tensor
    stats: GenerationStats


class TokenStream:
    """Iterator over the token ids each step emits (a list of 1..D+1 ints per step).
    After the last step, `result` holds the whole GenerationResult."""

    def __init__(self, engine: SpeculativeEngine, input_ids: torch.Tensor, streamer=None):
        self.engine, self.input_ids, self.streamer = engine, input_ids, streamer
        self.result: GenerationResult | None = None
        self._started = False

    def __iter__(self) -> Iterator[list[int]]:
        # the engine's caches hold this generation: a second pass would overrun them
        if self._started:
            raise RuntimeError(
                "this stream was iterated already (one stream is one generation); call treespec.stream(...) "
                "again for a new one, or read stream.result for this one's output"
            )
        self._started = True
        return self._steps()

    def _steps(self) -> Iterator[list[int]]:
        engine, stats = self.engine, self.engine.stats
        t0 = time.perf_counter()
        with torch.no_grad():
            engine.prefill(self.input_ids)
        if self.streamer is not None:
            self.streamer.put(self.input_ids.cpu())
        finished = False
        while not finished:
            with torch.no_grad():  # per step, not across the yield: the caller's grad mode stays theirs
                step = engine.step()
            finished = step.finished
            if self.streamer is not None and step.tokens:
                self.streamer.put(torch.tensor(step.tokens))
            stats.time_total = time.perf_counter() - t0
            yield step.tokens
        stats.new_tokens = engine.new_tokens
        stats.time_total = time.perf_counter() - t0
        if self.streamer is not None:
            self.streamer.end()
        self.result = GenerationResult(sequences=engine.sequences, stats=stats)


def stream(
    target: PreTrainedModel,
    draft: PreTrainedModel | None,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    method: str = "tree",
    tree: TreeTopology | Sequence[int] | str | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    attention: str = "auto",
    compile: bool | None = None,
    streamer=None,
    lookup: bool | LookupConfig = False,
    acceptance: str = "rejection",
    overlap: bool | OverlapConfig = False,
) -> TokenStream:
    """Like `generate`, but returns an iterator over the tokens of each step."""
    check_inputs(target, draft, compile=compile, streamer=streamer, eos_token_id=eos_token_id)
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    spec, max_new_tokens = _check_and_resolve(target, draft, input_ids, max_new_tokens, method, tree)
    check_acceptance(acceptance, spec.topology if isinstance(spec, StaticTree) else spec)
    lookup_config = resolve_switch(lookup, LookupConfig, "lookup")
    check_lookup(lookup_config, has_drafts=spec.has_drafts, greedy=sampling.greedy, acceptance=acceptance)
    overlap_config = resolve_switch(overlap, OverlapConfig, "overlap")
    check_overlap(overlap_config, spec, lookup_config)
    if sampling.greedy:
        proposer, acceptor = GreedyProposer(), GreedyAcceptor()
    else:
        generator = generator_for(target.device, generator)
        proposer, acceptor = SampledProposer(sampling, generator), SampledAcceptor(sampling, generator, acceptance)
    backend = make_backend(
        attention, target.device, target.dtype, compile=compile, context_length=input_ids.shape[1] + max_new_tokens
    )
    for model in (target, draft) if spec.has_drafts else (target,):
        backend.check_model(model)
    choice = None
    if isinstance(spec, AutoTreeConfig):  # after every check: calibrating is the first work done
        spec, choice = resolve_auto(spec, target, draft, backend)
    plan = None
    if overlap_config is not None and spec.has_drafts:  # tree='auto' may choose the target alone: nothing to draft below
        if choice is not None:  # and a tree shallower than the levels asked for
            overlap_config = replace(overlap_config, levels=min(overlap_config.levels, spec.topology.max_depth))
        plan = spec.ahead_plan(overlap_config, target.device)  # a StaticTree or DynamicTreeConfig (check_overlap)
    stats = GenerationStats(method=method, backend=backend.name, tree_choice=choice.as_dict() if choice else {})
    capacity = input_ids.shape[1] + max_new_tokens + spec.max_nodes(sampling.greedy) + 2
    if lookup_config is not None:  # extra tree slots, and accepted lookup tokens fed to the draft next step
        capacity += lookup_config.slots + lookup_config.length
    draft_capacity = capacity + (plan.slots_used if plan is not None else 0)
    drafter = None
    if spec.has_drafts:
        drafter = spec.make_drafter(draft, backend, backend.make_cache(draft, draft_capacity, "draft"), proposer, stats)
        if plan is not None:
            drafter.enable_ahead(plan)
        if lookup_config is not None:
            drafter = LookupDrafter(drafter, lookup_config)
    stats.tree = drafter.describe() if drafter is not None else "root only"
    engine = SpeculativeEngine(
        target,
        backend.make_cache(target, capacity, "target"),
        drafter,
        backend,
        acceptor,
        stats,
        prompt_len=input_ids.shape[1],
        max_new_tokens=max_new_tokens,
        eos_token_ids=eos_ids(target, eos_token_id),
        ahead=drafter if plan is not None else None,
    )
    if isinstance(drafter, LookupDrafter):
        drafter.attach(engine.out)  # the n-gram match reads the engine's token buffer
    return TokenStream(engine, input_ids, streamer)


def generate(
    target: PreTrainedModel,
    draft: PreTrainedModel | None,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    method: str = "tree",
    tree: TreeTopology | Sequence[int] | str | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    attention: str = "auto",
    compile: bool | None = None,
    streamer=None,
    lookup: bool | LookupConfig = False,
    acceptance: str = "rejection",
    overlap: bool | OverlapConfig = False,
) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens after `input_ids` with speculative decoding.

    Args:
        target: the model whose output distribution is kept exactly.
        draft: the small model that proposes tokens (None for method='autoregressive').
        input_ids: LongTensor (1, T), the prompt.
        method: 'tree' (a token tree), 'linear' (one chain of k drafts) or 'autoregressive'
            (the target alone, through the same engine).
        tree: a preset name (see `treespec.PRESETS`), a widths list such as [4, 2, 2, 1], or a
            TreeTopology; 'dynamic' / a DynamicTreeConfig (expanded by draft probability each
            step) or 'adaptive' / an AdaptiveTreeConfig (depth adapted to the acceptance); for
            'linear', a chain (e.g. 'chain-4' or [1, 1, 1, 1]). 'auto' / an AutoTreeConfig:
            the tree (or chain, for 'linear'; or the target alone) with the most predicted
            tokens/s from this machine's forward costs, measured once and cached
            (docs/auto_tree.md); stats.tree_choice says what was chosen and why.
        temperature, top_k, top_p: sampling settings, applied to p and q alike as transformers'
            warpers do (temperature 0 = greedy, top_k/top_p then ignored; top_k 0 = off).
        eos_token_id: stop after this token (or any of these); default: the target's
            generation_config.eos_token_id, as transformers does.
        generator: the torch.Generator (on the models' device) for every random draw when
            sampling; None seeds a fresh one from torch's global RNG.
        attention: attention backend ('auto', 'sdpa' or 'flash'; 'auto' picks flash on CUDA
            from FLASH_MIN_CONTEXT tokens of prompt + max_new_tokens on), or a backend object from
            `treespec.backends.factory.make_backend` reused across calls (keeps its CUDA graphs and
            compiled forwards).
        compile: torch.compile the fixed-shape forwards inside the CUDA graphs (None: on CUDA
            only; False: never; True: also on the CPU). Ignored for a backend object.
        streamer: a transformers streamer (e.g. TextStreamer) fed as tokens are accepted.
        lookup: True or a `LookupConfig`: each step, continuations of the context's last n-gram
            copied from earlier in the context join the draft tree as extra branches (free
            drafts when the output repeats the input; docs/lookup.md). Needs a draft model.
        acceptance: the stochastic verifier when sampling: 'rejection' (token-level, default),
            'traversal' (leaf-to-root, sequence-level; any tree) or 'block' (chains only:
            method='linear'). All are lossless (docs/sampling.md); at temperature 0 all are
            greedy verification and the option has no effect.
        overlap: True or an `OverlapConfig`: while the target verifies a tree, the draft drafts
            the next tree's first levels below the nodes where it expects verification to end,
            on a second CUDA stream (in order on the CPU); when it guessed right, the next step
            starts with those levels done (docs/overlap.md). Static trees, chains, and dynamic
            trees (one level ahead: levels=1).
    Returns:
        GenerationResult with sequences (1, T + new) and stats.
    """
    token_stream = stream(
        target,
        draft,
        input_ids,
        max_new_tokens=max_new_tokens,
        method=method,
        tree=tree,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        generator=generator,
        attention=attention,
        compile=compile,
        streamer=streamer,
        lookup=lookup,
        acceptance=acceptance,
        overlap=overlap,
    )
    for _ in token_stream:
        pass
    return token_stream.result


# ---------------------------------------------------------------------- validation
def _check_and_resolve(target, draft, input_ids, max_new_tokens, method, tree) -> tuple[TreePolicy, int]:
    """The tree policy and max_new_tokens as a plain int, after every argument check
    (treespec.engine.checks), before any work."""
    check_method(method)
    check_prompt(input_ids)
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    spec = resolve_policy(tree, method)
    models = [("target", target)]
    if spec.has_drafts:
        if draft is None:
            raise ValueError(f"method={method!r} needs a draft model; pass draft=... or use method='autoregressive'")
        check_pair(target, draft)
        models.append(("draft", draft))
    check_prompt_for(input_ids, models, max_new_tokens)
    return spec, max_new_tokens
