"""The routing a budget assumes: a saved profile, or every expert selected equally often."""

from __future__ import annotations

import json

import torch
from torch import nn

from ..backbones import architecture_for
from ..routing import RoutingProfile
from .backbone import one_line


def uniform_profile(model: nn.Module) -> RoutingProfile:
    """Every expert of every MoE layer selected equally often (E tokens, top_k selections each)."""
    arch = architecture_for(model)
    layers = [moe.index for moe in arch.moe_layers(model)]
    num_experts, top_k = arch.num_experts(model.config), arch.top_k(model.config)
    counts = torch.full((len(layers), num_experts), top_k, dtype=torch.int64)
    return RoutingProfile(layers, counts, torch.ones(len(layers), num_experts, dtype=torch.float64), num_experts, top_k)


def selection_shares(profile: RoutingProfile) -> torch.Tensor:
    """P(a selection of layer l goes to expert e), [L, E]; a layer with no selections is an error."""
    totals = profile.counts.sum(dim=1)
    empty = [profile.layers[i] for i in range(len(profile.layers)) if int(totals[i]) == 0]
    if empty:
        raise ValueError(f"The routing profile has no selections in MoE layers {empty}; profile on more data.")
    return profile.load()


def read_profile(path: str) -> RoutingProfile:
    """A routing_profile.json, or a clear error naming what writes one."""
    try:
        return RoutingProfile.read(path)
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{path!r} is not a saved routing profile ({type(exc).__name__}: {one_line(exc, 200)}); give the "
            "routing_profile.json written by RoutingProfilerCallback or RoutingProfile.save."
        ) from None
