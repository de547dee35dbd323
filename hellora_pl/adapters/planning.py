"""From a routing profile and a selection policy to an AdapterPlan."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..backbones import architecture_for
from ..routing import AllExperts, HotExpertPolicy, RoutingProfile
from .inject import count_plan_params
from .plan import AdapterPlan, LayerPlan


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
    dtype: str = "float32",
) -> AdapterPlan:
    """Choose hot experts per MoE layer and describe every adapter to inject.

    `attention_modules` / `expert_modules` default to the architecture's; pass [] to switch
    them off. `router_rank` None leaves the router frozen.
    """
    arch = architecture_for(model)
    moe_layers = arch.moe_layers(model)
    num_experts, top_k = arch.num_experts(model.config), arch.top_k(model.config)
    if profile is None:
        if policy.needs_profile:
            raise ValueError(
                f"The {policy.name!r} hot-expert policy needs a routing profile: add RoutingProfilerCallback "
                "or give a saved profile."
            )
        hot = AllExperts().select_all(len(moe_layers), num_experts)
        layers = [LayerPlan(moe.index, experts) for moe, experts in zip(moe_layers, hot)]
    else:
        if profile.layers != [moe.index for moe in moe_layers] or profile.num_experts != num_experts:
            raise ValueError(
                f"The routing profile covers layers {profile.layers} x {profile.num_experts} experts, but the "
                f"model has MoE layers {[m.index for m in moe_layers]} x {num_experts} experts; profile this model."
            )
        hot = policy.select(profile)
        layers = [
            LayerPlan(index, experts, profile.counts[i].tolist(), [round(float(g), 6) for g in profile.gate_mass[i]])
            for i, (index, experts) in enumerate(zip(profile.layers, hot))
        ]
    plan = AdapterPlan(
        method="lora" if isinstance(policy, AllExperts) else "hellora",
        architecture=arch.name,
        num_experts=num_experts,
        top_k=top_k,
        policy=policy.describe(),
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        dtype=dtype,
        router_rank=router_rank,
        attention_modules=list(arch.attention_projections if attention_modules is None else attention_modules),
        expert_modules=list(arch.expert_projections if expert_modules is None else expert_modules),
        layers=layers,
        profile_tokens=0 if profile is None else profile.tokens,
    )
    plan.trainable_params = count_plan_params(model, plan)
    plan.lora_all_experts_params = count_plan_params(model, plan, all_experts=True)
    return plan
