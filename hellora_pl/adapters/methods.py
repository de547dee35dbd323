"""The methods, as defaults for one plan: which experts, which modules, which kind of expert adapter.

Every method goes through the same plan, injection, callbacks and expert path; a method only
chooses defaults, and each can be overridden (a policy, attention modules, router, shared experts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from ..routing import AllExperts, CoveragePerLayer, HotExpertPolicy, TopKPerLayer
from .plan import METHODS

# The method names as a type, so LightningCLI lists the choices when a name is wrong.
MethodName = Literal["lora", "hellora", "attention_only", "hellori", "dr_lora", "esft"]
assert get_args(MethodName) == METHODS


@dataclass(frozen=True)
class Method:
    name: str
    policy: Callable[[], HotExpertPolicy]
    summary: str
    experts: bool = True
    attention: bool = True
    router: bool = True
    shared_experts: bool = True
    expert_adapter: str = "lora"  # "full": ESFT's full-rank deltas
    lori: bool = False  # HELLoRI: frozen A, sparse B (needs LoRIMaskCallback)
    dynamic_rank: bool = False  # DR-LoRA: growing per-expert ranks (needs DynamicRankCallback)


METHOD_DEFAULTS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora", AllExperts, "LoRA on attention, router, shared experts and every expert"),
        Method("hellora", TopKPerLayer, "LoRA on attention, router, shared experts and each layer's hot experts"),
        Method(
            "attention_only",
            AllExperts,
            "LoRA on attention only (a control)",
            experts=False,
            router=False,
            shared_experts=False,
        ),
        Method("hellori", TopKPerLayer, "HELLoRA placement with LoRI adapters (frozen A, sparse B)", lori=True),
        Method("dr_lora", AllExperts, "LoRA whose per-expert ranks grow by saliency", dynamic_rank=True),
        Method(
            "esft",
            lambda: CoveragePerLayer(coverage=0.2, by="count"),
            "full-rank updates of the experts that take 20% of each layer's routed tokens",
            attention=False,
            router=False,
            shared_experts=False,
            expert_adapter="full",
        ),
    )
}
assert tuple(METHOD_DEFAULTS) == METHODS


def method_defaults(name: str) -> Method:
    if name not in METHOD_DEFAULTS:
        raise ValueError(
            f"Unknown method {name!r}; choose one of {', '.join(METHOD_DEFAULTS)} "
            "(see hellora_pl/adapters/methods.py for what each one adapts)."
        )
    return METHOD_DEFAULTS[name]
