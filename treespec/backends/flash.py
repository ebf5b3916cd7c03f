"""Tree attention with flash-attn: the cached prefix without a mask, the tree block with one.

flash-attn has no arbitrary masks, so a tree forward is split the way production engines split
shared-prefix (cascade) attention:

    prefix  every new token attends to all C committed cache entries, unmasked:
            `flash_attn_with_kvcache(..., cache_seqlens=C, return_softmax_lse=True)` reads the KV
            cache in place (GQA handled by the kernel) and returns the log-sum-exp of each row
    block   each new token attends to the s scratch entries its block mask allows (itself and
            its ancestors in the tree, at most a few hundred keys): a small dense masked
            attention in float32
    merge   the two partial softmaxes are combined exactly by their log-sum-exps

Merge identity, for two disjoint key sets a and b with scores S_a, S_b:

    l_x = logsumexp(S_x),  o_x = softmax(S_x) V_x
    l   = logaddexp(l_a, l_b)
    o   = exp(l_a - l) o_a + exp(l_b - l) o_b        == softmax([S_a, S_b]) [V_a; V_b]

An empty part (no committed tokens yet) has l = -inf and weight 0. flash-attn reports +inf for a
row with no keys, so that value is mapped to -inf first.

The backend plugs into any transformers model through its attention interface: an attention
function is registered with `AttentionInterface` the first time a `FlashBackend` is used, the
model's `config._attn_implementation` points to it only for the duration of each forward, and
the tree metadata (`TreeAttentionMeta`) travels in the model's forward kwargs, which transformers
hands to every attention call. No model code is forked and nothing is stored on the model.

flash-attn is optional: this module imports it only when a FlashBackend runs on CUDA. On the CPU
the tests drive the same code path with `reference_prefix_attention`, a dense stand-in with
flash-attn's calling convention.

Dimension letters: docs/dimensions.md (n new tokens, C committed, s scratch incl. the new ones,
H query heads, H_kv key/value heads, Dh head size, S_max cache capacity, V vocabulary).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import PreTrainedModel

from treespec.backends.base import ForwardOutput, TreeCache, UnsupportedModelError
from treespec.backends.compat import FULL, cache_kwargs, hidden_kwargs, layer_types, with_hidden
from treespec.backends.kv_cache import TreeKVCache

ATTN_NAME = "treespec_tree_flash"  # the key registered with transformers' AttentionInterface
FLASH_DTYPES = (torch.float16, torch.bfloat16)

# prefix attention: (q (1, n, H, Dh), k_cache (1, S_max, H_kv, Dh), v_cache, cache_seqlens
# IntTensor (1,), scale) -> (out (1, n, H, Dh), lse FloatTensor (1, H, n))
PrefixAttention = Callable[..., tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------- the maths
def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention over the union of two disjoint key sets from their partial results.

    out_a, out_b: (..., Dh) each part's attention output (softmax-normalised within the part).
    lse_a, lse_b: (...) float32 log-sum-exp of each part's scores; -inf for an empty part.
    Returns (out (..., Dh) float32, lse (...) float32). A row empty in both parts gives out 0
    and lse -inf.
    """
    lse = torch.logaddexp(lse_a, lse_b)  # (...)
    # both parts empty: keep the weights at exp(-inf) = 0 instead of exp(nan)
    ref = torch.where(torch.isneginf(lse), 0.0, lse)
    w_a = torch.exp(lse_a - ref)[..., None]  # (..., 1)
    w_b = torch.exp(lse_b - ref)[..., None]
    return out_a.float() * w_a + out_b.float() * w_b, lse


def block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention of n queries to s block keys, in float32, with its log-sum-exp.

    q: (H, n, Dh); k, v: (H_kv, s, Dh); query head h reads key/value head h // (H // H_kv), as
        in transformers' repeat_kv.
    bias: (n, s) or (g * n, s) float32 additive mask, 0 where visible and -inf where not
        (g = H // H_kv; the (g * n, s) form is `bias.repeat(g, 1)`, precomputed once per forward).
    Returns (out (H, n, Dh) float32, lse (H, n) float32); a row with no visible key gives
    out 0 and lse -inf.
    """
    h, n, dh = q.shape
    hk, s = k.shape[0], k.shape[1]
    g = h // hk
    if bias.shape[0] != g * n:
        bias = bias.repeat(g, 1)  # (g*n, s): rows ordered like the grouped queries below
    # group the g query heads that share one kv head: (H, n, Dh) -> (H_kv, g*n, Dh)
    qg = q.reshape(hk, g * n, dh).float()
    scores = torch.baddbmm(bias[None], qg, k.float().transpose(1, 2), alpha=scale)  # (H_kv, g*n, s)
    lse = torch.logsumexp(scores, dim=-1)  # (H_kv, g*n)
    ref = torch.where(torch.isneginf(lse), 0.0, lse)
    p = torch.exp(scores - ref[..., None])  # (H_kv, g*n, s); fully masked rows are all 0
    out = torch.bmm(p, v.float())  # (H_kv, g*n, Dh)
    return out.reshape(h, n, dh), lse.reshape(h, n)


def block_attention_with_prefix(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    prefix_out: torch.Tensor,
    prefix_lse: torch.Tensor,
) -> torch.Tensor:
    """Block attention and the LSE merge in one softmax, with few kernels (it runs per layer).

    The prefix's partial result acts as one extra key per query row: score `prefix_lse`, value
    `prefix_out`. softmax over [block scores, prefix_lse] then weighs the block values and the
    prefix output exactly as `merge_attention` does (exp(l_p) = the prefix's softmax mass).

    q: (H, n, Dh); k, v: (H_kv, s, Dh); bias: (g * n, s) float32 (see block_attention).
    prefix_out: (H, n, Dh) softmax-normalised prefix output; prefix_lse: (H, n) float32, -inf
        for an empty prefix. Every row must see at least one block key (the engine's block
        masks always include the token itself).
    Returns out (H, n, Dh) float32.
    """
    h, n, dh = q.shape
    hk, s = k.shape[0], k.shape[1]
    g = h // hk
    qg = q.to(torch.float32, memory_format=torch.contiguous_format).reshape(hk, g * n, dh)
    scores = torch.baddbmm(bias[None], qg, k.float().transpose(1, 2), alpha=scale)  # (H_kv, g*n, s)
    scores = torch.cat([scores, prefix_lse.reshape(hk, g * n, 1)], dim=-1)  # (H_kv, g*n, s+1)
    p = torch.softmax(scores, dim=-1)
    po = prefix_out.to(torch.float32, memory_format=torch.contiguous_format).reshape(hk, g * n, dh)
    out = torch.baddbmm(po * p[..., s:], p[..., :s], v.float())  # (H_kv, g*n, Dh)
    return out.view(h, n, dh)


def reference_prefix_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense stand-in for `flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=...,
    softmax_scale=scale, causal=False, return_softmax_lse=True)`, same shapes and conventions
    (including lse = +inf for a row with no keys). For CPU tests; float32 inside.

    q: (1, n, H, Dh); k_cache, v_cache: (1, S_max, H_kv, Dh); cache_seqlens: IntTensor (1,).
    Returns (out (1, n, H, Dh) in q's dtype, lse (1, H, n) float32).
    """
    _, n, h, dh = q.shape
    s_max, hk = k_cache.shape[1], k_cache.shape[2]
    visible = torch.arange(s_max, device=q.device) < cache_seqlens[0]  # (S_max,)
    bias = torch.zeros(n, s_max, device=q.device).masked_fill(~visible, float("-inf"))  # (n, S_max)
    out, lse = block_attention(q[0].transpose(0, 1), k_cache[0].transpose(0, 1), v_cache[0].transpose(0, 1), bias, scale)
    lse = torch.where(torch.isneginf(lse), float("inf"), lse)  # flash-attn's convention for empty rows
    return out.transpose(0, 1)[None].to(q.dtype), lse[None]


def flash_available() -> bool:
    """True when the flash_attn package can be imported (it is only imported when used)."""
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def _flash_prefix_op():
    """Register `treespec::flash_prefix` (once, on first use: nothing is registered at import)."""
    from flash_attn import flash_attn_with_kvcache

    @torch.library.custom_op("treespec::flash_prefix", mutates_args=(), device_types="cuda")
    def flash_prefix(
        q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = flash_attn_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=cache_seqlens, softmax_scale=scale, causal=False, return_softmax_lse=True
        )
        return out.contiguous(), lse.contiguous()  # (1, n, H, Dh), (1, H, n)

    @flash_prefix.register_fake
    def _(q, k_cache, v_cache, cache_seqlens, scale):
        b, n, h, dh = q.shape
        return q.new_empty(b, n, h, dh), q.new_empty(b, h, n, dtype=torch.float32)

    return torch.ops.treespec.flash_prefix.default  # the op itself: what dynamo traces as one node


# --------------------------------------------------------------------------- the attention function
@dataclass
class TreeAttentionMeta:
    """What the attention function needs besides q, k, v; built once per forward.

    cache_seqlens: IntTensor (1,) committed entries C (device; the prefix flash-attn reads).
    block_index: LongTensor (s,) cache slots of the scratch entries this forward's block sees:
        C .. C + s - 1 (the earlier tree nodes of this step, then the n new tokens).
    bias: FloatTensor (g * n, s) additive block mask (0 visible, -inf hidden), rows repeated
        for the g query heads that share a kv head.
    prefix_attention: the flash-attn call (or its dense stand-in on the CPU).
    """

    cache_seqlens: torch.Tensor
    block_index: torch.Tensor
    bias: torch.Tensor
    prefix_attention: PrefixAttention = field(repr=False)


def tree_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    tree_attention: TreeAttentionMeta | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (registered as ATTN_NAME).

    query: (1, H, n, Dh) after RoPE; key, value: (1, H_kv, S, Dh) everything the cache returned
    (S_max slots for the static cache, C + s for TreeKVCache); attention_mask is ignored: the
    mask is in `tree_attention`. Returns (out (1, n, H, Dh), None) like transformers' own
    attention functions.
    """
    if tree_attention is None:
        raise RuntimeError(
            f"attn_implementation={ATTN_NAME!r} needs the tree metadata that FlashBackend.forward passes; "
            "run the model through treespec's FlashBackend, not directly"
        )
    meta = tree_attention
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out_p, lse_p = meta.prefix_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), meta.cache_seqlens, scale
    )  # (1, n, H, Dh), (1, H, n): strided views in, no copies of the cache
    # a row with no committed key has lse +inf in flash-attn's convention: make it weigh 0
    lse_p = lse_p[0].nan_to_num(nan=float("-inf"), posinf=float("-inf"))  # (H, n)
    kb = key[0].index_select(1, meta.block_index)  # (H_kv, s, Dh)
    vb = value[0].index_select(1, meta.block_index)
    out = block_attention_with_prefix(query[0], kb, vb, meta.bias, scale, out_p[0].transpose(0, 1), lse_p)  # (H, n, Dh)
    return out.transpose(0, 1)[None].to(query.dtype), None  # (1, n, H, Dh)


def _register() -> None:
    """Register the attention function with transformers (idempotent; done on first use)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, tree_attention_forward)


@contextlib.contextmanager
def attn_implementation(model: PreTrainedModel, name: str):
    """Point the model's attention at `name` for the duration of the block, then restore it."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


# --------------------------------------------------------------------------- the backend
@dataclass
class FlashBackend:
    """Cascade tree attention: flash-attn over the committed prefix + a masked block, merged by LSE.

    prefix_attention: None for flash-attn itself (CUDA, fp16/bf16); tests on the CPU pass
        `reference_prefix_attention`.
    Makes `TreeKVCache`s (committed count on the host); runs against `StaticTreeKVCache` too
    (device-side counters, which CUDA graphs need: GraphedBackend hands those out).
    """

    name: str = "flash"
    prefix_attention: PrefixAttention | None = None

    def make_cache(self, model: PreTrainedModel, capacity: int, role: str = "target") -> TreeCache:
        return TreeKVCache.for_model(model, capacity)

    def _prefix(self) -> PrefixAttention:
        # resolved here, outside any compiled region, so that a compiled forward sees the op
        return self.prefix_attention or _flash_prefix_op()

    def check_model(self, model: PreTrainedModel) -> None:
        config = model.config.get_text_config()
        if not getattr(config, "is_decoder", True) or model.config.is_encoder_decoder:
            raise UnsupportedModelError("only decoder-only causal LMs are supported")
        types = set(layer_types(model))  # Mistral-style configs window every layer without layer_types
        if types != {FULL}:
            raise UnsupportedModelError(
                f"{type(model).__name__} has sliding-window or other non-full attention layers ({sorted(types)}); "
                "the flash tree backend supports full attention only: use attention='sdpa', which honours each "
                "layer's window (with the static cache and CUDA graphs on a GPU too)"
            )
        if getattr(config, "attn_logit_softcapping", None):
            raise UnsupportedModelError("attention logit soft-capping is not supported by the flash tree backend; use attention='sdpa'")
        if self.prefix_attention is None:
            if not flash_available():
                raise UnsupportedModelError(
                    "attention='flash' needs the flash_attn package (pip install 'treespec[flash]'); "
                    "use attention='sdpa' or 'auto' without it"
                )
            if model.device.type != "cuda":
                raise UnsupportedModelError(f"flash-attn runs on CUDA only, but the model is on {model.device}; use attention='sdpa'")
            if model.dtype not in FLASH_DTYPES:
                raise UnsupportedModelError(
                    f"flash-attn needs float16 or bfloat16 weights, the model is {model.dtype}; "
                    "load it with dtype=torch.bfloat16 or use attention='sdpa'"
                )

    def run_captured(self, cache: TreeCache, key: object, fn) -> None:
        """See `Backend.run_captured`: nothing to capture here."""
        fn()

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
        """Run `model` on n new tokens and return their logits (the `Backend` contract).

        input_ids, position_ids: LongTensor (1, n); block_mask: BoolTensor (n, s).
        Returns FloatTensor (n, V), or (1, V) with last_only; with hidden, a ForwardOutput
        with the last hidden states (n, Hm) too.
        """
        _register()
        n, s = block_mask.shape
        device = input_ids.device
        cache.begin_forward(n)
        committed = cache.committed_index(device)  # (1,)
        config = model.config.get_text_config()
        g = config.num_attention_heads // config.num_key_value_heads
        bias = torch.zeros(n, s, dtype=torch.float32, device=device).masked_fill_(~block_mask, float("-inf"))
        meta = TreeAttentionMeta(
            cache_seqlens=committed.to(torch.int32),
            block_index=committed + torch.arange(s, device=device),  # (s,)
            bias=bias.repeat(g, 1),  # (g*n, s)
            prefix_attention=self._prefix(),
        )
        with attn_implementation(model, ATTN_NAME):
            out = model(
                input_ids=input_ids,
                position_ids=position_ids,
                # a 4D mask makes transformers skip building its own (which would inspect the
                # tree's position ids); the attention function reads the mask from the metadata
                attention_mask=block_mask[None, None],
                **cache_kwargs(model, cache),
                use_cache=True,
                logits_to_keep=1 if last_only else 0,
                tree_attention=meta,
                **hidden_kwargs(hidden),
            )
        return with_hidden(out, hidden)
