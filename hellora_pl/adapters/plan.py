"""The adapter placement as data: which layers, experts and modules get adapters, at what rank.

A plan is saved as plan.json beside adapter.safetensors; resume, export, merge and reports read it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

PLAN_FORMAT_VERSION = 2
METHODS = ("lora", "hellora", "attention_only", "hellori", "dr_lora", "esft")


@dataclass
class LayerPlan:
    """One MoE layer: its adapted ("hot") experts, sorted, and the routing statistics that chose them.

    `expert_ranks` (DR-LoRA) holds each hot expert's active rank, updated as ranks grow.
    """

    layer: int
    hot_experts: list[int]
    counts: list[int] = field(default_factory=list)
    gate_mass: list[float] = field(default_factory=list)
    expert_ranks: list[int] | None = None


@dataclass
class AdapterPlan:
    """Every adapter of a run.

    `rank` and `alpha` apply to attention, shared-expert and expert LoRA (scale alpha / rank);
    `expert_rank` is the rank allocated for expert LoRA (DR-LoRA's r_max; `rank` otherwise).
    `expert_adapter` is "lora" or "full" (ESFT's full-rank deltas). `lori` (HELLoRI) freezes
    every A and masks every B; it records the mask's density, granularity and whether the mask
    is in force yet. `dynamic_rank` records DR-LoRA's settings and rank budget.
    """

    method: str  # one of METHODS
    architecture: str
    num_experts: int
    top_k: int
    policy: dict
    rank: int
    alpha: float
    dropout: float = 0.0
    dtype: str = "float32"  # of the adapter tensors, whatever the base's dtype
    router_rank: int | None = None  # None: no router adapter
    attention_modules: list[str] = field(default_factory=list)
    expert_modules: list[str] = field(default_factory=list)
    shared_expert_modules: list[str] = field(default_factory=list)
    expert_adapter: str = "lora"
    expert_rank: int | None = None
    lori: dict | None = None
    dynamic_rank: dict | None = None
    layers: list[LayerPlan] = field(default_factory=list)
    profile_tokens: int = 0
    trainable_params: int = 0
    lora_all_experts_params: int = 0
    format_version: int = PLAN_FORMAT_VERSION

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; choose one of {', '.join(METHODS)}.")
        if self.expert_adapter not in ("lora", "full"):
            raise ValueError(f"Unknown expert_adapter {self.expert_adapter!r}; choose 'lora' or 'full'.")

    def hot_experts(self) -> dict[int, list[int]]:
        return {layer.layer: layer.hot_experts for layer in self.layers}

    @property
    def allocated_expert_rank(self) -> int:
        return self.expert_rank if self.expert_rank is not None else self.rank

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AdapterPlan:
        data = dict(data)
        version = data.get("format_version", PLAN_FORMAT_VERSION)
        if version > PLAN_FORMAT_VERSION:
            raise ValueError(
                f"This plan has format version {version}, newer than this hellora_pl understands "
                f"({PLAN_FORMAT_VERSION}); upgrade hellora_pl."
            )
        data["layers"] = [LayerPlan(**layer) for layer in data.get("layers", [])]
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> AdapterPlan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Adapter plan {str(path)!r} does not exist; give the plan.json written by a fit.")
        return cls.from_dict(json.loads(path.read_text()))
