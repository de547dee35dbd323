"""How a fused experts module stores its experts: the one reader of transformers' layout flags.

transformers' `@use_experts_implementation(...)` sets flags on each experts instance; its
`grouped_mm_experts_forward` (transformers/integrations/moe.py) shows what each does:

- `has_gate`: `gate_up_proj` [E, 2I, H] then the experts' own `_apply_gate` (SwiGLU, GELU, the
  clamped SwiGLU of gpt_oss); False: `up_proj` [E, I, H] then `act_fn` (nemotron_h: ReLU^2);
- `is_transposed`: every projection stored [E, in, out] instead of [E, out, in] (aria, gpt_oss);
- `has_bias`: `<projection>_bias` [E, out], the bias of the row's expert added after the GEMM;
- `is_concatenated=False`: gate and up rows interleaved (gate0, up0, gate1, ...); only the
  experts' `_apply_gate` reads it, so the path never needs to know the order;
- `has_post_expert_norm`: `post_expert_norm` on each expert's output, before the routing weight.

Adapters work in the logical (out, in) orientation whatever the storage (A [n_hot, r, in],
B [n_hot, out, r]); `ExpertLayout.to_storage` turns a logical update into the stored one for a
merge. A fused experts module without the flags (a registered family) reads as the plain layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GATE_UP = "gate_up_proj"
UP = "up_proj"
DOWN = "down_proj"
POST_EXPERT_NORM = "post_expert_norm"


@dataclass(frozen=True)
class ExpertLayout:
    """The layout of one fused experts module, read from its flags and tensors (`ExpertLayout.of`)."""

    up: str  # "gate_up_proj" (gated) or "up_proj" (ungated)
    gated: bool
    transposed: bool  # stored [E, in, out]
    bias: bool  # `<projection>_bias` [E, out]
    post_norm: bool  # `post_expert_norm` after down_proj
    concatenated: bool  # gate/up rows [gate; up] (False: interleaved; `_apply_gate` handles it)
    num_experts: int
    hidden: int  # the experts' input width (H, or a latent width)
    shapes: tuple[tuple[str, tuple[int, int]], ...]  # logical (out, in) of each projection

    @classmethod
    def of(cls, experts: nn.Module) -> ExpertLayout:
        """Read the layout; raises NotImplementedError naming the flag when a tensor the flags promise is missing."""
        gated = bool(getattr(experts, "has_gate", True))
        transposed = bool(getattr(experts, "is_transposed", False))
        bias = bool(getattr(experts, "has_bias", False))
        post_norm = bool(getattr(experts, "has_post_expert_norm", False))
        up = GATE_UP if gated else UP
        where = type(experts).__name__
        for name in (up, DOWN):
            weight = getattr(experts, name, None)
            if weight is None or len(weight.shape) != 3:
                raise NotImplementedError(
                    f"{where} (has_gate={gated}) should hold a 3D `{name}` [E, out, in] (or [E, in, out] with "
                    f"is_transposed); found {None if weight is None else tuple(weight.shape)}. The adapted expert "
                    "path runs fused experts of transformers' experts interface only."
                )
            if bias and getattr(experts, f"{name}_bias", None) is None:
                raise NotImplementedError(f"{where} sets has_bias but has no `{name}_bias`.")
        if post_norm and not callable(getattr(experts, POST_EXPERT_NORM, None)):
            raise NotImplementedError(f"{where} sets has_post_expert_norm but has no `{POST_EXPERT_NORM}` module.")
        if getattr(experts, "_is_expert_parallel", False):
            raise NotImplementedError(
                f"{where} runs expert-parallel (_is_expert_parallel: sentinel experts beyond E), which the adapted "
                "expert path does not handle; run without expert parallelism."
            )
        shapes = tuple((name, _logical(getattr(experts, name).shape, transposed)) for name in (up, DOWN))
        up_weight = getattr(experts, up)
        return cls(
            up=up,
            gated=gated,
            transposed=transposed,
            bias=bias,
            post_norm=post_norm,
            concatenated=bool(getattr(experts, "is_concatenated", True)),
            num_experts=int(up_weight.shape[0]),
            hidden=dict(shapes)[up][1],
            shapes=shapes,
        )

    @property
    def projections(self) -> tuple[str, str]:
        """The projections adapters use, in forward order."""
        return (self.up, DOWN)

    @property
    def plain(self) -> bool:
        """Concatenated gated [E, out, in] projections, no bias, no post-expert norm (what Triton runs)."""
        return self.gated and not self.transposed and not self.bias and not self.post_norm and self.concatenated

    def shape(self, name: str) -> tuple[int, int]:
        """Logical (out, in) of projection `name`."""
        shapes = dict(self.shapes)
        if name not in shapes:
            raise ValueError(f"No expert projection {name!r} in this layout; its projections are {self.projections}.")
        return shapes[name]

    def bias_of(self, experts: nn.Module, name: str) -> torch.Tensor | None:
        """[E, out] bias of projection `name`, or None."""
        return getattr(experts, f"{name}_bias") if self.bias else None

    def to_storage(self, update: torch.Tensor) -> torch.Tensor:
        """A logical [..., out, in] update in the stored orientation (transposed storage: [..., in, out])."""
        return update.transpose(-2, -1) if self.transposed else update

    def differences(self) -> list[str]:
        """What differs from the plain layout, one phrase per flag ([] for the plain layout)."""
        found = []
        if not self.gated:
            found.append("ungated experts (has_gate=False)")
        if self.transposed:
            found.append("transposed expert weights (is_transposed)")
        if self.bias:
            found.append("expert biases (has_bias)")
        if not self.concatenated:
            found.append("interleaved gate/up rows (is_concatenated=False)")
        if self.post_norm:
            found.append("a post-expert norm (has_post_expert_norm)")
        return found


def _logical(stored: torch.Size, transposed: bool) -> tuple[int, int]:
    first, second = int(stored[1]), int(stored[2])
    return (second, first) if transposed else (first, second)
