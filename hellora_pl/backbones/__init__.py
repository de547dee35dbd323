"""Backbones: loading, and one small description per MoE architecture."""

from . import families  # noqa: F401  (registers the built-in architectures)
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
