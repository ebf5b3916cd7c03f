"""The draft head: one decoder layer that drafts from the target's own features (EAGLE-style).

    x_t, f_{t-1}  ->  fc([embed(x_t); f_{t-1}])  ->  decoder layer  ->  target's final norm  ->  f^_t
    f^_t          ->  target's LM head  ->  q logits for x_{t+1}

f is the target's last hidden state after its final norm (what its LM head reads, and what
EAGLE-1 regresses); f^_t is the head's prediction of f_t, in the same space, so the target's own
LM head turns it into logits and a deeper tree level reads it as its parent's feature. The
embedding, rotary embedding, final norm and LM head are the target's (shared, never copied or
saved); the head owns `fc` and `layer` only, a decoder layer of the target's own family
(transformers' class, built from a copy of the target's config with one layer). docs/heads.md
has the design and its sources.

To the backends the head looks like a causal LM: `forward(input_ids, position_ids,
attention_mask, cache, ...)` returns logits (and, asked, its features as hidden_states), so the
sdpa, static, flash and graphed backends run it unchanged, with its own one-layer KV cache. The
features it reads are not a forward argument: the drafter writes them into the head's feature
buffer (`set_features`) before each forward, so that a captured CUDA graph reads them from a
fixed address on every replay.

Dimension letters: docs/dimensions.md (n new tokens, Hm hidden size, V vocabulary).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

FEATURE_ROWS = 512  # the feature buffer's rows: the engine's prefill chunk; wider forwards use a one-off tensor
FINGERPRINT_SAMPLES = 4096  # values sampled from each target tensor for its fingerprint


class HeadMismatchError(ValueError):
    """A head used with a target it was not trained for (the message says what to do)."""


@dataclass(frozen=True)
class HeadIdentity:
    """Which target a head belongs to: stored in the head file, checked before any work."""

    target_name: str
    target_hash: str  # target_fingerprint(target)
    hidden_size: int  # Hm
    vocab_size: int  # V


@dataclass
class SharedParts:
    """The target's modules the head reads (held by reference: not the head's parameters)."""

    target: PreTrainedModel
    embed: nn.Module
    rotary: nn.Module
    norm: nn.Module
    lm_head: nn.Module


def target_fingerprint(target: PreTrainedModel) -> str:
    """A hash of the target's weights that does not depend on its dtype or device: per tensor,
    its name, shape and FINGERPRINT_SAMPLES evenly spaced values rounded to bfloat16 (a float32
    and a bfloat16 copy of one checkpoint agree; another checkpoint does not)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in sorted(target.state_dict().items()):
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
            sample = flat[::step][:FINGERPRINT_SAMPLES].to("cpu", torch.bfloat16).view(torch.int16)
            digest.update(f"{name}:{tuple(param.shape)}:".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def decoder_layer_class(target: PreTrainedModel) -> type[nn.Module]:
    """transformers' decoder layer class of the target's family (Qwen2DecoderLayer, ...)."""
    layers = getattr(target.base_model, "layers", None)
    if layers is None or len(layers) == 0:
        raise HeadMismatchError(
            f"{type(target).__name__} has no `model.layers` of decoder layers; a draft head reuses the target's "
            "decoder layer class and supports Llama-style causal LMs (Llama, Qwen2, Mistral, ...)"
        )
    return type(layers[0])


def head_config(target: PreTrainedModel, intermediate_size: int | None = None):
    """A copy of the target's text config for the head's one layer: full attention (a sliding
    window would need a per-layer mask the head does not build), sdpa, and optionally a narrower
    MLP (a smaller head file)."""
    config = copy.deepcopy(target.config.get_text_config())
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = ["full_attention"]
    for key, off in (("use_sliding_window", False), ("sliding_window", None)):
        if hasattr(config, key):
            setattr(config, key, off)
    if intermediate_size:
        config.intermediate_size = intermediate_size
    config._attn_implementation = "sdpa"
    return config


class DraftHead(nn.Module):
    """fc + one decoder layer, bound to a target whose embedding, norm and LM head it shares.

    Made by `DraftHead.for_target(target)` (fresh, for training) or `treespec.heads.io.load_head`
    (trained). Its parameters are `fc.*` and `layer.*`; `state_dict()` holds nothing else.
    """

    def __init__(self, config, layer_cls: type[nn.Module], identity: HeadIdentity):
        super().__init__()
        h = config.hidden_size
        self.config = config
        self.identity = identity
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.layer = layer_cls(config, layer_idx=0)
        self._cache_keyword = "cache" if "cache" in inspect.signature(layer_cls.forward).parameters else "past_key_values"
        self.shared: SharedParts | None = None
        # (FEATURE_ROWS, Hm): a buffer (moves with .to(), never saved) allocated here, so that no
        # forward allocates it (a compiled forward must not) and a captured graph reads one address
        self.register_buffer("_features", torch.zeros(FEATURE_ROWS, h), persistent=False)
        self._wide: torch.Tensor | None = None  # (n, Hm) for a forward wider than the buffer
        self.main_input_name = "input_ids"

    @classmethod
    def for_target(cls, target: PreTrainedModel, *, name: str, intermediate_size: int | None = None,
                   seed: int = 0) -> "DraftHead":
        """A fresh head for `target` (weights drawn from `seed`), on its device, float32."""
        config = head_config(target, intermediate_size)
        identity = HeadIdentity(name, target_fingerprint(target), config.hidden_size, vocab_of(target))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = cls(config, decoder_layer_class(target), identity)
        head.to(target.device)
        return head.bind(target, identity.target_hash)

    def bind(self, target: PreTrainedModel, fingerprint: str | None = None) -> "DraftHead":
        """Share `target`'s embedding, rotary embedding, final norm and LM head, after checking
        that the head was trained for it (HeadMismatchError otherwise). fingerprint: the
        target's, when the caller has computed it already."""
        check_identity(self.identity, target, fingerprint)
        base = target.base_model
        self.shared = SharedParts(target, target.get_input_embeddings(), base.rotary_emb, base.norm,
                                  target.get_output_embeddings())
        return self

    # ------------------------------------------------------------------ what the backends read
    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    @property
    def base_model(self) -> "DraftHead":
        return self

    def can_generate(self) -> bool:
        return True

    def get_input_embeddings(self) -> nn.Module:
        return self._shared().embed

    def get_output_embeddings(self) -> nn.Module:
        return self._shared().lm_head

    def _shared(self) -> SharedParts:
        if self.shared is None:
            raise HeadMismatchError("this draft head is bound to no target; load it with treespec.heads.load_head(target)")
        return self.shared

    # ------------------------------------------------------------------ features
    def set_features(self, features: torch.Tensor) -> None:
        """The parent features the next forward reads: (n, Hm), one per new token."""
        n = features.shape[0]
        if n > FEATURE_ROWS:
            self._wide = features.to(self.dtype)
            return
        self._features[:n].copy_(features)

    def _feature_input(self, n: int, device: torch.device) -> torch.Tensor:
        """(n, Hm): what set_features wrote (zeros before any, as for a cost measurement)."""
        if n > FEATURE_ROWS:
            if self._wide is None or self._wide.shape[0] != n:
                return torch.zeros(n, self.config.hidden_size, dtype=self.dtype, device=device)
            return self._wide
        return self._features[:n]

    # ------------------------------------------------------------------ forward
    def step(self, input_ids: torch.Tensor, features: torch.Tensor, position_ids: torch.Tensor,
             attention_mask=None, cache=None, use_cache: bool = False, **kwargs) -> torch.Tensor:
        """The head's layer: input_ids (B, n), features (B, n, Hm) -> predicted features f^ (B, n, Hm),
        after the target's final norm."""
        shared = self._shared()
        x = self.fc(torch.cat([shared.embed(input_ids).to(self.dtype), features.to(self.dtype)], dim=-1))  # (B, n, Hm)
        rope = shared.rotary(x, position_ids)
        if isinstance(attention_mask, dict):  # a mask per layer type: the head's one layer attends fully
            attention_mask = attention_mask["full_attention"]
        out = self.layer(x, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache,
                         position_embeddings=rope, **{self._cache_keyword: cache}, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        return shared.norm(h.to(shared.norm.weight.dtype))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """q logits from predicted features: (..., Hm) -> (..., V), through the target's LM head."""
        lm_head = self._shared().lm_head
        return lm_head(features.to(lm_head.weight.dtype))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask=None, cache=None,
                past_key_values=None, use_cache: bool = True, logits_to_keep: int = 0,
                output_hidden_states: bool = False, **kwargs) -> CausalLMOutputWithPast:
        """The causal-LM call the backends make: input_ids, position_ids (1, n) with the features
        from set_features -> logits (1, n, V) (the last logits_to_keep), and with
        output_hidden_states the predicted features (1, n, Hm) as hidden_states[-1]."""
        n = input_ids.shape[1]
        feats = self._feature_input(n, input_ids.device)[None]  # (1, n, Hm)
        f = self.step(input_ids, feats, position_ids, attention_mask, cache if cache is not None else past_key_values,
                      use_cache, **kwargs)  # (1, n, Hm)
        logits = self.logits(f[:, -logits_to_keep:] if logits_to_keep else f)
        return CausalLMOutputWithPast(logits=logits, hidden_states=(f,) if output_hidden_states else None)


def vocab_of(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_identity(identity: HeadIdentity, target: PreTrainedModel, fingerprint: str | None = None) -> None:
    """HeadMismatchError unless the head was trained for `target`: same hidden size, same
    vocabulary, same weights (fingerprint)."""
    hidden = target.config.get_text_config().hidden_size
    if identity.hidden_size != hidden:
        raise HeadMismatchError(
            f"this draft head has hidden size {identity.hidden_size} (trained for {identity.target_name!r}) but the "
            f"target's is {hidden}: it belongs to another model. Train one for this target with "
            "`treespec-train-head target=<this target>`"
        )
    if identity.vocab_size != vocab_of(target):
        raise HeadMismatchError(
            f"this draft head scores {identity.vocab_size} token ids (trained for {identity.target_name!r}) but the "
            f"target has {vocab_of(target)}: it belongs to another model. Train one with `treespec-train-head`"
        )
    fingerprint = fingerprint or target_fingerprint(target)
    if identity.target_hash != fingerprint:
        raise HeadMismatchError(
            f"this draft head was trained for {identity.target_name!r} (weights hash {identity.target_hash}) but the "
            f"target's weights hash is {fingerprint}: a head only drafts well for the exact model it was trained on. "
            "Train one for this target with `treespec-train-head target=<this target>`"
        )
