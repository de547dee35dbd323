"""The budget report of a method on a backbone: check the arguments, build the plan a fit would,
count over its adapter sites, and label every figure (the counting rules: this package's docstring)."""

from __future__ import annotations

from torch import nn

from ..adapters.methods import method_defaults
from ..adapters.plan import AdapterPlan
from ..adapters.sites import adapter_sites
from ..backbones import architecture_for
from ..memory import MemorySettings, memory_report
from ..routing import RoutingProfile
from .counting import adapter_figures, base_figures, check_ranks
from .figures import comparison_figures, flop_figures, notes, parameter_figures
from .profile import selection_shares, uniform_profile
from .settings import HOT_K_METHODS, BudgetArguments, check_arguments, plan_settings


def budget(
    model: nn.Module,
    method: str = "lora",
    rank: int = 8,
    hot_k: int | None = None,
    router_rank: int | None = None,
    no_router: bool = False,
    profile: RoutingProfile | None = None,
    esft_coverage: float = 0.2,
    lori_density: float = 0.1,
    rank_max: int | None = None,
    source: str = "",
    profile_path: str | None = None,
    memory: MemorySettings | None = None,
) -> dict:
    """The budget report of `method` on `model` (a meta-device model is enough), as a dict.

    With `memory`, the report also holds the predicted peak memory of a training step
    (`hellora_pl.memory`) under its key "memory".
    """
    args = BudgetArguments(method, rank, hot_k, router_rank, no_router, esft_coverage, lori_density, rank_max)
    arch = architecture_for(model)
    num_experts, top_k = arch.num_experts(model.config), arch.top_k(model.config)
    hot_k_used, rank_max_used = check_arguments(args, num_experts, top_k)
    settings = plan_settings(args, hot_k_used, rank_max_used)
    routing = profile if profile is not None else uniform_profile(model)
    plan = settings.build(model, routing)
    sites = adapter_sites(model, plan)
    check_ranks(sites, plan)
    shares = selection_shares(routing)

    base = base_figures(model)
    counts = adapter_figures(model, plan, sites, shares, rank, rank_max_used)
    routers = [site for site in sites if site.kind == "router"]
    router = {"experts": routers[0].shape[0], "hidden": routers[0].shape[1]} if routers else {}  # rows: E (+ skip or shared)
    report = {
        "backbone": _backbone(model, arch, source),
        "method": method,
        "summary": method_defaults(method).summary,
        "settings": _settings(plan, rank, hot_k_used),
        "routing": _routing(profile, profile_path, num_experts, counts["flops"]["adapted_selection_share"]),
        "adapted_experts": _adapted_experts(plan),
        "figures": {
            **parameter_figures(plan, counts, base, rank),
            **flop_figures(plan, counts, rank),
            **comparison_figures(counts, base),
        },
        "notes": notes(plan, counts, rank, hot_k, profile is not None, router) + _left_out_notes(arch, plan),
    }
    if memory is not None:
        report["memory"] = memory_report(model, plan, shares, memory, sites)
    return report


def _backbone(model: nn.Module, arch, source: str) -> dict:
    moe_layers = arch.moe_layers(model)
    return {
        "source": source,
        "model_type": model.config.model_type,
        "architecture": arch.name,
        "decoder_layers": len(arch.decoder_layers(model)),
        "moe_layers": len(moe_layers),
        "num_experts": arch.num_experts(model.config),
        "top_k": arch.top_k(model.config),
        "expert_shapes": {n: list(s) for n, s in arch.expert_shapes(moe_layers[0].experts).items()}
        if moe_layers
        else {},
    }


def _settings(plan: AdapterPlan, rank: int, hot_k: int) -> dict:
    settings = {
        "rank": rank,
        "alpha": float(plan.alpha),
        "router_rank": plan.router_rank,
        "attention_modules": plan.attention_modules,
        "shared_expert_modules": plan.shared_expert_modules,
        "expert_modules": plan.expert_modules,
        "expert_adapter": plan.expert_adapter,
        "policy": plan.policy,
    }
    if plan.mixer_projections:  # a hybrid decoder: the projections adapted per layer type (the mixer's class)
        settings["mixer_projections"] = dict(plan.mixer_projections)
    if plan.method in HOT_K_METHODS:
        settings["hot_k"] = hot_k
    if plan.lori is not None:
        lori = plan.lori
        settings["lori"] = {"density": lori.density, "granularity": lori.granularity, "masked": lori.masked}
    if plan.dynamic_rank is not None:
        spec = plan.dynamic_rank
        settings["dynamic_rank"] = {"rank_init": spec.rank_init, "rank_max": spec.rank_max, "budget": spec.budget}
    return settings


def _left_out_notes(arch, plan: AdapterPlan) -> list[str]:
    """Which mixer projections detection left without an adapter, and why (never silently)."""
    if not arch.left_out or not plan.attention_modules:
        return []
    return [f"Not adapted ({arch.name}): " + "; ".join(arch.left_out) + "."]


def _routing(profile: RoutingProfile | None, profile_path: str | None, num_experts: int, adapted: float) -> dict:
    if profile is None:
        routing = {
            "assumed": "uniform",
            "detail": f"no --profile: every expert takes 1/{num_experts} of each MoE layer's selections; "
            "hot-expert ties go to the lower index",
        }
    else:
        routing = {
            "assumed": "profile",
            "detail": f"counts from {profile_path or 'a saved profile'} ({profile.tokens} profiled tokens)",
        }
    routing["adapted_selection_share"] = adapted
    return routing


def _adapted_experts(plan: AdapterPlan) -> dict:
    hot_per_layer = [len(layer.hot_experts) for layer in plan.layers]
    return {
        "total": sum(hot_per_layer),
        "per_layer_min": min(hot_per_layer, default=0),
        "per_layer_max": max(hot_per_layer, default=0),
    }
