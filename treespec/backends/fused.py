"""Fused forwards: a lean forward of a transformers causal LM over its own weights.

A transformers decoder layer runs its q, k, v projections as three matmuls and gate and up as
two, with RMSNorm, RoPE, bias adds and residuals as separate ops around them (docs/gpu.md,
"Fused forwards"). `fuse(model)` builds, once, a forward with one matmul for q/k/v and one for
gate/up, written as a plain chain of tensor ops that inductor (torch.compile, fullgraph, static
shapes) fuses into a few kernels per layer, in the style of gpt-fast's model.py:

    RMSNorm -> [q|k|v] = x W_qkv (+ b) -> q/k RMSNorm (Qwen3, Gemma 3) -> RoPE -> cache.update
    -> attention(q, keys, values, tree mask) -> o_proj (-> RMSNorm, Gemma 2/3) -> + residual
    -> RMSNorm -> [gate|up] = x W_gu -> act(gate) * up -> down (-> RMSNorm) -> + residual

The user's model is not changed: W_qkv, W_gu (and their biases) are new tensors, every other
weight (embedding, o_proj, down, norms, LM head) and the rotary module are the model's own,
shared by reference. The concatenations cost as much memory as the q, k, v, gate and up weights.

Grouped-query attention without repeating the cache: the g = H / H_kv query heads that share a
key/value head are laid along the query axis, so attention runs over H_kv heads with g n queries
each and the mask is repeated g times along its rows once per forward, not the keys once per
layer. Attention itself is transformers' eager arithmetic (scores in the model's dtype, fp32
softmax) for up to MATMUL_ATTENTION_ROWS query rows (a `fuse` argument) and sdpa beyond.

`FusedModel` takes the call the backends make (`SdpaBackend.forward`): input_ids and
position_ids (1, n), the additive mask (1, 1, n, S) or {layer type: mask}, the cache under
`cache` or `past_key_values`, `logits_to_keep`; it returns `.logits` (1, n or 1, V) and, with
`output_hidden_states=True`, `.hidden_states[-1]` (1, n, d): the final-norm output of every
new token, as transformers' last hidden state. Other attribute reads (config, dtype, device,
can_generate, generation_config, ...) go to the model. Which models it serves: backends/fusable.py (`can_fuse`).

Dimension letters: docs/dimensions.md (n new tokens, S keys handed to attention, H / H_kv
heads, g = H / H_kv, Dh head size, d hidden size, V vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from treespec.backends.base import UnsupportedModelError
from treespec.backends.compat import layer_types
from treespec.backends.fusable import GEMMA_NORM, FamilySpec, can_fuse, family_of, layer_norm_names, norm_eps

# Up to this many query rows (g n), attention runs as two matmuls around a softmax that inductor
# fuses: faster than sdpa at every size measured on the H200, 1 to 1,536 rows (docs/gpu.md, "Fused
# forwards"). Beyond it sdpa, which never holds the fp32 scores (1, H_kv, g n, S) in memory: for
# 2,048 rows over 32k keys and 4 kv heads they would take 1 GiB per layer.
MATMUL_ATTENTION_ROWS = 2048


@dataclass
class FusedOutput:
    """logits: (1, n, V), or (1, 1, V) with logits_to_keep=1. hidden_states, when asked for:
    a 1-tuple holding the final norm's output (1, n, d) for every new token (what the LM head
    reads); as in transformers, `hidden_states[-1]` is that tensor (the earlier layers' states
    are not kept). None when not asked for."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor] | None = None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kind: str) -> torch.Tensor:
    """transformers' RMSNorm of the family, op for op: fp32 statistics, then Llama's
    weight * x.to(dtype) or Gemma's (x * (1 + weight)).to(dtype)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if kind == GEMMA_NORM:
        return (normed * (1.0 + weight.float())).type_as(x)
    return weight * normed.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (1, n, heads, Dh) rotated by cos, sin (1, n, 1, Dh): transformers' rotate_half form."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def pack_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """(1, 1, n, S) -> (1, 1, g n, S): the mask of each query repeated for the g query heads
    that share a key/value head (their queries are packed along the query axis)."""
    _, _, n, s = mask.shape
    return mask[:, :, None].expand(1, 1, groups, n, s).reshape(1, 1, groups * n, s)


class FusedLayer(nn.Module):
    """One decoder layer over concatenated projections; reads the model's other weights."""

    def __init__(self, layer: nn.Module, index: int, spec: FamilySpec, layer_type: str, heads: int, kv_heads: int,
                 head_dim: int, matmul_attention_rows: int):  # fmt: skip
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.index, self.layer_type, self.kind, self.spec = index, layer_type, spec.norm, spec
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.scaling = attn.scaling
        self.softcap = getattr(attn, "attn_logit_softcapping", None)
        self.matmul_attention_rows = matmul_attention_rows
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        self.register_buffer("w_qkv", _cat([lin.weight for lin in qkv]), persistent=False)
        self.register_buffer("b_qkv", _cat_bias(qkv), persistent=False)
        self.register_buffer("w_gate_up", _cat([mlp.gate_proj.weight, mlp.up_proj.weight]), persistent=False)
        self.register_buffer("b_gate_up", _cat_bias([mlp.gate_proj, mlp.up_proj]), persistent=False)
        self.w_o, self.b_o = attn.o_proj.weight, attn.o_proj.bias
        self.w_down, self.b_down = mlp.down_proj.weight, mlp.down_proj.bias
        self.act = mlp.act_fn
        norms = [layer.get_submodule(name) for name in layer_norm_names(spec)]
        self.norm_weights = nn.ParameterList([norm.weight for norm in norms])  # attn in, [attn out,] mlp in, [mlp out]
        self.eps = [norm_eps(norm) for norm in norms]
        if spec.qk_norm:
            self.q_norm, self.k_norm = attn.q_norm.weight, attn.k_norm.weight
            self.qk_eps = (norm_eps(attn.q_norm), norm_eps(attn.k_norm))

    def norm(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return rms_norm(x, self.norm_weights[i], self.eps[i], self.kind)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """x (1, n, d); cos, sin (1, n, 1, Dh); mask (1, 1, g n, S) packed -> (1, n, d)."""
        n, h, h_kv, dh = x.shape[1], self.heads, self.kv_heads, self.head_dim
        g = h // h_kv
        qkv = F.linear(self.norm(x, 0), self.w_qkv, self.b_qkv).view(1, n, h + 2 * h_kv, dh)
        q, k, v = qkv.split([h, h_kv, h_kv], dim=2)  # (1, n, H | H_kv, Dh)
        if self.spec.qk_norm:
            q = rms_norm(q, self.q_norm, self.qk_eps[0], self.kind)
            k = rms_norm(k, self.k_norm, self.qk_eps[1], self.kind)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        keys, values = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.index)  # (1, H_kv, S, Dh)
        q = q.view(1, n, h_kv, g, dh).permute(0, 2, 3, 1, 4).reshape(1, h_kv, g * n, dh)
        out = self.attend(q, keys, values, mask)  # (1, H_kv, g n, Dh)
        out = out.view(1, h_kv, g, n, dh).permute(0, 3, 1, 2, 4).reshape(1, n, h * dh)
        out = F.linear(out, self.w_o, self.b_o)  # (1, n, d)
        sandwich = self.spec.sandwich
        if sandwich:
            out = self.norm(out, 1)
        x = x + out
        gate, up = F.linear(self.norm(x, 2 if sandwich else 1), self.w_gate_up, self.b_gate_up).chunk(2, dim=-1)
        out = F.linear(self.act(gate) * up, self.w_down, self.b_down)  # (1, n, d)
        if sandwich:
            out = self.norm(out, 3)
        return x + out

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q (1, H_kv, g n, Dh) over keys, values (1, H_kv, S, Dh) with the additive mask."""
        if self.softcap is None and q.shape[2] > self.matmul_attention_rows:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
        # transformers' eager attention: scores in the model's dtype, softmax in fp32; Gemma 2 caps them
        scores = torch.matmul(q, keys.transpose(2, 3)) * self.scaling  # (1, H_kv, g n, S)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        probs = F.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)  # (1, H_kv, g n, S)
        return torch.matmul(probs, values)


class FusedModel(nn.Module):
    """The lean forward of one transformers causal LM (module docstring). Build it with `fuse`.
    `wrapped` is the user's model; attributes this object lacks are read from it."""

    def __init__(self, model: PreTrainedModel, spec: FamilySpec, matmul_attention_rows: int):
        super().__init__()
        self.__dict__["wrapped"] = model  # not a submodule: the user's model stays theirs alone
        config, base = model.config.get_text_config(), model.base_model
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.types = layer_types(model)
        self.type_names = tuple(sorted(set(self.types)))  # fixed order: one trace per shape, in any process
        self.groups, self.kind, self.spec = heads // kv_heads, spec.norm, spec
        self.embed, self.rotary = base.embed_tokens, base.rotary_emb
        self.layers = nn.ModuleList(
            FusedLayer(layer, i, spec, self.types[i], heads, kv_heads, head_dim, matmul_attention_rows)
            for i, layer in enumerate(base.layers[: config.num_hidden_layers])
        )
        self.norm_weight, self.norm_eps = base.norm.weight, norm_eps(base.norm)
        head = model.get_output_embeddings()
        self.w_head, self.b_head = head.weight, head.bias
        self.final_softcap = getattr(config, "final_logit_softcapping", None)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or "wrapped" not in self.__dict__:
                raise
            return getattr(self.__dict__["wrapped"], name)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | dict[str, torch.Tensor],
        cache=None,
        past_key_values=None,
        use_cache: bool = True,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool = False,
        **unused,
    ) -> FusedOutput:
        """input_ids, position_ids (1, n); attention_mask additive (1, 1, n, S) or {layer type:
        mask}; cache (or past_key_values): a transformers Cache, written by `update` per layer."""
        cache = cache if cache is not None else past_key_values
        if cache is None or attention_mask is None:
            raise ValueError("a fused forward needs the KV cache and the additive attention mask the backend builds")
        first_mask = next(iter(attention_mask.values())) if isinstance(attention_mask, dict) else attention_mask
        if "tree_attention" in unused or first_mask.dtype == torch.bool:
            # FlashBackend's call: a boolean block mask plus its own attention function, which a
            # fused forward (always sdpa over the additive mask) would misread
            raise UnsupportedModelError(
                "fused forwards run sdpa over the additive tree mask of the sdpa backends (SdpaBackend, "
                "StaticSdpaBackend); run the unfused model with attention='flash'"
            )
        x = self.embed(input_ids)  # (1, n, d)
        rope_tables = {}
        by_type = self.spec.rope_per_layer_type
        for t in self.type_names:  # one table, or one per layer type (Gemma 3)
            cos, sin = self.rotary(x, position_ids, t) if by_type else self.rotary(x, position_ids)  # (1, n, Dh)
            rope_tables[t] = (cos[:, :, None], sin[:, :, None])  # (1, n, 1, Dh)
        masks = {t: pack_mask(attention_mask[t] if isinstance(attention_mask, dict) else attention_mask, self.groups)
                 for t in self.type_names}  # fmt: skip
        for layer in self.layers:
            x = layer(x, *rope_tables[layer.layer_type], masks[layer.layer_type], cache)
        x = rms_norm(x, self.norm_weight, self.norm_eps, self.kind)  # (1, n, d)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = F.linear(x[:, keep], self.w_head, self.b_head)  # (1, n or 1, V)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return FusedOutput(logits=logits, hidden_states=(x,) if output_hidden_states else None)


def fuse(model: PreTrainedModel, matmul_attention_rows: int = MATMUL_ATTENTION_ROWS) -> FusedModel:
    """The fused forward of `model` (module docstring); UnsupportedModelError, with the reason,
    for a model `can_fuse` refuses. Build it once per model and keep it: it owns the
    concatenated projection weights. Attention runs as two matmuls for up to
    `matmul_attention_rows` packed query rows, through sdpa beyond (0: always sdpa)."""
    reason = can_fuse(model)
    if reason is not None:
        raise UnsupportedModelError(f"cannot fuse: {reason}. Run the model itself (unfused) instead")
    with torch.no_grad():
        return FusedModel(model, family_of(model), matmul_attention_rows).eval()


def _cat(weights: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([w.detach() for w in weights])


def _cat_bias(linears: list[nn.Linear]) -> torch.Tensor | None:
    """The concatenated biases; zeros stand in for a missing one (adding 0 is exact); None when
    none has a bias."""
    if all(lin.bias is None for lin in linears):
        return None
    w = linears[0].weight
    return torch.cat([
        lin.bias.detach() if lin.bias is not None else w.new_zeros(lin.out_features) for lin in linears
    ])
