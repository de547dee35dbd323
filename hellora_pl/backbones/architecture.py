"""Per-architecture descriptions: where routers, experts and attention live, and how a model routes.

Adding an architecture is one `MoEArchitecture(...)` passed to `register_architecture`.
Everything else in hellora_pl (profiling, injection, merge, export, budgets) reads a model only
through this description.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..kernels.layout import ExpertLayout


@dataclass(frozen=True)
class MoELayer:
    """One decoder layer's MoE parts, as found in a live model."""

    index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: nn.Module | None = None


# -- reading a router's decision -----------------------------------------------------------
# A reader turns a router's forward output into (weights [T, k], indices [T, k]).


def _read_topk_router(output, top_k: int, config) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers 5 routers return (logits [T, E], weights [T, k], indices [T, k])."""
    _, weights, indices = output
    return weights, indices


def _read_gate_topk(output, top_k: int, config) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeekMoE's MoEGate returns (indices [T, k], weights [T, k], aux_loss)."""
    indices, weights = output[0], output[1]
    return weights, indices


def _read_linear_logits(output, top_k: int, config) -> tuple[torch.Tensor, torch.Tensor]:
    """An nn.Linear gate returns logits only (Mixtral in transformers 4): softmax, top-k, renormalise."""
    logits = output.reshape(-1, output.shape[-1])
    probs = torch.softmax(logits.float(), dim=-1)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    if getattr(config, "norm_topk_prob", True):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def _read_experts_input(call, top_k: int, config) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' own arguments (transformers' experts interface: hidden_states, top_k_index,
    top_k_weights), as (args, kwargs) of the experts' forward: exactly the experts the model ran,
    whatever its router computes (softmax or sigmoid, correction bias, groups, top-k first)."""
    args, kwargs = call
    named = dict(zip(("hidden_states", "top_k_index", "top_k_weights"), args))
    named.update(kwargs)
    return named["top_k_weights"], named["top_k_index"]


ROUTING_READERS: dict[str, Callable] = {
    "topk_router": _read_topk_router,
    "gate_topk": _read_gate_topk,
    "linear_logits": _read_linear_logits,
    "experts_input": _read_experts_input,
}

# The reader that hooks the experts module (a forward pre-hook) instead of the router's output.
EXPERTS_INPUT = "experts_input"


@dataclass(frozen=True)
class MoEArchitecture:
    """Where the parts of an MoE causal LM live, as dotted attribute paths.

    `layers` is relative to the causal-LM model; `attention`, `moe_block` are relative to a
    decoder layer; `router`, `experts` and `shared_experts` are relative to the MoE block. A
    decoder layer whose block has no router (a dense layer, as in DeepSeek's first layers) is not
    an MoE layer.

    `expert_layout` is "fused" (transformers 5: `experts.<projection>` is one [E, out, in]
    tensor per projection) or "module_list" (`experts[e].<projection>` is an nn.Linear, as in
    DeepSeekMoE's remote code and transformers-4 checkpoints). `routing` names the reader in
    ROUTING_READERS that turns the router's output into the chosen experts and their weights;
    "experts_input" reads them from the experts' arguments instead (families found by
    `backbones.detect`, whose experts use transformers' experts interface).
    `attention_projections` lists candidates; those a layer's mixer lacks (DeepSeek's q_proj vs
    q_a_proj/q_b_proj, a DeltaNet layer's q_proj) are skipped. `mixers` lists the candidate paths
    of a layer's attention-like module (its token mixer: `self_attn`, `linear_attn`, `mamba`, ...)
    for hybrid decoders whose layers differ; empty means `attention` only. A layer whose mixer is
    its MoE block (NemotronH's `mixer`) has none (`layer_mixer`). `aux_loss_field` is the config field of the load-balancing
    loss coefficient, or None when the model has no such loss.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    attention: str = "self_attn"
    attention_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mixers: tuple[str, ...] = ()
    moe_block: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    expert_layout: Literal["fused", "module_list"] = "fused"
    expert_projections: tuple[str, ...] = ("gate_up_proj", "down_proj")
    shared_experts: str | None = None
    shared_expert_projections: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    routing: str = "topk_router"
    num_experts_field: str = "num_experts"
    top_k_field: str = "num_experts_per_tok"
    aux_loss_field: str | None = "router_aux_loss_coef"
    notes: str = field(default="", compare=False)
    # Linear children of a mixer left without an adapter, each "path (why)": detection records them so the
    # plan's budget says so (a weight the mixer's code reads directly, a linear with a forward of its own).
    left_out: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        if self.expert_layout not in ("fused", "module_list"):
            raise ValueError(
                f"{self.name}: expert_layout must be 'fused' or 'module_list', got {self.expert_layout!r}."
            )
        if self.routing not in ROUTING_READERS:
            raise ValueError(
                f"{self.name}: unknown routing {self.routing!r}; choose one of {', '.join(ROUTING_READERS)}."
            )

    @property
    def reads_experts_input(self) -> bool:
        """Routing is read from the experts' arguments (a pre-hook on `experts`), not the router's output."""
        return self.routing == EXPERTS_INPUT

    @property
    def fused(self) -> bool:
        return self.expert_layout == "fused"

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(_get(model, self.layers))

    def layer_mixer(self, layer: nn.Module) -> tuple[str, tuple[str, ...]] | None:
        """(path, adaptable projections) of `layer`'s attention-like module: the first of `mixers`
        (`attention` when empty) the layer has that is not its MoE block, and the candidates of
        `attention_projections` that are its linear children. None when the layer has none."""
        moe_block = _get(layer, self.moe_block, default=None)
        for path in self.mixers or (self.attention,):
            mixer = _get(layer, path, default=None)
            if mixer is None or (mixer is moe_block and _get(mixer, self.router, default=None) is not None):
                continue  # absent, or the layer's MoE block (NemotronH's MoE layers)
            return path, tuple(name for name in self.attention_projections if _is_linear(getattr(mixer, name, None)))
        return None

    def attention_module(self, layer: nn.Module) -> nn.Module | None:
        """`layer`'s attention-like module (see `layer_mixer`); None when it has none."""
        found = self.layer_mixer(layer)
        return None if found is None else _get(layer, found[0])

    def attention_projections_of(self, model: nn.Module) -> list[str]:
        """The candidate attention projections this model has on any layer's mixer, in candidate order."""
        present = set()
        for layer in self.decoder_layers(model):
            found = self.layer_mixer(layer)
            present |= set(found[1]) if found is not None else set()
        return [name for name in self.attention_projections if name in present]

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        found = []
        for index, layer in enumerate(self.decoder_layers(model)):
            block = _get(layer, self.moe_block, default=None)
            router = _get(block, self.router, default=None) if block is not None else None
            if router is None:
                continue
            shared = _get(block, self.shared_experts, default=None) if self.shared_experts else None
            found.append(MoELayer(index, block, router, _get(block, self.experts), shared))
        return found

    def expert_shapes(self, experts: nn.Module) -> dict[str, tuple[int, int]]:
        """Logical (out, in) of each expert projection, the same for every expert of a layer (fused experts:
        whatever the storage orientation, read by `kernels.layout.ExpertLayout`)."""
        if self.fused:
            layout = ExpertLayout.of(experts)
            return {name: layout.shape(name) for name in self.expert_projections}
        return {name: tuple(getattr(experts[0], name).weight.shape) for name in self.expert_projections}

    def expert_linear(self, experts: nn.Module, expert: int, name: str) -> nn.Module:
        """Expert `expert`'s projection module (module_list layout only)."""
        return getattr(experts[expert], name)

    def read_routing(self, output, config) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k], indices [T, k]) from a router's forward output."""
        return ROUTING_READERS[self.routing](output, self.top_k(config), config)

    def num_experts(self, config) -> int:
        return int(_get(config, self.num_experts_field))  # dotted for a wrapper: "text_config.num_experts"

    def top_k(self, config) -> int:
        return int(_get(config, self.top_k_field))


_MISSING = object()


def acts_as_linear(module) -> bool:
    """An nn.Linear that computes x W^T + b on the last dimension, so a LoRA beside it adds B A x to its
    output: nn.Linear's own forward, or hellora_pl's stand-ins (NF4Linear stores W in 4 bits, same map).
    A subclass with a forward of its own (DeepSeek-V4's grouped `o_a_proj`, block-diagonal per group) is not."""
    if not isinstance(module, nn.Linear):
        return False
    forward = type(module).forward
    return forward is nn.Linear.forward or getattr(forward, "__module__", "").startswith("hellora_pl.")


def _is_linear(module) -> bool:
    """A plain linear map (`acts_as_linear`), or an adapter wrapping one (its `base_layer`), as in a model
    already injected."""
    return acts_as_linear(module) or acts_as_linear(getattr(module, "base_layer", None))


def _get(obj, dotted: str, default=_MISSING):
    """The attribute at `dotted` ("" is `obj` itself)."""
    for part in dotted.split(".") if dotted else ():
        if not hasattr(obj, part):
            if default is _MISSING:
                raise AttributeError(f"{type(obj).__name__} has no attribute {part!r} (path {dotted!r})")
            return default
        obj = getattr(obj, part)
    return obj
