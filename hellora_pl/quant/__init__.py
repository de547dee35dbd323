"""4-bit (NF4) storage of the frozen base: attention, routers and fused experts (bitsandbytes)."""

from __future__ import annotations

from .model import QUANTIZED_ATTR, quantize_model, quantized_bytes, quantized_storage
from .nf4 import BLOCKSIZE, QUANTIZATIONS, NF4Dequantize, NF4Linear, NF4Weight, check_quantization

__all__ = [
    "BLOCKSIZE",
    "QUANTIZATIONS",
    "QUANTIZED_ATTR",
    "NF4Dequantize",
    "NF4Linear",
    "NF4Weight",
    "check_quantization",
    "quantize_model",
    "quantized_bytes",
    "quantized_storage",
]
