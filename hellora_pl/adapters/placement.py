"""Placement: from a routing profile and a selection policy to an AdapterPlan."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import nn

from ..backbones import architecture_for
from ..routing import AllExperts, HotExpertPolicy, RoutingProfile
from .plan import AdapterPlan, DynamicRankSpec, LayerPlan, LoRISpec
from .sites import count_lora_baseline_params, count_plan_params, mixer_projections


def build_plan(
    model: nn.Module,
    policy: HotExpertPolicy,
    profile: RoutingProfile | None,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    attention_modules: Sequence[str] | None = None,
    router_rank: int | None = None,
    expert_modules: Sequence[str] | None = None,
    shared_expert_modules: Sequence[str] | None = None,
    dtype: str = "float32",
    method: str | None = None,
    expert_adapter: str = "lora",
    lori: LoRISpec | None = None,
    dynamic_rank: DynamicRankSpec | None = None,
) -> AdapterPlan:
    """Choose the adapted experts per MoE layer and describe every adapter to inject.

    `attention_modules`, `expert_modules` and `shared_expert_modules` default to the
    architecture's (attention projections the model lacks are skipped); pass [] to switch them
    off. `router_rank` None leaves the router frozen. With `dynamic_rank` (DR-LoRA) expert
    adapters are allocated at its rank_max and start at its rank_init, within a budget of `rank`
    per adapted expert. The specs are copied into the plan.
    """
    arch = architecture_for(model)
    expert_modules = list(arch.expert_projections if expert_modules is None else expert_modules)
    if shared_expert_modules is None:
        shared_expert_modules = arch.shared_expert_projections if arch.shared_experts else []
    layers = _hot_expert_layers(model, policy, profile, needs_experts=bool(expert_modules))
    if not expert_modules:
        for layer in layers:
            layer.hot_experts = []
    if method is None:
        method = "attention_only" if not expert_modules else "lora" if isinstance(policy, AllExperts) else "hellora"
    if dynamic_rank is not None:
        dynamic_rank = _dynamic_rank_budget(dynamic_rank, layers, rank)
    plan = AdapterPlan(
        method=method,
        architecture=arch.name,
        num_experts=arch.num_experts(model.config),
        top_k=arch.top_k(model.config),
        policy=policy.describe(),
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        dtype=dtype,
        router_rank=router_rank,
        attention_modules=list(
            arch.attention_projections_of(model) if attention_modules is None else attention_modules
        ),
        mixer_projections=mixer_projections(
            model, arch.attention_projections_of(model) if attention_modules is None else attention_modules
        ),
        expert_modules=expert_modules,
        shared_expert_modules=list(shared_expert_modules),
        expert_adapter=expert_adapter,
        expert_rank=None if dynamic_rank is None else dynamic_rank.rank_max,
        lori=None if lori is None else dataclasses.replace(lori),
        dynamic_rank=dynamic_rank,
        layers=layers,
        profile_tokens=0 if profile is None else profile.tokens,
    )
    plan.trainable_params = count_plan_params(model, plan)
    plan.lora_all_experts_params = count_lora_baseline_params(model, rank)
    return plan


def _hot_expert_layers(
    model: nn.Module, policy: HotExpertPolicy, profile: RoutingProfile | None, needs_experts: bool
) -> list[LayerPlan]:
    """One LayerPlan per MoE layer: the policy's hot experts from `profile` (with its counts and gate
    mass), or every expert without a profile (refused when the policy needs one and experts are adapted)."""
    arch = architecture_for(model)
    moe_layers = arch.moe_layers(model)
    num_experts = arch.num_experts(model.config)
    if profile is None:
        if policy.needs_profile and needs_experts:
            raise ValueError(
                f"The {policy.name!r} hot-expert policy needs a routing profile: add RoutingProfilerCallback "
                "or give a saved profile."
            )
        hot = AllExperts().select_all(len(moe_layers), num_experts)
        return [LayerPlan(moe.index, experts) for moe, experts in zip(moe_layers, hot)]
    if profile.layers != [moe.index for moe in moe_layers] or profile.num_experts != num_experts:
        raise ValueError(
            f"The routing profile covers layers {profile.layers} x {profile.num_experts} experts, but the "
            f"model has MoE layers {[m.index for m in moe_layers]} x {num_experts} experts; profile this model."
        )
    hot = policy.select(profile)
    return [
        LayerPlan(index, experts, profile.counts[i].tolist(), [round(float(g), 6) for g in profile.gate_mass[i]])
        for i, (index, experts) in enumerate(zip(profile.layers, hot))
    ]


def _dynamic_rank_budget(spec: DynamicRankSpec, layers: list[LayerPlan], rank: int) -> DynamicRankSpec:
    """DR-LoRA: a copy of `spec` with the budget of a uniform `rank` per adapted expert; every adapted
    expert of `layers` starts at rank_init (set in place)."""
    spec = dataclasses.replace(spec)
    adapted = sum(len(layer.hot_experts) for layer in layers)
    spec.budget = adapted * rank
    if adapted * spec.rank_init > spec.budget:
        raise ValueError(
            f"DR-LoRA rank_init={spec.rank_init} exceeds the budget of a uniform rank {rank}; "
            f"choose rank_init <= {rank}."
        )
    for layer in layers:
        layer.expert_ranks = [spec.rank_init] * len(layer.hot_experts)
    return spec
