"""Inject the adapters a plan describes into an MoE causal LM, and count them."""

from __future__ import annotations

import torch
from torch import nn

from ..backbones import architecture_for
from ..backbones.loading import DTYPES as ADAPTER_DTYPES
from ..kernels import ExpertKernel, use_adapted_experts
from .experts import (
    ExpertAdapter,
    ExpertDelta,
    ExpertLoRA,
    attach_expert_adapter,
    layer_expert_adapter,
)
from .linear import LoRALinear
from .plan import AdapterPlan, LayerPlan
from .router import RouterLoRA, attach_router_lora, router_lora


def lora_params(shape: tuple[int, int], rank: int) -> int:
    out_features, in_features = shape
    return rank * (out_features + in_features)


def count_plan_params(model: nn.Module, plan: AdapterPlan) -> int:
    """Adapter parameters of `plan` that train and act on the output.

    LoRA counts r (out + in) per matrix; DR-LoRA counts each expert at its active rank, not the
    allocated r_max; ESFT counts out x in per adapted expert matrix; LoRI (HELLoRI) counts B only
    (A is frozen), and only its kept share once the sparsity mask is in force.
    """
    arch = architecture_for(model)

    def lora(shape, rank):
        if plan.lori is None:
            return lora_params(shape, rank)
        density = plan.lori["density"] if plan.lori.get("masked") else 1.0
        return round(density * rank * shape[0])

    total = 0
    for layer in arch.decoder_layers(model):
        attention = arch.attention_module(layer)
        total += sum(lora(tuple(getattr(attention, n).weight.shape), plan.rank) for n in plan.attention_modules)
    hot = plan.hot_experts()
    ranks = {layer.layer: layer.expert_ranks for layer in plan.layers}
    for moe in arch.moe_layers(model):
        if plan.router_rank is not None:
            total += lora(tuple(moe.router.weight.shape), plan.router_rank)
        if moe.shared is not None:
            total += sum(lora(tuple(getattr(moe.shared, n).weight.shape), plan.rank) for n in plan.shared_expert_modules)
        shapes = arch.expert_shapes(moe.experts)
        experts = hot.get(moe.index, [])
        for name in plan.expert_modules:
            if plan.expert_adapter == "full":
                total += len(experts) * shapes[name][0] * shapes[name][1]
            else:
                expert_ranks = ranks.get(moe.index) or [plan.allocated_expert_rank] * len(experts)
                total += sum(lora(shapes[name], r) for r in expert_ranks)
    return total


def count_lora_baseline_params(model: nn.Module, rank: int) -> int:
    """Plain LoRA at `rank` on every attention projection, router, shared expert and expert."""
    arch = architecture_for(model)
    moe_layers = arch.moe_layers(model)
    num_experts = arch.num_experts(model.config)
    baseline = AdapterPlan(
        method="lora",
        architecture=arch.name,
        num_experts=num_experts,
        top_k=arch.top_k(model.config),
        policy={"name": "all"},
        rank=rank,
        alpha=rank,
        router_rank=rank,
        attention_modules=arch.attention_projections_of(model),
        expert_modules=list(arch.expert_projections),
        shared_expert_modules=list(arch.shared_expert_projections) if arch.shared_experts else [],
    )
    baseline.layers = [LayerPlan(moe.index, list(range(num_experts))) for moe in moe_layers]
    return count_plan_params(model, baseline)


def inject_adapters(model: nn.Module, plan: AdapterPlan, expert_kernel: ExpertKernel = "auto") -> None:
    """Freeze the base and add the plan's adapters in place (LoRA: A random, B zero; deltas zero).

    Fused experts then run the adapted path with `expert_kernel`: "auto" (Triton for CUDA tensors
    when installed, torch otherwise), "triton" or "torch".
    """
    arch = architecture_for(model)
    if arch.name != plan.architecture:
        raise ValueError(f"The plan was made for {plan.architecture!r} but the model is {arch.name!r}.")
    if is_injected(model):
        raise RuntimeError("This model already holds hellora adapters; merge or reload it before injecting again.")
    if plan.dtype not in ADAPTER_DTYPES:
        raise ValueError(f"Unknown adapter dtype {plan.dtype!r}; choose one of {', '.join(ADAPTER_DTYPES)}.")
    dtype = ADAPTER_DTYPES[plan.dtype]
    lori = plan.lori is not None
    for param in model.parameters():
        param.requires_grad_(False)
    for index, layer in enumerate(arch.decoder_layers(model)):
        _wrap_linears(arch.attention_module(layer), plan.attention_modules, plan, f"layer {index} {arch.attention}", dtype)
    moe_layers = {moe.index: moe for moe in arch.moe_layers(model)}
    unknown = sorted(set(plan.hot_experts()) - set(moe_layers))
    if unknown:
        raise ValueError(f"The plan names MoE layers {unknown} that this model does not have.")
    for index, moe in moe_layers.items():
        if plan.router_rank is not None:
            attach_router_lora(moe.router, plan.router_rank, plan.alpha, f"layer {index} router", dtype, lori)
        if moe.shared is not None and plan.shared_expert_modules:
            _wrap_linears(moe.shared, plan.shared_expert_modules, plan, f"layer {index} shared experts", dtype)
    for layer_plan in plan.layers:
        if plan.expert_modules and layer_plan.hot_experts:
            moe = moe_layers[layer_plan.layer]
            adapter = _expert_adapter(arch, moe, layer_plan, plan, dtype)
            attach_expert_adapter(moe, adapter, arch.fused)
    if arch.fused:
        use_adapted_experts(model, expert_kernel)


def _wrap_linears(parent: nn.Module, names, plan: AdapterPlan, where: str, dtype: torch.dtype) -> None:
    for name in names:
        base = getattr(parent, name, None)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{where} has no nn.Linear {name!r} to adapt; check the plan's module names.")
        setattr(parent, name, LoRALinear(base, plan.rank, plan.alpha, plan.dropout, f"{where}.{name}", dtype, plan.lori is not None))


def _expert_adapter(arch, moe, layer_plan, plan: AdapterPlan, dtype: torch.dtype) -> ExpertAdapter:
    all_shapes = arch.expert_shapes(moe.experts)
    missing = [name for name in plan.expert_modules if name not in all_shapes]
    if missing:
        raise ValueError(f"Experts of {arch.name} have no projections {missing}; they have {list(all_shapes)}.")
    shapes = {name: all_shapes[name] for name in plan.expert_modules}
    first = getattr(moe.experts, plan.expert_modules[0]) if arch.fused else moe.experts[0]
    device = first.device if arch.fused else next(first.parameters()).device
    where = f"layer {layer_plan.layer} experts"
    if plan.expert_adapter == "full":
        return ExpertDelta(shapes, plan.num_experts, layer_plan.hot_experts, where, device, dtype)
    return ExpertLoRA(
        shapes,
        plan.num_experts,
        layer_plan.hot_experts,
        plan.allocated_expert_rank,
        plan.scale,
        plan.dropout,
        where,
        device,
        dtype,
        active_ranks=layer_plan.expert_ranks,
        lori=plan.lori is not None,
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
