"""Lightning callbacks: thin glue over routing and adapters, usable in any LightningModule
that follows `hellora_pl.callbacks.protocol`."""

from .dynamic_rank import DynamicRankCallback
from .injection import HotExpertInjectionCallback
from .interrupt import InterruptCheckpoint
from .lori import LoRIMaskCallback
from .routing_profiler import RoutingProfilerCallback
from .run_summary import RunSummary

__all__ = [
    "DynamicRankCallback",
    "HotExpertInjectionCallback",
    "InterruptCheckpoint",
    "LoRIMaskCallback",
    "RoutingProfilerCallback",
    "RunSummary",
]
