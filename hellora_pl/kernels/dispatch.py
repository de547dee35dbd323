"""Wire the adapted expert path into transformers' experts interface, torch or Triton.

Three experts implementations are registered with transformers: "hellora" (auto: Triton for
CUDA tensors when Triton is installed, the torch reference otherwise), "hellora_triton" and
"hellora_torch". `use_adapted_experts(model, kernel)` points every fused experts module of the
model at one of them; a module without an adapter runs the base path only, so the whole model
goes through the seam with no other change.
"""

from __future__ import annotations

import functools
from typing import Literal

from transformers import PreTrainedModel
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .reference import adapted_experts_forward

ExpertKernel = Literal["auto", "triton", "torch"]
EXPERTS_IMPLEMENTATION = "hellora"
IMPLEMENTATIONS = {"auto": "hellora", "triton": "hellora_triton", "torch": "hellora_torch"}


@functools.cache
def _triton_forward():
    """The Triton path, or None where Triton cannot run (not installed, or no CUDA and no interpreter)."""
    try:
        from .triton_host import triton_adapted_experts_forward, triton_available
    except ImportError:
        return None
    return triton_adapted_experts_forward if triton_available() else None


def triton_forward_or_raise():
    forward = _triton_forward()
    if forward is None:
        raise RuntimeError(
            "expert_kernel 'triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1 for the CPU "
            "interpreter): install it with `pip install hellora_pl[triton]`, or choose expert_kernel 'auto' "
            "(Triton on CUDA when present, torch otherwise) or 'torch'."
        )
    return forward


def _auto_forward(experts, hidden_states, top_k_index, top_k_weights):
    forward = _triton_forward() if hidden_states.is_cuda else None
    return (forward or adapted_experts_forward)(experts, hidden_states, top_k_index, top_k_weights)


def _triton_only_forward(experts, hidden_states, top_k_index, top_k_weights):
    # The Triton entry itself falls back to the reference for layers it does not cover (ESFT, LoRA dropout, ...).
    return triton_forward_or_raise()(experts, hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATIONS["auto"], _auto_forward)
ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATIONS["triton"], _triton_only_forward)
ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATIONS["torch"], adapted_experts_forward)


def use_adapted_experts(model: PreTrainedModel, kernel: ExpertKernel = "auto") -> None:
    """Send the model's fused experts through the adapted path with `kernel` ("auto", "triton", "torch")."""
    if kernel not in IMPLEMENTATIONS:
        raise ValueError(f"Unknown expert_kernel {kernel!r}; choose one of {', '.join(IMPLEMENTATIONS)}.")
    if kernel == "triton":
        triton_forward_or_raise()
    implementation = IMPLEMENTATIONS[kernel]
    if model.config._experts_implementation != implementation:
        model.set_experts_implementation(implementation)


def expert_kernel_of(model: PreTrainedModel) -> str | None:
    """Which kernel choice the model's experts use now, or None when not the adapted path."""
    found = {impl: kernel for kernel, impl in IMPLEMENTATIONS.items()}
    return found.get(getattr(model.config, "_experts_implementation", None))
