"""Which models `fuse` (backends/fused.py) can rebuild as a lean forward, and how each family's
layer is put together.

A family is served when the lean forward computes what the model's own forward computes, op for
op: the same RMSNorm (fp32 upcast; weight applied after the cast back, Llama-style, or
(1 + weight) before it, Gemma-style), the same RoPE (the model's own rotary module), q/k norms
where the family has them (Qwen3, Gemma 3), the "sandwich" norms after attention and MLP
(Gemma 2/3), logit soft-capping (Gemma 2/3). Everything else is refused with a reason, so the
caller runs the model itself: another family, a subclass of a served one (it may override the
forward), projections that are not plain `nn.Linear` (quantised), hooks on modules (offloading,
adapters), weights on several devices or on the meta device, dropout while training, and RoPE
whose frequencies depend on the sequence length through host control flow ('dynamic').

`can_fuse(model)` answers None (fusable) or the reason, in one line.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

LLAMA_NORM, GEMMA_NORM = "llama", "gemma"  # w * x.to(dtype)  |  (x * (1 + w)).to(dtype)


@dataclass(frozen=True)
class FamilySpec:
    """How one family's decoder layer differs from Llama's."""

    norm: str  # LLAMA_NORM or GEMMA_NORM
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3, Gemma 3)
    sandwich: bool = False  # norms after attention and after the MLP too (Gemma 2/3)
    rope_per_layer_type: bool = False  # one rotary table per attention type (Gemma 3)


FAMILIES = {
    "LlamaForCausalLM": FamilySpec(LLAMA_NORM),
    "MistralForCausalLM": FamilySpec(LLAMA_NORM),
    "Qwen2ForCausalLM": FamilySpec(LLAMA_NORM),
    "Qwen3ForCausalLM": FamilySpec(LLAMA_NORM, qk_norm=True),
    "GemmaForCausalLM": FamilySpec(GEMMA_NORM),
    "Gemma2ForCausalLM": FamilySpec(GEMMA_NORM, sandwich=True),
    "Gemma3ForCausalLM": FamilySpec(GEMMA_NORM, qk_norm=True, sandwich=True, rope_per_layer_type=True),
}
ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def family_of(model: PreTrainedModel) -> FamilySpec | None:
    """The model's family, for transformers' own classes only (a subclass may change the forward)."""
    cls = type(model)
    if not cls.__module__.startswith("transformers.models."):
        return None
    return FAMILIES.get(cls.__name__)


def layer_norm_names(spec: FamilySpec) -> tuple[str, ...]:
    """The RMSNorm modules of one decoder layer, in the order the layer applies them."""
    if spec.sandwich:
        return ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")
    return ("input_layernorm", "post_attention_layernorm")


def can_fuse(model: PreTrainedModel) -> str | None:
    """None when `fuse(model)` gives a forward equal to the model's own; else why not (one line)."""
    name = type(model).__name__
    spec = family_of(model)
    if spec is None:
        return (f"{name} is not one of the families fused forwards serve ({', '.join(sorted(FAMILIES))}, as "
                "transformers defines them); it runs through its own forward")
    config = model.config.get_text_config()
    base = model.base_model
    if model.training and (getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        return f"{name} is in training mode with attention dropout; call model.eval() to fuse it"
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        return f"{name} has no rotary embedding module at model.rotary_emb"
    rope_types = rotary.rope_type.values() if isinstance(rotary.rope_type, dict) else [rotary.rope_type]
    if spec.rope_per_layer_type and "layer_type" not in inspect.signature(type(rotary).forward).parameters:
        return (f"{name}'s rotary module takes no layer type in this transformers version; fused forwards read "
                "one rotary table per attention type from it")
    if any("dynamic" in str(t) for t in rope_types):
        return (f"{name} uses dynamic RoPE scaling, whose frequencies are recomputed on the host as the sequence "
                "grows; fused forwards cannot capture that")
    for i, layer in enumerate(base.layers):
        reason = _layer_reason(layer, spec)
        if reason:
            return f"{name} layer {i}: {reason}"
    if not isinstance(model.get_output_embeddings(), nn.Linear):
        return f"{name}'s LM head is not an nn.Linear"
    hooked = [n for n, m in model.named_modules() if _foreign_hooks(m)]
    if hooked:
        return (f"{name} has forward hooks on {hooked[0] or 'the model'} (offloading, adapters, ...), which a fused "
                "forward would skip")
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1 or torch.device("meta") in devices:
        return f"{name}'s weights are on {sorted(map(str, devices))}; fused forwards need them all on one device"
    return None


def _layer_reason(layer: nn.Module, spec: FamilySpec) -> str | None:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return "no self_attn / mlp (a mixture of experts or another layer layout)"
    for owner, names in ((attn, ATTN_PROJECTIONS), (mlp, MLP_PROJECTIONS)):
        for proj in names:
            linear = getattr(owner, proj, None)
            if type(linear) is not nn.Linear or type(linear.weight) is not nn.Parameter:
                return (f"{proj} is not a plain nn.Linear (quantised or replaced); fused forwards read its weight "
                        "directly")
    if not hasattr(mlp, "act_fn"):
        return "the MLP has no act_fn"
    if not isinstance(getattr(attn, "scaling", None), float):
        return "the attention module has no scaling"
    norms = layer_norm_names(spec) + (("self_attn.q_norm", "self_attn.k_norm") if spec.qk_norm else ())
    for norm in norms:
        module = layer.get_submodule(norm) if _has(layer, norm) else None
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            return f"no {norm} with a weight"
        if getattr(module, "bias", None) is not None:
            return f"{norm} has a bias, which RMSNorm here does not"
        if not isinstance(getattr(module, "variance_epsilon", getattr(module, "eps", None)), float):
            return f"{norm} has no epsilon (variance_epsilon or eps)"
    return None


def _foreign_hooks(module: nn.Module) -> bool:
    """Whether something hooks into the module's call: accelerate's wrapped forward (offloading,
    device maps) or forward (pre-)hooks other than transformers' own output recording, which
    stays inactive unless hidden states or attentions are asked of the model itself."""
    if hasattr(module, "_hf_hook"):
        return True
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return any(getattr(hook, "__module__", None) != "transformers.utils.output_capturing" for hook in hooks)


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def norm_eps(norm: nn.Module) -> float:
    """The epsilon of an RMSNorm module (Llama-style modules call it variance_epsilon)."""
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", None)))
