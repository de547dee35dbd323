"""The methods, as defaults for one plan: which experts, which modules, which kind of expert adapter.

Every method goes through the same plan, injection, callbacks and expert path; a method only
chooses defaults, and each can be overridden (a policy, attention modules, router, shared experts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from ..routing import AllExperts, CoveragePerLayer, HotExpertPolicy, TopKPerLayer
from .placement import build_plan
from .plan import METHODS, AdapterPlan, DynamicRankSpec, LoRISpec

# The method names as a type, so LightningCLI lists the choices when a name is wrong.
MethodName = Literal["lora", "hellora", "attention_only", "hellori", "dr_lora", "esft"]
assert get_args(MethodName) == METHODS


ESFT_COVERAGE = 0.2  # share of each layer's routed tokens ESFT's experts cover


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
            lambda: CoveragePerLayer(coverage=ESFT_COVERAGE, by="count"),
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


@dataclass(frozen=True)
class PlanSettings:
    """A method's name and overrides resolved into what `build_plan` takes (model and profile aside).

    `attention_modules` None means the architecture's attention projections; `experts` and
    `shared_experts` switch the architecture's expert and shared-expert projections on or off.
    """

    method: str
    policy: HotExpertPolicy
    rank: int
    alpha: float
    dropout: float
    dtype: str
    attention_modules: list[str] | None
    router_rank: int | None
    experts: bool
    shared_experts: bool
    expert_adapter: str
    lori: LoRISpec | None
    dynamic_rank: DynamicRankSpec | None

    def build(self, model, profile) -> AdapterPlan:
        """The plan of these settings on `model`, hot experts chosen from `profile`."""
        return build_plan(
            model,
            self.policy,
            profile,
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            dtype=self.dtype,
            attention_modules=self.attention_modules,
            router_rank=self.router_rank,
            expert_modules=None if self.experts else [],
            shared_expert_modules=None if self.shared_experts else [],
            method=self.method,
            expert_adapter=self.expert_adapter,
            lori=self.lori,
            dynamic_rank=self.dynamic_rank,
        )


def resolve_method(
    name: str,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    dtype: str = "float32",
    hot_experts: HotExpertPolicy | None = None,
    attention_modules: list[str] | None = None,
    router: bool | None = None,
    router_rank: int | None = None,
    shared_experts: bool | None = None,
    experts: bool | None = None,
    lori: LoRISpec | None = None,
    dynamic_rank: DynamicRankSpec | None = None,
) -> PlanSettings:
    """The one translation of a method and its overrides into plan settings (the injection callback
    and the budget tool both use it).

    None keeps the method's default: its policy, attention on or off, router (at `router_rank`,
    default `rank`), shared experts, experts. hellori needs `lori` and dr_lora `dynamic_rank`
    (`DynamicRankSpec.for_rank(rank)` holds its defaults); other methods take neither.
    """
    method = method_defaults(name)
    for spec, needed, label, owner in (
        (lori, method.lori, "LoRI settings (LoRISpec)", "hellori"),
        (dynamic_rank, method.dynamic_rank, "DR-LoRA settings (DynamicRankSpec)", "dr_lora"),
    ):
        if needed and spec is None:
            raise ValueError(f"Method {name!r} needs {label}.")
        if spec is not None and not needed:
            raise ValueError(f"Method {name!r} takes no {label}; only {owner} does.")
    use_router = method.router if router is None else router
    return PlanSettings(
        method=method.name,
        policy=hot_experts if hot_experts is not None else method.policy(),
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        dtype=dtype,
        attention_modules=attention_modules if attention_modules is not None else (None if method.attention else []),
        router_rank=(router_rank or rank) if use_router else None,
        experts=method.experts if experts is None else experts,
        shared_experts=method.shared_experts if shared_experts is None else shared_experts,
        expert_adapter=method.expert_adapter,
        lori=lori,
        dynamic_rank=dynamic_rank,
    )
