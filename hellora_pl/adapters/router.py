"""LoRA on a router's bare `weight` [E, H] through a parametrization.

Routers in transformers 5 are not nn.Linear and compute top-k inside their forward, so the
update has to act on the weight itself. The router is small (E x H), so building W + BA here
costs about as much as the router's own matmul.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .common import check_rank, effective_B, init_lora_pair


class RouterLoRA(nn.Module):
    def __init__(
        self,
        weight: torch.Tensor,
        rank: int,
        alpha: float,
        where: str = "router",
        dtype: torch.dtype | None = None,
        lori: bool = False,
    ):
        super().__init__()
        check_rank(rank, tuple(weight.shape), where)
        self.rank = rank
        self.scale = alpha / rank
        num_experts, hidden = weight.shape
        factory = {"device": weight.device, "dtype": dtype or weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, hidden, **factory))
        self.lora_B = nn.Parameter(torch.empty(num_experts, rank, **factory))
        init_lora_pair(self.lora_A, self.lora_B)
        self.lora_A.requires_grad_(not lori)
        self.register_buffer("lora_B_mask", torch.ones_like(self.lora_B, dtype=torch.bool) if lori else None)

    def effective_B(self) -> torch.Tensor:
        return effective_B(self.lora_B, self.lora_B_mask)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.effective_B() @ self.lora_A)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight().to(weight.dtype)


def attach_router_lora(
    router: nn.Module, rank: int, alpha: float, where: str, dtype: torch.dtype | None = None, lori: bool = False
) -> RouterLoRA:
    lora = RouterLoRA(router.weight, rank, alpha, where, dtype, lori)
    parametrize.register_parametrization(router, "weight", lora, unsafe=True)
    router.parametrizations.weight.original.requires_grad_(False)
    return lora


def router_lora(router: nn.Module) -> RouterLoRA | None:
    if not parametrize.is_parametrized(router, "weight"):
        return None
    found = [p for p in router.parametrizations.weight if isinstance(p, RouterLoRA)]
    return found[0] if found else None


def merge_router_lora(router: nn.Module) -> None:
    """Fold the update into `weight` and remove the parametrization (the key is `weight` again)."""
    parametrize.remove_parametrizations(router, "weight", leave_parametrized=True)
    router.weight.requires_grad_(False)


def remove_router_lora(router: nn.Module) -> None:
    """Remove the parametrization and its update, keeping the original weight."""
    parametrize.remove_parametrizations(router, "weight", leave_parametrized=False)
    router.weight.requires_grad_(False)
