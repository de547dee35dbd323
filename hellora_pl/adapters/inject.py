"""Inject the adapters a plan describes into a transformers MoE causal LM, and count them."""

from __future__ import annotations

from torch import nn

from ..backbones import architecture_for
from ..backbones.loading import DTYPES as ADAPTER_DTYPES
from ..kernels import use_adapted_experts
from .experts import ExpertLoRA, attach_expert_lora, expert_lora
from .linear import LoRALinear
from .plan import AdapterPlan
from .router import RouterLoRA, attach_router_lora, router_lora


def lora_params(shape: tuple[int, int], rank: int) -> int:
    out_features, in_features = shape
    return rank * (out_features + in_features)


def count_plan_params(model: nn.Module, plan: AdapterPlan, all_experts: bool = False) -> int:
    """Trainable parameters the plan adds to `model` (or would add with every expert hot)."""
    arch = architecture_for(model)
    total = 0
    for layer in arch.decoder_layers(model):
        attention = arch.attention_module(layer)
        for name in plan.attention_modules:
            total += lora_params(tuple(getattr(attention, name).weight.shape), plan.rank)
    hot = plan.hot_experts()
    for moe in arch.moe_layers(model):
        if plan.router_rank is not None:
            total += lora_params(tuple(moe.router.weight.shape), plan.router_rank)
        num_hot = plan.num_experts if all_experts else len(hot.get(moe.index, []))
        for name in plan.expert_modules:
            total += num_hot * lora_params(tuple(getattr(moe.experts, name).shape[1:]), plan.rank)
    return total


def inject_adapters(model: nn.Module, plan: AdapterPlan) -> None:
    """Freeze the base and add the plan's adapters in place (A random, B zero)."""
    arch = architecture_for(model)
    if arch.name != plan.architecture:
        raise ValueError(f"The plan was made for {plan.architecture!r} but the model is {arch.name!r}.")
    if is_injected(model):
        raise RuntimeError("This model already holds hellora adapters; merge or reload it before injecting again.")
    if plan.dtype not in ADAPTER_DTYPES:
        raise ValueError(f"Unknown adapter dtype {plan.dtype!r}; choose one of {', '.join(ADAPTER_DTYPES)}.")
    dtype = ADAPTER_DTYPES[plan.dtype]
    for param in model.parameters():
        param.requires_grad_(False)
    for index, layer in enumerate(arch.decoder_layers(model)):
        attention = arch.attention_module(layer)
        for name in plan.attention_modules:
            base = getattr(attention, name)
            where = f"layer {index} {arch.attention}.{name}"
            setattr(attention, name, LoRALinear(base, plan.rank, plan.alpha, plan.dropout, where, dtype))
    moe_layers = {moe.index: moe for moe in arch.moe_layers(model)}
    unknown = sorted(set(plan.hot_experts()) - set(moe_layers))
    if unknown:
        raise ValueError(f"The plan names MoE layers {unknown} that this model does not have.")
    for index, moe in moe_layers.items():
        if plan.router_rank is not None:
            attach_router_lora(moe.router, plan.router_rank, plan.alpha, f"layer {index} router", dtype)
    for layer_plan in plan.layers:
        if plan.expert_modules and layer_plan.hot_experts:
            experts = moe_layers[layer_plan.layer].experts
            lora = ExpertLoRA(
                experts,
                layer_plan.hot_experts,
                plan.rank,
                plan.alpha,
                plan.dropout,
                plan.expert_modules,
                f"layer {layer_plan.layer} experts",
                dtype,
            )
            attach_expert_lora(experts, lora)
    use_adapted_experts(model)


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every hellora adapter in the model, by qualified name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (LoRALinear, ExpertLoRA, RouterLoRA))
    }


def is_injected(model: nn.Module) -> bool:
    return bool(adapter_modules(model))


def adapter_state_dict(model: nn.Module) -> dict:
    """The adapter tensors only, by their names in `model`: every adapter names its tensors lora_A / lora_B."""
    return {name: param for name, param in model.named_parameters() if ".lora_A" in name or ".lora_B" in name}


def injected_hot_experts(model: nn.Module) -> dict[int, list[int]]:
    """What was actually injected, per MoE layer (for checking a plan against a model)."""
    arch = architecture_for(model)
    found = {}
    for moe in arch.moe_layers(model):
        lora = expert_lora(moe.experts)
        found[moe.index] = [] if lora is None else lora.hot_experts.tolist()
    return found


def has_router_lora(model: nn.Module) -> list[bool]:
    return [router_lora(moe.router) is not None for moe in architecture_for(model).moe_layers(model)]
