"""The adapter placement as data: which layers, experts and modules get adapters, at what rank.

A plan is saved as plan.json beside adapter.safetensors; resume, export, merge and reports read it.
It is the one record of a run's hot experts, of LoRI's mask state and of DR-LoRA's active ranks:
companion callbacks change it through its methods, and `adapters.sites` turns it (with a model)
into the list of adapter sites that everything else reads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

PLAN_FORMAT_VERSION = 3  # the newest this code reads
# A plan is written with the oldest version that describes it: 3 only once it records a routing
# re-selection (`reselections`), so older readers refuse such a plan by its version, not by a bad key.
BASE_FORMAT_VERSION = 2
RESELECTION_FORMAT_VERSION = 3
METHODS = ("lora", "hellora", "attention_only", "hellori", "dr_lora", "esft")
LORI_GRANULARITIES = ("model", "layer", "matrix")
SALIENCY_COMBINATIONS = ("sum", "product")


@dataclass
class LoRISpec:
    """HELLoRI's LoRI settings: every A frozen, every B masked to its top `density` by magnitude.

    `masked` says whether the mask is in force yet (a dense phase comes first unless the mask is
    read from `mask_from`, a dense run's hellora/ folder); `switched_at_step` records when a dense
    phase ended.
    """

    density: float = 0.1
    granularity: str = "model"
    masked: bool = False
    mask_from: str | None = None
    switched_at_step: int | None = None

    def __post_init__(self):
        if not 0 < self.density <= 1:
            raise ValueError(f"LoRI density must be in (0, 1], got {self.density}.")
        if self.granularity not in LORI_GRANULARITIES:
            raise ValueError(
                f"Unknown LoRI mask granularity {self.granularity!r}; choose one of {', '.join(LORI_GRANULARITIES)}."
            )

    @property
    def kept_share(self) -> float:
        """The share of each B that acts and trains now: `density` once masked, all of it before."""
        return self.density if self.masked else 1.0

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["switched_at_step"] is None:
            del data["switched_at_step"]  # written only once a dense phase has ended
        return data


@dataclass
class DynamicRankSpec:
    """DR-LoRA's settings: expert adapters allocated at `rank_max`, starting at `rank_init`, and
    grown by saliency (the schedule fields) within `budget` rank units (the plan's rank per
    adapted expert; filled in by `build_plan`)."""

    rank_init: int
    rank_max: int
    interval: int = 50
    grow_fraction: float = 0.25
    rank_step: int = 2
    frequency_weight: float = 0.5
    combination: str = "sum"
    budget: int | None = None

    @classmethod
    def for_rank(
        cls, rank: int, rank_init: int | None = None, rank_max: int | None = None, **schedule
    ) -> DynamicRankSpec:
        """The settings for a plan of nominal `rank`: rank_init defaults to rank // 2 (at least 1),
        rank_max to 2 x rank; 1 <= rank_init <= rank <= rank_max must hold."""
        rank_init = max(1, rank // 2) if rank_init is None else rank_init
        rank_max = 2 * rank if rank_max is None else rank_max
        if not 1 <= rank_init <= rank <= rank_max:
            raise ValueError(
                f"DR-LoRA needs 1 <= rank_init <= rank <= rank_max, got rank_init={rank_init}, rank={rank}, "
                f"rank_max={rank_max}; the budget is `rank` per adapted expert."
            )
        return cls(rank_init=rank_init, rank_max=rank_max, **schedule)

    def __post_init__(self):
        if self.interval < 1 or self.rank_step < 1:
            raise ValueError(f"interval and rank_step must be >= 1, got {self.interval} and {self.rank_step}.")
        if not 0 < self.grow_fraction <= 1 or not 0 <= self.frequency_weight <= 1:
            raise ValueError("grow_fraction must be in (0, 1] and frequency_weight in [0, 1].")
        if self.combination not in SALIENCY_COMBINATIONS:
            raise ValueError(f"Unknown combination {self.combination!r}; choose 'sum' or 'product'.")

    def to_dict(self) -> dict:
        return asdict(self)


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
    every A and masks every B; `dynamic_rank` holds DR-LoRA's settings and rank budget.
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
    lori: LoRISpec | None = None
    dynamic_rank: DynamicRankSpec | None = None
    layers: list[LayerPlan] = field(default_factory=list)
    profile_tokens: int = 0
    trainable_params: int = 0
    lora_all_experts_params: int = 0
    # Hybrid decoders: per layer type (the class of a layer's attention-like module) the projections
    # adapted on it. Empty when every layer has the same one: `attention_modules` then says it all.
    mixer_projections: dict[str, list[str]] = field(default_factory=dict)
    # Routing re-selections during training (HotExpertInjectionCallback(reselect_every_n_steps), an
    # extension beyond the paper): one {"step", "layer", "added", "hot_now", "tokens"} per layer that
    # gained experts, in order. `layers[*].hot_experts` already holds the experts added.
    reselections: list[dict] = field(default_factory=list)
    format_version: int = BASE_FORMAT_VERSION

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; choose one of {', '.join(METHODS)}.")
        if self.expert_adapter not in ("lora", "full"):
            raise ValueError(f"Unknown expert_adapter {self.expert_adapter!r}; choose 'lora' or 'full'.")
        if isinstance(self.lori, dict):
            self.lori = LoRISpec(**self.lori)
        if isinstance(self.dynamic_rank, dict):
            self.dynamic_rank = DynamicRankSpec(**self.dynamic_rank)

    def hot_experts(self) -> dict[int, list[int]]:
        return {layer.layer: layer.hot_experts for layer in self.layers}

    @property
    def allocated_expert_rank(self) -> int:
        return self.expert_rank if self.expert_rank is not None else self.rank

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    # -- what companion callbacks change -----------------------------------------------------
    def mark_lori_masked(self, switched_at_step: int | None = None) -> None:
        """LoRI's mask is in force from now on (`switched_at_step`: where a dense phase ended)."""
        if self.lori is None:
            raise ValueError(f"A {self.method} plan has no LoRI adapters to mask; use method 'hellori'.")
        self.lori.masked = True
        if switched_at_step is not None:
            self.lori.switched_at_step = switched_at_step

    def set_expert_ranks(self, layer: int, ranks: list[int]) -> None:
        """DR-LoRA: the active rank of each hot expert of MoE layer `layer`."""
        entry = next((e for e in self.layers if e.layer == layer), None)
        if entry is None or self.dynamic_rank is None:
            raise ValueError(f"The plan has no DR-LoRA experts in MoE layer {layer}.")
        if len(ranks) != len(entry.hot_experts) or not all(1 <= r <= self.dynamic_rank.rank_max for r in ranks):
            raise ValueError(
                f"Layer {layer}: ranks {ranks} must give one rank in 1..{self.dynamic_rank.rank_max} per hot expert "
                f"({len(entry.hot_experts)})."
            )
        entry.expert_ranks = [int(r) for r in ranks]

    def add_hot_experts(self, layer: int, added: list[int], step: int, hot_now: list[int], tokens: int) -> None:
        """Re-selection: MoE layer `layer` adapts `added` experts too from optimizer step `step` on
        (`hot_now`: what the policy chose from `tokens` recent routed tokens). Experts are never removed."""
        entry = next((e for e in self.layers if e.layer == layer), None)
        if entry is None:
            raise ValueError(f"The plan has no MoE layer {layer}.")
        added = sorted({int(e) for e in added})
        if not added or set(added) & set(entry.hot_experts) or added[0] < 0 or added[-1] >= self.num_experts:
            raise ValueError(
                f"Layer {layer}: experts to add {added} must be new (adapted: {entry.hot_experts}) and within "
                f"0..{self.num_experts - 1}."
            )
        if self.dynamic_rank is not None or self.lori is not None or self.expert_adapter != "lora":
            raise ValueError(f"A {self.method} plan cannot gain experts during training.")
        entry.hot_experts = sorted(entry.hot_experts + added)
        self.reselections.append(
            {"step": int(step), "layer": layer, "added": added, "hot_now": sorted(hot_now), "tokens": int(tokens)}
        )
        self.format_version = max(self.format_version, RESELECTION_FORMAT_VERSION)

    # -- saving --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        data["lori"] = None if self.lori is None else self.lori.to_dict()
        data["dynamic_rank"] = None if self.dynamic_rank is None else self.dynamic_rank.to_dict()
        if not self.mixer_projections:
            del data["mixer_projections"]  # plans of uniform decoders read as before
        if not self.reselections:
            del data["reselections"]  # plans without re-selection read as before
        return data

    @classmethod
    def from_dict(cls, data: dict) -> AdapterPlan:
        data = dict(data)
        version = data.get("format_version", BASE_FORMAT_VERSION)
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
