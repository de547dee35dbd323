"""Take adapters out of a model: merged into the base weights, or dropped."""

from __future__ import annotations

from torch import nn

from ..backbones import architecture_for
from .experts import EXPERT_LORA_ATTR, merge_expert_lora
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
    for layer in arch.decoder_layers(model):
        attention = arch.attention_module(layer)
        for name, child in list(attention.named_children()):
            if isinstance(child, LoRALinear):
                setattr(attention, name, child.merged() if merge else child.base_layer)
    for moe in arch.moe_layers(model):
        if router_lora(moe.router) is not None:
            (merge_router_lora if merge else remove_router_lora)(moe.router)
        if merge:
            merge_expert_lora(moe.experts)
        elif hasattr(moe.experts, EXPERT_LORA_ATTR):
            delattr(moe.experts, EXPERT_LORA_ATTR)
    model.set_experts_implementation(experts_implementation)
    return model
