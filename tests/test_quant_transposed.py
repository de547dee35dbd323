"""NF4 on transposed experts (gpt_oss: [E, H, 2I] interleaved gate/up, biases, clamped SwiGLU).

NF4 holds the logical [E, out, in] orientation; the oracle is the same model with every quantized
tensor replaced by its fp32 dequantization in the stored orientation (still is_transposed), run
through the same adapted expert path.
"""

import copy

import pytest
import torch

pytest.importorskip("bitsandbytes")

from conftest import today_twins  # noqa: E402
from hellora_pl.adapters import adapter_state_dict, build_plan, inject_adapters  # noqa: E402
from hellora_pl.backbones import BackboneConfig, architecture_for  # noqa: E402
from hellora_pl.kernels.layout import ExpertLayout  # noqa: E402
from hellora_pl.loading import load_backbone  # noqa: E402
from hellora_pl.quant import NF4Weight, quantize_model  # noqa: E402
from hellora_pl.quant.model import quantization_targets  # noqa: E402
from hellora_pl.routing import RoutingProfile, TopKPerLayer  # noqa: E402



TODAY_TWINS = today_twins()

# Both models multiply the same fp32 weights (NF4 dequantized); only summation order may differ.
ATOL, RTOL = 1e-5, 1e-5


def tiny_gpt_oss(quantization=None, dtype="float32"):
    model_type, fields = TODAY_TWINS["gpt_oss"]
    config = BackboneConfig(
        model_type=model_type, config=dict(fields), seed=0, dtype=dtype, attn_implementation="eager"
    )
    config.quantization = quantization
    model = load_backbone(config)
    if quantization is None:  # transformers initializes expert biases to zero: give them values to check
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("_proj_bias") and "experts" in name:
                    param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    return model


def nf4_of(target) -> NF4Weight:
    """The NF4 storage that replaced `target` (taken before quantizing) in its model."""
    if target.kind == "linear":
        return getattr(target.owner, target.attr).weight_nf4
    if target.kind == "router":
        return target.owner.parametrizations.weight[0].weight_nf4
    return getattr(target.owner, target.attr)


def quantized_and_dequantized_twin():
    """Tiny gpt_oss in NF4, and a dense copy holding exactly the fp32 values its NF4 storage decodes to."""
    model = tiny_gpt_oss()
    reference = copy.deepcopy(model)
    targets, reference_targets = quantization_targets(model), quantization_targets(reference)
    assert any(t.transposed for t in targets) and all(t.transposed for t in targets if t.kind == "experts")
    quantize_model(model, "nf4")
    with torch.no_grad():
        for target, ref in zip(targets, reference_targets, strict=True):
            dense = getattr(ref.owner, ref.attr).weight if ref.kind == "linear" else getattr(ref.owner, ref.attr)
            decoded = ref.logical(nf4_of(target).dequantize())  # back to the stored orientation
            assert decoded.shape == dense.shape
            dense.copy_(decoded)
    return model, reference


def portable(tensors: dict) -> dict:
    """Names without the router's parametrization index (NF4 is parametrization 0 on a 4-bit router)."""
    return {n.split("parametrizations")[0] + n.rsplit(".", 1)[-1]: t for n, t in tensors.items()}


def hellora_plan(model):
    arch = architecture_for(model)
    layers = [moe.index for moe in arch.moe_layers(model)]
    counts = torch.arange(8).flip(0).repeat(len(layers), 1) + 1  # experts 0 and 1 hot in every layer
    profile = RoutingProfile(layers, counts, counts.double() / 2, int(counts.sum()) // 2, 2)
    return build_plan(model, TopKPerLayer(), profile, rank=4, alpha=8, router_rank=2)


def test_transposed_experts_quantize_in_logical_orientation():
    model = tiny_gpt_oss()
    layers = architecture_for(model).moe_layers(model)
    stored = {id(moe.experts): moe.experts.gate_up_proj.detach().clone() for moe in layers}
    quantize_model(model, "nf4")
    for moe in architecture_for(model).moe_layers(model):
        experts = moe.experts
        assert isinstance(experts.gate_up_proj, NF4Weight) and isinstance(experts.down_proj, NF4Weight)
        layout = ExpertLayout.of(experts)
        assert not layout.transposed and layout.bias and not layout.concatenated  # storage now [E, out, in]
        assert experts.gate_up_proj.shape == (8, 48, 32) and experts.down_proj.shape == (8, 32, 24)
        assert isinstance(experts.gate_up_proj_bias, torch.nn.Parameter) and experts.gate_up_proj_bias.ndim == 2
        # NF4 of the logical weight: within NF4's block error of the stored tensor's transpose.
        logical = stored[id(experts)].transpose(-2, -1)
        error = (experts.gate_up_proj.dequantize() - logical).abs().reshape(-1, 64)
        assert (error <= 0.2 * logical.reshape(-1, 64).abs().amax(1, keepdim=True) + 1e-6).all()


def test_nf4_gpt_oss_matches_its_dequantized_twin_and_trains_only_adapters():
    model, reference = quantized_and_dequantized_twin()
    plan = hellora_plan(model)
    inject_adapters(model, plan, expert_kernel="torch")
    inject_adapters(reference, plan, expert_kernel="torch")
    with torch.no_grad():  # nonzero B everywhere, the same adapter values on both
        generator = torch.Generator().manual_seed(1)
        for tensor in adapter_state_dict(model).values():
            if tensor.is_floating_point():
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator))
        reference_adapters = portable(adapter_state_dict(reference))
        for name, tensor in portable(adapter_state_dict(model)).items():
            reference_adapters[name].copy_(tensor)
    ids = torch.randint(3, 64, (2, 13), generator=torch.Generator().manual_seed(0))

    def run(m):
        m.zero_grad(set_to_none=True)
        logits = m(ids).logits
        logits.square().mean().backward()
        return logits.detach(), portable({n: p.grad for n, p in m.named_parameters() if p.requires_grad})

    logits, grads = run(model)
    ref_logits, ref_grads = run(reference)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=RTOL)
    adapters = portable(adapter_state_dict(model))
    assert grads.keys() == ref_grads.keys() and set(grads) <= adapters.keys()  # gradients only on adapters
    assert any("experts" in n for n in grads)  # expert adapters among them
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(grad, ref_grads[name], atol=ATOL, rtol=RTOL)
    nf4 = [w for w in model.modules() if isinstance(w, NF4Weight)]
    assert nf4 and all(not b.requires_grad for w in nf4 for b in w.buffers())


def test_budget_counts_nf4_for_gpt_oss_experts():
    """The memory estimate's NF4 rule now covers the transposed experts (it refused them before)."""
    from hellora_pl.memory import MemorySettings, quantized_tensor_ids

    model = tiny_gpt_oss()
    ids = quantized_tensor_ids(model, MemorySettings(quantization="nf4", dtype="bfloat16"))
    experts = [moe.experts for moe in architecture_for(model).moe_layers(model)]
    assert all(id(e.gate_up_proj) in ids and id(e.down_proj) in ids for e in experts)
    assert not any(id(e.gate_up_proj_bias) in ids for e in experts)  # biases stay dense


def test_a_16bit_gpt_oss_checkpoint_quantizes_while_loading(tmp_path):
    """The on-load path: transposed experts arrive as [E, in, out] and are stored as their NF4 transpose."""
    from hellora_pl.quant import quantized_storage

    model = tiny_gpt_oss(dtype="bfloat16")
    model.save_pretrained(tmp_path)
    loaded = load_backbone(
        BackboneConfig(pretrained=str(tmp_path), dtype="bfloat16", attn_implementation="eager", quantization="nf4")
    )
    quantize_model(model, "nf4")
    got, want = quantized_storage(loaded), quantized_storage(model)
    assert got.keys() == want.keys() and any("experts.gate_up_proj" in n for n in got)
    assert all(torch.equal(got[n], want[n]) for n in want)
    ids = torch.randint(3, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
