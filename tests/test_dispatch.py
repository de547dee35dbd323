"""The expert_kernel option: auto/triton/torch wired in as transformers experts implementations."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported anywhere: its CPU interpreter

import importlib.util

import pytest

from conftest import tiny_olmoe
from hellora_pl.adapters import AdapterPlan, LayerPlan, inject_adapters
from hellora_pl.callbacks import HotExpertInjectionCallback
from hellora_pl.kernels import dispatch, expert_kernel_of

HAS_TRITON = importlib.util.find_spec("triton") is not None


def plan_for(model, hot=((0, [1, 3]), (1, [0, 2, 5]))):
    return AdapterPlan(
        method="hellora",
        architecture="olmoe",
        num_experts=model.config.num_experts,
        top_k=model.config.num_experts_per_tok,
        policy={"name": "fixed"},
        rank=4,
        alpha=8,
        layers=[LayerPlan(layer=index, hot_experts=experts) for index, experts in hot],
        attention_modules=[],
        expert_modules=["gate_up_proj", "down_proj"],
    )


def adapted_model(kernel, seed=0, quantization=None):
    torch.manual_seed(seed)
    model = tiny_olmoe(vocab_size=64).eval()
    if quantization:
        pytest.importorskip("bitsandbytes")
        from hellora_pl.quant import quantize_model

        quantize_model(model, quantization)
    inject_adapters(model, plan_for(model), expert_kernel=kernel)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)  # a non-zero update, so the adapter path matters
    return model


def test_each_choice_sets_its_experts_implementation():
    for kernel, implementation in (("auto", "hellora"), ("torch", "hellora_torch")):
        model = adapted_model(kernel)
        assert model.config._experts_implementation == implementation
        assert expert_kernel_of(model) == kernel


def test_auto_on_cpu_is_the_torch_reference():
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        auto = adapted_model("auto")(input_ids=ids).logits
        reference = adapted_model("torch")(input_ids=ids).logits
    assert torch.equal(auto, reference)  # exactly: auto is the torch path itself, run in this process


def test_triton_where_it_cannot_run_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_forward", lambda: None)
    with pytest.raises(RuntimeError, match=r"expert_kernel 'triton' needs Triton.*pip install hellora_pl\[triton\]"):
        adapted_model("triton")
    with pytest.raises(ValueError, match="Unknown expert_kernel 'trition'; choose one of auto, triton, torch"):
        HotExpertInjectionCallback(expert_kernel="trition")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_whole_model_through_the_triton_seam_matches_torch(quantization):
    """The model needs no other change: its fused experts (16-bit or 4-bit) call the Triton path through transformers."""
    pytest.importorskip("hellora_pl.kernels.triton_host")
    dispatch._triton_forward.cache_clear()
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    triton_model = adapted_model("triton", quantization=quantization)
    torch_model = adapted_model("torch", quantization=quantization)
    assert expert_kernel_of(triton_model) == "triton"
    from hellora_pl.backbones import architecture_for
    from hellora_pl.kernels.triton_host import triton_unsupported_reason

    probe = torch.zeros(1, triton_model.config.hidden_size)
    assert all(
        triton_unsupported_reason(m.experts, probe) is None
        for m in architecture_for(triton_model).moe_layers(triton_model)
    )
    triton_logits = triton_model(input_ids=ids, use_cache=False).logits
    torch_logits = torch_model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(triton_logits, torch_logits, rtol=1e-4, atol=1e-4)
    triton_logits.square().mean().backward()
    torch_logits.square().mean().backward()
    for (name, ours), (_, reference) in zip(triton_model.named_parameters(), torch_model.named_parameters()):
        if ours.requires_grad:
            torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-3, atol=1e-4, msg=name)
