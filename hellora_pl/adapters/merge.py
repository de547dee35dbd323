"""Take adapters out of a model: merged into the base weights, or dropped.

It strips the adapters at the sites of the plan injected into the model (`inject_adapters` records
it on the model; `adapters_at_sites` refuses a model holding adapters elsewhere).
"""

from __future__ import annotations

from torch import nn

from ..backbones import architecture_for
from .at_sites import adapters_at_sites
from .experts import detach_expert_adapter
from .inject import forget_injected_plan, injected_plan, is_injected
from .plan import AdapterPlan
from .router import merge_router_lora, remove_router_lora
from .sites import adapter_sites


def merge_adapters(
    model: nn.Module, experts_implementation: str = "grouped_mm", plan: AdapterPlan | None = None
) -> nn.Module:
    """Merge every hellora adapter into `model` in place and return it.

    The result has the original module tree and parameter names, so `save_pretrained` writes a
    checkpoint that transformers loads without hellora_pl. `plan`: the plan injected into `model`
    (default: the one `inject_adapters` recorded), checked against its adapters before anything changes.
    """
    return _strip_adapters(model, True, experts_implementation, plan)


def remove_adapters(
    model: nn.Module, experts_implementation: str = "grouped_mm", plan: AdapterPlan | None = None
) -> nn.Module:
    """Drop every hellora adapter without merging: the model is the frozen base again."""
    return _strip_adapters(model, False, experts_implementation, plan)


def _strip_adapters(model: nn.Module, merge: bool, experts_implementation: str, plan: AdapterPlan | None) -> nn.Module:
    arch = architecture_for(model)
    plan = plan if plan is not None else injected_plan(model)
    if plan is None and is_injected(model):
        raise ValueError(
            "The model holds hellora adapters but no record of the plan they came from; pass plan= "
            "(the plan.json saved with them)."
        )
    if plan is not None:
        _strip_at_sites(model, arch, plan, merge)
        forget_injected_plan(model)
    if arch.fused:
        model.set_experts_implementation(experts_implementation)
    return model


def _strip_at_sites(model: nn.Module, arch, plan: AdapterPlan, merge: bool) -> None:
    moe_layers = {moe.index: moe for moe in arch.moe_layers(model)}
    found = adapters_at_sites(model, adapter_sites(model, plan))  # checks everything before a change
    stripped_layers = set()
    for site, adapter in found:
        if site.kind == "router":
            (merge_router_lora if merge else remove_router_lora)(model.get_submodule(site.module))
        elif site.kind == "routed_expert":
            if site.layer not in stripped_layers:  # one adapter serves all projections of a layer
                detach_expert_adapter(moe_layers[site.layer], merge)
                stripped_layers.add(site.layer)
        else:
            setattr(model.get_submodule(site.module), site.name, adapter.merged() if merge else adapter.base_layer)
