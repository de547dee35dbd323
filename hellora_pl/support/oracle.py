"""The reference a family's adapted model is checked against, computed without hellora_pl's merge.

Every adapter is folded into a copy of the base here (W += scale * B @ A, transposed for
transposed expert storage), and the copy runs transformers' own "eager" experts: the adapted model
must give the same logits.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..adapters.experts import expert_adapter
from ..adapters.linear import LoRALinear
from ..adapters.router import RouterLoRA
from ..backbones.detect import is_experts_interface


def merged_copy(base: nn.Module, adapted: nn.Module) -> nn.Module:
    """`base` with every adapter of `adapted` folded into its weights, on transformers' eager experts."""
    merged = copy.deepcopy(base)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, module in adapted.named_modules():
            if isinstance(module, LoRALinear):
                modules[name].weight += module.scale * module.lora_B @ module.lora_A
            elif isinstance(module, RouterLoRA):  # <router>.parametrizations.weight.0
                router = name.rsplit(".parametrizations", 1)[0]
                modules[router].weight += module.scale * module.lora_B @ module.lora_A
            elif is_experts_interface(module) and expert_adapter(module) is not None:
                lora = expert_adapter(module)
                for slot, expert in enumerate(lora.hot_experts.tolist()):
                    for projection in lora.projections:
                        delta = lora.scale * lora.lora_B[projection][slot] @ lora.lora_A[projection][slot]
                        # transposed storage ([E, in, out]) takes the transposed [out, in] update
                        getattr(modules[name], projection)[expert] += delta.T if module.is_transposed else delta
    merged.set_experts_implementation("eager")
    return merged
