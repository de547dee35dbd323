"""Routing drift: how far a run's current routing has moved from the hot experts its plan adapted.

Per MoE layer, from a routing profile of recent training steps: the share of routing selections
(token-expert assignments) that land on adapted experts, the hot set the plan's own policy would
choose from this routing, and its overlap with the adapted set (|adapted & now| / |now|, and the
Jaccard index |adapted & now| / |adapted | now|). The paper names drift as a limitation; this is
the measurement behind `RoutingProfilerCallback`'s watch and the injection callback's re-selection.
"""

from __future__ import annotations

from dataclasses import dataclass

from .profile import RoutingProfile
from .selection import HotExpertPolicy


@dataclass(frozen=True)
class LayerDrift:
    layer: int
    adapted: list[int]  # the experts with adapters now
    hot_now: list[int]  # what the policy would choose from this routing
    adapted_share: float  # share of the layer's selections on adapted experts
    overlap: float  # |adapted & hot_now| / |hot_now|: 1 = every expert the policy wants is adapted
    jaccard: float  # |adapted & hot_now| / |adapted | hot_now|

    @property
    def newly_hot(self) -> list[int]:
        """Experts the policy would choose now that have no adapter."""
        return sorted(set(self.hot_now) - set(self.adapted))


@dataclass(frozen=True)
class RoutingDrift:
    layers: list[LayerDrift]
    adapted_share: float  # over every watched layer's selections
    overlap: float  # sum |adapted & hot_now| / sum |hot_now|
    jaccard: float  # sum |adapted & hot_now| / sum |adapted | hot_now|

    def metrics(self, prefix: str = "routing/drift") -> dict[str, float]:
        """Scalars by name: `<prefix>/{adapted_share,overlap,jaccard}` and the same plus `newly_hot` per layer."""
        metrics = {
            f"{prefix}/adapted_share": self.adapted_share,
            f"{prefix}/overlap": self.overlap,
            f"{prefix}/jaccard": self.jaccard,
        }
        for entry in self.layers:
            metrics[f"{prefix}/layer_{entry.layer}/adapted_share"] = entry.adapted_share
            metrics[f"{prefix}/layer_{entry.layer}/overlap"] = entry.overlap
            metrics[f"{prefix}/layer_{entry.layer}/jaccard"] = entry.jaccard
            metrics[f"{prefix}/layer_{entry.layer}/newly_hot"] = float(len(entry.newly_hot))
        return metrics

    def below(self, threshold: float) -> list[LayerDrift]:
        """The layers whose overlap is under `threshold`."""
        return [entry for entry in self.layers if entry.overlap < threshold]


def routing_drift(profile: RoutingProfile, adapted: dict[int, list[int]], policy: HotExpertPolicy) -> RoutingDrift:
    """Drift of `profile`'s routing from the `adapted` experts (MoE layer -> experts); layers without
    adapted experts (attention-only plans, or none chosen) are left out."""
    if profile.tokens <= 0:
        raise ValueError("Routing drift needs a profile with routed tokens.")
    hot_now = policy.select(profile)
    layers, on_adapted, selections, shared, wanted, union = [], 0, 0, 0, 0, 0
    for row, layer in enumerate(profile.layers):
        chosen = sorted(adapted.get(layer) or [])
        if not chosen:
            continue
        counts = profile.counts[row]
        now = set(hot_now[row])
        common = len(now & set(chosen))
        either = len(now | set(chosen))
        total = int(counts.sum())
        landed = int(counts[chosen].sum())
        layers.append(
            LayerDrift(
                layer=layer,
                adapted=chosen,
                hot_now=sorted(now),
                adapted_share=landed / max(total, 1),
                overlap=common / max(len(now), 1),
                jaccard=common / max(either, 1),
            )
        )
        on_adapted, selections = on_adapted + landed, selections + total
        shared, wanted, union = shared + common, wanted + len(now), union + either
    return RoutingDrift(
        layers=layers,
        adapted_share=on_adapted / max(selections, 1),
        overlap=shared / max(wanted, 1),
        jaccard=shared / max(union, 1),
    )
