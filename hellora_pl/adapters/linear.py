"""LoRA around an nn.Linear (attention, shared experts): y = W x + scale * B (A dropout(x))."""

from __future__ import annotations

import torch
from torch import nn

from .common import check_rank, effective_B, init_lora_pair


class LoRALinear(nn.Module):
    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        where: str = "linear",
        dtype: torch.dtype | None = None,
        lori: bool = False,
    ):
        super().__init__()
        check_rank(rank, tuple(base_layer.weight.shape), where)
        self.base_layer = base_layer
        self.rank = rank
        self.scale = alpha / rank
        factory = {"device": base_layer.weight.device, "dtype": dtype or base_layer.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base_layer.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(base_layer.out_features, rank, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        init_lora_pair(self.lora_A, self.lora_B)
        # LoRI: A stays at its random init; B gets a sparsity mask (all ones until one is set).
        self.lora_A.requires_grad_(not lori)
        self.register_buffer("lora_B_mask", torch.ones_like(self.lora_B, dtype=torch.bool) if lori else None)

    @property
    def weight(self) -> torch.Tensor:  # code that reads `.weight` (e.g. a dtype check) sees the base
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T) @ self.effective_B().T
        return self.base_layer(x) + (self.scale * update).to(x.dtype)

    def effective_B(self) -> torch.Tensor:
        return effective_B(self.lora_B, self.lora_B_mask)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.effective_B() @ self.lora_A)

    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight."""
        with torch.no_grad():
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
        return self.base_layer
