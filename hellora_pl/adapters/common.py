"""Shared LoRA helpers: initialisation (A as nn.Linear's default, B zero, so a new adapter leaves
the model unchanged), rank checks, and B as the forward sees it."""

import math

import torch


def init_lora_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    """Initialise A ([..., r, in]) and B ([..., out, r]) in place; leading dims are experts."""
    with torch.no_grad():
        fan_in = a.shape[-1]
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) as in nn.Linear and PEFT
        a.uniform_(-bound, bound)
        b.zero_()


def check_rank(rank: int, shape: tuple[int, int], where: str) -> None:
    """A rank must be positive and at most the smaller side of the matrix it adapts."""
    out_features, in_features = shape
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank} for {where}; set rank >= 1.")
    if rank > min(out_features, in_features):
        raise ValueError(
            f"LoRA rank {rank} is larger than {where}'s smaller dimension "
            f"({out_features} x {in_features}); choose rank <= {min(out_features, in_features)}."
        )


def effective_B(
    lora_B: torch.Tensor, mask: torch.Tensor | None = None, active_rank: torch.Tensor | None = None
) -> torch.Tensor:
    """B as the forward uses it: LoRI's sparsity mask (same shape as B) and DR-LoRA's active ranks
    (one per leading index; rank slices at or beyond it are off) applied.

    Masking in the forward makes the gradient outside the mask exactly zero, so B entries that
    start at zero there stay zero, and inactive rank slices neither act nor train.
    """
    if mask is not None:
        lora_B = lora_B * mask.to(lora_B.dtype)
    if active_rank is not None:
        rank = lora_B.shape[-1]
        on = torch.arange(rank, device=lora_B.device) < active_rank.unsqueeze(-1)  # [..., r]
        lora_B = lora_B * on.unsqueeze(-2).to(lora_B.dtype)
    return lora_B
