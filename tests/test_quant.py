"""NF4 base weights: the expert path against an fp32 dequantize-then-reference oracle, memory, training."""

import copy

import pytest
import torch
from lightning.pytorch import Callback

pytest.importorskip("bitsandbytes")

from test_methods import RANK, companions  # noqa: E402

from conftest import RandomTokens, make_trainer  # noqa: E402
from hellora_pl import HelloraModule, HotExpertInjectionCallback, RoutingProfilerCallback  # noqa: E402
from hellora_pl.adapters import METHODS, ExpertDelta, ExpertLoRA, LoRALinear, adapter_state_dict  # noqa: E402
from hellora_pl.adapters.experts import EXPERT_ADAPTER_ATTR  # noqa: E402
from hellora_pl.backbones import BackboneConfig, architecture_for  # noqa: E402
from hellora_pl.backbones.tiny import TINY_CONFIGS  # noqa: E402
from hellora_pl.kernels import adapted_experts_forward  # noqa: E402
from hellora_pl.loading import load_backbone  # noqa: E402
from hellora_pl.quant import NF4Linear, NF4Weight, quantize_model, quantized_bytes, quantized_storage  # noqa: E402
from hellora_pl.quant.nf4 import _codes  # noqa: E402

# Both sides multiply the same fp32 dequantized weights; only summation order may differ.
ATOL, RTOL = 1e-5, 1e-5


def tiny_mixtral(quantization=None, seed=0):
    config = BackboneConfig(model_type="mixtral", config=dict(TINY_CONFIGS["mixtral"][1]), seed=seed)
    config.quantization = quantization
    return load_backbone(config)


def independent_decode(weight: NF4Weight) -> torch.Tensor:
    """NF4 by its definition: code[nibble] * absmax of the block, high nibble first."""
    nf4, _ = _codes(weight.device)
    packed = weight.packed.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 15], -1).reshape(-1).long()
    return (nf4[codes].view(-1, weight.blocksize) * weight.absmax_fp32().reshape(-1, 1)).view(weight.shape)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(8, 48, 32), (4, 32, 24), (32, 128)])
def test_storage_decodes_as_nf4_and_subsets_match(shape, double_quant):
    torch.manual_seed(0)
    dense = torch.randn(shape)
    weight = NF4Weight(dense, double_quant)
    full = weight.dequantize()
    assert full.shape == dense.shape and full.dtype == torch.float32
    assert torch.equal(full, independent_decode(weight))  # one fp32 product per value, no reduction: exact
    blocks = dense.reshape(-1, 64).abs().amax(1, keepdim=True)  # NF4's widest gap is < 0.35 of a block's absmax
    assert ((full - dense).reshape(-1, 64).abs() <= 0.2 * blocks + 0.02).all()
    if len(shape) == 3:
        index = torch.tensor([shape[0] - 1, 1])
        assert torch.equal(weight.dequantize(index), full[index])


def quantized_experts(hot, top_k, num_tokens=19, double_quant=False, full=False, seed=0):
    """NF4 experts, the same experts holding their fp32 dequantization, a shared adapter, and a routing."""
    torch.manual_seed(seed)
    model = tiny_mixtral()
    experts = model.model.layers[0].mlp.experts.requires_grad_(False)
    reference = copy.deepcopy(experts)
    for name in ("gate_up_proj", "down_proj"):
        quantized = NF4Weight(getattr(experts, name), double_quant, role="experts")
        delattr(experts, name)
        setattr(experts, name, quantized)
        getattr(reference, name).data = quantized.dequantize()  # the oracle's weights: fp32 dequantized
    lora = None
    if hot:
        shapes = {name: tuple(getattr(reference, name).shape[1:]) for name in ("gate_up_proj", "down_proj")}
        if full:
            lora = ExpertDelta(shapes, 8, hot)
            with torch.no_grad():
                for delta in lora.lora_delta.values():
                    delta.normal_(0, 0.1)
        else:
            lora = ExpertLoRA(shapes, 8, hot, 4, 2.0)
            with torch.no_grad():
                for b in lora.lora_B.values():
                    b.normal_(0, 0.5)
        setattr(experts, EXPERT_ADAPTER_ATTR, lora)
        setattr(reference, EXPERT_ADAPTER_ATTR, lora)
    hidden = torch.randn(num_tokens, 32)
    weights, index = torch.topk(torch.randn(num_tokens, 8).softmax(-1), top_k, dim=-1)
    return experts, reference, lora, hidden, index, weights


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize(
    "hot,top_k,full",
    [([], 2, False), ([0, 3], 2, False), ([5], 1, False), (list(range(8)), 8, False), ([2, 6], 2, True)],
)
def test_nf4_expert_path_matches_fp32_dequantized_reference(hot, top_k, full, double_quant):
    experts, reference, lora, hidden, index, weights = quantized_experts(
        hot, top_k, double_quant=double_quant, full=full
    )
    adapter_params = [] if lora is None else list(lora.parameters())

    def run(module):
        x = hidden.clone().requires_grad_(True)
        w = weights.clone().requires_grad_(True)
        out = adapted_experts_forward(module, x, index, w)
        grads = torch.autograd.grad(out, [x, w, *adapter_params], torch.randn_like(out, generator=_gen()))
        return out, grads

    out, grads = run(experts)
    ref_out, ref_grads = run(reference)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=RTOL)
    assert len(grads) == len(ref_grads)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, atol=ATOL, rtol=RTOL)


def _gen():
    return torch.Generator().manual_seed(3)


def test_only_routed_experts_are_dequantized_and_nothing_dense_is_saved(monkeypatch):
    experts, _, lora, hidden, _, _ = quantized_experts([1, 4], 2, num_tokens=12)
    index = torch.tensor([[1, 4], [4, 6]] * 6)  # experts 1, 4 and 6 only
    weights = torch.full(index.shape, 0.5)
    calls = []
    original = NF4Weight.dequantize

    def recording(self, index=None, dtype=None):
        calls.append(None if index is None else index.tolist())
        return original(self, index, dtype)

    monkeypatch.setattr(NF4Weight, "dequantize", recording)
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    x = hidden.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = adapted_experts_forward(experts, x, index, weights)
    assert calls == [[1, 4, 6], [1, 4, 6]]  # forward: gate_up and down, used experts only
    out.backward(torch.randn_like(out))
    assert calls[2:] == [[1, 4, 6], [1, 4, 6]]  # backward recomputes them for dX
    dense_shapes = {(48, 32), (32, 24)}
    for shape, dtype in saved:
        assert not (dtype.is_floating_point and shape[-2:] in dense_shapes), f"a dense weight {shape} was saved"
    assert x.grad is not None and all(p.grad is not None for p in lora.parameters())


def test_nf4_linear_recomputes_and_matches_dequantized_linear():
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 32, bias=True)
    quantized = NF4Linear(dense, double_quant=True, role="attention")
    assert isinstance(quantized, torch.nn.Linear) and quantized.weight.shape == (32, 64)
    x = torch.randn(3, 5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = quantized(x)
    assert (32, 64) not in saved and (64, 32) not in saved
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(x_ref, quantized.weight, dense.bias.detach())
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), x_ref)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(grad, ref_grad, atol=ATOL, rtol=RTOL)
    wrapped = LoRALinear(quantized, 4, 8.0, dtype=torch.float32)
    torch.testing.assert_close(wrapped(x), out)  # B starts at zero
    with pytest.raises(RuntimeError, match="stored in NF4"):
        wrapped.merged()


def test_quantized_bytes_per_parameter():
    found = {}
    for quantization in ("nf4", "nf4-dq"):
        model = tiny_mixtral(quantization)
        report = quantized_bytes(model)
        assert set(report) == {"experts", "attention", "router"}
        found[quantization] = report["experts"]["bytes_per_param"]
        arch = architecture_for(model)
        assert all(isinstance(getattr(arch.attention_module(layer), n), NF4Linear) for layer in arch.decoder_layers(model)
                   for n in arch.attention_projections_of(model))  # fmt: skip
        assert not any(p.dtype == torch.float32 and p.ndim == 3 for p in model.parameters())  # no dense experts left
    assert found["nf4"] <= 0.6 and found["nf4-dq"] < found["nf4"]
    print(f"bytes per expert parameter: {found}")


def test_quantization_choices_and_layouts_are_checked():
    with pytest.raises(ValueError, match="Unknown quantization 'int4'; choose one of nf4, nf4-dq"):
        tiny_mixtral("int4")
    model = load_backbone(BackboneConfig(model_type="tiny_deepseek_moe", config=dict(TINY_CONFIGS["deepseek_moe"][1])))
    with pytest.raises(NotImplementedError, match="nn.ModuleList"):
        quantize_model(model, "nf4")


@pytest.mark.parametrize("method", METHODS)
def test_four_bit_tiny_mixtral_trains_with_every_method(tmp_path, method):
    config = BackboneConfig(model_type="mixtral", config=dict(TINY_CONFIGS["mixtral"][1]), quantization="nf4")
    module = HelloraModule(config, learning_rate=1e-2, warmup=0)
    storage = {name: t.clone() for name, t in quantized_storage(module.model).items()}
    losses = []

    class Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    injection = HotExpertInjectionCallback(method=method, rank=RANK, alpha=2 * RANK)
    callbacks = [RoutingProfilerCallback(num_batches=2), injection, *companions(method), Losses()]
    make_trainer(tmp_path, 3, callbacks).fit(module, datamodule=RandomTokens())
    model = module.model
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    adapters = adapter_state_dict(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable <= adapters.keys()
    moved = [t for n, t in adapters.items() if t.is_floating_point() and ("lora_B" in n or "lora_delta" in n)]
    assert any(t.abs().sum() > 0 for t in moved)
    after = {name.replace(".base_layer.", "."): t for name, t in quantized_storage(model).items()}
    assert after.keys() == storage.keys() and all(torch.equal(storage[n], after[n]) for n in storage)
    assert set(quantized_bytes(model)) == {"experts", "attention", "router"}


def test_triton_entry_runs_4bit_experts(monkeypatch):
    """The Triton entry dequantizes the routed experts itself: on a 4-bit layer it matches the torch path."""
    pytest.importorskip("triton")
    triton_host = pytest.importorskip("hellora_pl.kernels.triton_host")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # so Triton can run here (its CPU interpreter)
    experts, _, _, hidden, index, weights = quantized_experts([0, 3], 2)
    assert triton_host.triton_unsupported_reason(experts, hidden) is None
    with torch.no_grad():
        got = triton_host.triton_adapted_experts_forward(experts, hidden, index, weights)
        want = adapted_experts_forward(experts, hidden, index, weights)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("direction", ["4bit_to_16bit", "16bit_to_4bit"])
def test_adapters_move_between_4bit_and_16bit_bases(tmp_path, direction):
    """The router LoRA sits after the NF4 parametrization on a 4-bit router: saved names must not depend on it."""
    from hellora_pl.adapters import build_plan, inject_adapters, load_adapter, save_adapter
    from hellora_pl.routing import AllExperts
    from hellora_pl.adapters.router import router_lora

    source_q, target_q = ("nf4", None) if direction == "4bit_to_16bit" else (None, "nf4")
    source = tiny_mixtral(source_q)
    plan = build_plan(source, AllExperts(), None, rank=RANK, alpha=2 * RANK, router_rank=2)
    inject_adapters(source, plan)
    with torch.no_grad():
        for tensor in adapter_state_dict(source).values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor))
    save_adapter(tmp_path, source, plan)
    target = tiny_mixtral(target_q)
    load_adapter(target, tmp_path)

    def router_deltas(model):
        arch = architecture_for(model)
        return [router_lora(moe.router).delta_weight().detach() for moe in arch.moe_layers(model)]

    assert all(torch.equal(a, b) for a, b in zip(router_deltas(source), router_deltas(target), strict=True))
    got = {n.split("parametrizations")[0] + n.rsplit(".", 1)[-1]: t for n, t in adapter_state_dict(target).items()}
    want = {n.split("parametrizations")[0] + n.rsplit(".", 1)[-1]: t for n, t in adapter_state_dict(source).items()}
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


def test_casting_a_4bit_model_changes_its_compute_dtype_not_its_scales():
    """Lightning's bf16-true casts the whole module: NF4 scales must stay fp32 and the router follow the cast."""
    model = tiny_mixtral("nf4", seed=3)
    storage = {name: t.clone() for name, t in quantized_storage(model).items()}
    weights = [w for w in model.modules() if isinstance(w, NF4Weight)]
    dense = [w.dequantize() for w in weights]
    ids = torch.randint(0, 30, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        cast = model.to(torch.bfloat16)(ids).logits
        assert cast.dtype == torch.bfloat16
        assert (cast.float() - reference).abs().max() < 0.05 * reference.abs().max()
        after = quantized_storage(model)
        assert all(after[n].dtype == storage[n].dtype and torch.equal(after[n], storage[n]) for n in storage)
        assert {w.dtype for w in weights} == {torch.bfloat16}
        model.float()  # and back: the 4-bit weights dequantize exactly as before
        assert all(w.dtype == torch.float32 and torch.equal(w.dequantize(), d) for w, d in zip(weights, dense))
