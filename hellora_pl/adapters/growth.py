"""Growing a layer's expert adapter by newly hot experts during training, trained slots untouched.

An `ExpertLoRA` holds one [n_hot, ...] tensor per factor and projection, so adding experts means
new, larger tensors: every trained slot is copied bit for bit into its new position (slots follow
the ascending expert order), the new slots start as a fresh adapter does (A uniform as nn.Linear,
B zero, so the model's output does not change), and the new module takes the old one's place in
the model, so parameter order is that of a model injected with the grown plan from the start.
`move_optimizer_state` then points an optimizer at the new tensors, carrying each trained slot's
state over exactly and starting the new slots' state at zero.

Used by HotExpertInjectionCallback's re-selection (an extension beyond the paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..backbones import architecture_for
from .experts import ExpertLoRA, attach_expert_adapter, layer_expert_adapter


@dataclass(frozen=True)
class GrownTensor:
    """An adapter tensor replaced by a grown one: `new[slots] == old` (slots: long [n_hot_old])."""

    old: nn.Parameter
    new: nn.Parameter
    slots: torch.Tensor


def grow_expert_adapters(model: nn.Module, added: dict[int, list[int]], seed: int) -> list[GrownTensor]:
    """Add adapters on `added` experts (MoE layer index -> experts) of `model`'s expert adapters, in place.

    New A slots are drawn from a generator seeded with (`seed`, layer), so a growth is reproducible
    and leaves the global random state alone. Returns every replaced tensor with its slot map.
    """
    arch = architecture_for(model)
    grown: list[GrownTensor] = []
    for moe in arch.moe_layers(model):
        if not added.get(moe.index):
            continue
        old = layer_expert_adapter(moe)
        if not isinstance(old, ExpertLoRA) or old.lora_B_mask is not None or old.lora_active_rank is not None:
            raise ValueError(
                f"MoE layer {moe.index}: only plain expert LoRA can gain experts during training, not "
                f"{type(old).__name__ if old is not None else 'a layer without expert adapters'} (LoRI and "
                "DR-LoRA adapters keep a fixed expert set)."
            )
        hot = old.hot_experts.tolist()
        new_hot = sorted(set(hot) | {int(e) for e in added[moe.index]})
        if len(new_hot) == len(hot):
            continue
        new = _grown_lora(old, new_hot, torch.Generator().manual_seed(seed * 100_003 + moe.index))
        slots = new.slot_of_expert[old.hot_experts].cpu()
        for factor in ("lora_A", "lora_B"):
            for name in old.projections:
                grown.append(GrownTensor(getattr(old, factor)[name], getattr(new, factor)[name], slots))
        _replace_expert_adapter(moe, old, new, arch.fused)
    return grown


def _grown_lora(old: ExpertLoRA, hot: list[int], generator: torch.Generator) -> ExpertLoRA:
    first = old.lora_A[old.projections[0]]
    shapes = {name: (old.lora_B[name].shape[1], old.lora_A[name].shape[2]) for name in old.projections}
    dropout = old.dropout.p if isinstance(old.dropout, nn.Dropout) else 0.0
    new = ExpertLoRA(shapes, old.num_experts, hot, old.rank, old.scale, dropout, "experts", first.device, first.dtype)
    new.to(first.device)  # the expert -> slot buffers are made on the CPU
    new.train(old.training)
    slots = new.slot_of_expert[old.hot_experts.to(first.device)]
    fresh = torch.ones(new.num_hot, dtype=torch.bool, device=first.device)
    fresh[slots] = False
    with torch.no_grad():
        for name in old.projections:
            a, b = new.lora_A[name], new.lora_B[name]
            bound = 1.0 / math.sqrt(a.shape[-1])  # init_lora_pair's A, from our own generator
            draw = torch.rand(int(fresh.sum()), *a.shape[1:], generator=generator, dtype=torch.float64)
            a[fresh] = ((2 * draw - 1) * bound).to(a.dtype).to(a.device)
            b[fresh] = 0
            a[slots] = old.lora_A[name].detach()
            b[slots] = old.lora_B[name].detach()
            a.requires_grad_(old.lora_A[name].requires_grad)
            b.requires_grad_(old.lora_B[name].requires_grad)
    return new


def _replace_expert_adapter(moe, old: ExpertLoRA, new: ExpertLoRA, fused: bool) -> None:
    """`new` takes `old`'s attribute (the same place among the module's children, so the same
    parameter order); ModuleList experts get their slot wrappers again."""
    if not fused:
        for expert in old.hot_experts.tolist():
            for name in old.projections:
                wrapped = getattr(moe.experts[expert], name)
                setattr(moe.experts[expert], name, wrapped.base_layer)
    attach_expert_adapter(moe, new, fused)


def move_optimizer_state(optimizers: list[torch.optim.Optimizer], grown: list[GrownTensor]) -> None:
    """Point the optimizers at the grown tensors: each old tensor's place in its parameter group goes
    to the new one, and its per-element state (Adam's moments) is copied into the trained slots, zero
    in the new ones; scalar state (Adam's step) is kept.

    A new slot shares its tensor's step count, so Adam's bias correction treats its zero moments as
    if they had been averaged from the start: its first updates are larger than a fresh tensor's
    (a known approximation; the trained slots continue exactly). State of another shape (a factored
    optimizer), or an adapter tensor no optimizer holds, is refused.
    """
    by_old = {id(g.old): g for g in grown}
    found = set()
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for index, param in enumerate(group["params"]):
                change = by_old.get(id(param))
                if change is None:
                    continue
                found.add(id(param))
                group["params"][index] = change.new
                state = optimizer.state.pop(param, None)
                if state is not None:
                    optimizer.state[change.new] = _grown_state(optimizer, state, param, change)
    missing = [g for g in grown if id(g.old) not in found and g.old.requires_grad]
    if missing:
        raise ValueError(
            f"No optimizer holds {len(missing)} trainable adapter tensor(s) of shape {tuple(missing[0].old.shape)}; "
            "re-selection needs configure_optimizers to optimize every parameter with requires_grad=True "
            "(hellora_pl/callbacks/protocol.py, point 3)."
        )


def _grown_state(optimizer, state: dict, param: torch.Tensor, change: GrownTensor) -> dict:
    moved = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == param.shape:
            grown_value = torch.zeros(change.new.shape, dtype=value.dtype, device=value.device)
            grown_value[change.slots.to(value.device)] = value
            moved[key] = grown_value
        elif not torch.is_tensor(value) or value.numel() == 1:
            moved[key] = value
        else:
            raise ValueError(
                f"{type(optimizer).__name__} keeps state {key!r} of shape {tuple(value.shape)} for an adapter tensor "
                f"of shape {tuple(param.shape)}; re-selection carries per-element and scalar state only (AdamW, "
                "Adam, SGD with momentum). Use one of those, or reselect_every_n_steps=0."
            )
    return moved
