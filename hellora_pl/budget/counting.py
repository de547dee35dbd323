"""The budget's numbers: base parameters and bytes from the model, every adapter figure from its sites."""

from __future__ import annotations

import torch
from torch import nn

from ..adapters.common import check_rank
from ..adapters.plan import AdapterPlan
from ..adapters.sites import (
    AdapterSite,
    adapter_flops,
    adapter_sites,
    allocated_elements,
    lora_everywhere,
    trainable_params,
    with_expert_rank,
)
from ..backbones import architecture_for
from ..memory import MemorySettings, quantized_tensor_ids, weight_bytes


def base_figures(model: nn.Module) -> dict:
    """Total and active parameters, forward FLOPs per token, weight bytes at 16 and 4 bits."""
    arch = architecture_for(model)
    num_experts, top_k = arch.num_experts(model.config), arch.top_k(model.config)
    routed = {id(p) for moe in arch.moe_layers(model) for p in moe.experts.parameters()}
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    head = output.weight if output is not None else None
    total = active = 0
    for param in model.parameters():  # each tensor once, tied ones included
        n = param.numel()
        total += n
        if param is not embedding:
            active += n * top_k / num_experts if id(param) in routed else n
    if head is not None and head is embedding:  # tied: the lm_head matmul still runs
        active += head.numel()
    active = round(active)
    return {
        "total_params": total,
        "active_params": active,
        "forward_flops": 2 * active,
        "bytes_16bit": 2 * total,
        "bytes_nf4": nf4_weight_bytes(model),
    }


def nf4_weight_bytes(model: nn.Module) -> int | None:
    """Base weight bytes with hellora_pl.quant's NF4 storage at a 16-bit compute dtype (the memory
    estimate's rule), or None where 4-bit storage does not handle the model's expert layout."""
    settings = MemorySettings(dtype="bfloat16", quantization="nf4")
    try:
        return weight_bytes(model, settings, quantized_tensor_ids(model, settings))
    except NotImplementedError:
        return None


# Per site kind: what the rank error calls the matrix, and the flag that sets its rank.
_RANK_FLAGS = {
    "attention": ("attention {name}", "--rank", ""),
    "router": ("the router", "--router-rank", " (the router's rank defaults to --rank) or --no-router"),
    "shared_expert": ("shared expert {name}", "--rank", ""),
    "routed_expert": ("expert {name}", "--rank", ""),
}


def check_ranks(sites: list[AdapterSite], plan: AdapterPlan) -> None:
    """Every LoRA rank at most the smaller side of the matrix it adapts (as injection will require).

    A routed expert is checked at its allocated rank (DR-LoRA: r_max, set by --rank-max).
    """
    for site in sites:
        if site.form == "full":
            continue
        where, flag, tail = _RANK_FLAGS[site.kind]
        if site.kind == "routed_expert" and plan.dynamic_rank is not None:
            flag = "--rank-max"
        try:
            check_rank(site.rank, site.shape, where.format(name=site.name))
        except ValueError:
            raise ValueError(
                f"Rank {site.rank} is larger than {where.format(name=site.name)}'s smaller side "
                f"({site.shape[0]} x {site.shape[1]}); choose {flag} <= {min(site.shape)}{tail}."
            ) from None


def adapter_figures(
    model: nn.Module, plan: AdapterPlan, sites: list[AdapterSite], shares: torch.Tensor, rank: int, rank_max: int
) -> dict:
    """Trainable and allocated parameters and forward FLOPs per token (by part) of `plan` (`sites`:
    its adapter sites in `model`), and of LoRA on everything at `rank`, all summed over sites.

    DR-LoRA: build_plan starts every expert at rank_init ("start"); the figures are at the budget
    (every adapted expert at `rank`), "executed" at the allocation `rank_max`.
    """
    arch = architecture_for(model)
    layers, top_k = [moe.index for moe in arch.moe_layers(model)], arch.top_k(model.config)
    everywhere = lora_everywhere(model, rank)
    all_sites = adapter_sites(model, everywhere)
    figures = {
        "allocated": allocated_elements(sites),
        "lora_all_params": trainable_params(all_sites, everywhere),
        "lora_all_flops": adapter_flops(all_sites, layers, top_k, None)["total"],
    }
    if plan.dynamic_rank is not None:
        at_budget = with_expert_rank(sites, rank)
        figures["start"] = trainable_params(sites, plan)
        figures["trainable"] = trainable_params(at_budget, plan)
        figures["flops"] = adapter_flops(at_budget, layers, top_k, shares)
        figures["executed"] = adapter_flops(with_expert_rank(sites, rank_max), layers, top_k, shares)
    else:
        figures["trainable"] = trainable_params(sites, plan)
        figures["flops"] = adapter_flops(sites, layers, top_k, shares)
    return figures
