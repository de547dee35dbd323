"""The adapted expert path in Triton, host side: forward and backward of one MoE layer with LoRA on its hot experts.

A drop-in for `reference.adapted_experts_forward` (same signature, same result up to rounding).
This module decides where Triton runs (and falls back to the reference elsewhere), builds the
routing and block table, and holds the autograd function; the `@triton.jit` kernels and their
launchers are in `triton_jit`, imported only when a kernel runs.

What is Triton (`triton_jit`):
- the frozen base as grouped GEMMs over expert-sorted rows, X rows gathered by index in place:
  gate_up with the LoRA expand of hot rows and SwiGLU fused into its epilogue, and down with the
  LoRA expand, the routing weights and a scatter to (token, k) order;
- the LoRA shrinks (x A^T, h A^T; dY B, dgu B in the backward) over hot blocks only;
- the backward of down + SwiGLU in one kernel (dY W_down plus the LoRA path, h recomputed from
  the stored pre-activation, partial sums of the routing weights' gradient), dX as a grouped
  GEMM through W_gate_up^T plus the LoRA path, and the per-expert reductions dA and dB.

What is torch: sorting the (token, k) pairs and building the block table (sort, scatter_add,
cumsum, repeat_interleave), the sum over k of the per-pair
outputs and of dX, the sum of the routing-weight gradient partials, B_eff = effective_B (so
autograd applies LoRI's mask and DR-LoRA's active ranks to dB), and the dtype casts.

Host syncs: one per `build_routing` (`sizes.tolist()`: the block, hot-block, hot-row and used-expert
counts), because a launch's grid and the buffers' sizes must be known on the host; a layer builds
its routing once, and recomputing it under gradient checkpointing syncs once more. `lora_grad` picks
its row splits from those counts, with no further sync. Nothing else waits for the device.

Cold rows get no LoRA program at all: hot experts come first in the sort order, hot blocks first
in the block table, and the LoRA-only kernels launch over hot blocks (or hot slots) only.

Saved for backward: x, the routing weights, A and B_eff of each projection (inputs), the gate_up
pre-activation [rows, 2I] in the base dtype, and the shrinks x A^T and h A^T [hot rows, r] in fp32,
plus the int32 routing metadata. The frozen weights are not saved: the context keeps a plain
reference to the module's parameters, and their gradient is never computed.

4-bit experts (`hellora_pl.quant.NF4Weight`): the kernels read dense weights, so each projection
dequantizes the experts that receive rows, alone and in x's dtype, into a fresh stack
[used experts, out, in] just before its kernel and drops it right after; the block table then
numbers experts within that stack (`build_routing(compact=True)`; the whole stack in one call
when every expert has rows). Nothing dense is saved or kept in the context: the backward
dequantizes the same experts again (QLoRA's recompute), the down projection for dgu and, when dX
is needed, gate_up. At most one projection's dense experts exist at a time.

Falls back to the torch reference for what it does not cover: full-rank deltas (ESFT), LoRA dropout
while training, experts with a custom `_apply_gate` or an activation other than SiLU, any layout but the
plain one (`layout.ExpertLayout.plain`: ungated, transposed, biased, interleaved, post-norm), frozen weights that require a gradient, quantized storage other than a dense tensor or
one with `dequantize(index, dtype)`, dtypes other than fp32/fp16/bf16, and when Triton cannot run
(no CUDA tensors and no TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch
from torch import nn

from .contract import LORA, expert_adapter
from .layout import ExpertLayout
from .reference import adapted_experts_forward

__all__ = [
    "TritonRouting",
    "build_routing",
    "triton_adapted_experts_forward",
    "triton_available",
    "triton_unsupported_reason",
]

PROJECTIONS = ("gate_up_proj", "down_proj")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """Triton is installed and can run here: a CUDA device, or the interpreter (TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None and (torch.cuda.is_available() or _interpreting())


def _is_silu(act: nn.Module | None) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _custom_gate(experts: nn.Module) -> bool:
    """A gate of the model's own: transformers attaches `_default_apply_gate` (act(gate) * up) otherwise."""
    gate = getattr(type(experts), "_apply_gate", None)
    return gate is not None and getattr(gate, "__name__", "") != "_default_apply_gate"


def _quantized(weight) -> bool:
    """4-bit storage of an expert stack (`hellora_pl.quant.NF4Weight`): read through `dequantize`."""
    return not isinstance(weight, torch.Tensor) and callable(getattr(weight, "dequantize", None))


def triton_unsupported_reason(experts: nn.Module, hidden_states: torch.Tensor) -> str | None:
    """Why the Triton path cannot run this layer (the reference then does), or None."""
    if not triton_available():
        return "Triton is not installed or has neither CUDA nor TRITON_INTERPRET=1"
    if hidden_states.device.type != "cuda" and not _interpreting():
        return "tensors are not on CUDA"
    layout = ExpertLayout.of(experts)
    if not layout.plain:  # the kernels read concatenated gated [E, out, in] weights, no bias, no post-norm
        return f"{', '.join(layout.differences())}: the Triton kernels run the plain layout only"
    if _custom_gate(experts) or not _is_silu(getattr(experts, "act_fn", None)):
        return "the activation is not SwiGLU with SiLU"
    weights = (experts.gate_up_proj, experts.down_proj)
    if not all(isinstance(w, torch.Tensor) or _quantized(w) for w in weights):
        return "expert weights neither dense tensors nor dequantizable storage (hellora_pl.quant.NF4Weight)"
    if any(w.dtype not in _DTYPES for w in weights) or hidden_states.dtype not in _DTYPES:
        return "dtype other than fp32, fp16 or bf16"
    if torch.is_grad_enabled() and any(getattr(w, "requires_grad", False) for w in weights):
        return "the expert weights require a gradient (the Triton path never computes dW)"
    lora = expert_adapter(experts)
    if lora is not None:
        if lora.kind != LORA:
            return f"{type(lora).__name__} adapters (full-rank deltas) run in torch"
        if not set(lora.projections) <= set(PROJECTIONS):
            return f"adapted projections {lora.projections} beyond {PROJECTIONS}"
        if isinstance(lora.dropout, nn.Dropout) and lora.dropout.training and lora.dropout.p > 0:
            return "LoRA dropout while training"
        if any(lora.lora_A[n].dtype not in _DTYPES or lora.lora_B[n].dtype not in _DTYPES for n in lora.projections):
            return "adapter dtype other than fp32, fp16 or bf16"
    return None


# -- routing ---------------------------------------------------------------------------------


@dataclass
class TritonRouting:
    """(token, k) rows sorted by expert, hot experts first, and the block table over them.

    blocks [n_blocks, 4] int32: expert, hot slot (-1 = cold), first row, end of the expert's rows;
    every block lies inside one expert and the hot blocks come first. slots [n_hot, 2] int32: the
    rows of each hot slot. Built once; both projections and the backward reuse it.

    With `compact`, the expert column indexes `used_experts` (the experts with rows, ascending)
    rather than all experts, so a weight stack holding those experts alone serves; `used_experts`
    stays None when every expert has rows (or without `compact`), and the column is the expert.
    """

    tok: torch.Tensor  # int32 [rows]: sorted row -> token
    pair: torch.Tensor  # int32 [rows]: sorted row -> token * top_k + k
    blocks: torch.Tensor
    slots: torch.Tensor
    num_blocks: int
    num_hot_blocks: int
    num_hot_rows: int
    block_m: int
    num_used: int  # experts with at least one row
    used_experts: torch.Tensor | None = None


def _block_m(num_rows: int, num_experts: int) -> int:
    if _interpreting():
        return 16
    per_expert = num_rows / max(num_experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64


def build_routing(
    top_k_index: torch.Tensor,
    num_experts: int,
    hot_experts: torch.Tensor | None,
    block_m: int | None = None,
    compact: bool = False,
) -> TritonRouting:
    """Sort the (token, k) pairs by expert, hot experts (in slot order) first, and cut them into blocks.

    `compact`: number the experts in the block table among the used ones only (see TritonRouting).
    """
    device = top_k_index.device
    top_k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    block_m = block_m or _block_m(flat.numel(), num_experts)
    num_hot = 0 if hot_experts is None else int(hot_experts.numel())
    if num_hot:
        cold = torch.ones(num_experts, dtype=torch.int32, device=device)
        cold[hot_experts] = 0
        order = torch.sort(cold, stable=True).indices  # hot ascending (= slot order), then cold ascending
    else:
        order = torch.arange(num_experts, device=device)
    position = torch.empty_like(order)
    position[order] = torch.arange(num_experts, device=device)
    key = position[flat]
    perm = torch.sort(key, stable=True).indices
    # Rows per expert without a host sync (torch.bincount syncs on CUDA to size its output); integer adds
    # commute, so the count is deterministic.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, key, torch.ones_like(key))
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    blocks_per = (counts + block_m - 1) // block_m
    blocks_end = torch.cumsum(blocks_per, 0)
    hot_end = num_hot - 1 if num_hot else 0
    zero = torch.zeros((), dtype=ends.dtype, device=device)
    used = counts[position] > 0  # by expert id
    sizes = torch.stack(
        [blocks_end[-1], blocks_end[hot_end] if num_hot else zero, ends[hot_end] if num_hot else zero, used.sum()]
    )
    num_blocks, num_hot_blocks, num_hot_rows, num_used = sizes.tolist()  # the one host sync
    block_position = torch.repeat_interleave(
        torch.arange(num_experts, device=device), blocks_per, output_size=num_blocks
    )
    within = torch.arange(num_blocks, device=device) - (blocks_end - blocks_per)[block_position]
    slot = torch.where(block_position < num_hot, block_position, torch.full_like(block_position, -1))
    expert = order[block_position]
    used_experts = None
    if compact and num_used < num_experts:
        used_experts = torch.argsort((~used).to(torch.int8), stable=True)[:num_used]  # ascending, no host sync
        expert = (torch.cumsum(used, 0) - 1)[expert]  # expert id -> its place among the used experts
    blocks = torch.stack([expert, slot, starts[block_position] + within * block_m, ends[block_position]], dim=1)
    slots = torch.stack([starts[:num_hot], ends[:num_hot]], dim=1)
    return TritonRouting(
        tok=(perm // top_k).to(torch.int32),
        pair=perm.to(torch.int32),
        blocks=blocks.to(torch.int32).contiguous(),
        slots=slots.to(torch.int32).contiguous(),
        num_blocks=num_blocks,
        num_hot_blocks=num_hot_blocks,
        num_hot_rows=num_hot_rows,
        block_m=block_m,
        num_used=num_used,
        used_experts=used_experts,
    )


# -- the layer -------------------------------------------------------------------------------


@dataclass
class _LayerArgs:
    """Everything the forward and backward share that is neither differentiated nor saved.

    The frozen weights are references: the module's parameters, or its 4-bit storage (NF4Weight),
    which `_dense_experts` dequantizes anew each time a kernel needs it.
    """

    w_gate_up: torch.Tensor | nn.Module
    w_down: torch.Tensor | nn.Module
    routing: TritonRouting
    ranks: torch.Tensor  # int32 [n_hot]: active rank per hot slot (the full rank without DR-LoRA)
    rank: int  # allocated rank
    scale: float
    top_k: int


def _dense_experts(weight: torch.Tensor | nn.Module, routing: TritonRouting, dtype: torch.dtype) -> torch.Tensor:
    """The expert stack the kernels read: the dense parameter itself, or for 4-bit storage a fresh
    dequantization in `dtype` of the experts with rows (all of them, in one call, when all have rows),
    laid out as the block table's compact expert column expects."""
    if isinstance(weight, torch.Tensor):
        return weight
    return weight.dequantize(routing.used_experts, dtype=dtype)


def _dtypes(base: torch.dtype, *factors: torch.Tensor | None):
    """(base dot dtype, LoRA dot dtype, (base, LoRA) input precisions).

    Exact fp32 dots ("ieee") when the base is fp32, tf32 otherwise: fp32 adapters on a 16-bit
    base do not need more. "ieee" only ever meets fp32 operands.
    """
    from . import triton_jit as K

    lora = next((f.dtype for f in factors if f is not None), base)
    exact = base == torch.float32
    prec = ("ieee" if exact else "tf32", "ieee" if exact and lora == torch.float32 else "tf32")
    return K.dot_dtype(base), K.dot_dtype(lora), prec


def _forward(x, top_k_weights, a1, b1, a2, b2, args: _LayerArgs, save: bool):
    """Returns the layer output [T, H] and, when `save`, (gu, s1, s2) for the backward."""
    from . import triton_jit as K

    rt = args.routing
    num_tokens, hidden = x.shape
    rows, intermediate = rt.tok.numel(), args.w_down.shape[2]
    _, lora_dt, prec = _dtypes(x.dtype, a1, a2)
    f32 = {"device": x.device, "dtype": torch.float32}
    s1 = s2 = None
    if a1 is not None:
        s1 = torch.empty(rt.num_hot_rows, args.rank, **f32)
        _shrink(K, x, rt.tok, a1, (a1.stride(0), a1.stride(1), a1.stride(2)), args, s1, lora_dt, prec)
    h = torch.empty(rows, intermediate, device=x.device, dtype=x.dtype)
    gu = torch.empty(rows, 2 * intermediate, device=x.device, dtype=x.dtype) if save else None
    w = _dense_experts(args.w_gate_up, rt, x.dtype)
    K.gate_up_forward(
        x, rt.tok, w, s1, b1, args.ranks, rt.blocks, rt.num_blocks, h, gu, args.scale, rt.block_m, lora_dt, prec,
    )  # fmt: skip
    del w  # 4-bit: the dequantized gate_up goes before down is dequantized
    if a2 is not None:
        s2 = torch.empty(rt.num_hot_rows, args.rank, **f32)
        _shrink(K, h, None, a2, (a2.stride(0), a2.stride(1), a2.stride(2)), args, s2, lora_dt, prec)
    pairs = torch.empty(rows, hidden, device=x.device, dtype=x.dtype)
    w = _dense_experts(args.w_down, rt, x.dtype)
    K.grouped_gemm(
        h, w, (w.stride(0), w.stride(1), w.stride(2)), s2, b2, None if b2 is None else (b2.stride(0), b2.stride(1), b2.stride(2)),
        args.rank, args.ranks, rt.blocks, rt.num_blocks, rt.pair, top_k_weights.reshape(-1), pairs, args.scale,
        rt.block_m, lora_dt, prec,
    )  # fmt: skip
    out = pairs.view(num_tokens, args.top_k, hidden).sum(dim=1)
    return out, (gu, s1, s2)


def _shrink(K, x, src, m, m_strides, args: _LayerArgs, out, lora_dt, prec) -> None:
    rt = args.routing
    K.shrink(x, src, m, m_strides, args.rank, args.ranks, rt.blocks, rt.num_hot_blocks, out, rt.block_m, lora_dt, prec)


class _AdaptedExperts(torch.autograd.Function):
    """One MoE layer's expert path: differentiable in x, the routing weights, A and B_eff; never in W."""

    @staticmethod
    def forward(ctx, x, top_k_weights, a1, b1, a2, b2, args: _LayerArgs):
        out, (gu, s1, s2) = _forward(x, top_k_weights, a1, b1, a2, b2, args, save=True)
        ctx.save_for_backward(x, top_k_weights, a1, b1, a2, b2, gu, s1, s2)
        ctx.args = args  # holds references to W (or its 4-bit storage), not saved copies
        return out

    @staticmethod
    def backward(ctx, d_out):
        from . import triton_jit as K

        x, tw, a1, b1, a2, b2, gu, s1, s2 = ctx.saved_tensors
        args: _LayerArgs = ctx.args
        rt = args.routing
        need_x, need_tw, need_a1, need_b1, need_a2, need_b2 = ctx.needs_input_grad[:6]
        num_tokens, hidden = x.shape
        rows, intermediate = rt.tok.numel(), args.w_down.shape[2]
        _, lora_dt, prec = _dtypes(x.dtype, a1, a2)
        dev = x.device
        f32 = {"device": dev, "dtype": torch.float32}
        dy = d_out.to(x.dtype).contiguous()
        flat_tw = tw.reshape(-1)
        dx = dtw = da1 = db1 = da2 = db2 = None

        # Down projection and SwiGLU: p2 = dY B_down on hot rows, then dgu, h (hot rows), d(weights).
        p2 = None
        if b2 is not None:
            p2 = torch.empty(rt.num_hot_rows, args.rank, **f32)
            _shrink(K, dy, rt.tok, b2, (b2.stride(0), b2.stride(2), b2.stride(1)), args, p2, lora_dt, prec)
        dgu = torch.empty(rows, 2 * intermediate, device=dev, dtype=x.dtype)
        h_hot = torch.empty(rt.num_hot_rows, intermediate, device=dev, dtype=x.dtype) if need_a2 else None
        dtw_parts = torch.empty(K.down_backward_tiles(intermediate), rows, **f32)
        w = _dense_experts(args.w_down, rt, x.dtype)  # 4-bit: dequantized again, not saved
        K.down_backward(
            dy, rt.tok, w, p2, a2, args.ranks, rt.blocks, rt.num_blocks, rt.pair, flat_tw, gu, dgu, h_hot,
            dtw_parts, args.scale, rt.block_m, lora_dt, prec,
        )  # fmt: skip
        del w
        if need_tw:
            dtw = dtw_parts.sum(0).view_as(tw).to(tw.dtype)
        if need_b2:  # dB[s] = scale * sum_rows (w dY[tok])^T (h A^T): [n_hot, H, r]
            db2 = torch.zeros(b2.shape, **f32)
            K.lora_grad(
                s2, flat_tw, rt.pair, dy, rt.tok, rt.slots, args.ranks, db2, (db2.stride(0), db2.stride(2), db2.stride(1)),
                args.rank, args.scale, lora_dt, prec,
            )  # fmt: skip
            db2 = db2.to(b2.dtype)
        if need_a2:  # dA[s] = scale * sum_rows (w dY B)^T h: [n_hot, r, I]
            da2 = torch.zeros(a2.shape, **f32)
            K.lora_grad(
                p2, flat_tw, rt.pair, h_hot, None, rt.slots, args.ranks, da2, da2.stride(), args.rank, args.scale,
                lora_dt, prec,
            )  # fmt: skip
            da2 = da2.to(a2.dtype)

        # gate_up: p1 = dgu B_gate_up on hot rows, dX = dgu W + scale p1 A, then dA and dB.
        p1 = None
        if b1 is not None and (need_x or need_a1):
            p1 = torch.empty(rt.num_hot_rows, args.rank, **f32)
            _shrink(K, dgu, None, b1, (b1.stride(0), b1.stride(2), b1.stride(1)), args, p1, lora_dt, prec)
        if need_x:
            w = _dense_experts(args.w_gate_up, rt, x.dtype)  # [E, 2I, H] read as (e, n=H, k=2I)
            pairs = torch.empty(rows, hidden, device=dev, dtype=x.dtype)
            K.grouped_gemm(
                dgu, w, (w.stride(0), w.stride(2), w.stride(1)), p1, a1,
                None if a1 is None else (a1.stride(0), a1.stride(2), a1.stride(1)),
                args.rank, args.ranks, rt.blocks, rt.num_blocks, rt.pair, None, pairs, args.scale, rt.block_m,
                lora_dt, prec,
            )  # fmt: skip
            dx = pairs.view(num_tokens, args.top_k, hidden).sum(dim=1)
        if need_b1:  # [n_hot, 2I, r]
            db1 = torch.zeros(b1.shape, **f32)
            K.lora_grad(
                s1, None, rt.pair, dgu, None, rt.slots, args.ranks, db1, (db1.stride(0), db1.stride(2), db1.stride(1)),
                args.rank, args.scale, lora_dt, prec,
            )  # fmt: skip
            db1 = db1.to(b1.dtype)
        if need_a1:  # [n_hot, r, H]
            da1 = torch.zeros(a1.shape, **f32)
            K.lora_grad(
                p1, None, rt.pair, x, rt.tok, rt.slots, args.ranks, da1, da1.stride(), args.rank, args.scale,
                lora_dt, prec,
            )  # fmt: skip
            da1 = da1.to(a1.dtype)
        return dx, dtw, da1, db1, da2, db2, None


def triton_adapted_experts_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Drop-in for `adapted_experts_forward` that runs the expert path in Triton where it can."""
    if triton_unsupported_reason(experts, hidden_states) is not None or hidden_states.shape[0] == 0:
        return adapted_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    lora = expert_adapter(experts)
    w_gate_up, w_down = experts.gate_up_proj, experts.down_proj
    x = hidden_states.to(w_gate_up.dtype).contiguous()
    factors: dict[str, tuple[torch.Tensor, torch.Tensor] | tuple[None, None]] = dict.fromkeys(PROJECTIONS, (None, None))
    rank, scale, ranks, hot = 1, 0.0, None, None
    if lora is not None:
        hot, scale = lora.hot_experts, float(lora.scale)
        rank = lora.lora_A[lora.projections[0]].shape[1]
        for name in lora.projections:
            factors[name] = (lora.lora_A[name], lora.effective_B(name))
        active = lora.lora_active_rank
        ranks = active if active is not None else torch.full((lora.num_hot,), rank, device=x.device)
    routing = build_routing(top_k_index, w_gate_up.shape[0], hot, compact=_quantized(w_gate_up))
    if ranks is None:
        ranks = torch.ones(1, device=x.device)
    args = _LayerArgs(
        w_gate_up, w_down, routing, ranks.to(device=x.device, dtype=torch.int32), rank, scale, top_k_index.shape[1]
    )
    (a1, b1), (a2, b2) = factors["gate_up_proj"], factors["down_proj"]
    differentiable = (x, top_k_weights, a1, b1, a2, b2)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable):
        out = _AdaptedExperts.apply(x, top_k_weights, a1, b1, a2, b2, args)
    else:
        out, _ = _forward(x, top_k_weights, a1, b1, a2, b2, args, save=False)
    return out.to(hidden_states.dtype)
