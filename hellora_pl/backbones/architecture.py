"""Per-architecture descriptions: where routers, experts and attention live, and how a model routes.

Adding an architecture is one `MoEArchitecture(...)` passed to `register_architecture`.
Everything else in hellora_pl (profiling, injection, merge, budgets) reads a model only
through this description.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class MoELayer:
    """One decoder layer's MoE parts, as found in a live model."""

    index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module


@dataclass(frozen=True)
class MoEArchitecture:
    """Where the parts of an MoE causal LM live, as dotted attribute paths.

    `layers` is relative to the causal-LM model; `attention`, `moe_block` are relative to a
    decoder layer; `router` and `experts` are relative to the MoE block. A decoder layer whose
    block has no router (a dense layer, as in DeepSeek's first layers) is not an MoE layer.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    attention: str = "self_attn"
    attention_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    moe_block: str = "mlp"
    router: str = "router"
    experts: str = "experts"
    num_experts_field: str = "num_experts"
    top_k_field: str = "num_experts_per_tok"
    expert_projections: tuple[str, ...] = ("gate_up_proj", "down_proj")
    notes: str = field(default="", compare=False)

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(_get(model, self.layers))

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.attention)

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        found = []
        for index, layer in enumerate(self.decoder_layers(model)):
            block = _get(layer, self.moe_block, default=None)
            router = _get(block, self.router, default=None) if block is not None else None
            if router is None:
                continue
            found.append(MoELayer(index, block, router, _get(block, self.experts)))
        return found

    def num_experts(self, config) -> int:
        return int(getattr(config, self.num_experts_field))

    def top_k(self, config) -> int:
        return int(getattr(config, self.top_k_field))


_MISSING = object()


def _get(obj, dotted: str, default=_MISSING):
    for part in dotted.split("."):
        if not hasattr(obj, part):
            if default is _MISSING:
                raise AttributeError(f"{type(obj).__name__} has no attribute {part!r} (path {dotted!r})")
            return default
        obj = getattr(obj, part)
    return obj
