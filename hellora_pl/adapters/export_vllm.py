"""Export an adapted model as a LoRA adapter in the per-expert layout vLLM loads for MoE models.

vLLM (checked against the loader code of vllm 0.33.0) serves MoE models whose `is_3d_moe_weight`
is False (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, ...) with a 2D fused-MoE LoRA wrapper that reads
the experts one by one, under the model's checkpoint names:

    base_model.model.<layers>.{i}.<block>.experts.{e}.<gate>.lora_A.weight   [r, H]
    base_model.model.<layers>.{i}.<block>.experts.{e}.<gate>.lora_B.weight   [I, r]
    (the same for <up> [r, H] / [I, r] and <down> [r, I] / [H, r])

with <gate>/<up>/<down> = gate_proj/up_proj/down_proj (Mixtral: w1/w3/w2, block `block_sparse_moe`).
The 3D PEFT layout (`export_peft`) is refused there unless the server runs with
`--enable-mixed-moe-lora-format` and the request sets `is_3d_lora_weight=True`.

What the loader demands, and what this writer does about it:
- every expert of an adapted layer, with all three projections (`PackedLoRALayerWeights.pack_moe`
  asserts each one): cold experts and an unadapted projection are written as zero A and B;
- one rank per projection across experts: one rank R (the largest in use) for every tensor, smaller
  ranks padded with zero rank slices;
- scaling lora_alpha / r from adapter_config.json: B is written as our scale * B_eff (LoRI mask and
  DR-LoRA active ranks applied) and lora_alpha = r = R, so vLLM's scaling is 1.
The fused gate_up_proj [E, 2I, H] is transformers' concatenation [gate; up] of the checkpoint's
per-expert gate and up (conversion_mapping: Concatenate(dim=1)): gate is the first I rows of B,
up the last I, and both share the layer's A. Attention, router and shared-expert adapters are plain
PEFT module keys (`<module>.lora_A.weight`), which vLLM maps onto its packed layers itself.

Refused by name: full-rank expert deltas (ESFT, not low-rank), interleaved gate/up rows, ungated
experts, expert-list layouts, and model types whose vLLM checkpoint names are not in `VLLM_NAMING`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..backbones import architecture_for
from ..kernels.layout import DOWN, GATE_UP, ExpertLayout
from .experts import ExpertLoRA
from .export import (
    _PEFT_PREFIX,
    _check_directory,
    _checked_adapters,
    _expert_rank_in_use,
    _kept_rank,
    _pad_lora,
    _write_peft,
)
from .plan import AdapterPlan


@dataclass(frozen=True)
class VLLMExpertNaming:
    """A model type's checkpoint names, as vLLM loads them: per-expert projections and the MoE block."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    block: str | None = None  # the MoE block's checkpoint name where transformers renames it to `mlp`

    def checkpoint_path(self, module_path: str) -> str:
        """A module path of the transformers model under the checkpoint's (and vLLM's) names."""
        if self.block is None:
            return module_path
        return re.sub(r"(^|\.)mlp(\.|$)", rf"\1{self.block}\2", module_path)


# vLLM's expert checkpoint names per model type: RoutedExperts' default (gate_proj, down_proj, up_proj,
# vllm/model_executor/layers/fused_moe/routed_experts.py) or the model's own ckpt_names (mixtral.py:
# ("w1", "w2", "w3"), and transformers renames its block_sparse_moe to mlp: conversion_mapping "mixtral").
VLLM_NAMING: dict[str, VLLMExpertNaming] = {
    "olmoe": VLLMExpertNaming(),
    "qwen2_moe": VLLMExpertNaming(),
    "qwen3_moe": VLLMExpertNaming(),
    "mixtral": VLLMExpertNaming(gate="w1", up="w3", down="w2", block="block_sparse_moe"),
}


def vllm_naming(model: nn.Module) -> VLLMExpertNaming:
    """The model type's vLLM expert names; refuses a model type they are not known for."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in VLLM_NAMING:
        raise ValueError(
            f"vLLM's per-expert LoRA key names are not known to hellora_pl for model type {model_type!r} (known: "
            f"{', '.join(sorted(VLLM_NAMING))}); add its checkpoint names to hellora_pl.adapters.export_vllm."
            "VLLM_NAMING after checking vLLM's model file, or export with format 'peft' (vLLM loads that 3D "
            "layout with --enable-mixed-moe-lora-format) or 'merged'."
        )
    return VLLM_NAMING[model_type]


def export_vllm(
    model: nn.Module,
    plan: AdapterPlan,
    directory: str | Path,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the injected adapters of `model` as a LoRA adapter in vLLM's per-expert MoE layout; return `directory`.

    Serve it with `vllm serve BASE --enable-lora --lora-modules name=DIR --max-lora-rank >= r` on the base
    model `plan` was injected into. The model is not modified. See the module docstring for the layout.
    """
    if plan.expert_adapter == "full":
        raise ValueError(
            f"The {plan.method!r} plan holds full-rank expert deltas, which are not low-rank and cannot be written "
            "as a vLLM LoRA adapter; use export_merged(model, directory) to save a merged checkpoint."
        )
    naming = vllm_naming(model)
    if not architecture_for(model).fused:
        raise ValueError(
            f"{architecture_for(model).name} keeps its experts as a list of modules; the vLLM per-expert export "
            "handles fused experts only. Use format 'peft' or 'merged'."
        )
    found = _checked_adapters(model, plan)
    directory = _check_directory(directory, overwrite)
    with torch.no_grad():
        linears, experts, rank = _collect(model, found)
        tensors: dict[str, torch.Tensor] = {}
        for path, (a, b) in linears.items():
            _put(tensors, naming.checkpoint_path(path), *_pad_lora(a, b, rank))
        for experts_name, adapter in experts.items():
            _put_experts(tensors, model, naming, experts_name, adapter, rank)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    config = _vllm_config(base_model_name_or_path, rank, _target_modules(tensors))
    _write_peft(directory, tensors, config, plan.method)
    return directory


def _collect(model: nn.Module, found: list) -> tuple[dict, dict[str, ExpertLoRA], int]:
    """Linear adapters (attention, router, shared experts) as (A, scaled B_eff), the fused experts adapters, R."""
    linears: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    experts: dict[str, ExpertLoRA] = {}
    ranks: list[int] = []
    for site, adapter in found:
        if site.kind == "routed_expert":
            _check_layout(model, site.module)
            experts[site.module] = adapter
            ranks.append(_expert_rank_in_use(adapter))
        else:  # the router's bare weight [E, H] is vLLM's GateLinear (a ReplicatedLinear): a plain module key
            path = site.module if site.kind == "router" else site.path
            linears[path] = (adapter.lora_A.detach(), (adapter.scale * adapter.effective_B()).detach())
            ranks.append(adapter.rank)
    return linears, experts, max(ranks)


def _check_layout(model: nn.Module, experts_name: str) -> None:
    """Refuse fused layouts whose gate_up_proj is not [gate; up] per expert."""
    layout = ExpertLayout.of(model.get_submodule(experts_name))
    if not layout.gated:
        raise ValueError(
            f"{experts_name} has ungated experts (has_gate=False: up_proj then act_fn); the vLLM per-expert export "
            "writes gate/up/down triplets only. Use format 'peft' or 'merged'."
        )
    if not layout.concatenated:
        raise ValueError(
            f"{experts_name} interleaves gate and up rows (is_concatenated=False); the vLLM per-expert export splits "
            "gate_up_proj as [gate; up] halves and would split these wrongly. Use format 'peft' or 'merged'."
        )


def _put(tensors: dict[str, torch.Tensor], module_path: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """Own copies: safetensors refuses tensors that share memory (gate and up share A, zeros are reused)."""
    tensors[f"{_PEFT_PREFIX}{module_path}.lora_A.weight"] = a.to("cpu", copy=True).contiguous()
    tensors[f"{_PEFT_PREFIX}{module_path}.lora_B.weight"] = b.to("cpu", copy=True).contiguous()


def _put_experts(
    tensors: dict[str, torch.Tensor],
    model: nn.Module,
    naming: VLLMExpertNaming,
    experts_name: str,
    adapter: ExpertLoRA,
    rank: int,
) -> None:
    """Every expert's gate, up and down factors at rank R: hot experts from the adapter, the rest zeros."""
    layout = ExpertLayout.of(model.get_submodule(experts_name))
    two_i, hidden = layout.shape(GATE_UP)
    intermediate = two_i // 2
    dtype = next(iter(adapter.lora_A.values())).dtype
    zeros = {
        GATE_UP: (torch.zeros(rank, hidden, dtype=dtype), torch.zeros(two_i, rank, dtype=dtype)),
        DOWN: (torch.zeros(rank, intermediate, dtype=dtype), torch.zeros(hidden, rank, dtype=dtype)),
    }
    per_expert = {name: [zeros[name]] * layout.num_experts for name in (GATE_UP, DOWN)}
    for name in adapter.projections:
        a_hot = adapter.lora_A[name].detach().to("cpu")
        b_hot = (adapter.scale * adapter.effective_B(name)).detach().to("cpu")
        keep = _kept_rank(b_hot, rank)
        for slot, expert in enumerate(adapter.hot_experts.tolist()):
            a, b = zeros[name][0].clone(), zeros[name][1].clone()
            a[:keep], b[:, :keep] = a_hot[slot, :keep], b_hot[slot, :, :keep]
            per_expert[name][expert] = (a, b)
    prefix = naming.checkpoint_path(experts_name)
    for expert in range(layout.num_experts):
        a, b = per_expert[GATE_UP][expert]
        _put(tensors, f"{prefix}.{expert}.{naming.gate}", a, b[:intermediate])
        _put(tensors, f"{prefix}.{expert}.{naming.up}", a, b[intermediate:])
        _put(tensors, f"{prefix}.{expert}.{naming.down}", *per_expert[DOWN][expert])


def _target_modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The module name suffixes the tensors adapt (PEFT's usual form; vLLM matches keys by suffix too)."""
    return sorted({key.rsplit(".", 2)[0].rsplit(".", 1)[-1] for key in tensors})


def _vllm_config(base_model_name_or_path: str | None, rank: int, target_modules: list[str]) -> dict:
    """adapter_config.json: LoRA at rank R, lora_alpha = R so vLLM's scaling alpha / r is 1 (scales are in B)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": target_modules,
        "modules_to_save": None,
    }
