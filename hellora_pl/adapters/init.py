"""Shared LoRA initialisation: A as nn.Linear's default (Kaiming-uniform), B zero, so a new
adapter leaves the model unchanged."""

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
