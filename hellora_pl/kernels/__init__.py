"""The adapted expert path: a torch reference (also the CPU path) and its dispatch."""

from .dispatch import EXPERTS_IMPLEMENTATION, use_adapted_experts
from .reference import ExpertRouting, adapted_experts_forward, grouped_mm

__all__ = ["EXPERTS_IMPLEMENTATION", "ExpertRouting", "adapted_experts_forward", "grouped_mm", "use_adapted_experts"]
