"""The `@triton.jit` kernels of the adapted expert path, and thin launchers around them (device side).

Every kernel works on (token, k) rows sorted by expert, hot experts first, and reads a block
table built once per layer (`triton_host.build_routing`): one row per BLOCK_M-row block that
never straddles two experts, holding (expert, hot slot or -1, first row, end of the expert's
rows). Hot blocks come first, so the LoRA kernels launch over them only and cold rows get no
program. Rows are never copied to gather them: kernels load X rows through a row -> token index.

Dots accumulate in fp32. Their operands are cast to a dot dtype first: the base dtype for the
frozen weights, the adapter dtype for the LoRA factors (fp32 adapters keep fp32 dots, as tf32 on
GPU when the base is 16-bit). The interpreter cannot dot bf16, so it upcasts bf16 to fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Fused multiply-adds on (triton's default until 3.9, which warns that 3.10 turns it off): passed at every
# launch, so the kernels do not change with the triton version or TRITON_DEFAULT_FP_FUSION.
FP_FUSION = True

# BLOCK_N of the down-projection backward is fixed: it sets how many partial sums of the routing
# weights' gradient each row gets, and that buffer is sized before the launch.
_DOWN_BWD_BLOCK_N = 32 if INTERPRET else 64


def _cuda_configs(entries: list[dict]) -> list[triton.Config]:
    """Configs from {constexpr: value, "w": warps, "s": stages, "dots": "tc" or "ieee" (optional)} entries.

    "dots" limits an entry to launches with that kind of dots (`fitting_configs`): "tc" tensor cores (16-bit
    or tf32), "ieee" exact fp32 FMA dots, which hold whole fp32 tiles in registers and need more warps.
    """
    out = []
    for entry in entries:
        config = triton.Config(
            {k: v for k, v in entry.items() if k not in ("w", "s", "dots")}, num_warps=entry["w"], num_stages=entry["s"]
        )
        config.dots = frozenset((entry["dots"],) if "dots" in entry else ("tc", "ieee"))
        out.append(config)
    return out


def _configs(interpret: dict, cuda: list[dict]) -> list[triton.Config]:
    """One config under the interpreter (it is slow to tune), a short list on CUDA."""
    if INTERPRET:
        return [triton.Config(interpret, num_warps=1, num_stages=1)]
    return _cuda_configs(cuda)


# Chosen with the compile gate (ptxas -v, sm_80/89/90, OLMoE and Mixtral shapes): no spills in 16-bit
# training variants. Two fp32 accumulators (gate and up) of a 64 x 128 tile need 8 warps. "ieee" dots run
# on FMA units with their operands in registers: smaller K tiles there keep register pressure down.
_GATE_UP_CUDA = [
    {"BLOCK_N": 64, "BLOCK_K": 32, "w": 4, "s": 3, "dots": "tc"},
    {"BLOCK_N": 128, "BLOCK_K": 32, "w": 8, "s": 3, "dots": "tc"},
    {"BLOCK_N": 64, "BLOCK_K": 64, "w": 4, "s": 3, "dots": "tc"},
    {"BLOCK_N": 128, "BLOCK_K": 64, "w": 8, "s": 3, "dots": "tc"},
    {"BLOCK_N": 64, "BLOCK_K": 32, "w": 8, "s": 3, "dots": "ieee"},
    {"BLOCK_N": 64, "BLOCK_K": 16, "w": 8, "s": 3, "dots": "ieee"},
    {"BLOCK_N": 128, "BLOCK_K": 16, "w": 8, "s": 3, "dots": "ieee"},
]
_GATE_UP_CONFIGS = _configs({"BLOCK_N": 32, "BLOCK_K": 32}, _GATE_UP_CUDA)
_GEMM_CUDA = [
    {"BLOCK_N": 64, "BLOCK_K": 32, "w": 4, "s": 3},
    {"BLOCK_N": 128, "BLOCK_K": 32, "w": 4, "s": 3, "dots": "tc"},
    {"BLOCK_N": 64, "BLOCK_K": 64, "w": 4, "s": 3, "dots": "tc"},
    {"BLOCK_N": 128, "BLOCK_K": 64, "w": 8, "s": 3, "dots": "tc"},
    {"BLOCK_N": 128, "BLOCK_K": 32, "w": 8, "s": 3, "dots": "ieee"},
    {"BLOCK_N": 64, "BLOCK_K": 16, "w": 4, "s": 3, "dots": "ieee"},
    {"BLOCK_N": 128, "BLOCK_K": 16, "w": 8, "s": 3, "dots": "ieee"},
]
_GEMM_CONFIGS = _configs({"BLOCK_N": 32, "BLOCK_K": 32}, _GEMM_CUDA)
# The down backward's epilogue (SwiGLU backward, routing-weight partials) holds several fp32 tiles: 8 warps.
_DOWN_BWD_CUDA = [
    {"BLOCK_K": 32, "w": 8, "s": 3},
    {"BLOCK_K": 64, "w": 8, "s": 3, "dots": "tc"},
    {"BLOCK_K": 64, "w": 8, "s": 4, "dots": "tc"},
    {"BLOCK_K": 16, "w": 8, "s": 4, "dots": "ieee"},
    {"BLOCK_K": 32, "w": 8, "s": 4, "dots": "ieee"},
]
_DOWN_BWD_CONFIGS = _configs({"BLOCK_K": 32}, _DOWN_BWD_CUDA)
_SHRINK_CUDA = [{"BLOCK_K": 32, "w": 4, "s": 3}, {"BLOCK_K": 64, "w": 4, "s": 3}, {"BLOCK_K": 128, "w": 8, "s": 3}]
_SHRINK_CONFIGS = _configs({"BLOCK_K": 32}, _SHRINK_CUDA)
_GRAD_CUDA = [
    {"BLOCK_D": 64, "BLOCK_M": 32, "w": 4, "s": 3},
    {"BLOCK_D": 128, "BLOCK_M": 32, "w": 4, "s": 3, "dots": "tc"},
    {"BLOCK_D": 128, "BLOCK_M": 32, "w": 8, "s": 3, "dots": "ieee"},
    {"BLOCK_D": 64, "BLOCK_M": 64, "w": 4, "s": 3},
]
_GRAD_CONFIGS = _configs({"BLOCK_D": 32, "BLOCK_M": 16}, _GRAD_CUDA)


# -- shared memory: drop configs the device cannot hold --------------------------------------
# Tiles each pipeline stage of a kernel's main loop holds in shared memory: (rows, cols, tensor arg, count);
# a str dimension is a constexpr, an int a fixed size. `_EPILOGUE_TILES`: the LoRA expand's operands, staged
# after the loop. Fitted to the compiled kernels (ptxas, triton 3.9): the estimate is never below `metadata.shared`.
_STAGE_TILES = {
    "_gate_up_fwd_kernel": (("BLOCK_M", "BLOCK_K", "x_ptr", 1), ("BLOCK_K", "BLOCK_N", "w_ptr", 2)),
    "_grouped_gemm_kernel": (("BLOCK_M", "BLOCK_K", "x_ptr", 1), ("BLOCK_K", "BLOCK_N", "w_ptr", 1)),
    "_down_bwd_kernel": (("BLOCK_M", "BLOCK_K", "dy_ptr", 1), ("BLOCK_K", "BLOCK_N", "w_ptr", 1)),
    "_shrink_kernel": (("BLOCK_M", "BLOCK_K", "x_ptr", 1), ("BLOCK_K", "BLOCK_R", "m_ptr", 1)),
    "_lora_grad_kernel": (("BLOCK_R", "BLOCK_M", "l_ptr", 1), ("BLOCK_M", "BLOCK_D", "x_ptr", 1)),
}
_EPILOGUE_TILES = {
    "_gate_up_fwd_kernel": (("BLOCK_M", "BLOCK_R", "s_ptr", 1), ("BLOCK_R", "BLOCK_N", "b_ptr", 1)),
    "_grouped_gemm_kernel": (("BLOCK_M", "BLOCK_R", "s_ptr", 1), ("BLOCK_R", "BLOCK_N", "m_ptr", 1)),
    "_down_bwd_kernel": (("BLOCK_M", "BLOCK_R", "p_ptr", 1), ("BLOCK_R", "BLOCK_N", "a_ptr", 1)),
}


def _tiles_bytes(tiles, values: dict, named_args: dict) -> int:
    total = 0
    for rows, cols, arg, count in tiles:
        tensor = named_args.get(arg)
        elem = tensor.element_size() if hasattr(tensor, "element_size") else 4
        missing = [d for d in (rows, cols) if isinstance(d, str) and d not in values]
        if missing:
            raise ValueError(f"fitting_configs: constexpr {missing} neither in the config nor in the named args")
        dims = [values[d] if isinstance(d, str) else d for d in (rows, cols)]
        total += count * dims[0] * dims[1] * elem
    return total


def shared_bytes_estimate(kernel: str, config: triton.Config, named_args: dict, cc: int | None = None) -> int:
    """A conservative estimate of the shared memory one launch of `kernel` (its name) with `config` needs.

    The main loop buffers its operand tiles once per stage: num_stages times with Hopper's wgmma (sm_90+,
    16-bit or tf32 dots), num_stages - 1 times with cp.async (sm_80/89, or "ieee" fp32 dots); unknown `cc`
    takes the larger. The LoRA epilogue reuses that memory, so the estimate is the larger of the two.
    """
    if kernel not in _STAGE_TILES:
        raise ValueError(
            f"shared_bytes_estimate: {kernel!r} is not a kernel of triton_jit; known: {sorted(_STAGE_TILES)}"
        )
    values = {**named_args, **config.all_kwargs()}
    wgmma = cc is None or (cc >= 90 and values.get("PREC") != "ieee")
    stages = config.num_stages if wgmma else config.num_stages - 1
    main = max(stages, 1) * _tiles_bytes(_STAGE_TILES[kernel], values, named_args)
    return max(main, _tiles_bytes(_EPILOGUE_TILES.get(kernel, ()), values, named_args))


def fitting_configs(
    kernel: str, configs: list[triton.Config], named_args: dict, smem_bytes: int, cc: int | None = None
) -> list[triton.Config]:
    """The configs that fit a launch of `kernel` (its name): estimated shared memory (`shared_bytes_estimate`)
    within `smem_bytes` per block, and meant for its kind of dots (tensor cores, or "ieee" when PREC is; see
    `_cuda_configs`).

    `named_args`: the kernel's argument names -> values, constexprs included (the autotuner's nargs and
    kwargs). `cc`: the compute capability as 80, 89, 90; None estimates for the worst case.
    """
    dots = "ieee" if named_args.get("PREC") == "ieee" else "tc"
    return [
        c
        for c in configs
        if dots in getattr(c, "dots", (dots,)) and shared_bytes_estimate(kernel, c, named_args, cc) <= smem_bytes
    ]


def _device_limits() -> tuple[int, int]:
    """(max shared memory per block in bytes, compute capability as 90) of the current CUDA device."""
    device = torch.cuda.current_device()
    props = triton.runtime.driver.active.utils.get_device_properties(device)
    major, minor = torch.cuda.get_device_capability(device)
    return int(props["max_shared_mem"]), major * 10 + minor


def _prune_for(kernel: str):
    """An `early_config_prune` that keeps the configs that fit the current device (`fitting_configs`)."""

    def prune(configs, nargs, **kwargs):
        if INTERPRET:
            return configs
        smem, cc = _device_limits()
        kept = fitting_configs(kernel, configs, {**nargs, **kwargs}, smem, cc)
        if not kept:
            raise RuntimeError(
                f"{kernel}: no autotune config fits the device's {smem} B of shared memory per block (sm_{cc}) "
                f"with PREC={kwargs.get('PREC')!r}; configs tried: {configs}. Add one with smaller BLOCK_K/BLOCK_N "
                "or fewer num_stages to the kernel's config list."
            )
        return kept

    return {"early_config_prune": prune}


def dot_dtype(dtype: torch.dtype):
    """The tl dtype dots run in for operands of `dtype` (bf16 -> fp32 under the interpreter)."""
    if INTERPRET and dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPES[dtype]


def rank_block(rank: int) -> int:
    """The rank tile: the whole rank at once, at least 16 wide (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(rank))


# -- shared tiles ----------------------------------------------------------------------------
# Kernels call only builtins and the helpers below, never triton.language.standard's jit
# functions (tl.zeros, tl.sigmoid, tl.sum): those are compiled-mode objects when Triton was
# imported before TRITON_INTERPRET was set (torch._dynamo imports it early), and the
# interpreter then refuses to call them.


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _block(blocks_ptr, pid, BLOCK_M: tl.constexpr):
    """The expert, hot slot (-1 = cold) and rows of block `pid` of the block table."""
    expert = tl.load(blocks_ptr + pid * 4)
    slot = tl.load(blocks_ptr + pid * 4 + 1)
    start = tl.load(blocks_ptr + pid * 4 + 2)
    end = tl.load(blocks_ptr + pid * 4 + 3)
    rows = start + tl.arange(0, BLOCK_M)
    return expert, slot, rows, rows < end


@triton.jit
def _base_tile(
    acc,
    x_ptr,
    src,
    row_mask,
    stride_xm,
    w_ptr,
    cols,
    col_mask,
    stride_wn,
    stride_wk,
    K,
    BLOCK_K: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
):
    """acc += X[src, :K] @ W[cols, :K]^T, W already offset to the block's expert."""
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + src.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        x = tl.load(x_rows + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_cols + k[:, None] * stride_wk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(x.to(DT), w.to(DT), acc, input_precision=PREC)
    return acc


@triton.jit
def _expand_tile(
    acc,
    s_ptr,
    rows,
    row_mask,
    stride_sm,
    m_ptr,
    cols,
    col_mask,
    stride_mn,
    stride_mr,
    rank,
    scale,
    BLOCK_R: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
):
    """acc += scale * S[rows, :rank] @ M[cols, :rank]^T, M offset to the hot slot.

    Rank slices at or beyond the slot's active rank are not loaded (DR-LoRA).
    """
    r = tl.arange(0, BLOCK_R)
    r_mask = r < rank
    s = tl.load(
        s_ptr + rows.to(tl.int64)[:, None] * stride_sm + r[None, :],
        mask=row_mask[:, None] & r_mask[None, :],
        other=0.0,
    )
    m = tl.load(
        m_ptr + cols.to(tl.int64)[None, :] * stride_mn + r[:, None] * stride_mr,
        mask=r_mask[:, None] & col_mask[None, :],
        other=0.0,
    )
    return acc + scale * tl.dot(s.to(DT), m.to(DT), input_precision=PREC)


# -- kernels ---------------------------------------------------------------------------------


@triton.autotune(
    configs=_GATE_UP_CONFIGS,
    key=["INTER", "H", "HAS_LORA", "STORE_GU", "BLOCK_M", "BLOCK_R", "PREC", "LORA_PREC"],
    prune_configs_by=_prune_for("_gate_up_fwd_kernel"),
)
@triton.jit
def _gate_up_fwd_kernel(
    x_ptr,
    tok_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    rank_ptr,
    blocks_ptr,
    h_ptr,
    gu_ptr,
    H,
    INTER,
    stride_xm,
    stride_we,
    stride_wn,
    stride_wk,
    stride_sm,
    stride_be,
    stride_bn,
    stride_br,
    stride_hm,
    stride_gm,
    scale,
    HAS_LORA: tl.constexpr,
    STORE_GU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DT: tl.constexpr,
    LORA_DT: tl.constexpr,
    PREC: tl.constexpr,
    LORA_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """h = silu(g) * u with [g, u] = X[tok] W_gu^T (+ LoRA on hot rows): gate and up columns
    j and I + j in one program so SwiGLU runs in the epilogue; X rows are read once for both."""
    expert, slot, rows, row_mask = _block(blocks_ptr, tl.program_id(0), BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < INTER
    src = tl.load(tok_ptr + rows, mask=row_mask, other=0)

    w_gate = w_ptr + expert.to(tl.int64) * stride_we + cols.to(tl.int64)[None, :] * stride_wn
    w_up = w_gate + INTER * stride_wn
    x_rows = x_ptr + src.to(tl.int64)[:, None] * stride_xm
    offs_k = tl.arange(0, BLOCK_K)
    acc_g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc_u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < H
        x = tl.load(x_rows + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(DT)
        w_mask = k_mask[:, None] & col_mask[None, :]
        wg = tl.load(w_gate + k[:, None] * stride_wk, mask=w_mask, other=0.0)
        wu = tl.load(w_up + k[:, None] * stride_wk, mask=w_mask, other=0.0)
        acc_g = tl.dot(x, wg.to(DT), acc_g, input_precision=PREC)
        acc_u = tl.dot(x, wu.to(DT), acc_u, input_precision=PREC)

    if HAS_LORA:
        if slot >= 0:
            rank = tl.load(rank_ptr + slot)
            b = b_ptr + slot.to(tl.int64) * stride_be
            acc_g = _expand_tile(
                acc_g, s_ptr, rows, row_mask, stride_sm, b, cols, col_mask, stride_bn, stride_br, rank, scale,
                BLOCK_R, LORA_DT, LORA_PREC,
            )  # fmt: skip
            acc_u = _expand_tile(
                acc_u, s_ptr, rows, row_mask, stride_sm, b + INTER * stride_bn, cols, col_mask, stride_bn, stride_br,
                rank, scale, BLOCK_R, LORA_DT, LORA_PREC,
            )  # fmt: skip

    out_dtype = h_ptr.dtype.element_ty
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    # Round the pre-activation first, as stored: the backward recomputes h from the stored values.
    g = acc_g.to(out_dtype)
    u = acc_u.to(out_dtype)
    if STORE_GU:
        tl.store(gu_ptr + rows64 * stride_gm + cols[None, :], g, mask=mask)
        tl.store(gu_ptr + rows64 * stride_gm + INTER + cols[None, :], u, mask=mask)
    g = g.to(tl.float32)
    h = g * _sigmoid(g) * u.to(tl.float32)
    tl.store(h_ptr + rows64 * stride_hm + cols[None, :], h.to(out_dtype), mask=mask)


@triton.autotune(
    configs=_GEMM_CONFIGS,
    key=["N", "K", "HAS_LORA", "HAS_ROW_SCALE", "BLOCK_M", "BLOCK_R", "PREC", "LORA_PREC"],
    prune_configs_by=_prune_for("_grouped_gemm_kernel"),
)
@triton.jit
def _grouped_gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    m_ptr,
    rank_ptr,
    blocks_ptr,
    dst_ptr,
    row_scale_ptr,
    out_ptr,
    N,
    K,
    stride_xm,
    stride_we,
    stride_wn,
    stride_wk,
    stride_sm,
    stride_me,
    stride_mn,
    stride_mr,
    stride_om,
    scale,
    HAS_LORA: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DT: tl.constexpr,
    LORA_DT: tl.constexpr,
    PREC: tl.constexpr,
    LORA_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[dst[row]] = row_scale[dst[row]] * (X[row] W_e^T + scale * S[row] M_slot^T on hot rows).

    The down projection (X = h, M = B_down, scaled by the routing weights) and dX (X = dgu,
    W and M = A_gate_up read transposed through strides). Rows land in (token, k) order, so
    summing over k afterwards is deterministic.
    """
    expert, slot, rows, row_mask = _block(blocks_ptr, tl.program_id(0), BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    w = w_ptr + expert.to(tl.int64) * stride_we
    acc = _base_tile(
        acc, x_ptr, rows, row_mask, stride_xm, w, cols, col_mask, stride_wn, stride_wk, K, BLOCK_K, DT, PREC
    )
    if HAS_LORA:
        if slot >= 0:
            rank = tl.load(rank_ptr + slot)
            m = m_ptr + slot.to(tl.int64) * stride_me
            acc = _expand_tile(
                acc, s_ptr, rows, row_mask, stride_sm, m, cols, col_mask, stride_mn, stride_mr, rank, scale,
                BLOCK_R, LORA_DT, LORA_PREC,
            )  # fmt: skip
    dst = tl.load(dst_ptr + rows, mask=row_mask, other=0)
    if HAS_ROW_SCALE:
        acc = acc * tl.load(row_scale_ptr + dst, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(
        out_ptr + dst.to(tl.int64)[:, None] * stride_om + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


@triton.autotune(
    configs=_DOWN_BWD_CONFIGS,
    key=["H", "INTER", "HAS_LORA", "STORE_H", "BLOCK_M", "BLOCK_R", "BLOCK_N", "PREC", "LORA_PREC"],
    prune_configs_by=_prune_for("_down_bwd_kernel"),
)
@triton.jit
def _down_bwd_kernel(
    dy_ptr,
    tok_ptr,
    w_ptr,
    p_ptr,
    a_ptr,
    rank_ptr,
    blocks_ptr,
    pair_ptr,
    tw_ptr,
    gu_ptr,
    dgu_ptr,
    h_hot_ptr,
    dtw_ptr,
    H,
    INTER,
    num_rows,
    stride_dym,
    stride_we,
    stride_wn,
    stride_wk,
    stride_pm,
    stride_ae,
    stride_an,
    stride_ar,
    stride_gm,
    stride_hm,
    scale,
    HAS_LORA: tl.constexpr,
    STORE_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DT: tl.constexpr,
    LORA_DT: tl.constexpr,
    PREC: tl.constexpr,
    LORA_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Backward of the down projection and SwiGLU, one [rows, I-tile] per program.

    G = dY[tok] (W_down,e + scale B A on hot rows): the gradient of the unweighted down
    output, through W^T; h is recomputed from the stored pre-activation [g, u]. Writes
    dgu = d[g, u] of w * G, the partial sums of <G, h> (the routing weight's gradient) for this
    I-tile, and h on hot rows when dA_down needs it.
    """
    expert, slot, rows, row_mask = _block(blocks_ptr, tl.program_id(0), BLOCK_M)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < INTER
    src = tl.load(tok_ptr + rows, mask=row_mask, other=0)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    w = w_ptr + expert.to(tl.int64) * stride_we
    acc = _base_tile(
        acc, dy_ptr, src, row_mask, stride_dym, w, cols, col_mask, stride_wn, stride_wk, H, BLOCK_K, DT, PREC
    )
    if HAS_LORA:
        if slot >= 0:
            rank = tl.load(rank_ptr + slot)
            a = a_ptr + slot.to(tl.int64) * stride_ae
            acc = _expand_tile(
                acc, p_ptr, rows, row_mask, stride_pm, a, cols, col_mask, stride_an, stride_ar, rank, scale,
                BLOCK_R, LORA_DT, LORA_PREC,
            )  # fmt: skip

    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    g = tl.load(gu_ptr + rows64 * stride_gm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + rows64 * stride_gm + INTER + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(g)
    act = g * sig
    h = act * u
    pair = tl.load(pair_ptr + rows, mask=row_mask, other=0)
    tl.store(
        dtw_ptr + pid_n.to(tl.int64) * num_rows + pair, tl.reduce(tl.where(mask, h * acc, 0.0), 1, _add), mask=row_mask
    )

    dh = acc * tl.load(tw_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    du = dh * act
    out_dtype = dgu_ptr.dtype.element_ty
    tl.store(dgu_ptr + rows64 * stride_gm + cols[None, :], dg.to(out_dtype), mask=mask)
    tl.store(dgu_ptr + rows64 * stride_gm + INTER + cols[None, :], du.to(out_dtype), mask=mask)
    if STORE_H:
        if slot >= 0:
            tl.store(h_hot_ptr + rows64 * stride_hm + cols[None, :], h.to(h_hot_ptr.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=_SHRINK_CONFIGS,
    key=["D", "R", "GATHER", "BLOCK_M", "BLOCK_R", "PREC"],
    prune_configs_by=_prune_for("_shrink_kernel"),
)
@triton.jit
def _shrink_kernel(
    x_ptr,
    src_ptr,
    m_ptr,
    rank_ptr,
    blocks_ptr,
    s_ptr,
    D,
    R,
    stride_xm,
    stride_me,
    stride_mr,
    stride_mk,
    stride_sm,
    GATHER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """S[row, :R] = X[src(row)] M_slot^T over hot blocks only: [rows, rank] in fp32.

    x A^T in the forward, and dY B in the backward (M = B read transposed). Slices at or beyond
    the slot's active rank are stored as zeros and their factor is not read.
    """
    _, slot, rows, row_mask = _block(blocks_ptr, tl.program_id(0), BLOCK_M)
    if GATHER:
        src = tl.load(src_ptr + rows, mask=row_mask, other=0)
    else:
        src = rows
    rank = tl.load(rank_ptr + slot)
    r = tl.arange(0, BLOCK_R)
    r_mask = r < rank
    x_rows = x_ptr + src.to(tl.int64)[:, None] * stride_xm
    m_cols = m_ptr + slot.to(tl.int64) * stride_me + r[None, :] * stride_mr
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < D
        x = tl.load(x_rows + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        m = tl.load(m_cols + k[:, None] * stride_mk, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(x.to(DT), m.to(DT), acc, input_precision=PREC)
    tl.store(
        s_ptr + rows.to(tl.int64)[:, None] * stride_sm + r[None, :], acc, mask=row_mask[:, None] & (r < R)[None, :]
    )


@triton.autotune(
    configs=_GRAD_CONFIGS,
    key=["D", "R", "HAS_ROW_SCALE", "GATHER", "BLOCK_R", "PREC"],
    prune_configs_by=_prune_for("_lora_grad_kernel"),
)
@triton.jit
def _lora_grad_kernel(
    l_ptr,
    row_scale_ptr,
    pair_ptr,
    x_ptr,
    src_ptr,
    slots_ptr,
    rank_ptr,
    out_ptr,
    D,
    R,
    splits,
    stride_lm,
    stride_xm,
    stride_os,
    stride_oe,
    stride_or,
    stride_od,
    scale,
    HAS_ROW_SCALE: tl.constexpr,
    GATHER: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """out[split, slot, :R, d] = scale * sum over the split's rows of (row_scale * L[row])^T X[src(row), d].

    The per-expert reduction of dA and dB (dB stored transposed through strides). Program (slot, D-tile,
    split) loops over its share of the slot's rows, cut in `splits` BLOCK_M-aligned chunks, so a hot expert
    with many rows spreads over many programs; the host sums the splits: deterministic, no atomics.
    """
    slot = tl.program_id(0)
    split = tl.program_id(2)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    start = tl.load(slots_ptr + slot * 2)
    end = tl.load(slots_ptr + slot * 2 + 1)
    chunk = (end - start + splits - 1) // splits
    chunk = (chunk + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    lo = start + split * chunk
    hi = tl.minimum(end, lo + chunk)
    rank = tl.load(rank_ptr + slot)
    r = tl.arange(0, BLOCK_R)
    r_mask = r < rank
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.full((BLOCK_R, BLOCK_D), 0.0, tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + offs_m
        row_mask = rows < hi
        l_t = tl.load(
            l_ptr + rows.to(tl.int64)[None, :] * stride_lm + r[:, None],
            mask=r_mask[:, None] & row_mask[None, :],
            other=0.0,
        )  # [R, M]: L loaded transposed
        if HAS_ROW_SCALE:
            pair = tl.load(pair_ptr + rows, mask=row_mask, other=0)
            l_t = l_t * tl.load(row_scale_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)[None, :]
        if GATHER:
            src = tl.load(src_ptr + rows, mask=row_mask, other=0)
        else:
            src = rows
        x = tl.load(
            x_ptr + src.to(tl.int64)[:, None] * stride_xm + d[None, :],
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(l_t.to(DT), x.to(DT), acc, input_precision=PREC)
    out = out_ptr + split.to(tl.int64) * stride_os + slot.to(tl.int64) * stride_oe
    tl.store(
        out + r[:, None] * stride_or + d[None, :] * stride_od, acc * scale, mask=(r < R)[:, None] & d_mask[None, :]
    )


# -- launchers -------------------------------------------------------------------------------


def _grid2(num_blocks: int, cols: int):
    return lambda meta: (num_blocks, triton.cdiv(cols, meta["BLOCK_N"]))


def gate_up_forward(x, tok, w, s, b, ranks, blocks, num_blocks, h, gu, scale, block_m, lora_dtype, prec) -> None:
    """Fill h [rows, I] (and gu [rows, 2I] when not None) from x [T, H] gathered by tok."""
    intermediate, hidden = h.shape[1], x.shape[1]
    has_lora = b is not None
    _gate_up_fwd_kernel[_grid2(num_blocks, intermediate)](
        x, tok, w, s if has_lora else x, b if has_lora else w, ranks, blocks, h, gu if gu is not None else h,
        hidden, intermediate, x.stride(0), *w.stride(),
        s.stride(0) if has_lora else 0, *(b.stride() if has_lora else (0, 0, 0)),
        h.stride(0), gu.stride(0) if gu is not None else 0, float(scale),
        HAS_LORA=has_lora, STORE_GU=gu is not None, BLOCK_M=block_m,
        BLOCK_R=rank_block(b.shape[-1] if has_lora else 1), DT=dot_dtype(x.dtype), LORA_DT=lora_dtype, PREC=prec[0], LORA_PREC=prec[1],
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip


def grouped_gemm(
    x,
    w,
    w_strides,
    s,
    m,
    m_strides,
    rank,
    ranks,
    blocks,
    num_blocks,
    dst,
    row_scale,
    out,
    scale,
    block_m,
    lora_dtype,
    prec,
) -> None:
    """out[dst[row]] = row_scale * (x[row] W_e^T + scale s[row] M_slot^T); strides give (e, n, k) / (slot, n, r)."""
    n_out, k = out.shape[1], x.shape[1]
    has_lora = m is not None
    _grouped_gemm_kernel[_grid2(num_blocks, n_out)](
        x, w, s if has_lora else x, m if has_lora else w, ranks, blocks, dst,
        row_scale if row_scale is not None else x, out,
        n_out, k, x.stride(0), *w_strides, s.stride(0) if has_lora else 0, *(m_strides if has_lora else (0, 0, 0)),
        out.stride(0), float(scale),
        HAS_LORA=has_lora, HAS_ROW_SCALE=row_scale is not None, BLOCK_M=block_m, BLOCK_R=rank_block(rank),
        DT=dot_dtype(x.dtype), LORA_DT=lora_dtype, PREC=prec[0], LORA_PREC=prec[1],
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip


def down_backward(
    dy,
    tok,
    w,
    p,
    a,
    ranks,
    blocks,
    num_blocks,
    pair,
    top_k_weights,
    gu,
    dgu,
    h_hot,
    dtw,
    scale,
    block_m,
    lora_dtype,
    prec,
) -> None:
    """Fill dgu, h_hot (when not None) and the per-I-tile partial sums dtw [tiles, rows]."""
    hidden, intermediate = dy.shape[1], gu.shape[1] // 2
    has_lora = a is not None
    grid = (num_blocks, triton.cdiv(intermediate, _DOWN_BWD_BLOCK_N))
    _down_bwd_kernel[grid](
        dy, tok, w, p if has_lora else dy, a if has_lora else w, ranks, blocks, pair, top_k_weights, gu, dgu,
        h_hot if h_hot is not None else dgu, dtw,
        hidden, intermediate, dtw.shape[1], dy.stride(0),
        w.stride(0), w.stride(2), w.stride(1),  # G = dY W_e: W_down [E, H, I] read as (e, n=I, k=H)
        p.stride(0) if has_lora else 0,
        *((a.stride(0), a.stride(2), a.stride(1)) if has_lora else (0, 0, 0)),  # A [n_hot, r, I] as (slot, n=I, r)
        gu.stride(0), h_hot.stride(0) if h_hot is not None else 0, float(scale),
        HAS_LORA=has_lora, STORE_H=h_hot is not None, BLOCK_M=block_m,
        BLOCK_R=rank_block(a.shape[1] if has_lora else 1), DT=dot_dtype(dy.dtype), LORA_DT=lora_dtype, PREC=prec[0], LORA_PREC=prec[1],
        BLOCK_N=_DOWN_BWD_BLOCK_N, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip


def down_backward_tiles(intermediate: int) -> int:
    """How many I-tiles (partial sums of the routing weight's gradient) the down backward writes."""
    return triton.cdiv(intermediate, _DOWN_BWD_BLOCK_N)


def shrink(x, src, m, m_strides, rank, ranks, blocks, num_hot_blocks, s, block_m, lora_dtype, prec) -> None:
    """s[row] = x[src[row] or row] M_slot^T over the hot blocks; m_strides give (slot, r, k)."""
    if num_hot_blocks == 0:
        return
    _shrink_kernel[(num_hot_blocks,)](
        x, src if src is not None else blocks, m, ranks, blocks, s, x.shape[1], rank, x.stride(0), *m_strides,
        s.stride(0), GATHER=src is not None, BLOCK_M=block_m, BLOCK_R=rank_block(rank), DT=lora_dtype, PREC=prec[1],
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip


# lora_grad's row splits: enough programs to fill the GPU a few times over, each split at least a few blocks
# of rows on average, and a bounded partial-sum buffer.
_GRAD_PROGRAMS_PER_SM = 4
_GRAD_MIN_ROWS_PER_SPLIT = 256
_GRAD_MAX_SPLITS = 32


def lora_grad_splits(num_rows: int, num_hot: int, dim: int, num_sms: int) -> int:
    """How many programs share each hot slot's rows in `lora_grad` (chosen on the host, no sync).

    `num_rows` rows over `num_hot` slots, `dim` columns: aims at `_GRAD_PROGRAMS_PER_SM` x `num_sms` programs
    with the smallest D-tile (64), but never splits below `_GRAD_MIN_ROWS_PER_SPLIT` rows per split overall.
    """
    if num_hot == 0 or num_rows == 0:
        return 1
    programs = num_hot * triton.cdiv(dim, 64)
    wanted = triton.cdiv(_GRAD_PROGRAMS_PER_SM * num_sms, programs)
    return max(1, min(wanted, triton.cdiv(num_rows, _GRAD_MIN_ROWS_PER_SPLIT), _GRAD_MAX_SPLITS))


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def lora_grad(
    left, row_scale, pair, x, src, slots, ranks, out, out_strides, rank, scale, lora_dtype, prec, splits=None
) -> None:
    """out[slot] = scale * sum over its rows of (row_scale * left[row])^T x[src[row] or row]; strides (slot, r, d).

    `left` holds the hot rows only. With more than one split (`lora_grad_splits`, or `splits`), the kernel
    writes fp32 partial sums [splits, n_hot, rank, D] and torch adds them in a fixed order.
    """
    num_hot, dim = slots.shape[0], x.shape[1]
    if splits is None:
        splits = lora_grad_splits(left.shape[0], num_hot, dim, _num_sms(x.device))
    if splits > 1:
        target = torch.empty(splits, num_hot, rank, dim, device=x.device, dtype=torch.float32)
        strides = target.stride()
    else:
        target, strides = out, (0, *out_strides)
    _lora_grad_kernel[lambda meta: (num_hot, triton.cdiv(dim, meta["BLOCK_D"]), splits)](
        left, row_scale if row_scale is not None else left, pair, x, src if src is not None else pair, slots, ranks,
        target, dim, rank, splits, left.stride(0), x.stride(0), *strides, float(scale),
        HAS_ROW_SCALE=row_scale is not None, GATHER=src is not None, BLOCK_R=rank_block(rank), DT=lora_dtype,
        PREC=prec[1], enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    if splits > 1:
        out.as_strided((num_hot, rank, dim), out_strides).copy_(target.sum(0))
