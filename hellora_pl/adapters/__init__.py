"""Adapters: plans, their sites in a model, LoRA for linears, routers and a subset of experts; merge; save/load."""

from .experts import ExpertAdapter, ExpertDelta, ExpertLoRA, expert_adapter, layer_expert_adapter
from .export import export_merged, export_peft
from .inject import adapter_modules, adapter_state_dict, inject_adapters, injected_hot_experts, is_injected
from .io import ADAPTER_FILE, PLAN_FILE, load_adapter, load_adapter_weights, save_adapter
from .linear import LoRALinear
from .merge import merge_adapters, remove_adapters
from .placement import build_plan
from .plan import METHODS, AdapterPlan, DynamicRankSpec, LayerPlan, LoRISpec
from .router import RouterLoRA
from .sites import AdapterSite, adapter_sites, count_lora_baseline_params, count_plan_params, update_trainable_params

__all__ = [
    "ADAPTER_FILE",
    "PLAN_FILE",
    "METHODS",
    "AdapterPlan",
    "AdapterSite",
    "DynamicRankSpec",
    "LoRISpec",
    "ExpertAdapter",
    "ExpertDelta",
    "ExpertLoRA",
    "LayerPlan",
    "LoRALinear",
    "RouterLoRA",
    "adapter_modules",
    "adapter_sites",
    "update_trainable_params",
    "build_plan",
    "adapter_state_dict",
    "count_plan_params",
    "count_lora_baseline_params",
    "expert_adapter",
    "export_merged",
    "export_peft",
    "layer_expert_adapter",
    "inject_adapters",
    "injected_hot_experts",
    "is_injected",
    "load_adapter",
    "load_adapter_weights",
    "merge_adapters",
    "remove_adapters",
    "save_adapter",
]
