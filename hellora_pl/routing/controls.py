"""Control hot-expert policies: what HELLoRA's choice is measured against.

`RandomExperts` adapts as many experts per layer as HELLoRA does (k, by default the routing
top-k), drawn at random; `LeastUsedExperts` adapts the k least selected experts of each layer.
If routing counts carry the signal HELLoRA relies on, the top-k policy should beat both at the
same parameter count; least-used experts also receive the fewest routed tokens, so their adapter
FLOPs per token are the smallest of the three.

Both need a routing profile like the other policies (the profile gives the layers, and the
budget's per-token FLOPs). Neither changes with the routing it is shown again (the random draw is
a function of the seed and the layer index, not of the counts' order), so a re-selection or a
drift watch sees the same set unless the counts move under the least-used one.
"""

from __future__ import annotations

import torch

from .profile import RoutingProfile
from .selection import HotExpertPolicy, _ranked


def _check_k(policy: str, k: int | None) -> None:
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"{policy} needs k >= 1 (an integer) or k=None for the routing top-k, got k={k!r}.")


def _check_k_fits(policy: str, k: int | None, num_experts: int, top_k: int) -> int:
    k = k if k is not None else top_k
    if k > num_experts:
        raise ValueError(
            f"{policy} k={k} is larger than the number of experts ({num_experts}); choose k <= {num_experts}."
        )
    return k


class RandomExperts(HotExpertPolicy):
    """k experts per MoE layer drawn uniformly without replacement (a control for HELLoRA's choice).

    k defaults to the routing top-k, the count TopKPerLayer (HELLoRA) adapts. Layer l's draw is
    seeded by (seed, l) alone, so a plan rebuilt from its description, a resume and a re-selection
    give the same experts, and two seeds give independent draws.
    """

    name = "random"

    def __init__(self, k: int | None = None, seed: int = 0):
        _check_k("RandomExperts", k)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"RandomExperts needs a seed >= 0 (an integer), got seed={seed!r}.")
        self.k = k
        self.seed = seed

    def check(self, num_experts: int, top_k: int) -> None:
        _check_k_fits("RandomExperts", self.k, num_experts, top_k)

    def select(self, profile: RoutingProfile) -> list[list[int]]:
        return [
            self.select_layer(profile.counts[i], profile.gate_mass[i], profile.top_k, layer=layer)
            for i, layer in enumerate(profile.layers)
        ]

    def select_layer(self, counts, gate_mass, top_k, layer: int = 0) -> list[int]:
        """The draw of MoE layer `layer` (its index in the model); the counts only give the number of experts."""
        k = _check_k_fits("RandomExperts", self.k, counts.numel(), top_k)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(layer))
        return sorted(torch.randperm(counts.numel(), generator=generator)[:k].tolist())


class LeastUsedExperts(HotExpertPolicy):
    """The k least often selected experts of each layer (the opposite of TopKPerLayer; a control).

    k defaults to the routing top-k. Ties break towards the lower expert index, as in the other policies.
    """

    name = "least_used"

    def __init__(self, k: int | None = None):
        _check_k("LeastUsedExperts", k)
        self.k = k

    def check(self, num_experts: int, top_k: int) -> None:
        _check_k_fits("LeastUsedExperts", self.k, num_experts, top_k)

    def select_layer(self, counts, gate_mass, top_k) -> list[int]:
        k = _check_k_fits("LeastUsedExperts", self.k, counts.numel(), top_k)
        return sorted(_ranked(-counts.double())[:k])  # fewest selections first, lower index among equals
