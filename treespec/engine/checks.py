"""Argument checks of the public API: every bad input fails here, before any model work, with a
message that names the argument and says what to do (never an error from deep inside torch).

Integral numpy and torch scalars (`np.int64(64)`, `torch.tensor(64)`) are accepted wherever an
int is, and turned into plain ints; strings, floats and bools are refused.

`ArgumentError.argument` names the offending argument, so that a caller with its own names for
them (the benchmark's config keys) can report its own key.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch
from transformers import PreTrainedModel

from treespec.backends.compat import vocab_size
from treespec.errors import ArgumentError
from treespec.drafting.ahead import OverlapConfig
from treespec.drafting.dynamic import DynamicTreeConfig
from treespec.drafting.static import StaticTree
from treespec.tree.auto import AutoTreeConfig

METHODS = ("tree", "linear", "autoregressive")


def as_int(value) -> int | None:
    """value as a plain int if it is an integral scalar (int, numpy integer, 0-d integer tensor),
    else None. Bools are not ints here."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            return None
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy integers are Integral
        return None
    return int(value)


def resolve_switch(value, config_cls: type, argument: str):
    """An on/off option that also takes a config (lookup=, overlap=): False/None -> None (off),
    True -> config_cls's defaults, an instance of config_cls -> itself; anything else is a TypeError."""
    if value is None or value is False:
        return None
    if value is True:
        return config_cls()
    if isinstance(value, config_cls):
        return value
    raise TypeError(f"{argument} must be True, False or a treespec.{config_cls.__name__}, got {type(value).__name__}")


def check_inputs(target, draft, *, compile, streamer, eos_token_id) -> None:
    """The arguments that are objects or switches, checked first (before any other check reads
    a model): the models are loaded models, `compile` is a bool or None, `streamer` has put and
    end, and eos_token_id holds token ids."""
    for name, model in (("target", target), ("draft", draft)):
        if model is None and name == "draft":
            continue
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            raise ArgumentError(name, f"{name} is {str(model)!r}, a name or path, but generate/stream take a loaded model: "
                                f"load it first with treespec.loading.load_model({str(model)!r}) (or transformers' "
                                "AutoModelForCausalLM.from_pretrained)")  # fmt: skip
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise ArgumentError(name, f"{name} must be a transformers causal LM (a PreTrainedModel), got "
                                f"{type(model).__name__}; load one with treespec.loading.load_model")  # fmt: skip
    if compile is not None and not isinstance(compile, bool):
        raise ArgumentError("compile", f"compile must be True, False or None (None: compile on CUDA only), got {compile!r}")
    if streamer is not None and not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise ArgumentError("streamer", f"streamer must have put(token_ids) and end() methods, like transformers' "
                            f"TextStreamer(tokenizer), got {type(streamer).__name__} {streamer!r:.40}")  # fmt: skip
    if eos_token_id is not None:
        eos_ids(target, eos_token_id)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ArgumentError("method", f"unknown method {method!r}; choose one of {METHODS}")


def check_max_new_tokens(max_new_tokens) -> int:
    """max_new_tokens as a plain int >= 1."""
    value = as_int(max_new_tokens)
    if value is None or value < 1:
        raise ArgumentError(
            "max_new_tokens", f"max_new_tokens must be a whole number >= 1 (an int), got {max_new_tokens!r}"
        )
    return value


def check_prompt(input_ids) -> None:
    """Type and shape of the prompt (its ids and device are checked against the models later)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long:
        raise TypeError("input_ids must be a LongTensor of shape (1, T), e.g. tokenizer(text, return_tensors='pt').input_ids")
    if input_ids.dim() != 2:
        raise ArgumentError(
            "input_ids", f"input_ids must have shape (1, T), got {tuple(input_ids.shape)}; use input_ids[None] for one prompt"
        )
    if input_ids.shape[0] != 1:
        raise ArgumentError(
            "input_ids",
            f"batch size {input_ids.shape[0]} is not supported yet: treespec decodes one prompt at a time; "
            "call generate once per prompt"
        )
    if input_ids.shape[1] == 0:
        raise ArgumentError(
            "input_ids", "the prompt is empty: give at least one token (e.g. the BOS token or a chat template)"
        )


def check_lookup(lookup_config: object | None, *, has_drafts: bool, greedy: bool, acceptance: str) -> None:
    """lookup (a resolved LookupConfig, None when off) can run: its branches join a draft model's
    tree, and when sampling only token-level rejection verifies them (as point masses)."""
    if lookup_config is None:
        return
    if not has_drafts:
        raise ArgumentError("lookup", "lookup=True merges context n-gram branches into a draft model's tree; "
                            "use method='tree' or 'linear' with a draft model")
    if not greedy and acceptance != "rejection":
        raise ArgumentError("lookup", f"lookup branches are verified as point masses by acceptance='rejection' only; "
                            f"acceptance={acceptance!r} does not handle them: use acceptance='rejection' or lookup=False")


def check_pair(target: PreTrainedModel, draft: PreTrainedModel) -> None:
    """Target and draft can work together: one device, and a draft vocabulary that is the target's
    or a prefix of it (the same tokenizer with fewer padding rows, docs/sampling.md)."""
    vt, vd = vocab_size(target), vocab_size(draft)
    if vd > vt:
        raise ArgumentError(
            "draft",
            f"the draft scores {vd} token ids but the target only {vt}: the draft could propose ids the target has "
            "no probability for. Use a draft with at most the target's vocabulary (the same tokenizer; fewer "
            "padding rows are fine), or swap the models if the larger one is meant to be the target"
        )
    if draft.device != target.device:
        raise ArgumentError("draft", f"target is on {target.device} but draft is on {draft.device}; put both on one "
                            "device")


def check_prompt_for(input_ids: torch.Tensor, models: Sequence[tuple[str, PreTrainedModel]], max_new_tokens: int) -> None:
    """The prompt fits the models: device, token ids in the target's vocabulary, context length.
    models: [("target", target)] or [("target", target), ("draft", draft)]."""
    target = models[0][1]
    if input_ids.device != target.device:
        raise ArgumentError("input_ids", f"input_ids is on {input_ids.device} but the target is on {target.device}")
    vocab = target.get_input_embeddings().weight.shape[0]
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ArgumentError(
            "input_ids",
            f"input_ids holds token id {bad}, outside the target's vocabulary 0..{vocab - 1}; the prompt must come "
            "from the target's own tokenizer (tokenizer(text, return_tensors='pt').input_ids)",
        )
    t = input_ids.shape[1]
    for name, model in models:
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if limit is not None and t >= limit:
            raise ArgumentError("input_ids", f"the prompt has {t} tokens but the {name} model's context is {limit}")
        if limit is not None and t + max_new_tokens > limit:
            raise ArgumentError(
                "max_new_tokens",
                f"prompt ({t}) + max_new_tokens ({max_new_tokens}) exceed the {name} model's context of {limit} "
                f"tokens; lower max_new_tokens to at most {limit - t}",
            )


def eos_ids(target: PreTrainedModel, eos_token_id) -> set[int]:
    """The stop ids: eos_token_id (an id, or a list / 1-d tensor of ids), or by default the target's
    generation_config.eos_token_id, as transformers does."""
    argument = eos_token_id
    if eos_token_id is None:
        argument = eos_token_id = getattr(target.generation_config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, torch.Tensor) and eos_token_id.dim() == 1:
        eos_token_id = list(eos_token_id)
    if isinstance(eos_token_id, Sequence) and not isinstance(eos_token_id, (str, bytes)):
        items = list(eos_token_id)
    else:
        items = [eos_token_id]
    values = [as_int(e) for e in items]
    if any(isinstance(e, (str, bytes)) for e in items):
        raise ArgumentError(
            "eos_token_id",
            f"eos_token_id must be a token id (an int) or a list of ids, got the string {argument!r}; "
            "convert it first: tokenizer.convert_tokens_to_ids(...)",
        )
    if any(v is None for v in values):
        raise ArgumentError(
            "eos_token_id", f"eos_token_id must be a token id (an int) or a list of ids, got {argument!r}"
        )
    if any(v < 0 for v in values):
        raise ArgumentError("eos_token_id", f"eos_token_id must hold token ids >= 0, got {argument!r}; pass the id "
                            "of the stop token (tokenizer.eos_token_id), or [] to never stop early")  # fmt: skip
    return set(values)


def generator_for(device: torch.device, generator: torch.Generator | None) -> torch.Generator:
    """The generator every random draw uses: the caller's (checked), or a fresh one seeded from
    torch's global RNG (like transformers' sampling)."""
    if generator is None:
        seed = int(torch.randint(0, 2**62, (1,)))
        return torch.Generator(device=device).manual_seed(seed)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if torch.device(generator.device).type != device.type:
        raise ArgumentError(
            "generator",
            f"the generator is on {generator.device} but the models are on {device}; "
            f"use torch.Generator(device='{device.type}').manual_seed(...)"
        )
    return generator


def check_overlap(config: OverlapConfig | None, spec, lookup_config) -> None:
    """overlap= needs a static or dynamic tree with drafts (drafting/ahead.py) and no lookup
    branches. spec: the resolved tree policy; lookup_config: LookupConfig | None."""
    if config is None:
        return
    # tree='auto' resolves to a static tree, or to the target alone (then nothing is drafted ahead)
    static = isinstance(spec, StaticTree) and spec.has_drafts
    dynamic = isinstance(spec, DynamicTreeConfig)
    if not (static or dynamic or isinstance(spec, AutoTreeConfig)):
        kind = type(spec).__name__ if not isinstance(spec, StaticTree) else "the target alone"
        raise ArgumentError("overlap", f"overlap=True drafts ahead below a static tree (widths, a preset, a TreeTopology, "
                            f"method='linear') or a dynamic one; this generation uses {kind}: pass one of those or "
                            "overlap=False")
    if lookup_config is not None:
        raise ArgumentError("overlap", "overlap=True and lookup=True cannot be combined yet (lookup branches change the tree "
                         "every step); use one of them")
    if static and config.levels > spec.topology.max_depth:
        raise ArgumentError("overlap", f"OverlapConfig(levels={config.levels}) exceeds the tree's depth "
                         f"{spec.topology.max_depth}; use levels <= {spec.topology.max_depth}")
    if dynamic and config.levels != 1:
        raise ArgumentError("overlap", f"a dynamic tree drafts ahead one level (the next root: its tree depends on "
                            f"that root's q only), got OverlapConfig(levels={config.levels}); use levels=1")
