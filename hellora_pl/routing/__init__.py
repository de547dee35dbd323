"""Routing profiles and hot-expert selection."""

from .controls import LeastUsedExperts, RandomExperts
from .drift import LayerDrift, RoutingDrift, routing_drift
from .profile import RoutingProfile, RoutingRecorder
from .selection import (
    AllExperts,
    CoveragePerLayer,
    FractionPerLayer,
    HotExpertPolicy,
    TopKPerLayer,
    policy_from_description,
)

__all__ = [
    "AllExperts",
    "CoveragePerLayer",
    "FractionPerLayer",
    "HotExpertPolicy",
    "LayerDrift",
    "LeastUsedExperts",
    "RandomExperts",
    "RoutingDrift",
    "RoutingProfile",
    "RoutingRecorder",
    "TopKPerLayer",
    "policy_from_description",
    "routing_drift",
]
