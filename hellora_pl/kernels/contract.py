"""What an adapted experts module shows the expert path: the kernels' side of the contract.

The kernels own this contract and import nothing else from hellora_pl; `hellora_pl.adapters.experts`
implements it (`ExpertLoRA`, `ExpertDelta`) and attaches one object per MoE layer under
`EXPERT_ADAPTER_ATTR`. A kernel tells the two kinds apart by `kind`, never by importing the classes.

Both kinds hold tensors for their hot experts h_0 < h_1 < ... only (slot s adapts expert h_s):

- `kind == "lora"` (`LoRAExperts`): A [n_hot, r, in] and B [n_hot, out, r] per projection,
  update = scale * B_eff A with B_eff = `effective_B(name)` (LoRI's mask and DR-LoRA's active
  ranks applied), and dropout on the adapter's input;
- `kind == "delta"` (`DeltaExperts`): a full-rank update [n_hot, out, in] per projection (ESFT).
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import nn

EXPERT_ADAPTER_ATTR = "hellora_lora"
"""The attribute of an experts module (fused) or an MoE block (ModuleList) that holds its adapter."""

LORA: Literal["lora"] = "lora"
DELTA: Literal["delta"] = "delta"


class AdaptedExperts(Protocol):
    """What every expert adapter exposes: its hot experts, the expert -> slot map, its projections."""

    kind: Literal["lora", "delta"]
    hot_experts: torch.Tensor  # long [n_hot], ascending
    slot_of_expert: torch.Tensor  # long [num_experts]: slot of each expert, -1 when cold

    @property
    def num_hot(self) -> int: ...

    @property
    def projections(self) -> list[str]: ...


class LoRAExperts(AdaptedExperts, Protocol):
    """`kind == "lora"`: low-rank factors per hot expert."""

    lora_A: nn.ParameterDict  # name -> [n_hot, r, in]
    lora_B: nn.ParameterDict  # name -> [n_hot, out, r] (raw; the forward reads effective_B)
    lora_active_rank: torch.Tensor | None  # long [n_hot] (DR-LoRA) or None: the whole rank acts
    scale: float
    dropout: nn.Module

    def effective_B(self, name: str) -> torch.Tensor: ...


class DeltaExperts(AdaptedExperts, Protocol):
    """`kind == "delta"`: a full-rank update per hot expert."""

    def delta_weight(self, name: str) -> torch.Tensor: ...


def expert_adapter(host: nn.Module) -> AdaptedExperts | None:
    """The expert adapter attached to an experts module (fused) or an MoE block (ModuleList), or None."""
    return getattr(host, EXPERT_ADAPTER_ATTR, None)
