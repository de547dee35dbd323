"""MXFP4 checkpoints (gpt-oss as published): dequantized by transformers' own MXFP4 loader.

gpt-oss ships its experts as MXFP4: `<proj>_blocks` (uint8, two FP4 e2m1 codes a byte, low nibble
first, 32 values a block) and `<proj>_scales` (uint8 E8M0 exponents, 2^(scale - 127)), everything
else in bf16 (`modules_to_not_convert`). Training needs dense weights, so hellora_pl loads them
through transformers' dequantizing op (`Mxfp4Dequantize`, `convert_moe_packed_tensors`), which
writes the stored [E, in, out] experts in the model's dtype:

- without quantization: `Mxfp4Config(dequantize=True)`, transformers' documented way; the loaded
  model carries no quantization config afterwards.
- with `quantization: nf4`: hellora's NF4 quantizer takes the same dequantizing op as the first
  step of each expert tensor's conversion, then quantizes the result right away, tensor by tensor
  (`quant.loading`), so host memory peaks near the NF4 model plus one layer's dense experts.
"""

from __future__ import annotations

from typing import Any

MXFP4 = "mxfp4"
PROJECTIONS = ("gate_up_proj", "down_proj")


def quant_method(quantization_config: Any) -> str | None:
    """The `quant_method` of a checkpoint's quantization config (a dict or a transformers config), or None."""
    if quantization_config is None:
        return None
    if isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method")
    else:
        method = getattr(quantization_config, "quant_method", quantization_config)
    return str(getattr(method, "value", method))


def is_mxfp4(quantization_config: Any) -> bool:
    return quant_method(quantization_config) == MXFP4


def dequantizing_config():
    """transformers' config that loads an MXFP4 checkpoint dequantized (to the dtype passed to from_pretrained)."""
    from transformers import Mxfp4Config

    return Mxfp4Config(dequantize=True)


def dequantizing_converters(quantizer) -> list:
    """The weight conversions that turn each `<proj>_blocks` + `<proj>_scales` pair into the dense `<proj>`.

    The same converters transformers' MXFP4 quantizer builds for `dequantize=True`; `quantizer` is
    any HfQuantizer (the op only keeps a reference to it). The blocks and scales reach the op cast
    to the model's dtype when the NF4 quantizer loads them (it quantizes on the fly, so transformers
    casts its inputs); bf16, fp16 and fp32 hold the integers 0..255 exactly and the op casts back to
    uint8 / int32 first, so the values are unchanged.
    """
    from transformers.core_model_loading import WeightConverter
    from transformers.integrations.mxfp4 import Mxfp4Dequantize

    return [
        WeightConverter([f"{proj}_blocks", f"{proj}_scales"], proj, [Mxfp4Dequantize(quantizer)])
        for proj in PROJECTIONS
    ]
