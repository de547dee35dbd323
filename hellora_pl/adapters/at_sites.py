"""The adapter injection put at each site of a plan: merge and export read adapters from the sites,
not from a walk of their own over the model."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..backbones import architecture_for
from .experts import ExpertAdapter, ExpertDelta, layer_expert_adapter
from .inject import adapter_modules
from .linear import LoRALinear
from .router import router_lora
from .sites import AdapterSite


def adapters_at_sites(model: nn.Module, sites: Sequence[AdapterSite]) -> list[tuple[AdapterSite, nn.Module]]:
    """(site, adapter) for every site, in the sites' order.

    The adapter is the LoRALinear at an attention or shared-expert site's path, the RouterLoRA of a
    router site, and the MoE layer's ExpertAdapter of a routed site (one per layer, shared by its
    projections' sites). Raises with the fix when a site holds no adapter of its kind, its hot
    experts differ, or the model holds adapters at no site: the sites must be those of the plan
    that was injected into `model`.
    """
    moe_layers = {moe.index: moe for moe in architecture_for(model).moe_layers(model)}
    found = [(site, _adapter_at(model, site, moe_layers)) for site in sites]
    placed = {id(adapter) for _, adapter in found}
    stray = [name for name, module in adapter_modules(model).items() if id(module) not in placed]
    if stray:
        raise ValueError(
            f"The model holds adapters at no site of the plan: {stray[:5]}{'...' if len(stray) > 5 else ''}; "
            "give the plan that was injected into this model."
        )
    return found


def _adapter_at(model: nn.Module, site: AdapterSite, moe_layers: dict) -> nn.Module:
    fix = "give the plan that was injected into this model (and inject it before merging or exporting)"
    if site.kind == "router":
        adapter = router_lora(model.get_submodule(site.module))
    elif site.kind == "routed_expert":
        adapter = layer_expert_adapter(moe_layers[site.layer])
    else:
        adapter = model.get_submodule(site.path)
        adapter = adapter if isinstance(adapter, LoRALinear) else None
    if adapter is None:
        raise ValueError(f"The model holds no adapter at {site.where} ({site.path}); {fix}.")
    if site.kind == "routed_expert":
        _check_expert_adapter(adapter, site, fix)
    return adapter


def _check_expert_adapter(adapter: ExpertAdapter, site: AdapterSite, fix: str) -> None:
    hot = adapter.hot_experts.tolist()
    if hot != list(site.experts):
        raise ValueError(
            f"The model's expert adapter of {site.where} covers experts {hot}, the plan's hot experts are "
            f"{list(site.experts)}; {fix}."
        )
    if site.name not in adapter.projections or isinstance(adapter, ExpertDelta) != (site.form == "full"):
        kind = "full-rank deltas" if isinstance(adapter, ExpertDelta) else "LoRA"
        raise ValueError(
            f"The model's expert adapter of {site.where} holds {kind} on {adapter.projections}, the plan "
            f"{site.form} on {site.name}; {fix}."
        )
