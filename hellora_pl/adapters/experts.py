"""LoRA on a subset of a layer's fused experts.

For a fused expert tensor W [E, out, in] and hot experts h_0 < h_1 < ... (sorted), this holds
A [n_hot, r, in] and B [n_hot, out, r]; slot s adapts expert h_s. Cold experts have no
parameters at all. The adapted forward lives in `hellora_pl.kernels`; this module only holds
the tensors and the expert -> slot map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .init import check_rank, init_lora_pair

EXPERT_LORA_ATTR = "hellora_lora"


class ExpertLoRA(nn.Module):
    def __init__(
        self,
        experts: nn.Module,
        hot_experts: Sequence[int],
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        projections: Sequence[str] = ("gate_up_proj", "down_proj"),
        where: str = "experts",
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        num_experts = getattr(experts, projections[0]).shape[0]
        hot = sorted(set(int(e) for e in hot_experts))
        if not hot:
            raise ValueError(f"{where}: an expert adapter needs at least one hot expert.")
        if hot[0] < 0 or hot[-1] >= num_experts:
            raise ValueError(f"{where}: hot experts {hot} fall outside 0..{num_experts - 1}.")
        self.rank = rank
        self.scale = alpha / rank
        self.num_experts = num_experts
        slot_of_expert = torch.full((num_experts,), -1, dtype=torch.long)
        slot_of_expert[hot] = torch.arange(len(hot))
        self.register_buffer("hot_experts", torch.tensor(hot, dtype=torch.long), persistent=False)
        self.register_buffer("slot_of_expert", slot_of_expert, persistent=False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in projections:
            weight = getattr(experts, name)
            _, out_features, in_features = weight.shape
            check_rank(rank, (out_features, in_features), f"{where}.{name}")
            factory = {"device": weight.device, "dtype": dtype or weight.dtype}
            self.lora_A[name] = nn.Parameter(torch.empty(len(hot), rank, in_features, **factory))
            self.lora_B[name] = nn.Parameter(torch.empty(len(hot), out_features, rank, **factory))
            init_lora_pair(self.lora_A[name], self.lora_B[name])
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def projections(self) -> list[str]:
        return list(self.lora_A.keys())

    def delta_weight(self, name: str) -> torch.Tensor:
        """scale * B @ A for every hot expert: [n_hot, out, in]. For merging and tests only."""
        return self.scale * torch.bmm(self.lora_B[name], self.lora_A[name])


def expert_lora(experts: nn.Module) -> ExpertLoRA | None:
    return getattr(experts, EXPERT_LORA_ATTR, None)


def attach_expert_lora(experts: nn.Module, lora: ExpertLoRA) -> None:
    setattr(experts, EXPERT_LORA_ATTR, lora)


def merge_expert_lora(experts: nn.Module) -> None:
    """Fold each hot expert's update into the fused base tensors and drop the adapter."""
    lora = expert_lora(experts)
    if lora is None:
        return
    with torch.no_grad():
        for name in lora.projections:
            weight = getattr(experts, name)
            weight[lora.hot_experts] += lora.delta_weight(name).to(weight.dtype)
    delattr(experts, EXPERT_LORA_ATTR)
