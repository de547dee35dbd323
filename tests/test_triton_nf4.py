"""The Triton expert path on 4-bit (NF4) experts against the torch reference on the same NF4 module.

The Triton path dequantizes only the experts a batch routes to, just before each kernel, and again
in backward; nothing dense is saved. Without CUDA the kernels run under Triton's interpreter (set
here before the kernels module is imported, as in test_triton_kernels.py), so shapes stay small:
H = 64 and I = 32 make every expert matrix a whole number of NF4 blocks of 64.

Tolerance: the largest difference over the largest reference value, 1e-4 in fp32 (both sides
multiply the same dequantized weights), 4e-2 in bf16 on CUDA against an fp32 reference that
dequantizes the same codes to fp32.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
pytest.importorskip("bitsandbytes")

from test_triton_kernels import CUDA_ONLY, DEVICE, PROJECTIONS, make_layer, one_expert_index, run  # noqa: E402

from hellora_pl.kernels.reference import adapted_experts_forward  # noqa: E402
from hellora_pl.kernels.triton_host import (  # noqa: E402
    build_routing,
    triton_adapted_experts_forward,
    triton_available,
    triton_unsupported_reason,
)
from hellora_pl.quant import NF4Weight  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton can run neither on CUDA nor interpreted")

HIDDEN, INTERMEDIATE, NUM_EXPERTS = 64, 32, 5
DENSE_SHAPES = {(2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)}  # one expert's gate_up and down
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 4e-2}
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=CUDA_ONLY)]
DTYPE_IDS = ["fp32", "bf16-cuda"]
QUANTIZATIONS = ["nf4", "nf4-dq"]
ADAPTERS = {"hot-lora": (0, 2, 3), "no-adapter": None}
ROUTINGS = {
    # k = 1, every token to expert 2 (hot with the adapter): experts 0, 1, 3 and 4 unused.
    "k1-one-expert": {"num_tokens": 37, "index": one_expert_index(37, 2)},
    # k = 2 over experts 1, 3 and 4 only: a cold, a hot and a cold expert, hot expert 0 unused.
    "k2-three-experts": {"num_tokens": 19, "index": torch.tensor([[3, 1], [4, 3], [1, 4]]).repeat(7, 1)[:19]},
    # k = 2 at random: every expert has rows, so each projection is dequantized whole.
    "k2-all-experts": {"num_tokens": 23, "top_k": 2},
}
USED = {"k1-one-expert": [2], "k2-three-experts": [1, 3, 4], "k2-all-experts": None}


def nf4_layer(quantization, hot, routing, dtype=torch.float32):
    """Small OLMoE experts with both projections in NF4, an ExpertLoRA on `hot` (or none), and a routing."""
    experts, lora, hidden, index, weights = make_layer(
        **ROUTINGS[routing], hidden=HIDDEN, intermediate=INTERMEDIATE, num_experts=NUM_EXPERTS, hot=hot, dtype=dtype
    )
    for name in PROJECTIONS:
        quantized = NF4Weight(getattr(experts, name), double_quant=quantization == "nf4-dq", role="experts")
        delattr(experts, name)
        setattr(experts, name, quantized)
    return experts, lora, hidden, index, weights


def fp32_twin(experts):
    """A copy that dequantizes the same codes to fp32 and holds fp32 adapters: the reference's module."""
    twin = copy.deepcopy(experts).float()
    for name in PROJECTIONS:
        getattr(twin, name).dtype = torch.float32
    return twin


def relative_error(got, want):
    want = want.float()
    return ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def used_experts(index):
    return sorted(set(index.reshape(-1).tolist()))


def record_dequantize(monkeypatch):
    """Patch NF4Weight.dequantize to log (shape, index as a list or None, dtype) of every call."""
    calls = []
    original = NF4Weight.dequantize

    def recording(self, index=None, dtype=None):
        calls.append((tuple(self.shape), None if index is None else index.tolist(), dtype))
        return original(self, index, dtype)

    monkeypatch.setattr(NF4Weight, "dequantize", recording)
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_nf4_triton_matches_torch_reference(quantization, adapter, routing, dtype):
    """Output, dX, d(routing weights) and dA, dB of both projections equal the reference on the same NF4 module."""
    experts, lora, hidden, index, weights = nf4_layer(quantization, ADAPTERS[adapter], routing, dtype)
    assert triton_unsupported_reason(experts, hidden) is None
    if routing == "k2-all-experts":
        assert used_experts(index) == list(range(NUM_EXPERTS))
    reference = experts if dtype == torch.float32 else fp32_twin(experts)
    grad_out = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    out, grads = run(triton_adapted_experts_forward, experts, hidden, index, weights, grad_out)
    want, want_grads = run(adapted_experts_forward, reference, hidden.float(), index, weights, grad_out)
    names = ["output", "dX", "d(top_k_weights)"]
    if lora is not None:
        names += [n for n, p in lora.named_parameters() if p.requires_grad]
        assert len(names) == 3 + 2 * len(PROJECTIONS)  # lora_A and lora_B of gate_up_proj and down_proj
    assert out.dtype == dtype and len(grads) == len(want_grads) == len(names) - 1
    worst = 0.0
    for name, got, ref in zip(names, [out, *grads], [want, *want_grads]):
        assert got.shape == ref.shape, name
        assert ref.abs().max() > 0, f"{name}: the reference is zero, the comparison would be empty"
        error = relative_error(got, ref)
        assert error <= TOLERANCES[dtype], f"{name}: relative error {error:.3g}"
        worst = max(worst, error)
    with torch.no_grad():
        inference = triton_adapted_experts_forward(experts, hidden, index, weights)  # the path that saves nothing
    torch.testing.assert_close(inference, out.detach(), atol=0, rtol=0)
    print(f"\n{quantization} {adapter} {routing} {dtype}: largest relative error {worst:.3g}")  # shown with -s


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_only_used_experts_are_dequantized_forward_and_backward(monkeypatch, quantization, routing, dtype):
    """Each projection dequantizes the used experts (all at once when all are used), once forward, once backward."""
    experts, _, hidden, index, weights = nf4_layer(quantization, ADAPTERS["hot-lora"], routing, dtype)
    calls = record_dequantize(monkeypatch)
    out = triton_adapted_experts_forward(experts, hidden.requires_grad_(), index, weights)
    gate_up, down = (tuple(getattr(experts, name).shape) for name in PROJECTIONS)
    used = USED[routing]
    assert used is None or used == used_experts(index)
    assert calls == [(gate_up, used, dtype), (down, used, dtype)]  # forward
    out.backward(torch.randn_like(out))
    assert calls[2:] == [(down, used, dtype), (gate_up, used, dtype)]  # backward: dequantized again
    assert hidden.grad is not None


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_no_dense_expert_weight_is_saved_for_backward(quantization, dtype):
    """Neither the saved tensors nor the context hold a float tensor shaped like an expert weight."""
    experts, _, hidden, index, weights = nf4_layer(quantization, ADAPTERS["hot-lora"], "k2-three-experts", dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = triton_adapted_experts_forward(experts, hidden.requires_grad_(), index, weights)
    assert saved

    def expert_shaped(t):
        return t.is_floating_point() and t.ndim >= 2 and tuple(t.shape[-2:]) in DENSE_SHAPES

    assert not [tuple(t.shape) for t in saved if expert_shaped(t)]
    args = out.grad_fn.args  # the context's non-tensor state: the weights are the NF4 modules themselves
    assert args.w_gate_up is experts.gate_up_proj and args.w_down is experts.down_proj
    held = [v for v in (*vars(args).values(), *vars(args.routing).values()) if isinstance(v, torch.Tensor)]
    assert not [tuple(t.shape) for t in held if expert_shaped(t)]
    out.sum().backward()
    assert hidden.grad is not None


def test_compact_routing_numbers_only_the_used_experts():
    """With compact=True the block table's expert column counts the used experts only, ascending."""
    index = torch.tensor([[6, 1], [1, 3], [6, 3]] * 7)
    plain = build_routing(index, 8, torch.tensor([3, 0]), block_m=16)
    compact = build_routing(index, 8, torch.tensor([3, 0]), block_m=16, compact=True)
    assert plain.num_used == compact.num_used == 3 and plain.used_experts is None
    assert compact.used_experts.tolist() == [1, 3, 6]
    assert torch.equal(compact.used_experts[compact.blocks[:, 0].long()], plain.blocks[:, 0].long())
    assert torch.equal(compact.blocks[:, 1:], plain.blocks[:, 1:]) and torch.equal(compact.pair, plain.pair)
    everyone = build_routing(torch.arange(8).view(4, 2), 8, None, block_m=16, compact=True)
    assert everyone.num_used == 8 and everyone.used_experts is None  # all used: the whole stack, one call
