"""The public API: `generate` and `stream`.

Both check their inputs up front (clear errors, never a stack trace from inside torch), then run
on a kept `Speculator` (engine/speculator.py): one per (models, options), made on the first call
and reused by the later ones, so a loop of calls compiles and captures nothing after the first.
`treespec.release()` frees the kept objects; a `Speculator` of one's own gives explicit control
(its `max_context`, its lifetime).
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import PreTrainedModel

from treespec.drafting.ahead import OverlapConfig
from treespec.drafting.lookup import LookupConfig
from treespec.engine.checks import check_inputs, check_max_new_tokens, check_prompt, check_prompt_for
from treespec.engine.speculator import SpeculatorOptions, kept_speculator, release
from treespec.engine.stream import GenerationResult, TokenStream
from treespec.tree.topology import TreeTopology

__all__ = ["GenerationResult", "TokenStream", "generate", "release", "stream"]


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
    fuse: bool = False,
) -> TokenStream:
    """Like `generate`, but returns an iterator over the tokens of each step."""
    check_inputs(target, draft, compile=compile, streamer=streamer, eos_token_id=eos_token_id)
    check_prompt(input_ids)
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    check_prompt_for(input_ids, [("target", target)], max_new_tokens)  # before the kept object is made
    options = SpeculatorOptions(method=method, tree=tree, attention=attention, compile=compile, lookup=lookup,
                                acceptance=acceptance, overlap=overlap, fuse=fuse)
    speculator = kept_speculator(target, draft, options, input_ids.shape[1] + max_new_tokens)
    return speculator.stream(input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, eos_token_id=eos_token_id, generator=generator, streamer=streamer)


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
    fuse: bool = False,
) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens after `input_ids` with speculative decoding.

    Args:
        target: the model whose output distribution is kept exactly.
        draft: the small model that proposes tokens (None for method='autoregressive'), or a
            draft head trained for the target (`treespec.heads.load_head(target)`, docs/heads.md).
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
            `treespec.backends.factory.make_backend`.
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
        fuse: run fused forwards: one q/k/v and one gate/up matmul per decoder layer, from weights
            concatenated once (the models are not changed); the sdpa backends, and the Llama,
            Mistral, Qwen2/3 and Gemma 1/2/3 families (docs/gpu.md, "Fused forwards").
    Returns:
        GenerationResult with sequences (1, T + new) and stats.

    The backend, its caches, compiled forwards and CUDA graphs are kept for the next call with
    the same models and options (a `treespec.Speculator`, sized for at least 4096 tokens of
    prompt + max_new_tokens and remade larger when a call needs more); `treespec.release()`
    frees them.
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
        fuse=fuse,
    )
    return token_stream.run()
