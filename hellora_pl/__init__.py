"""hellora_pl: fine-tune MoE language models with adapters where the router sends tokens."""

from .backbones import BackboneConfig, load_backbone
from .callbacks import (
    DynamicRankCallback,
    HotExpertInjectionCallback,
    LoRIMaskCallback,
    RoutingProfilerCallback,
)
from .module import HelloraModule

__version__ = "0.1.0"

__all__ = [
    "BackboneConfig",
    "DynamicRankCallback",
    "HelloraModule",
    "HotExpertInjectionCallback",
    "LoRIMaskCallback",
    "RoutingProfilerCallback",
    "load_backbone",
]
