"""The adapted expert path: a torch reference (also the CPU path), Triton kernels, and their dispatch.

A leaf of hellora_pl: it imports nothing from the rest of the package. What it reads from an
adapter is the contract in `contract.py`, which `hellora_pl.adapters.experts` implements.
"""

from .contract import DELTA, EXPERT_ADAPTER_ATTR, LORA, AdaptedExperts, DeltaExperts, LoRAExperts, expert_adapter
from .dispatch import EXPERTS_IMPLEMENTATION, ExpertKernel, expert_kernel_of, use_adapted_experts
from .reference import ExpertRouting, adapted_experts_forward, grouped_mm

# The Triton path (triton_host, and the @triton.jit kernels in triton_jit) is imported lazily by the
# dispatch, so that importing hellora_pl never needs Triton and TRITON_INTERPRET can still be set before it loads.

__all__ = [
    "DELTA",
    "EXPERTS_IMPLEMENTATION",
    "EXPERT_ADAPTER_ATTR",
    "LORA",
    "AdaptedExperts",
    "DeltaExperts",
    "ExpertKernel",
    "ExpertRouting",
    "LoRAExperts",
    "adapted_experts_forward",
    "expert_adapter",
    "expert_kernel_of",
    "grouped_mm",
    "use_adapted_experts",
]
