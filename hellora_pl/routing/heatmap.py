"""Layer x expert heatmaps: a labelled matplotlib figure of a routing profile, and a bare RGB image.

`routing_heatmap` is what a person reads in TensorBoard: rows are the MoE layers by their
decoder-layer index (dense layers, such as DeepSeek's first ones, have no row), columns are
experts, colour is the share of the layer's routed selections diverging around the balanced
share 1/E, and adapted (hot) experts are boxed. It uses matplotlib's object API on the Agg
canvas, so no display or pyplot state is involved. `heatmap_image` is the older unlabelled image
(DR-LoRA's rank map still logs it).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.patheffects import withStroke
from matplotlib.ticker import MaxNLocator

from .profile import RoutingProfile

_MAX_TICK_LABELS = 64  # more experts or layers than this: label every n-th so labels stay legible
HOT_EDGE_COLOR = "black"


def routing_heatmap(
    profile: RoutingProfile, hot: Mapping[int, Sequence[int]] | None = None, title: str = "routing"
) -> Figure:
    """A figure of `profile.load()`: one row per MoE layer, one column per expert.

    `hot` maps a decoder-layer index to the adapted experts of that layer (they get a box);
    `title` names what was profiled (e.g. the logging tag) in the first line of the title.
    """
    load = profile.load().numpy()
    num_layers, num_experts = load.shape
    if num_layers == 0 or num_experts == 0:
        raise ValueError(
            f"The routing profile is empty ({num_layers} MoE layers x {num_experts} experts); nothing to plot."
        )
    if len(profile.layers) != num_layers:
        raise ValueError(
            f"The routing profile names {len(profile.layers)} layers ({profile.layers}) but holds counts for "
            f"{num_layers}; rebuild or re-save the profile."
        )
    boxes = _hot_cells(profile, hot or {})
    balanced = 1.0 / num_experts

    figure = Figure(
        figsize=(min(24.0, max(7.0, 2.5 + 0.16 * num_experts)), min(16.0, max(3.5, 2.0 + 0.28 * num_layers))),
        dpi=100,
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    # White is the balanced share; red above it, blue below. The top is at least 2/E so a nearly
    # balanced layer does not look extreme.
    norm = TwoSlopeNorm(vcenter=balanced, vmin=0.0, vmax=max(float(load.max()), 2 * balanced))
    image = axes.imshow(load, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")

    axes.set_xticks(_tick_positions(num_experts))
    axes.set_xticklabels([str(e) for e in _tick_positions(num_experts)], rotation=90 if num_experts > 32 else 0)
    axes.set_yticks(_tick_positions(num_layers))
    axes.set_yticklabels([str(profile.layers[row]) for row in _tick_positions(num_layers)])
    axes.tick_params(labelsize=7 if num_experts > 32 else 9)
    axes.set_xlabel("expert")
    axes.set_ylabel("decoder layer (MoE layers only)")
    lines = [
        f"{title}: share of routed (token, expert) selections per layer",
        f"each row sums to 1; {profile.tokens} tokens, top-{profile.top_k} of {num_experts} experts",
        f"white = balanced share 1/E = {balanced:.3g}, red above, blue below",
    ]
    if boxes:
        lines.append("boxed = adapted (hot) experts")
    axes.set_title(_pack(lines, width=int(figure.get_figwidth() * 11)), fontsize=10)  # ~11 chars/inch at size 10
    for row, expert in boxes:  # black with a white halo: visible on dark blue and dark red alike
        axes.add_patch(
            Rectangle(
                (expert - 0.5, row - 0.5),
                1,
                1,
                fill=False,
                edgecolor=HOT_EDGE_COLOR,
                linewidth=1.5,
                path_effects=[withStroke(linewidth=3, foreground="white")],
            )
        )

    colorbar = figure.colorbar(image, ax=axes, fraction=0.04, pad=0.01)
    colorbar.set_label("share of the layer's selections")
    # Ticks above the balanced share, none so close to it (in colour-bar position) that labels collide.
    above = [t for t in MaxNLocator(5).tick_values(balanced, norm.vmax) if 0.56 < norm(t) <= 1.0]
    colorbar.set_ticks([0.0, balanced, *above], labels=["0", "1/E", *(f"{t:.3g}" for t in above)])
    colorbar.ax.axhline(balanced, color="black", linewidth=1)
    return figure


def _hot_cells(profile: RoutingProfile, hot: Mapping[int, Sequence[int]]) -> list[tuple[int, int]]:
    """(row, expert) of each adapted expert; a layer or expert the profile lacks is an error."""
    rows = {layer: row for row, layer in enumerate(profile.layers)}
    cells = []
    for layer, experts in hot.items():
        if experts and layer not in rows:
            raise ValueError(
                f"Adapted experts are given for layer {layer}, which is not a MoE layer of the routing profile "
                f"(layers {profile.layers}); the profile and the model do not match."
            )
        for expert in experts:
            if not 0 <= int(expert) < profile.num_experts:
                raise ValueError(
                    f"Adapted expert {expert} of layer {layer} is outside the profile's {profile.num_experts} "
                    "experts; the profile and the model do not match."
                )
            cells.append((rows[layer], int(expert)))
    return cells


def _pack(phrases: Sequence[str], width: int) -> str:
    """The phrases joined by "; " into lines of at most `width` characters (a longer phrase is wrapped)."""
    lines: list[str] = []
    for phrase in phrases:
        if lines and len(lines[-1]) + 2 + len(phrase) <= width:
            lines[-1] += "; " + phrase
        else:
            lines.append(phrase)
    return "\n".join(textwrap.fill(line, width) for line in lines)


def _tick_positions(count: int) -> list[int]:
    """Every index, or every n-th when there are more than `_MAX_TICK_LABELS`."""
    return list(range(0, count, math.ceil(count / _MAX_TICK_LABELS)))


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
