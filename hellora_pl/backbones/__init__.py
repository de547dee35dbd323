"""Backbones: one small description per MoE architecture, and `BackboneConfig` (loading: `hellora_pl.loading`)."""

from . import families, tiny_deepseek_moe  # noqa: F401  (register the built-in architectures and the tiny ModuleList model)
from .architecture import MoEArchitecture, MoELayer
from .config import DTYPES, BackboneConfig
from .registry import (
    ARCHITECTURES,
    UnsupportedArchitectureError,
    architecture_for,
    register_architecture,
    supported_model_types,
)

__all__ = [
    "ARCHITECTURES",
    "DTYPES",
    "BackboneConfig",
    "MoEArchitecture",
    "MoELayer",
    "UnsupportedArchitectureError",
    "architecture_for",
    "register_architecture",
    "supported_model_types",
]
