"""Routing profiles: how often each expert of each MoE layer is selected, and its gate mass.

`RoutingRecorder` hooks every router (or, for routing "experts_input", every experts module's
input) and accumulates counts while armed; the architecture description says how to read the
chosen experts and their weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..backbones import architecture_for


@dataclass
class RoutingProfile:
    """Per MoE layer: selections and gate mass per expert, over `tokens` routed tokens.

    counts[l, e]: how many (token, k) slots chose expert e in MoE layer l.
    gate_mass[l, e]: the sum of the routing weights those selections applied to the expert.
    """

    layers: list[int]  # decoder-layer index of each MoE layer
    counts: torch.Tensor  # int64 [L, E]
    gate_mass: torch.Tensor  # float64 [L, E]
    tokens: int
    top_k: int

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[1])

    def load(self) -> torch.Tensor:
        """Share of each layer's selections that went to each expert ([L, E], rows sum to 1)."""
        total = self.counts.sum(dim=1, keepdim=True).clamp_min(1)
        return self.counts.double() / total

    def to_dict(self) -> dict:
        return {
            "layers": self.layers,
            "counts": self.counts.tolist(),
            "gate_mass": self.gate_mass.tolist(),
            "tokens": self.tokens,
            "top_k": self.top_k,
        }

    @classmethod
    def from_dict(cls, data: dict) -> RoutingProfile:
        return cls(
            layers=list(data["layers"]),
            counts=torch.tensor(data["counts"], dtype=torch.int64),
            gate_mass=torch.tensor(data["gate_mass"], dtype=torch.float64),
            tokens=int(data["tokens"]),
            top_k=int(data["top_k"]),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def read(cls, path: str | Path) -> RoutingProfile:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Routing profile {str(path)!r} does not exist; give the path of a saved routing_profile.json."
            )
        return cls.from_dict(json.loads(path.read_text()))


class RoutingRecorder:
    """Counts routing decisions of every MoE layer of a model while armed.

    Call `set_token_mask(mask)` before a forward to leave padding out: the mask must have one
    entry per token the routers see (batch x sequence, flattened).
    """

    def __init__(self, model: nn.Module):
        arch = self._arch = architecture_for(model)
        self._config = model.config
        moe_layers = arch.moe_layers(model)
        self.layers = [layer.index for layer in moe_layers]
        self.top_k = arch.top_k(model.config)
        num_experts = arch.num_experts(model.config)
        self.counts = torch.zeros(len(moe_layers), num_experts, dtype=torch.int64)
        self.gate_mass = torch.zeros(len(moe_layers), num_experts, dtype=torch.float64)
        self.tokens = 0
        self.armed = False
        self._token_mask: torch.Tensor | None = None
        if arch.reads_experts_input:
            self._handles = [
                layer.experts.register_forward_pre_hook(self._pre_hook(slot), with_kwargs=True)
                for slot, layer in enumerate(moe_layers)
            ]
        else:
            self._handles = [
                layer.router.register_forward_hook(self._hook(slot)) for slot, layer in enumerate(moe_layers)
            ]

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        self._token_mask = None if mask is None else mask.reshape(-1).bool()

    def _hook(self, slot: int):
        def record(module, inputs, output):
            if self.armed:
                self._count(slot, *self._arch.read_routing(output, self._config))

        return record

    def _pre_hook(self, slot: int):
        def record(module, args, kwargs):
            if self.armed:
                self._count(slot, *self._arch.read_routing((args, kwargs), self._config))

        return record

    def _count(self, slot: int, weights: torch.Tensor, indices: torch.Tensor) -> None:
        weights, indices = weights.detach(), indices.detach()
        mask = self._token_mask
        if mask is not None and mask.numel() == indices.shape[0]:
            mask = mask.to(indices.device)
            weights, indices = weights[mask], indices[mask]
        num_experts = self.counts.shape[1]
        flat = indices.reshape(-1)
        self.counts[slot] += torch.bincount(flat, minlength=num_experts).cpu()
        mass = torch.zeros(num_experts, dtype=torch.float64, device=flat.device)
        self.gate_mass[slot] += mass.index_add_(0, flat, weights.reshape(-1).double()).cpu()
        if slot == 0:
            self.tokens += int(indices.shape[0])

    def arm(self, batch) -> None:
        """Count the routing of the next forward, leaving out the batch's padding (a dict batch's attention_mask)."""
        self.set_token_mask(batch.get("attention_mask") if isinstance(batch, dict) else None)
        self.armed = True

    def take(self) -> RoutingProfile:
        """The counts so far, then start again from zero."""
        profile = self.profile()
        self.reset()
        return profile

    def reset(self) -> None:
        self.counts.zero_()
        self.gate_mass.zero_()
        self.tokens = 0

    def profile(self) -> RoutingProfile:
        return RoutingProfile(self.layers, self.counts.clone(), self.gate_mass.clone(), self.tokens, self.top_k)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> RoutingRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
