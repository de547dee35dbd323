"""Hot-expert selection policies: from a routing profile to the experts each layer adapts.

Ties break towards the lower expert index, so a profile always gives the same hot set.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

import torch

from .profile import RoutingProfile


def _ranked(scores: torch.Tensor) -> list[int]:
    """Expert indices by descending score, lower index first among equals."""
    order = torch.sort(-scores.double(), stable=True).indices
    return order.tolist()


class HotExpertPolicy(ABC):
    """Chooses, per MoE layer, which experts get adapters."""

    name: str = "policy"
    needs_profile: bool = True

    @abstractmethod
    def select_layer(self, counts: torch.Tensor, gate_mass: torch.Tensor, top_k: int) -> list[int]:
        """Hot experts of one layer, sorted ascending."""

    def check(self, num_experts: int, top_k: int) -> None:
        """Refuse settings this model cannot satisfy, before any routing is profiled."""

    def select(self, profile: RoutingProfile) -> list[list[int]]:
        return [
            self.select_layer(profile.counts[i], profile.gate_mass[i], profile.top_k)
            for i in range(len(profile.layers))
        ]

    def describe(self) -> dict:
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


class TopKPerLayer(HotExpertPolicy):
    """The k most often selected experts of each layer (HELLoRA); k defaults to the routing top-k."""

    name = "top_k"

    def __init__(self, k: int | None = None):
        if k is not None and k < 1:
            raise ValueError(f"TopKPerLayer needs k >= 1, got k={k}.")
        self.k = k

    def check(self, num_experts: int, top_k: int) -> None:
        k = self.k if self.k is not None else top_k
        if k > num_experts:
            raise ValueError(
                f"TopKPerLayer k={k} is larger than the number of experts ({num_experts}); "
                f"choose k <= {num_experts} (or AllExperts for LoRA on every expert)."
            )

    def select_layer(self, counts, gate_mass, top_k):
        self.check(counts.numel(), top_k)
        return sorted(_ranked(counts)[: self.k if self.k is not None else top_k])


class FractionPerLayer(HotExpertPolicy):
    """The ceil(fraction * E) most often selected experts of each layer (MoE-Sieve uses 0.25)."""

    name = "fraction"

    def __init__(self, fraction: float = 0.25):
        if not 0 < fraction <= 1:
            raise ValueError(f"FractionPerLayer needs 0 < fraction <= 1, got {fraction}.")
        self.fraction = fraction

    def select_layer(self, counts, gate_mass, top_k):
        n = max(1, math.ceil(self.fraction * counts.numel() - 1e-9))
        return sorted(_ranked(counts)[:n])


class CoveragePerLayer(HotExpertPolicy):
    """The fewest experts whose share of a layer's selections (or gate mass) reaches `coverage`."""

    name = "coverage"

    def __init__(self, coverage: float = 0.5, by: Literal["count", "gate_mass"] = "count"):
        if not 0 < coverage <= 1:
            raise ValueError(f"CoveragePerLayer needs 0 < coverage <= 1, got {coverage}.")
        if by not in ("count", "gate_mass"):
            raise ValueError(f"CoveragePerLayer `by` must be 'count' or 'gate_mass', got {by!r}.")
        self.coverage = coverage
        self.by = by

    def select_layer(self, counts, gate_mass, top_k):
        scores = (counts if self.by == "count" else gate_mass).double()
        total = float(scores.sum())
        if total <= 0:
            raise ValueError("CoveragePerLayer got a layer with no routed tokens; profile on more data.")
        chosen, covered = [], 0.0
        for expert in _ranked(scores):
            chosen.append(expert)
            covered += float(scores[expert]) / total
            if covered >= self.coverage - 1e-12:
                break
        return sorted(chosen)


class AllExperts(HotExpertPolicy):
    """Every expert: turns HELLoRA into plain LoRA (the baseline)."""

    name = "all"
    needs_profile = False

    def select_layer(self, counts, gate_mass, top_k):
        return list(range(counts.numel()))

    def select_all(self, num_layers: int, num_experts: int) -> list[list[int]]:
        return [list(range(num_experts)) for _ in range(num_layers)]


def _policy_classes(base: type = HotExpertPolicy) -> list[type]:
    found = []
    for cls in base.__subclasses__():
        found += [cls, *_policy_classes(cls)]
    return found


def policy_from_description(description: dict) -> HotExpertPolicy | None:
    """The policy a plan's `policy` field describes (`HotExpertPolicy.describe()`), rebuilt; None when no
    loaded policy class has that name or its arguments do not fit (a policy of one's own that
    `describe` does not round-trip)."""
    arguments = dict(description)
    name = arguments.pop("name", None)
    for cls in _policy_classes():
        if getattr(cls, "name", None) == name and not getattr(cls, "__abstractmethods__", None):
            try:
                policy = cls(**arguments)
            except (TypeError, ValueError):
                return None
            return policy if policy.describe() == description else None
    return None
