"""Quantize a pretrained MoE to NF4 while transformers loads it, one tensor at a time.

Loading a 16-bit checkpoint and quantizing afterwards needs the whole 16-bit model in host
memory first (94 GB for Mixtral-8x7B). transformers' quantizer seam avoids that: registered as a
quantization method, `HelloraNF4Quantizer` marks the tensors hellora_pl stores in 4 bits
(`quantization_targets`), and transformers hands each of them over right after reading and
fusing it (per-expert checkpoint tensors are stacked into the fused [E, out, in] tensor first).
The quantizer keeps the NF4 copy, gives transformers an empty placeholder to set, and installs
the NF4 weights once loading is done, through the same `quantize_model` that quantizes a model
built from a config. On-the-fly quantization also makes transformers load synchronously, so host
memory peaks near the 4-bit model plus one fused tensor in 16 bits.

An MXFP4 checkpoint (gpt-oss as published, `source_format="mxfp4"`) loads the same way: each expert
tensor's conversion first dequantizes its MXFP4 blocks and scales (`quant.mxfp4`), then hands the
dense tensor to the NF4 step, so it is never held dense in the model either.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .model import quantization_targets, quantize_model
from .mxfp4 import MXFP4, dequantizing_converters
from .nf4 import BLOCKSIZE, QUANTIZATIONS, NF4Weight, check_quantization

QUANT_METHOD = "hellora_nf4"


@register_quantization_config(QUANT_METHOD)
class HelloraNF4Config(QuantizationConfigMixin):
    """`quantization` is "nf4" or "nf4-dq" (absmax double-quantized); `blocksize` values share one absmax;
    `source_format` "mxfp4" for a checkpoint whose experts are MXFP4 (dequantized, then quantized)."""

    def __init__(
        self, quantization: str = "nf4", blocksize: int = BLOCKSIZE, source_format: str | None = None, **kwargs: Any
    ):
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"Unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}.")
        if source_format not in (None, MXFP4):
            raise ValueError(f"Unknown source_format {source_format!r}; hellora_pl reads None (16-bit) or {MXFP4!r}.")
        self.quant_method = QUANT_METHOD
        self.quantization = quantization
        self.blocksize = blocksize
        self.source_format = source_format


class _QuantizeOnLoad(ConversionOps):
    """Replaces each loaded (and already fused) target tensor by an NF4 copy kept on the quantizer."""

    def __init__(self, quantizer: HelloraNF4Quantizer):
        self.quantizer = quantizer

    def convert(self, input_dict: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        placeholders = {}
        for name, value in input_dict.items():
            dense = value[0] if isinstance(value, list) else value
            self.quantizer.quantize(name, dense)
            placeholders[name] = dense.new_empty(0)
        return placeholders


@register_quantizer(QUANT_METHOD)
class HelloraNF4Quantizer(HfQuantizer):
    """transformers' hooks for NF4 on load: which tensors, how to quantize one, how to install them."""

    requires_calibration = False

    def __init__(self, quantization_config: HelloraNF4Config, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.roles: dict[str, str] = {}
        self.transposed: set[str] = set()  # expert tensors stored [E, in, out]: NF4 holds their transpose
        self.quantized: dict[str, NF4Weight] = {}

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        check_quantization(self.quantization_config.quantization)  # bitsandbytes present

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> None:
        targets = quantization_targets(model)
        self.roles = {target.name: target.role for target in targets}
        self.transposed = {target.name for target in targets if target.transposed}

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs: Any) -> bool:
        return param_name in self.roles

    def get_quantize_ops(self) -> ConversionOps:
        return _QuantizeOnLoad(self)

    def get_weight_conversions(self) -> list:
        """MXFP4 sources: dequantize each expert tensor's blocks and scales first (the NF4 step follows)."""
        return dequantizing_converters(self) if self.quantization_config.source_format == MXFP4 else []

    def quantize(self, name: str, dense: torch.Tensor) -> None:
        config = self.quantization_config
        double_quant = config.quantization == "nf4-dq"
        logical = dense.transpose(-2, -1) if name in self.transposed else dense
        self.quantized[name] = NF4Weight(logical, double_quant, config.blocksize, self.roles[name])

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        missing = sorted(set(self.roles) - set(self.quantized))
        if missing:
            raise RuntimeError(
                f"The checkpoint has no weights for {len(missing)} tensors to quantize, e.g. {missing[:3]}; "
                "its weight files do not match its config.json. Give a complete checkpoint of that model "
                "(all its safetensors shards), or load it without quantization to see transformers' report."
            )
        quantize_model(model, self.quantization_config.quantization, self.quantization_config.blocksize, self.quantized)
        self.quantized = {}
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return True


def load_quantized(
    source: str, quantization: str, source_format: str | None = None, **from_pretrained_kwargs: Any
) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained(source, ...)` with the base quantized to NF4 tensor by tensor.

    `source_format="mxfp4"`: the checkpoint's experts are MXFP4 (the `config` passed must then carry
    no quantization config of its own, or transformers would use that one instead).
    """
    check_quantization(quantization)
    config = HelloraNF4Config(quantization=quantization, source_format=source_format)
    return AutoModelForCausalLM.from_pretrained(source, quantization_config=config, **from_pretrained_kwargs)
