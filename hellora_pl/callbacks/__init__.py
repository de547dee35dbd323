"""Lightning callbacks: thin glue over routing and adapters, usable in any LightningModule
that follows `hellora_pl.callbacks.protocol`."""

from .dynamic_rank import DynamicRankCallback
from .injection import HotExpertInjectionCallback
from .lori import LoRIMaskCallback
from .routing_profiler import RoutingProfilerCallback

__all__ = ["DynamicRankCallback", "HotExpertInjectionCallback", "LoRIMaskCallback", "RoutingProfilerCallback"]
