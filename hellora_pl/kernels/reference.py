"""The adapted expert path in torch: the oracle for every fast path, and the CPU path.

Route once, sort the (token, k) pairs by expert, run the frozen base as grouped GEMMs, and add
LoRA as a shrink (x A^T) and an expand (. B^T) over the rows routed to hot experts only. The
update W + BA is never built, cold rows get no adapter work, and the frozen weights get no
gradient.

Every layout of transformers' experts interface runs here (`layout.ExpertLayout`), step for step
as `grouped_mm_experts_forward`: transposed storage, the bias of each row's expert, the experts'
own `_apply_gate` (gated; interleaved or clamped gates included) or `act_fn` (ungated), the
post-expert norm, then the routing weights. The update is logical [out, in] whatever the storage,
so the gate sees base + update in the stored row order, as the merged weight would give.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .contract import DELTA, AdaptedExperts, expert_adapter
from .layout import ExpertLayout

_grouped_mm_op = getattr(F, "grouped_mm", None) or torch._grouped_mm


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows x[offsets[g-1]:offsets[g]] times weight[g] ([G, in, out]) for each group g."""
    return _grouped_mm_op(x, weight, offs=offsets)


@dataclass
class ExpertRouting:
    """(token, k) pairs sorted by expert, built once and reused by both projections."""

    perm: torch.Tensor  # sorted row -> flat (token * k + slot) index
    token_of_row: torch.Tensor  # sorted row -> token
    offsets: torch.Tensor  # int32 [E] cumulative rows per expert
    hot_rows: torch.Tensor | None  # sorted rows routed to a hot expert, in hot-slot order
    hot_offsets: torch.Tensor | None  # int32 [n_hot] cumulative hot rows per slot
    expert_of_row: torch.Tensor | None = None  # sorted row -> expert (for per-expert biases)

    @classmethod
    def build(cls, top_k_index: torch.Tensor, num_experts: int, lora: AdaptedExperts | None) -> ExpertRouting:
        top_k = top_k_index.shape[-1]
        sorted_experts, perm = torch.sort(top_k_index.reshape(-1), stable=True)
        counts = torch.bincount(sorted_experts, minlength=num_experts)
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        hot_rows = hot_offsets = None
        if lora is not None:
            hot_rows = torch.nonzero(lora.slot_of_expert[sorted_experts] >= 0).squeeze(1)
            hot_offsets = torch.cumsum(counts[lora.hot_experts], 0, dtype=torch.int32)
        return cls(perm, perm // top_k, offsets, hot_rows, hot_offsets, sorted_experts)


def lora_update(lora: AdaptedExperts, name: str, x: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
    """The adapter's update for the hot rows of x, in hot-row order.

    LoRA: scale * (x A^T) B_eff^T, B_eff carrying LoRI's mask and DR-LoRA's active ranks.
    Full-rank delta (ESFT): x D^T.
    """
    if lora.kind == DELTA:
        delta = lora.delta_weight(name)
        return grouped_mm(x[routing.hot_rows].to(delta.dtype), delta.transpose(-2, -1), routing.hot_offsets)
    a, b = lora.lora_A[name], lora.effective_B(name)
    pad = _rank_padding(a.shape[1], a.element_size())
    if pad:  # grouped_mm needs 16-byte row strides: zero rank slices change nothing
        a, b = F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))
    x_hot = lora.dropout(x[routing.hot_rows]).to(a.dtype)
    shrunk = grouped_mm(x_hot, a.transpose(-2, -1), routing.hot_offsets)
    return lora.scale * grouped_mm(shrunk, b.transpose(-2, -1), routing.hot_offsets)


def _rank_padding(rank: int, element_size: int) -> int:
    """Zero rank slices to add so a [rows, rank] intermediate has a 16-byte row stride."""
    multiple = max(1, 16 // element_size)
    return -rank % multiple


def _project(
    experts: nn.Module, layout: ExpertLayout, name: str, x: torch.Tensor, routing: ExpertRouting, lora
) -> torch.Tensor:
    weight = getattr(experts, name)
    if isinstance(weight, torch.Tensor):
        stored_in_out = weight if layout.transposed else weight.transpose(-2, -1)
        out = grouped_mm(x.to(weight.dtype), stored_in_out, routing.offsets)
    elif layout.transposed:
        raise NotImplementedError(
            f"{type(experts).__name__}.{name} is quantized storage of transposed experts (is_transposed), which "
            "the expert path does not read; hellora_pl.quant stores such experts as [E, out, in] and clears the flag."
        )
    else:  # quantized storage (hellora_pl.quant): dequantizes only the experts this batch routes to
        out = weight.grouped_mm(x.to(weight.dtype), routing.offsets)
    bias = layout.bias_of(experts, name)
    if bias is not None:  # the bias of each row's expert, as transformers' _grouped_linear adds it
        out = out + bias[routing.expert_of_row].to(out.dtype)
    if lora is not None and name in lora.projections and routing.hot_rows.numel() > 0:
        # In place: grouped_mm does not keep its output for backward, and a copy would cost a full pass.
        out.index_add_(0, routing.hot_rows, lora_update(lora, name, x, routing).to(out.dtype))
    return out


class _Unsort(torch.autograd.Function):
    """Rows back to (token, k) order by gathering with the inverse permutation.

    Its backward is the gather grad[perm]; `index_copy` would keep its whole [T*k, H] source for
    backward and autograd's gather backward is an accumulating scatter, both slower or larger.
    """

    @staticmethod
    def forward(ctx, rows, perm, inverse):
        ctx.save_for_backward(perm)
        return rows.index_select(0, inverse)

    @staticmethod
    def backward(ctx, grad):
        (perm,) = ctx.saved_tensors
        return grad.index_select(0, perm), None, None


def unsort_rows(rows: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Expert-sorted rows back to flat (token, k) order (`perm`: sorted row -> flat index)."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return _Unsort.apply(rows, perm, inverse)


def _activate(experts: nn.Module, layout: ExpertLayout, up_out: torch.Tensor) -> torch.Tensor:
    """The experts' own gate (gated: `_apply_gate`, which knows interleaved rows and clamps) or `act_fn`."""
    if not layout.gated:
        return experts.act_fn(up_out)
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(up_out)
    if not layout.concatenated:
        raise NotImplementedError(
            f"{type(experts).__name__} has interleaved gate/up rows (is_concatenated=False) and no `_apply_gate` "
            "to split them."
        )
    gate, up = up_out.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def adapted_experts_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Drop-in for a fused experts module's forward (the transformers experts interface)."""
    layout = ExpertLayout.of(experts)
    lora = expert_adapter(experts)
    if lora is not None and not set(lora.projections) <= set(layout.projections):
        raise NotImplementedError(
            f"{type(experts).__name__}: adapted projections {lora.projections} are not among its expert "
            f"projections {layout.projections}."
        )
    num_tokens, top_k = top_k_index.shape
    routing = ExpertRouting.build(top_k_index, layout.num_experts, lora)
    x = hidden_states[routing.token_of_row]
    hidden = _activate(experts, layout, _project(experts, layout, layout.up, x, routing, lora))
    out = _project(experts, layout, "down_proj", hidden, routing, lora)
    if layout.post_norm:
        out = experts.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[routing.perm].unsqueeze(-1).to(out.dtype)
    # Back to (token, k) order and sum over k: deterministic, unlike index_add on CUDA.
    return unsort_rows(out, routing.perm).view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)
