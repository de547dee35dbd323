"""Take adapters out of a model: merged into the base weights, or dropped."""

from __future__ import annotations

from torch import nn

from ..backbones import architecture_for
from .experts import detach_expert_adapter
from .linear import LoRALinear
from .router import merge_router_lora, remove_router_lora, router_lora


def merge_adapters(model: nn.Module, experts_implementation: str = "grouped_mm") -> nn.Module:
    """Merge every hellora adapter into `model` in place and return it.

    The result has the original module tree and parameter names, so `save_pretrained` writes a
    checkpoint that transformers loads without hellora_pl.
    """
    return _strip_adapters(model, merge=True, experts_implementation=experts_implementation)


def remove_adapters(model: nn.Module, experts_implementation: str = "grouped_mm") -> nn.Module:
    """Drop every hellora adapter without merging: the model is the frozen base again."""
    return _strip_adapters(model, merge=False, experts_implementation=experts_implementation)


def _strip_adapters(model: nn.Module, merge: bool, experts_implementation: str) -> nn.Module:
    arch = architecture_for(model)
    for moe in arch.moe_layers(model):
        if router_lora(moe.router) is not None:
            (merge_router_lora if merge else remove_router_lora)(moe.router)
        detach_expert_adapter(moe, merge)
    for parent in list(model.modules()):  # attention and shared-expert linears
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged() if merge else child.base_layer)
    if arch.fused:
        model.set_experts_implementation(experts_implementation)
    return model
