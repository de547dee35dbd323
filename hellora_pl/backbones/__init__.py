"""Backbones: loading, and one small description per MoE architecture."""

from . import families, tiny_deepseek_moe  # noqa: F401  (register the built-in architectures and the tiny ModuleList model)
from .architecture import MoEArchitecture, MoELayer
from .loading import BackboneConfig, load_backbone
from .registry import (
    ARCHITECTURES,
    UnsupportedArchitectureError,
    architecture_for,
    register_architecture,
    supported_model_types,
)

__all__ = [
    "ARCHITECTURES",
    "BackboneConfig",
    "MoEArchitecture",
    "MoELayer",
    "UnsupportedArchitectureError",
    "architecture_for",
    "load_backbone",
    "register_architecture",
    "supported_model_types",
]
