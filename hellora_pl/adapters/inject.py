"""Inject the adapters at a plan's sites into an MoE causal LM, and find them again."""

from __future__ import annotations

import torch
from torch import nn

from ..backbones import DTYPES as ADAPTER_DTYPES
from ..backbones import architecture_for
from ..kernels import ExpertKernel, use_adapted_experts
from .experts import (
    ExpertAdapter,
    ExpertDelta,
    ExpertLoRA,
    attach_expert_adapter,
    layer_expert_adapter,
)
from .linear import LoRALinear
from .plan import AdapterPlan
from .router import RouterLoRA, attach_router_lora, router_lora
from .sites import AdapterSite, adapter_sites

INJECTED_PLAN_ATTR = "hellora_plan"
REPLACED_EXPERTS_IMPLEMENTATION_ATTR = "hellora_replaced_experts_implementation"


def inject_adapters(model: nn.Module, plan: AdapterPlan, expert_kernel: ExpertKernel = "auto") -> None:
    """Freeze the base and add the adapters at the plan's sites, in place (LoRA: A random, B zero;
    deltas zero).

    Fused experts then run the adapted path with `expert_kernel`: "auto" (Triton for CUDA tensors
    when installed, torch otherwise), "triton" or "torch". Only a plan with expert adapters switches
    the experts implementation (attention_only keeps the model's own, on any expert layout); the one it
    replaced is recorded so that merge and remove put it back.
    """
    arch = architecture_for(model)
    if arch.name != plan.architecture:
        raise ValueError(f"The plan was made for {plan.architecture!r} but the model is {arch.name!r}.")
    if is_injected(model):
        raise RuntimeError("This model already holds hellora adapters; merge or reload it before injecting again.")
    if plan.dtype not in ADAPTER_DTYPES:
        raise ValueError(f"Unknown adapter dtype {plan.dtype!r}; choose one of {', '.join(ADAPTER_DTYPES)}.")
    sites = adapter_sites(model, plan)  # checks every site before anything changes
    dtype = ADAPTER_DTYPES[plan.dtype]
    lori = plan.lori is not None
    for param in model.parameters():
        param.requires_grad_(False)
    routed: dict[int, list[AdapterSite]] = {}
    for site in sites:
        parent = model.get_submodule(site.module)
        if site.kind == "router":
            attach_router_lora(parent, site.rank, plan.alpha, site.where, dtype, lori)
        elif site.kind == "routed_expert":
            routed.setdefault(site.layer, []).append(site)
        else:
            base = getattr(parent, site.name)
            setattr(parent, site.name, LoRALinear(base, site.rank, plan.alpha, plan.dropout, site.where, dtype, lori))
    moe_layers = {moe.index: moe for moe in arch.moe_layers(model)}
    for layer, group in routed.items():
        moe = moe_layers[layer]
        attach_expert_adapter(moe, _expert_adapter(arch, moe, group, plan, dtype), arch.fused)
    if arch.fused and routed:
        before = getattr(model.config, "_experts_implementation", None)
        use_adapted_experts(model, expert_kernel)
        if model.config._experts_implementation != before:
            model.__dict__[REPLACED_EXPERTS_IMPLEMENTATION_ATTR] = before
    model.__dict__[INJECTED_PLAN_ATTR] = plan  # the live plan (companions update it): merge reads its sites


def injected_plan(model: nn.Module) -> AdapterPlan | None:
    """The plan `inject_adapters` put into `model` (None when it holds none)."""
    return model.__dict__.get(INJECTED_PLAN_ATTR)


def forget_injected_plan(model: nn.Module) -> None:
    model.__dict__.pop(INJECTED_PLAN_ATTR, None)


def replaced_experts_implementation(model: nn.Module) -> str | None:
    """The experts implementation injection switched away from (None when it switched nothing)."""
    return model.__dict__.get(REPLACED_EXPERTS_IMPLEMENTATION_ATTR)


def forget_replaced_experts_implementation(model: nn.Module) -> None:
    model.__dict__.pop(REPLACED_EXPERTS_IMPLEMENTATION_ATTR, None)


def _expert_adapter(arch, moe, group: list[AdapterSite], plan: AdapterPlan, dtype: torch.dtype) -> ExpertAdapter:
    """One MoE layer's expert adapter, covering the projections of its routed sites."""
    shapes = {site.name: site.shape for site in group}
    first = getattr(moe.experts, group[0].name) if arch.fused else moe.experts[0]
    device = first.device if arch.fused else next(first.parameters()).device
    site = group[0]
    if site.form == "full":
        return ExpertDelta(shapes, plan.num_experts, site.experts, site.where, device, dtype)
    return ExpertLoRA(
        shapes,
        plan.num_experts,
        site.experts,
        site.rank,
        plan.scale,
        plan.dropout,
        site.where,
        device,
        dtype,
        active_ranks=site.active_ranks,
        lori=site.form == "lori",
    )


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every hellora adapter in the model, by qualified name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (LoRALinear, ExpertAdapter, RouterLoRA))
    }


def is_injected(model: nn.Module) -> bool:
    return bool(adapter_modules(model))


def _is_adapter_tensor(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors (parameters, LoRI masks, DR-LoRA active ranks) by their names in `model`.

    Every adapter names its tensors `lora_*`; nothing in a base model does.
    """
    tensors = {name: p for name, p in model.named_parameters(remove_duplicate=False) if _is_adapter_tensor(name)}
    tensors.update({name: b for name, b in model.named_buffers(remove_duplicate=False) if _is_adapter_tensor(name)})
    return tensors


def injected_hot_experts(model: nn.Module) -> dict[int, list[int]]:
    """What was actually injected, per MoE layer (for checking a plan against a model)."""
    found = {}
    for moe in architecture_for(model).moe_layers(model):
        adapter = layer_expert_adapter(moe)
        found[moe.index] = [] if adapter is None else adapter.hot_experts.tolist()
    return found


def has_router_lora(model: nn.Module) -> list[bool]:
    return [router_lora(moe.router) is not None for moe in architecture_for(model).moe_layers(model)]
