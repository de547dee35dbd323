"""LoRI's sparse B: keep the largest |B| entries, zero the rest, and train B only there.

The mask keeps the top `density` share of entries by magnitude, pooled over the whole model
("model", as LoRI does), per decoder layer ("layer"), or per matrix ("matrix": each attention
or router B, and each hot expert's B of each projection). Masks live beside B as `lora_B_mask`
buffers; the adapters multiply B by them in the forward, so entries outside the mask get no
gradient and stay exactly zero once B is reset to zero.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import torch
from torch import nn

from .inject import adapter_state_dict

GRANULARITIES = ("model", "layer", "matrix")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def lori_B_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every masked adapter's B by name (those with a `lora_B_mask` beside them)."""
    tensors = adapter_state_dict(model)
    return {
        name: t
        for name, t in tensors.items()
        if ".lora_B" in name and "lora_B_mask" not in name and _mask_name(name) in tensors
    }


def _mask_name(b_name: str) -> str:
    return b_name.replace("lora_B", "lora_B_mask")


def compute_lori_masks(
    model: nn.Module, density: float, granularity: str = "model", source: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Boolean masks keeping the top `density` of |B| per group, by mask buffer name.

    `source` gives the B values to rank (a dense run's adapter tensors by the same names);
    default: the model's current B.
    """
    if not 0 < density <= 1:
        raise ValueError(f"LoRI density must be in (0, 1], got {density}.")
    if granularity not in GRANULARITIES:
        raise ValueError(f"Unknown LoRI mask granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}.")
    targets = lori_B_tensors(model)
    if not targets:
        raise ValueError("The model has no LoRI adapters; inject a plan made with method 'hellori'.")
    values = {}
    for name in targets:
        if source is not None and name not in source:
            raise ValueError(f"The dense adapter has no tensor {name!r}; it must come from a run with the same plan.")
        values[name] = (source[name] if source is not None else targets[name]).detach().float().abs().cpu()
    groups: dict[object, list[tuple[str, int | None]]] = defaultdict(list)
    for name, value in values.items():
        if granularity == "model":
            groups["model"].append((name, None))
        elif granularity == "layer":
            match = _LAYER.search(name)
            groups[int(match.group(1)) if match else name].append((name, None))
        elif value.dim() == 3:  # an expert adapter's B [n_hot, out, r]: one matrix per hot expert
            for slot in range(value.shape[0]):
                groups[(name, slot)].append((name, slot))
        else:
            groups[name].append((name, None))
    masks = {name: torch.zeros_like(value, dtype=torch.bool) for name, value in values.items()}
    for members in groups.values():
        pooled = torch.cat([(values[n] if s is None else values[n][s]).reshape(-1) for n, s in members])
        keep = max(1, math.ceil(density * pooled.numel() - 1e-9))
        threshold = torch.topk(pooled, keep).values.min()
        for name, slot in members:
            if slot is None:
                masks[name] = values[name] >= threshold
            else:
                masks[name][slot] = values[name][slot] >= threshold
    return {_mask_name(name): mask for name, mask in masks.items()}


def apply_lori_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Install the masks and restart every masked B from zero (LoRI retrains B under the mask)."""
    tensors = adapter_state_dict(model)
    with torch.no_grad():
        for mask_name, mask in masks.items():
            b_name = mask_name.replace("lora_B_mask", "lora_B")
            tensors[mask_name].copy_(mask)
            tensors[b_name].zero_()
