"""NF4 storage for frozen base weights (bitsandbytes), dequantized on use and again in backward.

`NF4Weight` holds one weight, or a stack of E equal expert matrices, as packed 4-bit codes plus
one absmax per block of 64 values (`nf4`), or that absmax itself quantized to 8 bits with one
fp32 scale per 256 blocks (`nf4-dq`, bitsandbytes' `compress_statistics`). Blocks never straddle
two experts, so the experts a batch routes to are dequantized alone, with one bitsandbytes call.

The base never trains, so backward needs the weight only to compute dX: the autograd functions
here keep no dequantized weight for backward and dequantize a second time instead (QLoRA's
recompute), which costs one more dequantization per projection and saves a full dense copy of
every weight a layer used.

bitsandbytes 0.50.2's CPU dequantize kernel gives wrong values for 2D/3D shapes whose last
dimension is shorter than a block, so every dequantization here asks for a flat shape and
reshapes the result.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ..kernels.reference import grouped_mm

QUANTIZATIONS = ("nf4", "nf4-dq")
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256  # bitsandbytes' block of absmax values under double quantization
CHUNK_VALUES = 1 << 22  # values per bitsandbytes call while quantizing (8 MB of bf16)


def nf4_bytes(numel: int, double_quant: bool = False, blocksize: int = BLOCKSIZE) -> int:
    """Bytes an `NF4Weight` of `numel` weights holds (the one NF4 byte formula; budget and memory use it).

    nf4: packed codes ceil(n/2) + one fp32 absmax per block, 4 ceil(n/64) (0.5625 B/weight).
    nf4-dq: the absmax in 8 bits, ceil(n/64), + one fp32 scale per 256 of them + the fp32 offset
    (0.5159 B/weight). The NF4 code book and the 8-bit dynamic map are shared by every weight
    (`_codes`), not stored per tensor, so they are not counted here.
    """
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4


def _functional():
    """bitsandbytes.functional, or a clear error naming the extra to install."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as error:  # pragma: no cover - exercised only without bitsandbytes
        raise ImportError(
            "4-bit quantization needs bitsandbytes (>= 0.45): install it with `pip install hellora_pl[quant]` "
            "or `pip install bitsandbytes`, or set quantization to null."
        ) from error
    return bnb_functional


@functools.cache
def _codes(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The NF4 code book and the 8-bit dynamic map of nested absmax: constants shared by every weight."""
    bnb_functional = _functional()
    nf4 = bnb_functional.get_4bit_type("nf4", device=device)
    dynamic = bnb_functional.create_dynamic_map(signed=True).to(device)
    return nf4, dynamic


def check_quantization(quantization: str | None) -> bool:
    """True for a 4-bit choice, False for none; a clear error for anything else."""
    if quantization is None or quantization == "none":
        return False
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"Unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)} or null.")
    _functional()
    return True


def _quantize_in_chunks(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed NF4 codes and fp32 absmax of `weight`, flat, quantized CHUNK_VALUES at a time.

    bitsandbytes' CPU kernel holds about 7x its input in temporaries; chunks whole blocks at a
    time give the same codes with that overhead bounded by one chunk instead of a fused expert
    tensor (7x 1.9 GB for one Mixtral-8x7B layer's gate_up).

    A non-contiguous stack (the transpose of gpt_oss's [E, in, out] experts) is read one matrix
    at a time, so the contiguous copy it needs is one expert's, not the whole stack's; blocks never
    straddle two matrices, so the codes are the same.
    """
    matrices = [weight] if weight.is_contiguous() or weight.ndim < 3 else list(weight)
    step = max(CHUNK_VALUES // blocksize, 1) * blocksize
    packed, absmax = [], []
    for matrix in matrices:
        flat = matrix.reshape(-1)
        for start in range(0, flat.numel(), step):
            chunk = flat[start : start + step].contiguous()
            codes, state = _functional().quantize_4bit(
                chunk, blocksize=blocksize, compress_statistics=False, quant_type="nf4"
            )
            packed.append(codes.reshape(-1))
            absmax.append(state.absmax.float())
    return torch.cat(packed), torch.cat(absmax)


class NF4Weight(nn.Module):
    """A frozen weight [out, in] or expert stack [E, out, in] held in NF4 (optionally double-quantized).

    It answers `.shape`, `.dtype` (the compute dtype), `.device` and `.ndim` like the dense tensor it
    replaces, so shape and device reads elsewhere keep working; arithmetic on it does not.
    """

    def __init__(self, weight: torch.Tensor, double_quant: bool = False, blocksize: int = BLOCKSIZE, role: str = ""):
        super().__init__()
        weight = weight.detach()
        stack = weight.shape[0] if weight.ndim == 3 else 1
        per_matrix = weight.numel() // stack
        if per_matrix % blocksize or per_matrix % 2:
            raise ValueError(
                f"NF4 needs each matrix's size to be a multiple of the block size {blocksize}; "
                f"{role or 'a weight'} of shape {tuple(weight.shape)} is not."
            )
        packed, absmax = _quantize_in_chunks(weight, blocksize)
        self.shape = torch.Size(weight.shape)
        self.dtype = weight.dtype
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.role = role
        self.register_buffer("packed", packed.view(stack, per_matrix // 2))
        if double_quant:  # bitsandbytes' compress_statistics: absmax minus its mean, in 8 bits per 256 blocks
            offset = absmax.mean()
            nested, state = _functional().quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
            absmax = nested
            self.nested_blocksize = state.blocksize
            self.register_buffer("absmax_scale", state.absmax)
            self.register_buffer("absmax_offset", offset.float().reshape(1))
        self.register_buffer("absmax", absmax.view(stack, per_matrix // blocksize))
        if not double_quant:
            self.nested_blocksize = None
            self.absmax_scale = self.absmax_offset = None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def _apply(self, fn, recurse: bool = True):
        """`.to(device)` moves the storage; `.to(dtype)`, `.half()` and the like (Lightning's "bf16-true")
        change only the compute dtype. The fp32 scales are moved as raw bytes, never cast: in bf16
        they would lose precision, and a router would dequantize in a dtype its input no longer has."""
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        scales = [
            name for name, buffer in self._buffers.items() if buffer is not None and buffer.dtype == torch.float32
        ]
        for name in scales:
            self._buffers[name] = self._buffers[name].view(torch.int32)
        try:
            super()._apply(fn, recurse)
        finally:
            for name in scales:
                self._buffers[name] = self._buffers[name].view(torch.float32)
        return self

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def num_matrices(self) -> int:
        return self.packed.shape[0]

    def nbytes(self) -> int:
        """Bytes this weight holds: packed codes, absmax and nested statistics (the code books are shared)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block scales [num_matrices, blocks], un-nesting the double-quantized ones."""
        if not self.double_quant:
            return self.absmax.float()
        bnb_functional = _functional()
        _, dynamic = _codes(self.device)
        state = bnb_functional.QuantState(
            absmax=self.absmax_scale.float(), code=dynamic, blocksize=self.nested_blocksize, dtype=torch.float32
        )
        scales = bnb_functional.dequantize_blockwise(self.absmax.reshape(-1), state)
        return (scales + self.absmax_offset.float()).view(self.absmax.shape)

    def dequantize(self, index: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight, or only the experts in `index` ([len(index), out, in]), as a new tensor."""
        bnb_functional = _functional()
        packed, absmax = self.packed, self.absmax_fp32()
        count = self.num_matrices
        if index is not None:
            packed, absmax, count = packed[index], absmax[index], int(index.numel())
        matrix_shape = self.shape[1:] if self.ndim == 3 else self.shape
        flat = count * matrix_shape.numel()
        nf4, _ = _codes(self.device)
        state = bnb_functional.QuantState(
            absmax=absmax.reshape(-1).contiguous(),
            shape=torch.Size((flat,)),
            code=nf4,
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=dtype or self.dtype,
        )
        dense = bnb_functional.dequantize_4bit(packed.reshape(-1, 1), state)
        if self.ndim == 3:
            return dense.view(count, *matrix_shape)
        return dense.view(matrix_shape)

    def grouped_mm(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Rows of x routed to expert e (by `offsets`) times expert e's weight transposed, for every e.

        Only experts with rows are dequantized; the dequantized weights are not kept for backward.
        """
        return _NF4GroupedMM.apply(x, offsets, self)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T without keeping the dequantized W for backward."""
        return _NF4Linear.apply(x, self)

    def extra_repr(self) -> str:
        kind = "nf4-dq" if self.double_quant else "nf4"
        return f"{kind}, shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}"


class _NF4GroupedMM(torch.autograd.Function):
    """Grouped GEMM over the used experts of an NF4 stack; backward re-dequantizes them for dX."""

    @staticmethod
    def forward(ctx, x, offsets, weight: NF4Weight):
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
        used = torch.nonzero(counts).squeeze(1)
        used_offsets = offsets[used].contiguous()
        ctx.weight = weight
        ctx.save_for_backward(used, used_offsets)
        if used.numel() == 0:
            return x.new_zeros(x.shape[0], weight.shape[1])
        dense = weight.dequantize(None if used.numel() == weight.num_matrices else used, dtype=x.dtype)
        return grouped_mm(x, dense.transpose(-2, -1), used_offsets)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        used, used_offsets = ctx.saved_tensors
        weight: NF4Weight = ctx.weight
        if used.numel() == 0:
            return grad.new_zeros(grad.shape[0], weight.shape[2]), None, None
        dense = weight.dequantize(None if used.numel() == weight.num_matrices else used, dtype=grad.dtype)
        return grouped_mm(grad.contiguous(), dense, used_offsets), None, None


class _NF4Linear(torch.autograd.Function):
    """x W^T with W dequantized in forward and again in backward, never saved."""

    @staticmethod
    def forward(ctx, x, weight: NF4Weight):
        ctx.weight = weight
        return x @ weight.dequantize(dtype=x.dtype).T

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.weight.dequantize(dtype=grad.dtype), None


class NF4Linear(nn.Linear):
    """A frozen nn.Linear whose weight is NF4 storage; LoRALinear and other nn.Linear readers wrap it.

    `.weight` returns a fresh dense copy (for shape, device and dtype reads); assigning to it, as an
    in-place merge would, raises instead of silently changing nothing.
    """

    def __init__(
        self,
        linear: nn.Linear,
        double_quant: bool = False,
        blocksize: int = BLOCKSIZE,
        role: str = "",
        weight_nf4: NF4Weight | None = None,
    ):
        """Quantizes `linear.weight`, or takes `weight_nf4` made while loading (the weight is then a placeholder)."""
        nn.Module.__init__(self)
        self.weight_nf4 = (
            weight_nf4 if weight_nf4 is not None else NF4Weight(linear.weight, double_quant, blocksize, role)
        )
        self.out_features, self.in_features = self.weight_nf4.shape
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.register_parameter("bias", bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_nf4.dequantize()

    @weight.setter
    def weight(self, value) -> None:
        raise RuntimeError(
            "This linear's weight is stored in NF4 and frozen; merging into it is not supported. "
            "Load the base model without quantization to merge adapters."
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.weight_nf4.linear(x.to(self.weight_nf4.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype)


class NF4Dequantize(nn.Module):
    """A parametrization giving a router's bare `weight` from NF4 storage (its input is a placeholder).

    Routers in transformers 5 read `self.weight` in their own forward, so a parametrization is the
    seam that reaches them; RouterLoRA, registered after it, adds its update to the dequantized weight.
    """

    def __init__(self, weight: NF4Weight):
        super().__init__()
        self.weight_nf4 = weight

    def forward(self, placeholder: torch.Tensor) -> torch.Tensor:
        return self.weight_nf4.dequantize()
