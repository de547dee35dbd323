"""Routing profiles and hot-expert selection."""

from .profile import RoutingProfile, RoutingRecorder
from .selection import AllExperts, CoveragePerLayer, FractionPerLayer, HotExpertPolicy, TopKPerLayer

__all__ = [
    "AllExperts",
    "CoveragePerLayer",
    "FractionPerLayer",
    "HotExpertPolicy",
    "RoutingProfile",
    "RoutingRecorder",
    "TopKPerLayer",
]
