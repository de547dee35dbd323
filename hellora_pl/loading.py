"""Load a backbone by hub id or local path, or build one from a config with no network; 4-bit when asked.

This sits above both `backbones` (which architectures exist, `BackboneConfig`) and `quant` (NF4
storage, which itself reads the architectures), so neither of those imports the other back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .backbones import DTYPES, BackboneConfig, supported_model_types
from .backbones.meta import meta_architecture
from .backbones.registry import check_model_type
from .quant import check_quantization, quantize_model
from .quant.loading import load_quantized
from .quant.mxfp4 import MXFP4, dequantizing_config, quant_method

__all__ = ["BackboneConfig", "load_backbone"]


def load_backbone(cfg: BackboneConfig) -> PreTrainedModel:
    if (cfg.pretrained is None) == (cfg.model_type is None):
        raise ValueError(
            "BackboneConfig needs exactly one of `pretrained` (a hub id or a local path) or "
            f"`model_type` (one of {', '.join(supported_model_types())}) with `config` fields; "
            f"got pretrained={cfg.pretrained!r}, model_type={cfg.model_type!r}."
        )
    if cfg.dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}.")
    dtype = DTYPES[cfg.dtype]
    quantize = check_quantization(cfg.quantization)  # fail before loading anything
    if cfg.pretrained is not None:
        return _from_pretrained(cfg, dtype, quantize)  # quantizes tensor by tensor while loading
    model = _from_config(cfg, dtype)
    if quantize:
        quantize_model(model, cfg.quantization)
    return model


def _from_config(cfg: BackboneConfig, dtype: torch.dtype) -> PreTrainedModel:
    config = _config_for(cfg.model_type, cfg.config)
    arch = meta_architecture(config)  # registered, or detected from the model built on meta: refused before allocating
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=cfg.attn_implementation, **_experts_kwargs(cfg, arch)
        )
    return model


def _config_for(model_type: str, fields: dict):
    """The transformers config of `model_type` with `fields`; a type transformers does not know is the
    unknown-model refusal (it could only be described, not built from a config)."""
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        check_model_type(model_type)  # registered types with their own config class pass (tiny_deepseek_moe)
    return AutoConfig.for_model(model_type, **fields)


def _experts_kwargs(cfg: BackboneConfig, arch) -> dict:
    """Only models with fused experts take an experts implementation (ModuleList experts loop in Python)."""
    return {"experts_implementation": cfg.experts_implementation} if arch.fused else {}


def _from_pretrained(cfg: BackboneConfig, dtype: torch.dtype, quantize: bool) -> PreTrainedModel:
    source = cfg.pretrained
    looks_local = source.startswith((".", "/", "~")) or Path(source).expanduser().exists()
    if looks_local and not Path(source).expanduser().exists():
        raise FileNotFoundError(f"Backbone path {source!r} does not exist; give a local model directory or a hub id.")
    config = AutoConfig.from_pretrained(
        source, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, **cfg.config
    )
    # Registered, or detected from the model built on meta: refused before any weight is read.
    arch = meta_architecture(config, source, trust_remote_code=cfg.trust_remote_code)
    kwargs = dict(
        config=config,
        dtype=dtype,
        attn_implementation=cfg.attn_implementation,
        **_experts_kwargs(cfg, arch),
        trust_remote_code=cfg.trust_remote_code,
        revision=cfg.revision,
    )
    method = quant_method(getattr(config, "quantization_config", None))
    if method == MXFP4:  # gpt-oss as published: its experts dequantized while loading (quant.mxfp4)
        if quantize:  # hellora's NF4 quantizer dequantizes them itself, then quantizes each tensor
            del config.quantization_config
            return load_quantized(source, cfg.quantization, source_format=MXFP4, **kwargs)
        return AutoModelForCausalLM.from_pretrained(source, quantization_config=dequantizing_config(), **kwargs)
    if quantize:
        if method is not None:
            raise ValueError(
                f"{source!r} is already quantized ({method}); hellora_pl quantizes a 16-bit checkpoint itself "
                f"(or an {MXFP4} one, which it dequantizes first). Give the 16-bit checkpoint, or set quantization "
                "to null."
            )
        return load_quantized(source, cfg.quantization, **kwargs)
    return AutoModelForCausalLM.from_pretrained(source, **kwargs)
