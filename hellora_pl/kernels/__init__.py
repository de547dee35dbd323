"""The adapted expert path: a torch reference (also the CPU path), Triton kernels, and their dispatch."""

from .dispatch import EXPERTS_IMPLEMENTATION, ExpertKernel, expert_kernel_of, use_adapted_experts
from .reference import ExpertRouting, adapted_experts_forward, grouped_mm

# The Triton path (hellora_pl.kernels.triton_expert) is imported lazily by the dispatch, so that
# importing hellora_pl never needs Triton and TRITON_INTERPRET can still be set before it loads.

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "ExpertKernel",
    "ExpertRouting",
    "adapted_experts_forward",
    "expert_kernel_of",
    "grouped_mm",
    "use_adapted_experts",
]
