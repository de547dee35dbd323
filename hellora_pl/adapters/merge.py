"""Take adapters out of a model: merged into the base weights, or dropped.

It strips the adapters at the sites of the plan injected into the model (`inject_adapters` records
it on the model; `adapters_at_sites` refuses a model holding adapters elsewhere). The experts
implementation goes back to the one injection replaced (recorded on the model too); a plan without
expert adapters never changed it, so it stays.
"""

from __future__ import annotations

from torch import nn

from ..backbones import architecture_for
from .at_sites import adapters_at_sites
from .experts import detach_expert_adapter
from .inject import (
    forget_injected_plan,
    forget_replaced_experts_implementation,
    injected_plan,
    is_injected,
    replaced_experts_implementation,
)
from .plan import AdapterPlan
from .router import merge_router_lora, remove_router_lora
from .sites import adapter_sites


def merge_adapters(
    model: nn.Module, experts_implementation: str | None = None, plan: AdapterPlan | None = None
) -> nn.Module:
    """Merge every hellora adapter into `model` in place and return it.

    The result has the original module tree and parameter names, so `save_pretrained` writes a
    checkpoint that transformers loads without hellora_pl. `plan`: the plan injected into `model`
    (default: the one `inject_adapters` recorded), checked against its adapters before anything changes.
    `experts_implementation`: the fused experts' implementation afterwards (default: the one injection
    replaced, or the current one when injection changed nothing).
    """
    return _strip_adapters(model, True, experts_implementation, plan)


def remove_adapters(
    model: nn.Module, experts_implementation: str | None = None, plan: AdapterPlan | None = None
) -> nn.Module:
    """Drop every hellora adapter without merging: the model is the frozen base again (experts
    implementation as in `merge_adapters`)."""
    return _strip_adapters(model, False, experts_implementation, plan)


def _strip_adapters(
    model: nn.Module, merge: bool, experts_implementation: str | None, plan: AdapterPlan | None
) -> nn.Module:
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
    target = experts_implementation if experts_implementation is not None else replaced_experts_implementation(model)
    forget_replaced_experts_implementation(model)
    if arch.fused and target is not None and target != model.config._experts_implementation:
        model.set_experts_implementation(target)
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
