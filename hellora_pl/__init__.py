"""hellora_pl: fine-tune MoE language models with adapters where the router sends tokens."""

from .backbones import BackboneConfig
from .callbacks import (
    DynamicRankCallback,
    HotExpertInjectionCallback,
    InterruptCheckpoint,
    LoRIMaskCallback,
    RoutingProfilerCallback,
    RunSummary,
)
from .loading import load_backbone
from .module import HelloraModule

__version__ = "0.1.0"

__all__ = [
    "BackboneConfig",
    "DynamicRankCallback",
    "HelloraModule",
    "HotExpertInjectionCallback",
    "InterruptCheckpoint",
    "LoRIMaskCallback",
    "RoutingProfilerCallback",
    "RunSummary",
    "load_backbone",
]
