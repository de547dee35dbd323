"""Lightning callbacks: thin glue over routing and adapters, usable in any LightningModule
that follows `hellora_pl.callbacks.protocol`."""

from .injection import HotExpertInjectionCallback
from .routing_profiler import RoutingProfilerCallback

__all__ = ["HotExpertInjectionCallback", "RoutingProfilerCallback"]
