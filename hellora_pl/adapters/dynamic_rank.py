"""DR-LoRA's rank arithmetic: expert importance from gradients, saliency, and budgeted growth.

Kept free of Lightning so it can be tested and reused; `DynamicRankCallback` calls it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..backbones import architecture_for
from .experts import ExpertLoRA, layer_expert_adapter
from .plan import AdapterPlan


def expert_rank_importance(adapter: ExpertLoRA) -> torch.Tensor:
    """Per hot expert: sum of |theta * grad theta| over its active A rows and B columns, divided
    by its active rank (importance per rank, so a larger rank is not favoured for its size alone).
    Parameters without a gradient contribute nothing."""
    active = adapter.lora_active_rank
    rank = adapter.rank
    on = (torch.arange(rank, device=active.device) < active.unsqueeze(-1)).float()  # [n_hot, r]
    total = torch.zeros(adapter.num_hot, device=active.device)
    with torch.no_grad():
        for name in adapter.projections:
            a, b = adapter.lora_A[name], adapter.lora_B[name]
            if a.grad is not None:
                total += ((a * a.grad).abs().sum(dim=2).float() * on).sum(dim=1)
            if b.grad is not None:
                total += ((b * b.grad).abs().sum(dim=1).float() * on).sum(dim=1)
    return total / active.float()


def saliency(frequency: torch.Tensor, importance: torch.Tensor, frequency_weight: float, combination: str):
    """Combine routing frequency and rank importance, each normalised to mean 1 over experts.

    "sum": w * f + (1 - w) * i.   "product": f^w * i^(1 - w).
    """
    f = frequency / frequency.mean().clamp_min(1e-12)
    i = importance / importance.mean().clamp_min(1e-12)
    if combination == "sum":
        return frequency_weight * f + (1 - frequency_weight) * i
    if combination == "product":
        return f.clamp_min(1e-12) ** frequency_weight * i.clamp_min(1e-12) ** (1 - frequency_weight)
    raise ValueError(f"Unknown saliency combination {combination!r}; choose 'sum' or 'product'.")


def grow_ranks(
    ranks: torch.Tensor, scores: torch.Tensor, rank_max: int, budget: int, grow_fraction: float, rank_step: int
) -> torch.Tensor:
    """New ranks: the top `grow_fraction` of experts below rank_max (by score, ties to the lower
    index) each gain up to `rank_step`, while the total stays within `budget`. Never shrinks."""
    ranks = ranks.clone()
    remaining = budget - int(ranks.sum())
    candidates = torch.nonzero(ranks < rank_max).squeeze(1)
    if remaining <= 0 or candidates.numel() == 0:
        return ranks
    count = max(1, math.ceil(grow_fraction * candidates.numel() - 1e-9))
    order = torch.sort(-scores[candidates].double(), stable=True).indices[:count]
    for index in candidates[order].tolist():
        step = min(rank_step, rank_max - int(ranks[index]), remaining)
        if step <= 0:
            break
        ranks[index] += step
        remaining -= step
    return ranks


def ranked_expert_adapters(model: nn.Module) -> dict[int, ExpertLoRA]:
    """The expert adapters with DR-LoRA active ranks, by MoE layer index."""
    found = {}
    for moe in architecture_for(model).moe_layers(model):
        adapter = layer_expert_adapter(moe)
        if isinstance(adapter, ExpertLoRA) and adapter.lora_active_rank is not None:
            found[moe.index] = adapter
    return found


def apply_expert_ranks(model: nn.Module, plan: AdapterPlan) -> None:
    """Give every expert adapter the active ranks the plan records (the plan is where they change)."""
    ranks = {entry.layer: entry.expert_ranks for entry in plan.layers}
    for layer, adapter in ranked_expert_adapters(model).items():
        if ranks.get(layer) is not None:
            adapter.lora_active_rank.copy_(torch.tensor(ranks[layer], dtype=torch.long))
