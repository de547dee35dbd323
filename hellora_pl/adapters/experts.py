"""Adapters on a subset of one MoE layer's experts, for fused and nn.ModuleList expert layouts.

An expert adapter holds tensors for its hot experts h_0 < h_1 < ... only (slot s adapts expert
h_s); cold experts have no parameters at all. Two kinds:

- `ExpertLoRA`: A [n_hot, r, in] and B [n_hot, out, r] per projection (LoRA, HELLoRA, DR-LoRA
  with per-expert active ranks, HELLoRI with frozen A and a sparsity mask on B);
- `ExpertDelta`: a full-rank delta [n_hot, out, in] per projection (ESFT).

The same adapter object serves both layouts. With fused experts ([E, out, in] tensors) it is
attached to the experts module and the expert path in `hellora_pl.kernels` reads it through the
contract that `hellora_pl.kernels.contract` owns (`kind`, hot experts, slots, projections and
the LoRA factors or the deltas); the kernels never import this module. With an
nn.ModuleList of expert MLPs it is attached to the MoE block, and each hot expert's linears are
wrapped by `ExpertSlotLinear`, which adds that expert's slot of the update.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..kernels.contract import DELTA, EXPERT_ADAPTER_ATTR, LORA, expert_adapter
from ..kernels.layout import ExpertLayout
from .common import check_rank, effective_B, init_lora_pair

__all__ = [
    "EXPERT_ADAPTER_ATTR",
    "ExpertAdapter",
    "ExpertDelta",
    "ExpertLoRA",
    "ExpertSlotLinear",
    "attach_expert_adapter",
    "detach_expert_adapter",
    "expert_adapter",
    "layer_expert_adapter",
]


class _BufferDict(nn.Module):
    """Named buffers (nn.ParameterDict's counterpart for masks)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)

    def __getitem__(self, name: str) -> torch.Tensor:
        return getattr(self, name)


class ExpertAdapter(nn.Module):
    """The hot experts of one MoE layer and the expert -> slot map (`kernels.contract.AdaptedExperts`)."""

    kind: str  # LORA or DELTA: how the expert path reads the subclass

    def __init__(self, num_experts: int, hot_experts: Sequence[int], where: str):
        super().__init__()
        hot = sorted(set(int(e) for e in hot_experts))
        if not hot:
            raise ValueError(f"{where}: an expert adapter needs at least one hot expert.")
        if hot[0] < 0 or hot[-1] >= num_experts:
            raise ValueError(f"{where}: hot experts {hot} fall outside 0..{num_experts - 1}.")
        self.num_experts = num_experts
        slot_of_expert = torch.full((num_experts,), -1, dtype=torch.long)
        slot_of_expert[hot] = torch.arange(len(hot))
        self.register_buffer("hot_experts", torch.tensor(hot, dtype=torch.long), persistent=False)
        self.register_buffer("slot_of_expert", slot_of_expert, persistent=False)

    @property
    def num_hot(self) -> int:
        return int(self.hot_experts.numel())

    @property
    def projections(self) -> list[str]:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """The update of every hot expert, [n_hot, out, in]. For merging, export and tests."""
        raise NotImplementedError

    def slot_update(self, name: str, slot: int, x: torch.Tensor) -> torch.Tensor:
        """The update of one hot expert's projection on its rows x [N, in] (ModuleList layout)."""
        raise NotImplementedError


class ExpertLoRA(ExpertAdapter):
    """LoRA per hot expert: update = scale * B_eff @ A.

    `rank` is the allocated rank. `active_ranks` (DR-LoRA) switches rank slices at or beyond each
    expert's active rank off; `lori` freezes A and adds a mask on B (all ones until a sparsity
    mask is set). `scale` is alpha / r for the plan's nominal rank r, so growing a rank does not
    rescale the update. Implements `kernels.contract.LoRAExperts`.
    """

    kind = LORA

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, int]],
        num_experts: int,
        hot_experts: Sequence[int],
        rank: int,
        scale: float,
        dropout: float = 0.0,
        where: str = "experts",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        active_ranks: Sequence[int] | None = None,
        lori: bool = False,
    ):
        super().__init__(num_experts, hot_experts, where)
        self.rank = rank
        self.scale = scale
        factory = {"device": device, "dtype": dtype}
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (out_features, in_features) in shapes.items():
            check_rank(rank, (out_features, in_features), f"{where}.{name}")
            self.lora_A[name] = nn.Parameter(torch.empty(self.num_hot, rank, in_features, **factory))
            self.lora_B[name] = nn.Parameter(torch.empty(self.num_hot, out_features, rank, **factory))
            init_lora_pair(self.lora_A[name], self.lora_B[name])
            self.lora_A[name].requires_grad_(not lori)
        self.lora_B_mask = (
            _BufferDict({n: torch.ones_like(b, dtype=torch.bool) for n, b in self.lora_B.items()}) if lori else None
        )
        if active_ranks is not None:
            active = torch.tensor(list(active_ranks), dtype=torch.long, device=device)
            if active.numel() != self.num_hot or int(active.min()) < 1 or int(active.max()) > rank:
                raise ValueError(
                    f"{where}: active ranks {active.tolist()} must give one rank in 1..{rank} per hot expert "
                    f"({self.num_hot})."
                )
            self.register_buffer("lora_active_rank", active)
        else:
            self.lora_active_rank = None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def projections(self) -> list[str]:
        return list(self.lora_A.keys())

    def effective_B(self, name: str) -> torch.Tensor:
        """B [n_hot, out, r] with the LoRI mask and the active ranks applied."""
        mask = None if self.lora_B_mask is None else self.lora_B_mask[name]
        return effective_B(self.lora_B[name], mask, self.lora_active_rank)

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.scale * torch.bmm(self.effective_B(name), self.lora_A[name])

    def slot_update(self, name: str, slot: int, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A[name][slot]
        b = self.effective_B(name)[slot]
        return self.scale * ((self.dropout(x).to(a.dtype) @ a.T) @ b.T)


class ExpertDelta(ExpertAdapter):
    """A full-rank trainable delta per hot expert (ESFT), zero at the start (`kernels.contract.DeltaExperts`)."""

    kind = DELTA

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, int]],
        num_experts: int,
        hot_experts: Sequence[int],
        where: str = "experts",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(num_experts, hot_experts, where)
        self.lora_delta = nn.ParameterDict(
            {
                name: nn.Parameter(torch.zeros(self.num_hot, out_features, in_features, device=device, dtype=dtype))
                for name, (out_features, in_features) in shapes.items()
            }
        )

    @property
    def projections(self) -> list[str]:
        return list(self.lora_delta.keys())

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.lora_delta[name]

    def slot_update(self, name: str, slot: int, x: torch.Tensor) -> torch.Tensor:
        delta = self.lora_delta[name][slot]
        return x.to(delta.dtype) @ delta.T


class ExpertSlotLinear(nn.Module):
    """One hot expert's nn.Linear (ModuleList layout) plus its slot of the layer's expert adapter."""

    def __init__(self, base_layer: nn.Linear, adapter: ExpertAdapter, name: str, slot: int):
        super().__init__()
        self.base_layer = base_layer
        self.__dict__["adapter"] = adapter  # not a submodule: the MoE block owns the adapter
        self.name = name
        self.slot = slot

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.adapter.slot_update(self.name, self.slot, x).to(x.dtype)


# -- attaching to a model (under kernels.contract.EXPERT_ADAPTER_ATTR; `expert_adapter` reads it) --------------


def layer_expert_adapter(moe) -> ExpertAdapter | None:
    """The expert adapter of an MoELayer, whatever the layout."""
    return expert_adapter(moe.experts) or expert_adapter(moe.block)


def attach_expert_adapter(moe, adapter: ExpertAdapter, fused: bool) -> None:
    if fused:
        setattr(moe.experts, EXPERT_ADAPTER_ATTR, adapter)
        return
    setattr(moe.block, EXPERT_ADAPTER_ATTR, adapter)
    for slot, expert in enumerate(adapter.hot_experts.tolist()):
        for name in adapter.projections:
            base = getattr(moe.experts[expert], name)
            setattr(moe.experts[expert], name, ExpertSlotLinear(base, adapter, name, slot))


def detach_expert_adapter(moe, merge: bool) -> None:
    """Remove a layer's expert adapter, folding its update into the base weights when `merge`."""
    adapter = layer_expert_adapter(moe)
    if adapter is None:
        return
    host = moe.experts if expert_adapter(moe.experts) is not None else moe.block
    with torch.no_grad():
        if host is moe.experts:  # fused
            if merge:
                layout = ExpertLayout.of(moe.experts)  # the update is [out, in]; transposed storage takes its transpose
                for name in adapter.projections:
                    weight = getattr(moe.experts, name)
                    weight[adapter.hot_experts] += layout.to_storage(adapter.delta_weight(name)).to(weight.dtype)
        else:
            for name in adapter.projections:
                delta = adapter.delta_weight(name) if merge else None
                for slot, expert in enumerate(adapter.hot_experts.tolist()):
                    wrapped = getattr(moe.experts[expert], name)
                    if merge:
                        wrapped.base_layer.weight += delta[slot].to(wrapped.weight.dtype)
                    setattr(moe.experts[expert], name, wrapped.base_layer)
    delattr(host, EXPERT_ADAPTER_ATTR)
