"""Quantize an MoE causal LM's base to NF4 in place, and report what the quantized tensors hold.

What is quantized: attention projections, shared-expert linears, routers and fused expert
tensors (the bulk of an MoE). Embeddings, norms and the LM head stay 16-bit, as in QLoRA.
Adapters injected afterwards are ordinary bf16/fp32 tensors on top.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from ..backbones import architecture_for
from .nf4 import BLOCKSIZE, NF4Dequantize, NF4Linear, NF4Weight, check_quantization

QUANTIZED_ATTR = "hellora_quantization"


def quantize_model(model: nn.Module, quantization: str | None, blocksize: int = BLOCKSIZE) -> dict[str, int]:
    """Replace the base's large frozen tensors by NF4 storage, layer by layer; returns bytes before and after.

    Each dense tensor is dropped as soon as its NF4 copy exists, so peak memory grows by one
    tensor, not one model. The fused experts then run hellora's torch expert path (the only one
    that reads NF4 experts so far).
    """
    if not check_quantization(quantization):
        return {"bytes_before": 0, "bytes_after": 0}
    if getattr(model, QUANTIZED_ATTR, None):
        raise RuntimeError(f"This model is already quantized ({getattr(model, QUANTIZED_ATTR)}).")
    arch = architecture_for(model)
    if not arch.fused:
        raise NotImplementedError(
            f"{arch.name} keeps its experts in an nn.ModuleList; NF4 quantization handles fused experts "
            "([E, out, in] tensors, transformers 5) only so far. Set quantization to null for this model."
        )
    double_quant = quantization == "nf4-dq"
    moe_by_layer = {moe.index: moe for moe in arch.moe_layers(model)}
    before = after = 0

    def swap_linear(parent: nn.Module, name: str, role: str) -> None:
        nonlocal before, after
        linear = getattr(parent, name, None)
        if not isinstance(linear, nn.Linear) or isinstance(linear, NF4Linear):
            return
        before += linear.weight.numel() * linear.weight.element_size()
        quantized = NF4Linear(linear, double_quant, blocksize, role)
        setattr(parent, name, quantized)
        after += quantized.weight_nf4.nbytes()

    for index, layer in enumerate(arch.decoder_layers(model)):
        attention = arch.attention_module(layer)
        for name in arch.attention_projections:
            swap_linear(attention, name, "attention")
        moe = moe_by_layer.get(index)
        if moe is None:
            continue
        if moe.shared is not None:
            for name in arch.shared_expert_projections:
                swap_linear(moe.shared, name, "shared_experts")
        if isinstance(moe.router, nn.Linear):
            swap_linear(moe.block, arch.router, "router")
        else:
            b, a = _quantize_router(moe.router, double_quant, blocksize)
            before, after = before + b, after + a
        b, a = _quantize_experts(moe.experts, arch.expert_projections, double_quant, blocksize)
        before, after = before + b, after + a

    from ..kernels import use_adapted_experts

    use_adapted_experts(model, "torch")
    setattr(model, QUANTIZED_ATTR, quantization)
    return {"bytes_before": before, "bytes_after": after}


def _quantize_router(router: nn.Module, double_quant: bool, blocksize: int) -> tuple[int, int]:
    if parametrize.is_parametrized(router, "weight"):
        raise RuntimeError("Quantize the model before injecting adapters: this router is already parametrized.")
    weight = router.weight
    quantized = NF4Weight(weight, double_quant, blocksize, "router")
    before = weight.numel() * weight.element_size()
    # The placeholder keeps parametrize's bookkeeping; the storage lives in the parametrization.
    del router.weight
    router.weight = nn.Parameter(weight.new_empty(0, dtype=quantized.packed.dtype), requires_grad=False)
    parametrize.register_parametrization(router, "weight", NF4Dequantize(quantized), unsafe=True)
    return before, quantized.nbytes()


def _quantize_experts(experts: nn.Module, names, double_quant: bool, blocksize: int) -> tuple[int, int]:
    if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False):
        raise NotImplementedError(
            f"{type(experts).__name__} stores biased or transposed expert weights, which NF4 experts do not handle yet."
        )
    before = after = 0
    for name in names:
        weight = getattr(experts, name)
        quantized = NF4Weight(weight, double_quant, blocksize, "experts")
        before += weight.numel() * weight.element_size()
        delattr(experts, name)
        setattr(experts, name, quantized)
        after += quantized.nbytes()
    return before, after


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
