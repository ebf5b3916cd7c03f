"""The public API: `generate` and `stream`.

Both validate their inputs up front (clear errors, never a stack trace from inside torch),
build a `SpeculativeEngine`, and run its steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from transformers import PreTrainedModel

from treespec.backends.sdpa import make_backend
from treespec.drafting.base import GreedyProposer, SampledProposer, TreeDrafter
from treespec.drafting.dynamic import AdaptiveDrafter, AdaptiveTreeConfig, DynamicDrafter, DynamicTreeConfig
from treespec.engine.loop import GreedyAcceptor, SampledAcceptor, SpeculativeEngine
from treespec.backends.kv_cache import TreeKVCache
from treespec.acceptance.sampling import SamplingConfig
from treespec.acceptance.schemes import check_acceptance
from treespec.stats import GenerationStats
from treespec.tree.topology import TreeTopology, resolve_tree

METHODS = ("tree", "linear", "autoregressive")


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

    def __iter__(self) -> Iterator[list[int]]:
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
    streamer=None,
    acceptance: str = "rejection",
) -> TokenStream:
    """Like `generate`, but returns an iterator over the tokens of each step."""
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    spec = _check_and_resolve(target, draft, input_ids, max_new_tokens, method, tree)
    check_acceptance(acceptance, spec)
    if sampling.greedy:
        proposer, acceptor = GreedyProposer(), GreedyAcceptor()
    else:
        generator = _generator_for(target.device, generator)
        proposer, acceptor = SampledProposer(sampling, generator), SampledAcceptor(sampling, generator, acceptance)
    backend = make_backend(attention, target.device, target.dtype)
    drafting = _has_drafts(spec)
    for model in (target, draft) if drafting else (target,):
        backend.check_model(model)
    stats = GenerationStats(method=method, backend=backend.name)
    capacity = input_ids.shape[1] + max_new_tokens + _max_nodes(spec, sampling) + 2
    # a backend may own its caches (GraphedBackend: static buffers its CUDA graphs point to)
    make_cache = getattr(backend, "make_cache", lambda model, size, role: TreeKVCache.for_model(model, size))
    drafter = None
    if drafting:
        draft_cache = make_cache(draft, capacity, "draft")
        if isinstance(spec, DynamicTreeConfig):
            drafter = DynamicDrafter(draft, spec, backend, draft_cache, proposer)
        elif isinstance(spec, AdaptiveTreeConfig):
            drafter = AdaptiveDrafter(draft, spec, backend, draft_cache, proposer, stats)
        else:
            drafter = TreeDrafter(draft, spec, backend, draft_cache, proposer)
    stats.tree = drafter.describe() if drafter is not None else "root only"
    engine = SpeculativeEngine(
        target,
        make_cache(target, capacity, "target"),
        drafter,
        backend,
        acceptor,
        stats,
        prompt_len=input_ids.shape[1],
        max_new_tokens=max_new_tokens,
        eos_token_ids=_eos_ids(target, eos_token_id),
    )
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
    streamer=None,
    acceptance: str = "rejection",
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
            'linear', a chain (e.g. 'chain-4' or [1, 1, 1, 1]).
        temperature, top_k, top_p: sampling settings, applied to p and q alike as transformers'
            warpers do (temperature 0 = greedy, top_k/top_p then ignored; top_k 0 = off).
        eos_token_id: stop after this token (or any of these); default: the target's
            generation_config.eos_token_id, as transformers does.
        generator: the torch.Generator (on the models' device) for every random draw when
            sampling; None seeds a fresh one from torch's global RNG.
        attention: attention backend ('auto', 'sdpa' or 'flash'), or a backend object from
            `treespec.attention.make_backend` reused across calls (keeps its CUDA graphs).
        streamer: a transformers streamer (e.g. TextStreamer) fed as tokens are accepted.
        acceptance: the stochastic verifier when sampling: 'rejection' (token-level, default),
            'traversal' (leaf-to-root, sequence-level; any tree) or 'block' (chains only:
            method='linear'). All are lossless (docs/sampling.md); at temperature 0 all are
            greedy verification and the option has no effect.
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
        streamer=streamer,
        acceptance=acceptance,
    )
    for _ in token_stream:
        pass
    return token_stream.result


# ---------------------------------------------------------------------- validation
def _generator_for(device: torch.device, generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        seed = int(torch.randint(0, 2**62, (1,)))  # from the global RNG, like transformers' sampling
        return torch.Generator(device=device).manual_seed(seed)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if torch.device(generator.device).type != device.type:
        raise ValueError(
            f"the generator is on {generator.device} but the models are on {device}; "
            f"use torch.Generator(device='{device.type}').manual_seed(...)"
        )
    return generator


TreeSpec = TreeTopology | DynamicTreeConfig | AdaptiveTreeConfig


def _resolve_spec(tree, method: str) -> TreeSpec:
    if method == "tree":
        if isinstance(tree, (DynamicTreeConfig, AdaptiveTreeConfig)):
            return tree
        if tree == "dynamic":
            return DynamicTreeConfig()
        if tree == "adaptive":
            return AdaptiveTreeConfig()
    return resolve_tree(tree, method)


def _has_drafts(spec: TreeSpec) -> bool:
    return not (isinstance(spec, TreeTopology) and spec.num_drafts == 0)


def _max_nodes(spec: TreeSpec, sampling: SamplingConfig) -> int:
    """Most tree nodes (root included) one step can verify."""
    if isinstance(spec, DynamicTreeConfig):  # the draft's scratch holds (depth-1) frontiers of width nodes
        verified = 1 + (spec.pool_size if not sampling.greedy else spec.budget)
        return max(verified, 2 + (spec.depth - 1) * spec.width)
    if isinstance(spec, AdaptiveTreeConfig):
        return spec.topology(spec.max_depth).num_nodes
    return spec.num_nodes


def _check_and_resolve(target, draft, input_ids, max_new_tokens, method, tree) -> TreeSpec:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long:
        raise TypeError("input_ids must be a LongTensor of shape (1, T), e.g. tokenizer(text, return_tensors='pt').input_ids")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (1, T), got {tuple(input_ids.shape)}; use input_ids[None] for one prompt")
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"batch size {input_ids.shape[0]} is not supported yet: treespec decodes one prompt at a time; "
            "call generate once per prompt"
        )
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token (e.g. the BOS token or a chat template)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    spec = _resolve_spec(tree, method)
    models = [("target", target)]
    if _has_drafts(spec):
        if draft is None:
            raise ValueError(f"method={method!r} needs a draft model; pass draft=... or use method='autoregressive'")
        models.append(("draft", draft))
        vt, vd = _vocab_size(target), _vocab_size(draft)
        if vt != vd:
            raise ValueError(
                f"target and draft have different vocabulary sizes ({vt} vs {vd}); speculative decoding needs "
                "one shared tokenizer (treespec.loading.models.check_same_vocabulary compares two tokenizers)"
            )
        if draft.device != target.device:
            raise ValueError(f"target is on {target.device} but draft is on {draft.device}; put both on one device")
    if input_ids.device != target.device:
        raise ValueError(f"input_ids is on {input_ids.device} but the target is on {target.device}")
    t = input_ids.shape[1]
    for name, model in models:
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if limit is not None and t >= limit:
            raise ValueError(f"the prompt has {t} tokens but the {name} model's context is {limit}")
        if limit is not None and t + max_new_tokens > limit:
            raise ValueError(
                f"prompt ({t}) + max_new_tokens ({max_new_tokens}) exceed the {name} model's context of {limit} "
                f"tokens; lower max_new_tokens to at most {limit - t}"
            )
    return spec


def _vocab_size(model: PreTrainedModel) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _eos_ids(target: PreTrainedModel, eos_token_id) -> set[int]:
    if eos_token_id is None:
        eos_token_id = getattr(target.generation_config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(e) for e in eos_token_id}
