"""The Triton expert path against the torch reference: output, dX, d(routing weights), dA and dB.

Without CUDA the kernels run under Triton's interpreter: TRITON_INTERPRET=1 is set here, before the
kernels module is imported (conftest has already imported Triton through lightning -> torch._dynamo,
which the kernels tolerate). The interpreter is slow: shapes stay tiny, and blocks are 16 rows by 32
columns there, so T * k > 16 and H, I > 32 cross blocks and leave ragged tails.

Tolerances (relative: atol = tol * max(1, max |reference|), rtol = tol). Every dtype is compared
with the fp32 reference on the same weights upcast, so the table bounds our error only.

    dtype      tol    where
    float32    1e-4   interpreter and CUDA (fp32 dots in IEEE precision)
    float16    1e-2   interpreter and CUDA
    bfloat16   4e-2   interpreter (dots upcast to fp32 there: it cannot dot bf16) and CUDA
"""

from __future__ import annotations

import copy
import inspect
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from transformers import OlmoeConfig  # noqa: E402
from transformers.models.olmoe.modeling_olmoe import OlmoeExperts  # noqa: E402

from conftest import naive_experts_forward  # noqa: E402
from hellora_pl.adapters.experts import EXPERT_ADAPTER_ATTR, ExpertDelta, ExpertLoRA, expert_adapter  # noqa: E402
from hellora_pl.kernels.reference import adapted_experts_forward  # noqa: E402
from hellora_pl.kernels.triton_host import (  # noqa: E402
    build_routing,
    triton_adapted_experts_forward,
    triton_available,
    triton_unsupported_reason,
)

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton can run neither on CUDA nor interpreted")

TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
PROJECTIONS = ("gate_up_proj", "down_proj")


def make_layer(
    num_tokens=23,
    hidden=40,
    intermediate=24,
    num_experts=8,
    top_k=2,
    hot=(0, 3),
    rank=4,
    active_ranks=None,
    lori=False,
    dtype=torch.float32,
    adapter_dtype=torch.float32,
    index=None,
    seed=0,
):
    """OLMoE fused experts with an ExpertLoRA on `hot` (None: no adapter), tokens and routing."""
    gen = torch.Generator().manual_seed(seed)
    config = OlmoeConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_experts=num_experts, num_experts_per_tok=top_k
    )
    experts = OlmoeExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=gen) / hidden**0.5)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=gen) / intermediate**0.5)
    experts.requires_grad_(False)
    lora = None
    if hot is not None:
        shapes = {name: tuple(getattr(experts, name).shape[1:]) for name in PROJECTIONS}
        lora = ExpertLoRA(shapes, num_experts, hot, rank, 2.0, active_ranks=active_ranks, lori=lori)
        with torch.no_grad():
            for name in PROJECTIONS:
                a, b = lora.lora_A[name], lora.lora_B[name]
                a.copy_(torch.randn(a.shape, generator=gen) / a.shape[-1] ** 0.5)
                b.copy_(torch.randn(b.shape, generator=gen) * 0.5 / rank**0.5)
                if lori:
                    lora.lora_B_mask[name].copy_(torch.rand(b.shape, generator=gen) < 0.3)
        lora.to(adapter_dtype)
        setattr(experts, EXPERT_ADAPTER_ATTR, lora)
    hidden_states = torch.randn(num_tokens, hidden, generator=gen)
    if index is None:
        scores = torch.randn(num_tokens, num_experts, generator=gen)
        weights, index = torch.topk(scores.softmax(-1), top_k, dim=-1)
    else:
        weights = torch.rand(index.shape, generator=gen)
    experts.to(DEVICE, dtype)
    if lora is not None:
        lora.to(DEVICE, adapter_dtype)
    return experts, lora, hidden_states.to(DEVICE, dtype), index.to(DEVICE), weights.to(DEVICE)


def trainable(experts):
    lora = expert_adapter(experts)
    return [] if lora is None else [p for p in lora.parameters() if p.requires_grad]


def run(fn, experts, hidden, index, weights, grad_out):
    """The output and the gradients of hidden, routing weights and every trainable adapter tensor."""
    hidden = hidden.detach().requires_grad_()
    weights = weights.detach().requires_grad_()
    out = fn(experts, hidden, index, weights)
    inputs = [hidden, weights, *trainable(experts)]
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype), allow_unused=True)
    # the reference leaves adapters that no token reaches out of the graph: their gradient is zero
    return out, [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def assert_near(got, want, dtype, what):
    tol = TOLERANCES[dtype]
    want = want.float()
    atol = tol * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=tol, msg=lambda m: f"{what}: {m}")


def check_against_reference(experts, lora, hidden, index, weights, dtype):
    """Triton on the layer as given vs the fp32 reference on an upcast copy.

    Returns Triton's gradients of the trainable adapter tensors by name (lora_A.gate_up_proj, ...).
    """
    reference = copy.deepcopy(experts).float()
    grad_out = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    out, grads = run(triton_adapted_experts_forward, experts, hidden, index, weights, grad_out)
    want, want_grads = run(adapted_experts_forward, reference, hidden.float(), index, weights, grad_out)
    assert out.dtype == hidden.dtype
    names = ["output", "dX", "d(top_k_weights)"]
    if lora is not None:
        names += [n for n, p in lora.named_parameters() if p.requires_grad]
    assert len(grads) == len(want_grads) == len(names) - 1
    for name, got, ref in zip(names, [out, *grads], [want, *want_grads]):
        assert got.shape == ref.shape, name
        assert_near(got, ref, dtype, name)
    return dict(zip(names[3:], grads[2:]))


def check_empty_hot_slot(lora, grads):
    for name, grad in grads.items():
        assert torch.count_nonzero(grad[0]) == 0, name  # slot 0 = expert 4, which gets no tokens
        assert torch.count_nonzero(grad[1]) > 0, name


def check_inactive_ranks(lora, grads):
    for name in PROJECTIONS:
        for slot, active in enumerate(lora.lora_active_rank.tolist()):
            assert torch.count_nonzero(grads[f"lora_B.{name}"][slot, :, active:]) == 0
            assert torch.count_nonzero(grads[f"lora_A.{name}"][slot, active:]) == 0


def check_lori_mask(lora, grads):
    assert set(grads) == {f"lora_B.{name}" for name in PROJECTIONS}  # LoRI: A frozen
    for name in PROJECTIONS:
        mask, grad = lora.lora_B_mask[name], grads[f"lora_B.{name}"]
        assert torch.count_nonzero(grad[~mask]) == 0 and torch.count_nonzero(grad[mask]) > 0


def one_expert_index(num_tokens, expert):
    return torch.full((num_tokens, 1), expert, dtype=torch.long)


def avoiding(num_tokens, num_experts, top_k, skip, seed=3):
    """Routing that never picks expert `skip`."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(num_tokens, num_experts, generator=gen)
    scores[:, skip] = -torch.inf
    return torch.topk(scores, top_k, dim=-1).indices


CASES = {
    "tokens-fewer-than-a-block": {"num_tokens": 3, "hidden": 24, "intermediate": 20, "hot": (1, 5)},
    "odd-sizes-prime-experts": {"num_tokens": 29, "hidden": 36, "intermediate": 20, "num_experts": 7, "hot": (0, 3, 6)},
    "k1-13-experts": {"num_tokens": 33, "num_experts": 13, "top_k": 1, "hot": (2, 7, 12), "rank": 8},
    "k-equals-E": {"num_tokens": 6, "hidden": 24, "intermediate": 20, "num_experts": 7, "top_k": 7, "hot": (0, 4)},
    "no-hot-experts": {"hot": None},
    "all-hot": {"hidden": 48, "intermediate": 40, "hot": tuple(range(8))},
    "hot-expert-without-tokens": {"num_tokens": 19, "hot": (4, 6), "index": avoiding(19, 8, 2, skip=4)},
    "no-token-reaches-a-hot-expert": {"num_tokens": 9, "hot": (4,), "index": avoiding(9, 8, 2, skip=4)},
    "all-tokens-one-expert": {"num_tokens": 37, "hot": (2, 5), "index": one_expert_index(37, 2)},
    "dr-lora-active-ranks": {"hot": (0, 2, 5), "active_ranks": [1, 3, 4]},
    "lori-mask": {"hot": (1, 2, 7), "rank": 5, "lori": True},
}
CASE_CHECKS = {
    "hot-expert-without-tokens": check_empty_hot_slot,
    "dr-lora-active-ranks": check_inactive_ranks,
    "lori-mask": check_lori_mask,
}
HALF_CASES = ["odd-sizes-prime-experts", "all-hot", "dr-lora-active-ranks"]


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_reference(case):
    experts, lora, *rest = make_layer(**CASES[case])
    grads = check_against_reference(experts, lora, *rest, torch.float32)
    if case in CASE_CHECKS:
        CASE_CHECKS[case](lora, grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", HALF_CASES)
def test_half_precision_matches_reference(case, dtype):
    check_against_reference(*make_layer(**CASES[case], dtype=dtype), dtype)


def test_half_precision_adapters():
    check_against_reference(*make_layer(dtype=torch.float16, adapter_dtype=torch.float16), torch.float16)


@CUDA_ONLY
@pytest.mark.parametrize("case", list(CASES))
def test_bf16_on_cuda_matches_reference(case):
    experts, lora, *rest = make_layer(**CASES[case], dtype=torch.bfloat16)
    grads = check_against_reference(experts, lora, *rest, torch.bfloat16)
    if case in CASE_CHECKS:
        CASE_CHECKS[case](lora, grads)


def test_prime_sizes_match_naive_loop():
    experts, _, hidden, index, weights = make_layer(
        num_tokens=11, hidden=29, intermediate=19, num_experts=5, hot=(1, 3), rank=3, active_ranks=[3, 2]
    )
    grad_out = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    got = run(triton_adapted_experts_forward, experts, hidden, index, weights, grad_out)
    want = run(naive_experts_forward, experts, hidden, index, weights, grad_out)
    for i, (a, b) in enumerate(zip([got[0], *got[1]], [want[0], *want[1]])):
        assert_near(a, b, torch.float32, f"tensor {i}")


def test_cold_tokens_equal_base_and_hot_tokens_change():
    experts, lora, hidden, index, weights = make_layer(num_tokens=40, hot=(0, 3))
    with torch.no_grad():
        adapted = triton_adapted_experts_forward(experts, hidden, index, weights)
        delattr(experts, EXPERT_ADAPTER_ATTR)
        base = triton_adapted_experts_forward(experts, hidden, index, weights)
        reference_base = adapted_experts_forward(experts, hidden, index, weights)
    touches_hot = (index.unsqueeze(-1) == torch.tensor([0, 3], device=DEVICE)).any(-1).any(-1)
    assert touches_hot.any() and (~touches_hot).any()
    torch.testing.assert_close(adapted[~touches_hot], base[~touches_hot], atol=1e-6, rtol=1e-6)
    assert_near(base, reference_base, torch.float32, "base only")
    assert (adapted[touches_hot] - base[touches_hot]).abs().amax(-1).min() > 1e-3


def test_no_grad_forward_matches_autograd_forward():
    experts, _, hidden, index, weights = make_layer()
    with torch.no_grad():
        inference = triton_adapted_experts_forward(experts, hidden, index, weights)
    training = triton_adapted_experts_forward(experts, hidden.requires_grad_(), index, weights)
    torch.testing.assert_close(inference, training.detach(), atol=0, rtol=0)


def test_backward_saves_no_expert_weights():
    experts, _, hidden, index, weights = make_layer()
    frozen = {experts.gate_up_proj.data_ptr(), experts.down_proj.data_ptr()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = triton_adapted_experts_forward(experts, hidden.requires_grad_(), index, weights)
    assert saved and not frozen & {t.data_ptr() for t in saved}
    out.sum().backward()
    assert experts.gate_up_proj.grad is None and experts.down_proj.grad is None


def test_routing_puts_hot_blocks_first_and_never_straddles_experts():
    index = torch.randint(0, 7, (30, 3), generator=torch.Generator().manual_seed(0))
    index[:, 0] = 5  # expert 5 gets 30+ rows: several blocks
    hot = torch.tensor([1, 5])
    routing = build_routing(index, 7, hot, block_m=16)
    blocks = routing.blocks.tolist()
    slots = [slot for _, slot, _, _ in blocks]
    assert (
        slots[: routing.num_hot_blocks] == sorted(slots[: routing.num_hot_blocks])
        and min(slots[: routing.num_hot_blocks]) >= 0
    )
    assert all(slot == -1 for slot in slots[routing.num_hot_blocks :])
    sorted_experts = index.reshape(-1)[routing.pair.long()]
    covered = torch.zeros(index.numel(), dtype=torch.int32)
    for expert, _, start, end in blocks:
        rows = slice(start, min(start + 16, end))
        assert (sorted_experts[rows] == expert).all()
        covered[rows] += 1
    assert (covered == 1).all()
    assert routing.num_hot_rows == int(torch.isin(index, hot).sum())
    assert (sorted_experts[: routing.num_hot_rows].unsqueeze(-1) == hot).any(-1).all()
    assert (routing.tok.long() == routing.pair.long() // 3).all()


def test_unsupported_layers_fall_back_to_the_reference():
    experts, lora, hidden, index, weights = make_layer()
    assert triton_unsupported_reason(experts, hidden) is None
    lora.dropout = torch.nn.Dropout(0.1)
    assert "dropout" in triton_unsupported_reason(experts, hidden)
    lora.eval()
    assert triton_unsupported_reason(experts, hidden) is None
    shapes = {name: tuple(getattr(experts, name).shape[1:]) for name in PROJECTIONS}
    setattr(experts, EXPERT_ADAPTER_ATTR, ExpertDelta(shapes, 8, [0, 3]).to(DEVICE))
    assert "ExpertDelta" in triton_unsupported_reason(experts, hidden)
    with torch.no_grad():
        expert_adapter(experts).lora_delta["down_proj"].normal_()
    torch.testing.assert_close(
        triton_adapted_experts_forward(experts, hidden, index, weights),
        adapted_experts_forward(experts, hidden, index, weights),
    )
    experts.gate_up_proj.requires_grad_(True)
    assert "gradient" in triton_unsupported_reason(experts, hidden)


# -- issue 16: row splits of lora_grad, host syncs, shared memory, autotune keys, fp fusion --------------


@pytest.mark.parametrize("splits", [2, 5])
def test_lora_grad_row_splits_match_reference_with_skewed_routing(splits, monkeypatch):
    from hellora_pl.kernels import triton_jit as K

    index = torch.randint(0, 8, (45, 2), generator=torch.Generator().manual_seed(1))
    index[:, 0] = 2  # hot expert 2 (slot 0) gets every token, hot expert 5 a few
    index[index[:, 1] == 2, 1] = 5
    used = []
    monkeypatch.setattr(K, "lora_grad_splits", lambda *args: used.append(args) or splits)
    experts, lora, *rest = make_layer(num_tokens=45, hot=(2, 5), index=index)
    check_against_reference(experts, lora, *rest, torch.float32)
    assert len(used) == 4  # dA and dB of both projections went through the splits
    assert all(num_rows == int(torch.isin(index, torch.tensor([2, 5])).sum()) for num_rows, *_ in used)


def test_lora_grad_splits_fill_the_gpu_within_bounds():
    from hellora_pl.kernels.triton_jit import lora_grad_splits

    # OLMoE, 4096 tokens, 8 hot of 64 experts: ~4096 hot rows, D = I = 1024 -> 8 x 16 programs unsplit
    splits = lora_grad_splits(4096, 8, 1024, 132)
    assert splits > 1 and 8 * 16 * splits >= 4 * 132
    assert lora_grad_splits(4096, 8, 2048, 132) < splits  # wider D: more tiles, fewer splits
    assert lora_grad_splits(40, 8, 1024, 132) == 1  # few rows: never split
    assert lora_grad_splits(0, 8, 1024, 132) == lora_grad_splits(100, 0, 1024, 132) == 1
    assert lora_grad_splits(10**7, 1, 16, 132) == 32  # bounded partial-sum buffer


def test_build_routing_syncs_once_and_never_calls_bincount(monkeypatch):
    index = torch.randint(0, 7, (30, 3), generator=torch.Generator().manual_seed(0))
    index[:, 0] = 5
    counts = torch.bincount(index.reshape(-1), minlength=7).tolist()  # before the patches

    def refuse(*args, **kwargs):
        raise AssertionError("torch.bincount syncs with the host on CUDA")

    syncs = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: syncs.append(_n) or _o(self, *a, **k)
        )
    monkeypatch.setattr(torch, "bincount", refuse)
    monkeypatch.setattr(torch.Tensor, "bincount", refuse)
    routings = [build_routing(index, 7, torch.tensor([1, 5]), block_m=16) for _ in range(2)]
    monkeypatch.undo()
    assert syncs == ["tolist", "tolist"]  # one per build_routing
    rows = [0] * 7
    for expert, _, start, end in routings[1].blocks.tolist():
        rows[expert] += min(start + 16, end) - start
    assert rows == counts
    assert routings[1].num_hot_rows == counts[1] + counts[5]


def _named(kernel, dtype, prec, block_m=64, rank=16, adapter=torch.float32):
    """Named args of a launch, as the autotuner hands them to early_config_prune (meta tensors)."""

    def t(*shape, dt=dtype):
        return torch.empty(shape, dtype=dt, device="meta")

    common = {"BLOCK_M": block_m, "BLOCK_R": rank, "PREC": prec, "LORA_PREC": prec}
    if kernel == "gate_up":
        return {"x_ptr": t(8, 2048), "w_ptr": t(1, 2048, 2048), "s_ptr": t(8, rank, dt=torch.float32),
                "b_ptr": t(1, 2048, rank, dt=adapter), "gu_ptr": t(8, 2048), **common}  # fmt: skip
    return {"x_ptr": t(8, 1024), "w_ptr": t(1, 2048, 1024), "s_ptr": t(8, rank, dt=torch.float32),
            "m_ptr": t(1, 2048, rank, dt=adapter), "dst_ptr": t(8, dt=torch.int32), **common}  # fmt: skip


KERNELS = {"gate_up": "_gate_up_fwd_kernel", "gemm": "_grouped_gemm_kernel"}
# Per-block shared memory (sm_90, sm_80, sm_86/89) and figures the compiler gave (triton 3.9, ptxas, gate table).
LIMITS = {90: 232_448, 80: 166_912, 89: 101_376}
MEASURED = [  # (kernel, dtype, prec, config entry, cc, metadata.shared)
    ("gate_up", torch.float32, "ieee", {"BLOCK_N": 128, "BLOCK_K": 64, "w": 8, "s": 3}, 80, 163_840),
    ("gate_up", torch.float32, "ieee", {"BLOCK_N": 128, "BLOCK_K": 64, "w": 8, "s": 3}, 89, 163_840),
    ("gate_up", torch.bfloat16, "tf32", {"BLOCK_N": 128, "BLOCK_K": 64, "w": 8, "s": 3}, 80, 81_920),
    ("gate_up", torch.bfloat16, "tf32", {"BLOCK_N": 128, "BLOCK_K": 64, "w": 8, "s": 3}, 90, 122_880),
    ("gate_up", torch.bfloat16, "tf32", {"BLOCK_N": 64, "BLOCK_K": 32, "w": 4, "s": 3}, 90, 36_864),
    ("gemm", torch.float32, "ieee", {"BLOCK_N": 128, "BLOCK_K": 64, "w": 8, "s": 3}, 90, 98_304),
    ("gemm", torch.bfloat16, "tf32", {"BLOCK_N": 128, "BLOCK_K": 64, "w": 8, "s": 3}, 90, 73_728),
]


@pytest.mark.parametrize("kernel, dtype, prec, entry, cc, shared", MEASURED)
def test_shared_memory_estimate_is_never_below_the_compiler(kernel, dtype, prec, entry, cc, shared):
    from hellora_pl.kernels import triton_jit as K

    (config,) = K._cuda_configs([entry])
    named = _named(kernel, dtype, prec)
    estimate = K.shared_bytes_estimate(KERNELS[kernel], config, named, cc)
    assert shared <= estimate <= 1.25 * shared
    assert shared <= K.shared_bytes_estimate(KERNELS[kernel], config, named)  # unknown target: the worst case


def test_fitting_configs_drop_what_a_101_kb_card_cannot_hold():
    from hellora_pl.kernels import triton_jit as K

    fp32 = _named("gate_up", torch.float32, "ieee")
    big = K._cuda_configs([{"BLOCK_N": 128, "BLOCK_K": 64, "w": 8, "s": 3}])  # 163,840 B compiled on sm_80/89
    gate_up = KERNELS["gate_up"]
    assert K.fitting_configs(gate_up, big, fp32, LIMITS[89], 89) == []
    assert K.fitting_configs(gate_up, big, fp32, LIMITS[90], 90) == big
    lists = {"gate_up": K._cuda_configs(K._GATE_UP_CUDA), "gemm": K._cuda_configs(K._GEMM_CUDA)}
    for kernel, configs in lists.items():
        for dtype, prec in ((torch.bfloat16, "tf32"), (torch.float16, "tf32"), (torch.float32, "ieee")):
            for block_m in (16, 64):
                named = _named(kernel, dtype, prec, block_m)
                for cc, limit in LIMITS.items():
                    kept = K.fitting_configs(KERNELS[kernel], configs, named, limit, cc)
                    assert len(kept) >= 2, (kernel, dtype, block_m, cc)  # something left to tune
                    assert all(("ieee" if prec == "ieee" else "tc") in c.dots for c in kept)
                    assert all(K.shared_bytes_estimate(KERNELS[kernel], c, named, cc) <= limit for c in kept)


def test_prune_refuses_to_launch_nothing(monkeypatch):
    from hellora_pl.kernels import triton_jit as K

    monkeypatch.setattr(K, "INTERPRET", False)
    monkeypatch.setattr(K, "_device_limits", lambda: (20_000, 89))
    prune = K._prune_for("_gate_up_fwd_kernel")["early_config_prune"]
    configs = K._cuda_configs(K._GATE_UP_CUDA)
    named = _named("gate_up", torch.float32, "ieee")
    with pytest.raises(RuntimeError, match=r"_gate_up_fwd_kernel.*20000 B.*sm_89"):
        prune(
            configs,
            {k: v for k, v in named.items() if k.endswith("_ptr")},
            **{k: v for k, v in named.items() if not k.endswith("_ptr")},
        )
    monkeypatch.setattr(K, "_device_limits", lambda: (LIMITS[89], 89))
    assert 0 < len(prune(configs, named)) < len(configs)


def test_autotune_keys_cover_every_constexpr_that_is_not_tuned():
    from hellora_pl.kernels import triton_jit as K

    kernels = [K._gate_up_fwd_kernel, K._grouped_gemm_kernel, K._down_bwd_kernel, K._shrink_kernel, K._lora_grad_kernel]
    for tuner in kernels:
        params = inspect.signature(tuner.base_fn).parameters.values()
        constexprs = {p.name for p in params if "constexpr" in str(p.annotation)}
        assert constexprs, tuner.base_fn.__name__
        tuned = {name for config in tuner.configs for name in config.kwargs}
        # DT and LORA_DT follow the tensors' dtypes, which the autotuner adds to every key
        assert constexprs - tuned - {"DT", "LORA_DT"} <= set(tuner.keys), tuner.fn.__name__


def test_every_launch_sets_fp_fusion(monkeypatch):
    from triton.runtime.autotuner import Autotuner

    launches = []
    original = Autotuner.run
    monkeypatch.setattr(
        Autotuner, "run", lambda self, *a, **k: launches.append((self.base_fn.__name__, k)) or original(self, *a, **k)
    )
    experts, lora, hidden, index, weights = make_layer()
    out = triton_adapted_experts_forward(experts, hidden.requires_grad_(), index, weights.requires_grad_())
    out.sum().backward()
    assert {name for name, _ in launches} == {
        "_gate_up_fwd_kernel", "_grouped_gemm_kernel", "_down_bwd_kernel", "_shrink_kernel", "_lora_grad_kernel"
    }  # fmt: skip
    assert all(kwargs.get("enable_fp_fusion") is True for _, kwargs in launches)
