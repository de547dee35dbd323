"""Quantize an MoE causal LM's base to NF4 in place, and report what the quantized tensors hold.

What is quantized: attention projections, shared-expert linears, routers and fused expert
tensors (the bulk of an MoE; gated or ungated, with or without a post-expert norm; expert biases stay
dense). Embeddings, norms and the LM head stay 16-bit, as in QLoRA. Adapters injected afterwards are
ordinary bf16/fp32 tensors on top.

Transposed experts (transformers' `is_transposed`, [E, in, out]: gpt_oss, aria) are quantized in the
logical [E, out, in] orientation, so the NF4 expert path reads them like any other stack; once both
projections are NF4 the experts module's `is_transposed` is set to False, since that flag describes
how the module stores its tensors and the storage is now [E, out, in]. Interleaved gate/up rows keep
their order (the transpose moves no row), so the experts' own `_apply_gate` still reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..backbones import architecture_for
from ..kernels import use_adapted_experts
from .nf4 import BLOCKSIZE, NF4Dequantize, NF4Linear, NF4Weight, check_quantization

QUANTIZED_ATTR = "hellora_quantization"


@dataclass(frozen=True)
class QuantTarget:
    """One frozen base tensor that 4-bit storage replaces.

    `name` is the tensor's name in the model's state dict. `kind` says how it is swapped:
    "linear" (the nn.Linear `attr` of `owner` becomes an NF4Linear), "router" (the bare weight of
    the router `owner`, reached through a parametrization) or "experts" (the fused tensor `attr`
    of the experts module `owner`).
    """

    name: str
    owner: nn.Module
    attr: str
    kind: str
    role: str
    transposed: bool = False  # a fused experts tensor stored [E, in, out]: quantized as its transpose

    def logical(self, dense: torch.Tensor) -> torch.Tensor:
        """`dense` as stored, in the orientation NF4 storage holds ([E, out, in] for experts); a view."""
        return dense.transpose(-2, -1) if self.transposed else dense


def quantization_targets(model: nn.Module) -> list[QuantTarget]:
    """Attention projections, shared-expert linears, routers and fused experts, in layer order.

    Works on a model on the meta device too (the loader asks before any weight exists).
    """
    arch = architecture_for(model)
    if not arch.fused:
        raise NotImplementedError(
            f"{arch.name} keeps its experts in an nn.ModuleList; NF4 quantization handles fused experts "
            "([E, out, in] tensors, transformers 5) only so far. Set quantization to null for this model."
        )
    module_names = {id(module): name for name, module in model.named_modules()}
    moe_by_layer = {moe.index: moe for moe in arch.moe_layers(model)}
    targets: list[QuantTarget] = []

    def add(owner: nn.Module, attr: str, kind: str, role: str, transposed: bool = False) -> None:
        tensor_owner = getattr(owner, attr) if kind == "linear" else owner
        tensor_attr = "weight" if kind in ("linear", "router") else attr
        name = f"{module_names[id(tensor_owner)]}.{tensor_attr}"
        targets.append(QuantTarget(name, owner, attr, kind, role, transposed))

    def add_linears(parent: nn.Module, names, role: str) -> None:
        for name in names:
            if isinstance(getattr(parent, name, None), nn.Linear):
                add(parent, name, "linear", role)

    for index, layer in enumerate(arch.decoder_layers(model)):
        mixer = arch.layer_mixer(layer)  # each layer type's own projections (hybrid decoders)
        if mixer is not None:
            add_linears(layer.get_submodule(mixer[0]), mixer[1], "attention")
        moe = moe_by_layer.get(index)
        if moe is None:
            continue
        if moe.shared is not None:
            add_linears(moe.shared, arch.shared_expert_projections, "shared_experts")
        if isinstance(moe.router, nn.Linear):  # at a dotted path in the block too (gemma4: router.proj)
            parent, _, leaf = arch.router.rpartition(".")
            add(moe.block.get_submodule(parent), leaf, "linear", "router")
        else:
            add(moe.router, "weight", "router", "router")
        # Biases stay dense; ungated and post-norm experts quantize as is; transposed ones as their transpose.
        # The flag itself, not ExpertLayout.of: after loading with on-the-fly quantization the expert
        # tensors are empty placeholders, which the layout's shape checks (rightly) refuse.
        transposed = bool(getattr(moe.experts, "is_transposed", False))
        for name in arch.expert_projections:
            add(moe.experts, name, "experts", "experts", transposed)
    return targets


def quantized_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The base tensors 4-bit storage replaces (`quantization_targets`), as parameters of `model`;
    the one rule the memory estimate and the budget count NF4 bytes by (meta models too)."""
    return [model.get_parameter(target.name) for target in quantization_targets(model)]


def quantize_model(
    model: nn.Module,
    quantization: str | None,
    blocksize: int = BLOCKSIZE,
    prequantized: dict[str, NF4Weight] | None = None,
) -> dict[str, int]:
    """Replace the base's large frozen tensors by NF4 storage, one tensor at a time; returns bytes before and after.

    Each dense tensor is dropped as soon as its NF4 copy exists, so peak memory grows by one
    tensor, not one model. `prequantized` maps state-dict names to NF4 weights made while loading
    (`hellora_pl.quant.loading`); those targets hold only placeholders and take the given weight.
    The fused experts then run hellora's adapted expert path (torch, or Triton on CUDA).
    """
    if not check_quantization(quantization):
        return {"bytes_before": 0, "bytes_after": 0}
    if getattr(model, QUANTIZED_ATTR, None):
        raise RuntimeError(f"This model is already quantized ({getattr(model, QUANTIZED_ATTR)}).")
    double_quant = quantization == "nf4-dq"
    prequantized = dict(prequantized or {})
    before = after = 0
    targets = quantization_targets(model)
    for target in targets:
        if target.kind == "router" and parametrize.is_parametrized(target.owner, "weight"):
            raise RuntimeError("Quantize the model before injecting adapters: this router is already parametrized.")
        dense = _dense_tensor(target)
        quantized = prequantized.pop(target.name, None)
        if quantized is None:
            quantized = NF4Weight(target.logical(dense), double_quant, blocksize, target.role)
        before += quantized.numel() * quantized.dtype.itemsize
        after += quantized.nbytes()
        _install(target, quantized, dense)
    if prequantized:
        raise RuntimeError(f"Quantized weights without a place in the model: {sorted(prequantized)[:5]}")
    for experts in {id(t.owner): t.owner for t in targets if t.transposed}.values():
        experts.is_transposed = False  # its NF4 stacks hold [E, out, in] (see the module docstring)

    use_adapted_experts(model, "auto")
    setattr(model, QUANTIZED_ATTR, quantization)
    return {"bytes_before": before, "bytes_after": after}


def _dense_tensor(target: QuantTarget):
    if target.kind == "linear":
        return getattr(target.owner, target.attr).weight
    return getattr(target.owner, target.attr)


def _install(target: QuantTarget, quantized: NF4Weight, dense) -> None:
    if target.kind == "linear":
        linear = getattr(target.owner, target.attr)
        setattr(target.owner, target.attr, NF4Linear(linear, weight_nf4=quantized))
    elif target.kind == "router":
        router = target.owner
        del router.weight
        # The placeholder keeps parametrize's bookkeeping; the storage lives in the parametrization.
        router.weight = nn.Parameter(dense.new_empty(0, dtype=quantized.packed.dtype), requires_grad=False)
        parametrize.register_parametrization(router, "weight", NF4Dequantize(quantized), unsafe=True)
    else:
        delattr(target.owner, target.attr)
        setattr(target.owner, target.attr, quantized)


def quantized_bytes(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per role (experts, attention, router, shared_experts): parameters, bytes held, bytes per parameter."""
    report: dict[str, dict[str, float]] = {}
    for module in model.modules():
        if isinstance(module, NF4Weight):
            entry = report.setdefault(module.role or "other", {"params": 0, "bytes": 0})
            entry["params"] += module.numel()
            entry["bytes"] += module.nbytes()
    for entry in report.values():
        entry["bytes_per_param"] = entry["bytes"] / entry["params"]
    return report


def quantized_storage(model: nn.Module) -> dict[str, object]:
    """Every NF4 buffer by name (for checking that training left the base untouched)."""
    names = {id(m) for m in model.modules() if isinstance(m, NF4Weight)}
    return {
        f"{prefix}.{name}": buffer
        for prefix, module in model.named_modules()
        if id(module) in names
        for name, buffer in module.named_buffers(recurse=False)
    }
