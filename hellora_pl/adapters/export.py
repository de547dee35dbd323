"""Export an adapted model for use without hellora_pl: as a PEFT LoRA adapter, or merged.

`export_peft` writes `adapter_config.json` + `adapter_model.safetensors` that PEFT (0.21) loads on
the same base model with `PeftModel.from_pretrained(base, directory)` and that computes the same
function as the injected model. PEFT's layout, checked numerically in tests/test_export.py:

- nn.Linear targets (attention, shared experts, the experts of an nn.ModuleList layout) go through
  `target_modules`, by full module name: `<module>.lora_A.weight` [r, in], `<module>.lora_B.weight`
  [out, r].
- Fused experts ([E, out, in] tensors, or [E, in, out] with `is_transposed`, which PEFT reads too)
  go through `target_parameters` (`<experts>.gate_up_proj` or `up_proj`, `<experts>.down_proj`).
  A and B are in the logical (out, in) orientation either way. PEFT always adapts all E experts:
  `lora_A.weight` is [r*E, in] and views as (E, r, in), expert slowest; `lora_B.weight` is
  [out, r*E] and views as (out, r, E), expert fastest. Several targets on one experts module nest
  in the order the module registers its parameters (not the order listed): the first registered
  (`gate_up_proj`) is the innermost, so its keys are `<experts>.base_layer.lora_*.weight` and the
  last one's are `<experts>.lora_*.weight`.
- The router's bare `weight` [E, H] goes through `target_parameters` too (`<router>.weight`):
  PEFT treats a 2D parameter as one "expert", `lora_A.weight` [r, H], `lora_B.weight` [E, r], and
  adds scale * B @ A to the weight for the router's forward, which is what `RouterLoRA` does.

One rank R (the largest rank in use) serves every target: smaller ranks are padded with zero rows of
A and zero columns of B, cold experts get zero A and B, and B is exported as our scale * B_eff
(LoRI mask and DR-LoRA active ranks applied), so PEFT's scaling is lora_alpha / r = 1.

Limits: the file reproduces the adapted model's function, not its training state. Cold experts and
DR-LoRA's inactive rank slices are zero in both A and B, so training on in PEFT gives them no
gradient; LoRI's mask and frozen A are not carried over; dropout is not exported (PEFT's parameter
targets refuse it). PEFT runs fused experts by building W + BA for every expert on each forward,
which is slower than hellora_pl's adapted expert path: benchmarks/train_throughput.py measures
both on the same model (results in benchmarks/results/train_throughput_*.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..backbones import architecture_for
from .at_sites import adapters_at_sites
from .experts import ExpertLoRA
from .inject import is_injected
from .merge import merge_adapters
from .plan import AdapterPlan
from .sites import adapter_sites

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> the transformers model


def _check_directory(directory: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty directory unless `overwrite`; nothing is created yet."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"Export target {str(directory)!r} exists and is not a directory.")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Export directory {str(directory)!r} is not empty; give an empty or new directory, or pass "
            "overwrite=True to write into it (files of the same names are replaced, others are kept)."
        )
    return directory


def _pad_lora(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, in], B [out, r] -> A [R, in], B [out, R]: zero rows / columns beyond r, or slices beyond R
    dropped (only where B is zero there: DR-LoRA's inactive ranks)."""
    keep = _kept_rank(b, rank)
    padded_a = a.new_zeros(rank, a.shape[-1])
    padded_b = b.new_zeros(b.shape[-2], rank)
    padded_a[:keep] = a[:keep]
    padded_b[:, :keep] = b[:, :keep]
    return padded_a, padded_b


def _kept_rank(b: torch.Tensor, rank: int) -> int:
    """How many rank slices of B [..., out, r] fit in R; those cut off must be inactive (zero)."""
    keep = min(rank, b.shape[-1])
    if bool(b[..., keep:].any()):
        raise RuntimeError(f"Export rank {rank} would cut off active rank slices of an adapter; this is a bug.")
    return keep


def _fused_lora(adapter: ExpertLoRA, name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's tensors for one fused projection: A [R*E, in] (E, R, in) and B [out, R*E] (out, R, E)."""
    a = adapter.lora_A[name].detach()  # [n_hot, r_alloc, in]
    b = (adapter.scale * adapter.effective_B(name)).detach()  # [n_hot, out, r_alloc], zero beyond active ranks
    keep = _kept_rank(b, rank)  # slices beyond R are inactive in every expert (B_eff is zero there)
    experts, out_features, in_features = adapter.num_experts, b.shape[1], a.shape[2]
    hot = adapter.hot_experts.to(a.device)
    peft_a = a.new_zeros(experts, rank, in_features)
    peft_b = b.new_zeros(out_features, rank, experts)
    peft_a[hot, :keep] = a[:, :keep]
    peft_b[:, :keep, hot] = b[:, :, :keep].permute(1, 2, 0)
    return peft_a.reshape(experts * rank, in_features), peft_b.reshape(out_features, rank * experts)


def _expert_rank_in_use(adapter: ExpertLoRA) -> int:
    if adapter.lora_active_rank is None:
        return adapter.rank
    return int(adapter.lora_active_rank.max())


@dataclass
class _CollectedAdapters:
    """The injected adapters, by PEFT target kind, as `export_peft` gathers them from the sites.

    linears: module name -> (A [r, in], scaled B [out, r]); routers: router module name -> (A, scaled B);
    fused: experts module name -> the layer's adapter; ranks: the rank in use of each adapter.
    """

    linears: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    routers: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    fused: dict[str, ExpertLoRA] = field(default_factory=dict)
    ranks: list[int] = field(default_factory=list)


def export_peft(
    model: nn.Module,
    plan: AdapterPlan,
    directory: str | Path,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the injected adapters of `model` as a PEFT LoRA adapter in `directory` and return it.

    Load it with `PeftModel.from_pretrained(base, directory)` on the same base model (the one
    `plan` was injected into, without hellora adapters). The model is not modified or copied.
    ESFT plans (full-rank expert deltas) are not LoRA: use `export_merged` for them. Dropout is
    not exported (PEFT's parameter targets do not support it; the adapter is for inference).
    `base_model_name_or_path` defaults to the model's `name_or_path`.
    """
    found = _checked_adapters(model, plan)
    directory = _check_directory(directory, overwrite)
    with torch.no_grad():
        collected = _collect_adapters(model, found)
        rank = max(collected.ranks)
        tensors, target_parameters = _peft_tensors(model, collected, rank)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    config = _peft_config(base_model_name_or_path, rank, sorted(collected.linears), sorted(target_parameters))
    _write_peft(directory, tensors, config, plan.method)
    return directory


def _checked_adapters(model: nn.Module, plan: AdapterPlan) -> list:
    """The (site, adapter) pairs of `plan` in `model`, after refusing what cannot be a PEFT LoRA adapter."""
    if plan.expert_adapter == "full":
        raise ValueError(
            f"The {plan.method!r} plan holds full-rank expert deltas, which are not LoRA and cannot be "
            "exported as a PEFT LoRA adapter; use export_merged(model, directory) to save a merged checkpoint."
        )
    sites = adapter_sites(model, plan)  # checks the plan's architecture and modules against the model
    if not is_injected(model):
        raise ValueError("The model holds no hellora adapters; inject the plan (and load its weights) before export.")
    return adapters_at_sites(model, sites)  # and the injected adapters against the plan's sites


def _collect_adapters(model: nn.Module, found: list) -> _CollectedAdapters:
    """Each site's A and scaled B_eff (linears, routers) or its fused experts adapter, in site order."""
    fused_layout = architecture_for(model).fused
    collected = _CollectedAdapters()
    for site, adapter in found:
        if site.kind == "router":
            collected.routers[site.module] = (adapter.lora_A.detach(), (adapter.scale * adapter.effective_B()).detach())
            collected.ranks.append(adapter.rank)
        elif site.kind != "routed_expert":  # attention and shared-expert linears
            collected.linears[site.path] = (adapter.lora_A.detach(), (adapter.scale * adapter.effective_B()).detach())
            collected.ranks.append(adapter.rank)
        elif fused_layout:  # 3D parameters: one PEFT target parameter per projection
            # Transposed [E, in, out] storage needs nothing else: PEFT's ParamWrapper reads the module's
            # is_transposed and builds the stored-orientation delta from the same A [R*E, in], B [out, R*E].
            collected.fused[site.module] = adapter
            collected.ranks.append(_expert_rank_in_use(adapter))
        else:  # nn.ModuleList: each hot expert's nn.Linear, by full name
            for slot, expert in enumerate(site.experts):
                b = (adapter.scale * adapter.effective_B(site.name)[slot]).detach()
                collected.linears[f"{site.module}.{expert}.{site.name}"] = (adapter.lora_A[site.name][slot].detach(), b)
            collected.ranks.append(_expert_rank_in_use(adapter))
    return collected


def _peft_tensors(
    model: nn.Module, collected: _CollectedAdapters, rank: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """PEFT's state dict at one rank `rank` (linears, then routers, then fused experts) and its target parameters."""
    tensors: dict[str, torch.Tensor] = {}
    target_parameters: list[str] = []

    def put(module_path: str, a: torch.Tensor, b: torch.Tensor) -> None:
        tensors[f"{_PEFT_PREFIX}{module_path}.lora_A.weight"] = a.to("cpu").contiguous()
        tensors[f"{_PEFT_PREFIX}{module_path}.lora_B.weight"] = b.to("cpu").contiguous()

    for module_name, (a, b) in collected.linears.items():
        put(module_name, *_pad_lora(a, b, rank))
    for router_name, (a, b) in collected.routers.items():
        put(router_name, *_pad_lora(a, b, rank))
        target_parameters.append(f"{router_name}.weight")
    for experts_name, adapter in collected.fused.items():
        order = _fused_nesting_order(model, experts_name, adapter)
        for depth, proj in enumerate(order):
            put(experts_name + ".base_layer" * (len(order) - 1 - depth), *_fused_lora(adapter, proj, rank))
            target_parameters.append(f"{experts_name}.{proj}")
    return tensors, target_parameters


def _fused_nesting_order(model: nn.Module, experts_name: str, adapter: ExpertLoRA) -> list[str]:
    """The adapted projections of a fused experts module, innermost PEFT wrapper first.

    PEFT wraps the targeted parameters in the order the module registers them, each wrapper
    around the previous one: the first registered is the innermost base_layer.
    """
    registered = [p for p, _ in model.get_submodule(experts_name).named_parameters(recurse=False)]
    order = [p for p in registered if p in adapter.projections]
    missing = sorted(set(adapter.projections) - set(order))
    if missing:
        raise ValueError(f"{experts_name} has no parameters {missing} to export.")
    return order


def _peft_config(
    base_model_name_or_path: str | None, rank: int, target_modules: list[str], target_parameters: list[str]
) -> dict:
    """adapter_config.json: LoRA at rank R with lora_alpha = R (scaling 1: our scales are folded into B)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": rank,  # scaling 1: our scales are folded into B
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": target_modules,
        "target_parameters": target_parameters,
        "modules_to_save": None,
    }


def _write_peft(directory: Path, tensors: dict[str, torch.Tensor], config: dict, method: str) -> None:
    """Write adapter_model.safetensors and adapter_config.json into `directory` (created if need be)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        tensors,
        str(directory / PEFT_WEIGHTS_FILE),
        metadata={"format": "pt", "exported_by": "hellora_pl", "method": method},
    )
    (directory / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def export_merged(
    model: nn.Module,
    directory: str | Path,
    overwrite: bool = False,
    experts_implementation: str = "grouped_mm",
    plan: AdapterPlan | None = None,
) -> Path:
    """Merge every hellora adapter into `model` and `save_pretrained` it to `directory`; return it.

    This modifies `model` in place: afterwards it is the merged base model, with no adapters (the
    experts implementation is reset to `experts_implementation`). The checkpoint has the original
    parameter names and loads with `AutoModelForCausalLM.from_pretrained` without hellora_pl (a
    model class that is not in transformers, such as tiny_deepseek_moe, needs its registration).
    Works for every method, ESFT's full-rank expert deltas included. `plan`: the plan injected into
    `model`, checked against its adapters before merging (see `merge_adapters`).
    """
    directory = _check_directory(directory, overwrite)
    merge_adapters(model, experts_implementation=experts_implementation, plan=plan)
    model.save_pretrained(directory)
    return directory
