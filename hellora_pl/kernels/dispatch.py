"""Wire the adapted expert path into transformers' experts interface.

Registering it under the name "hellora" lets `model.set_experts_implementation("hellora")` send
every fused experts module through it; a module without an adapter runs the base path only.
"""

from __future__ import annotations

from transformers import PreTrainedModel
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .reference import adapted_experts_forward

EXPERTS_IMPLEMENTATION = "hellora"

ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, adapted_experts_forward)


def use_adapted_experts(model: PreTrainedModel) -> None:
    if model.config._experts_implementation != EXPERTS_IMPLEMENTATION:
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
