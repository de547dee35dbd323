"""A layer x expert heatmap as an RGB image tensor, without a plotting library."""

from __future__ import annotations

import torch

# A few stops of the viridis colour map; values in between are interpolated.
_STOPS = torch.tensor(
    [
        [68, 1, 84],
        [59, 82, 139],
        [33, 145, 140],
        [94, 201, 98],
        [253, 231, 37],
    ],
    dtype=torch.float32,
)


def heatmap_image(values: torch.Tensor, cell: int | None = None, vmax: float | None = None) -> torch.Tensor:
    """uint8 [3, rows * cell, cols * cell]; bright = large.

    Each row is scaled to its own max, or every value to `vmax` when given. `cell` (pixels per
    entry) defaults to what makes the image about 1024 pixels wide.
    """
    values = values.double()
    if cell is None:
        cell = max(4, min(32, 1024 // values.shape[1]))
    top = values.amax(dim=1, keepdim=True) if vmax is None else torch.tensor(float(vmax), dtype=values.dtype)
    scaled = values / top.clamp_min(1e-12)
    position = scaled.float().clamp(0, 1) * (len(_STOPS) - 1)
    low = position.floor().long().clamp(max=len(_STOPS) - 2)
    frac = (position - low).unsqueeze(-1)
    rgb = _STOPS[low] * (1 - frac) + _STOPS[low + 1] * frac  # [rows, cols, 3]
    rgb = rgb.repeat_interleave(cell, dim=0).repeat_interleave(cell, dim=1)
    return rgb.permute(2, 0, 1).round().to(torch.uint8)
