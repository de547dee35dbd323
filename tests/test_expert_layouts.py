"""Every expert layout of transformers' experts interface runs through the adapted expert path.

For each flag combination that exists (plain; gpt_oss: transposed + biased + interleaved gate/up +
clamped SwiGLU; aria: transposed; nemotron_h: ungated ReLU^2; muse_spark: post-expert norm) and one
no family has (classes decorated here: ungated + biased + post-norm, transposed or not), an experts
module of that class is built tiny, adapted on some hot experts with ExpertLoRA and ExpertDelta,
and checked against transformers' own paths (`grouped_mm_experts_forward` and the class's eager
forward) run on weights merged here (W[e] += delta, or delta^T for [E, in, out] storage).
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.activations import ACT2FN
from transformers.integrations.moe import (
    batched_mm_experts_forward,
    grouped_mm_experts_forward,
    use_experts_implementation,
)

from hellora_pl.adapters.experts import ExpertDelta, ExpertLoRA, attach_expert_adapter, detach_expert_adapter
from hellora_pl.backbones.tiny import tiny_config_for
from hellora_pl.kernels.reference import adapted_experts_forward

TOLERANCE = 1e-5  # fp32, relative to the output's largest magnitude
BASE_TOLERANCE = 1e-6
HOT = (1, 3, 6)
TOKENS, TOP_K, RANK = 12, 2, 4


def decorated_experts(transposed: bool) -> type[nn.Module]:
    """Ungated experts with biases and a post-expert norm, [E, in, out] when `transposed`: combinations no
    family has, declared with transformers' decorator as a family would."""

    @use_experts_implementation(has_gate=False, is_transposed=transposed, has_bias=True, has_post_expert_norm=True)
    class UngatedBiasedNormedExperts(nn.Module):
        def __init__(self, config):
            super().__init__()
            experts, hidden, inter = config.num_experts, config.hidden_size, config.intermediate_size
            self.num_experts = experts
            up, down = ((hidden, inter), (inter, hidden)) if transposed else ((inter, hidden), (hidden, inter))
            self.up_proj = nn.Parameter(torch.empty(experts, *up))
            self.up_proj_bias = nn.Parameter(torch.empty(experts, inter))
            self.down_proj = nn.Parameter(torch.empty(experts, *down))
            self.down_proj_bias = nn.Parameter(torch.empty(experts, hidden))
            self.act_fn = ACT2FN["gelu"]
            self.post_expert_norm = nn.LayerNorm(hidden)

        def forward(self, hidden_states, top_k_index, top_k_weights):  # the interface's paths run it
            raise NotImplementedError

    return UngatedBiasedNormedExperts


TEST_CLASSES = {transposed: decorated_experts(transposed) for transposed in (False, True)}


def _family_experts(model_type: str, module: str, class_name: str, **overrides):
    import importlib

    config = tiny_config_for(model_type)
    for name, value in overrides.items():
        setattr(config, name, value)
    cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), class_name)
    return cls(config)


def _test_class_experts(transposed: bool):
    config = PretrainedConfig(num_experts=8, hidden_size=32, intermediate_size=24)
    return TEST_CLASSES[transposed](config)


LAYOUTS = {
    "plain_olmoe": lambda: _family_experts("olmoe", "olmoe", "OlmoeExperts"),
    "transposed_biased_interleaved_clamped_gpt_oss": lambda: _family_experts("gpt_oss", "gpt_oss", "GptOssExperts"),
    "transposed_aria": lambda: _family_experts("aria_text", "aria", "AriaExperts"),
    "ungated_relu2_nemotron_h": lambda: _family_experts("nemotron_h", "nemotron_h", "NemotronHExperts"),
    "post_expert_norm_muse_spark": lambda: _family_experts(
        "muse_spark_text", "muse_spark", "MuseSparkExperts", moe_hidden_size=32
    ),
    "ungated_biased_normed_test_class": lambda: _test_class_experts(False),
    "ungated_transposed_biased_normed_test_class": lambda: _test_class_experts(True),
}


def build(layout: str) -> nn.Module:
    """The tiny experts module with seeded random tensors; frozen as injection leaves it."""
    torch.manual_seed(0)
    experts = LAYOUTS[layout]().float()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in experts.named_parameters():
            scale = 0.2
            if name == "gate_up_proj_bias":
                scale = 6.0  # past gpt_oss's swiglu_limit (7) for some rows: the clamps act
            values = torch.randn(tensor.shape, generator=generator) * scale
            tensor.copy_(values + 1.0 if "norm" in name else values)
    return experts.requires_grad_(False)


def routing(num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(TOKENS, 32, generator=generator)
    index = torch.stack([torch.randperm(num_experts, generator=generator)[:TOP_K] for _ in range(TOKENS)])
    index[0] = torch.tensor(HOT[:TOP_K])  # hot experts certainly get rows
    index[1, 0] = HOT[-1]
    index[1, 1] = 0 if HOT[-1] != 0 else 2
    weights = torch.softmax(torch.randn(TOKENS, TOP_K, generator=generator), dim=-1)
    return hidden, index, weights


def up_projection(experts: nn.Module) -> str:
    return "gate_up_proj" if experts.has_gate else "up_proj"


def logical_shapes(experts: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection, computed here from the flags (not by hellora_pl's layout reader)."""
    shapes = {}
    for name in (up_projection(experts), "down_proj"):
        _, first, second = getattr(experts, name).shape
        shapes[name] = (second, first) if experts.is_transposed else (first, second)
    return shapes


def make_adapter(experts: nn.Module, kind: str):
    shapes = logical_shapes(experts)
    if kind == "lora":
        adapter = ExpertLoRA(shapes, experts.num_experts, HOT, rank=RANK, scale=2.0)
        tensors = adapter.lora_B
    else:
        adapter = ExpertDelta(shapes, experts.num_experts, HOT)
        tensors = adapter.lora_delta
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tensor in tensors.values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return adapter


def merged(experts: nn.Module, adapter) -> nn.Module:
    """A copy of the experts with every hot expert's update folded in, in the stored orientation."""
    copy_ = copy.deepcopy(experts)
    with torch.no_grad():
        for name in adapter.projections:
            delta = adapter.delta_weight(name)
            if experts.is_transposed:
                delta = delta.transpose(-2, -1)
            getattr(copy_, name)[adapter.hot_experts] += delta
    return copy_


def transformers_paths(experts: nn.Module, hidden, index, weights) -> dict[str, torch.Tensor]:
    """transformers' grouped_mm and batched_mm paths, and the class's own eager forward when it has one."""
    outputs = {
        "grouped_mm": grouped_mm_experts_forward(experts, hidden, index, weights),
        "batched_mm": batched_mm_experts_forward(experts, hidden, index, weights),
    }
    eager = getattr(type(experts).forward, "__wrapped__", None)
    if type(experts) not in TEST_CLASSES.values():
        outputs["eager"] = eager(experts, hidden, index, weights)
    return outputs


def adapted(experts: nn.Module, adapter, hidden, index, weights) -> torch.Tensor:
    attach_expert_adapter(types.SimpleNamespace(experts=experts, block=None), adapter, fused=True)
    return adapted_experts_forward(experts, hidden, index, weights)


@pytest.mark.parametrize("kind", ["lora", "delta"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_adapted_path_equals_transformers_on_the_merged_weights(layout, kind):
    experts = build(layout)
    hidden, index, weights = routing(experts.num_experts)
    adapter = make_adapter(experts, kind)
    oracle = merged(experts, adapter)
    with torch.no_grad():
        expected = transformers_paths(oracle, hidden, index, weights)
        base = grouped_mm_experts_forward(experts, hidden, index, weights)
        out = adapted(experts, adapter, hidden, index, weights)
    scale = float(out.abs().max())
    assert float((out - base).abs().max()) > 1e-3 * scale, "the update changes the output"
    for path, reference in expected.items():
        difference = float((out - reference).abs().max())
        assert difference <= TOLERANCE * scale, f"{layout} {kind}: adapted vs merged {path} differ by {difference}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_zero_b_is_the_base_and_gradients_reach_a_and_b_only(layout):
    experts = build(layout)
    hidden, index, weights = routing(experts.num_experts)
    adapter = ExpertLoRA(logical_shapes(experts), experts.num_experts, HOT, rank=RANK, scale=2.0)  # B = 0
    with torch.no_grad():
        out = adapted(experts, adapter, hidden, index, weights)
        base = grouped_mm_experts_forward(experts, hidden, index, weights)
    assert float((out - base).abs().max()) <= BASE_TOLERANCE * float(base.abs().max())

    with torch.no_grad():
        for b in adapter.lora_B.values():
            b.normal_(0, 0.1)
    adapted_experts_forward(experts, hidden, index, weights).square().sum().backward()
    for name in adapter.projections:
        for factor in (adapter.lora_A[name], adapter.lora_B[name]):
            assert factor.grad is not None and bool(factor.grad.abs().sum() > 0), f"{layout}: no gradient on {name}"
    base_tensors = [p for name, p in experts.named_parameters() if not name.startswith("hellora_lora.")]
    assert base_tensors and all(p.grad is None for p in base_tensors), "a frozen base tensor got a gradient"


@pytest.mark.parametrize("kind", ["lora", "delta"])
@pytest.mark.parametrize("layout", ["transposed_biased_interleaved_clamped_gpt_oss", "ungated_relu2_nemotron_h"])
def test_merging_folds_the_update_into_the_stored_orientation(layout, kind):
    experts = build(layout)
    adapter = make_adapter(experts, kind)
    expected = merged(experts, adapter)
    moe = types.SimpleNamespace(experts=experts, block=nn.Module())
    attach_expert_adapter(moe, adapter, fused=True)
    detach_expert_adapter(moe, merge=True)
    for name in adapter.projections:
        assert torch.allclose(getattr(experts, name), getattr(expected, name), atol=1e-6, rtol=0)
    assert not torch.equal(getattr(experts, "down_proj"), getattr(build(layout), "down_proj"))


def test_the_layout_reader_gives_logical_shapes_and_the_projection_names():
    from hellora_pl.kernels.layout import ExpertLayout

    gpt_oss = ExpertLayout.of(build("transposed_biased_interleaved_clamped_gpt_oss"))
    assert gpt_oss.projections == ("gate_up_proj", "down_proj")
    assert (gpt_oss.transposed, gpt_oss.bias, gpt_oss.concatenated, gpt_oss.plain) == (True, True, False, False)
    assert dict(gpt_oss.shapes) == {"gate_up_proj": (96, 32), "down_proj": (32, 48)}  # stored [8, 32, 96], [8, 48, 32]
    assert (gpt_oss.num_experts, gpt_oss.hidden) == (8, 32)
    nemotron = ExpertLayout.of(build("ungated_relu2_nemotron_h"))
    assert nemotron.projections == ("up_proj", "down_proj") and not nemotron.gated
    assert nemotron.differences() == ["ungated experts (has_gate=False)"]
    assert ExpertLayout.of(build("plain_olmoe")).plain


def test_a_module_missing_a_tensor_its_flags_promise_is_refused_by_name():
    from hellora_pl.kernels.layout import ExpertLayout

    experts = build("ungated_transposed_biased_normed_test_class")
    del experts.down_proj_bias
    with pytest.raises(NotImplementedError, match="has_bias but has no `down_proj_bias`"):
        ExpertLayout.of(experts)
    experts = build("plain_olmoe")
    experts._is_expert_parallel = True
    hidden, index, weights = routing(experts.num_experts)
    with pytest.raises(NotImplementedError, match="_is_expert_parallel"):
        adapted_experts_forward(experts, hidden, index, weights)


@pytest.mark.parametrize(
    "layout, words",
    [
        ("transposed_biased_interleaved_clamped_gpt_oss", "transposed expert weights (is_transposed)"),
        ("transposed_biased_interleaved_clamped_gpt_oss", "interleaved gate/up rows"),
        ("ungated_relu2_nemotron_h", "ungated experts (has_gate=False)"),
        ("post_expert_norm_muse_spark", "a post-expert norm (has_post_expert_norm)"),
        ("ungated_transposed_biased_normed_test_class", "expert biases (has_bias)"),
    ],
)
def test_triton_names_each_layout_it_leaves_to_the_reference(layout, words, monkeypatch):
    from hellora_pl.kernels import triton_host  # imports no Triton itself: the reason is checked everywhere
    monkeypatch.setattr(triton_host, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    experts = build(layout)
    reason = triton_host.triton_unsupported_reason(experts, torch.zeros(2, 32))
    assert reason is not None and words in reason
    assert triton_host.triton_unsupported_reason(build("plain_olmoe"), torch.zeros(2, 32)) is None


def test_nf4_takes_transposed_experts_as_their_transpose():
    """NF4 holds transposed [E, in, out] experts as [E, out, in] (tests/test_quant_transposed.py runs them)."""
    from hellora_pl.quant.model import quantization_targets

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config_for("gpt_oss"), dtype=torch.float32)
    experts = [t for t in quantization_targets(model) if t.kind == "experts"]
    assert experts and all(t.transposed for t in experts)


@pytest.mark.parametrize("layout", ["ungated_relu2_nemotron_h", "ungated_biased_normed_test_class"])
def test_nf4_ungated_biased_and_normed_experts_run_the_adapted_path(layout):
    """NF4 storage of up/down (biases and the norm stay dense) equals the dequantized dense weights merged."""
    from hellora_pl.quant.nf4 import NF4Weight

    experts = build(layout)
    hidden, index, weights = routing(experts.num_experts)
    adapter = make_adapter(experts, "lora")
    dense = copy.deepcopy(experts)
    for name in ("up_proj", "down_proj"):
        quantized = NF4Weight(getattr(experts, name), blocksize=64, role="experts")
        delattr(experts, name)
        setattr(experts, name, quantized)
        with torch.no_grad():
            getattr(dense, name).copy_(quantized.dequantize())
    oracle = merged(dense, adapter)
    with torch.no_grad():
        expected = grouped_mm_experts_forward(oracle, hidden, index, weights)
        out = adapted(experts, adapter, hidden, index, weights)
    assert float((out - expected).abs().max()) <= TOLERANCE * float(out.abs().max())


@pytest.mark.parametrize("model_type", ["gpt_oss", "aria_text"])
def test_peft_export_of_transposed_experts_reproduces_the_adapted_logits(model_type, tmp_path):
    """PEFT's ParamWrapper reads `is_transposed` and builds delta^T from the same logical A and B."""
    import peft  # in the test extra (pyproject.toml)

    from hellora_pl.adapters import adapter_state_dict, inject_adapters
    from hellora_pl.adapters.export import export_peft
    from hellora_pl.adapters.methods import resolve_method

    def tiny():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(tiny_config_for(model_type), dtype=torch.float32).eval()

    model = tiny()
    ids = torch.randint(3, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    plan = resolve_method("lora", rank=4, alpha=8.0).build(model, None)
    inject_adapters(model, plan, expert_kernel="torch")
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        base = tiny()(input_ids=ids).logits
        for name, tensor in adapter_state_dict(model).items():
            if "lora_B" in name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
        expected = model(input_ids=ids).logits
    assert float((expected - base).abs().max()) > 1e-3, "the adapters change the logits"
    out = export_peft(model, plan, tmp_path / "peft")
    peft_model = peft.PeftModel.from_pretrained(tiny(), out)
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
    assert float((got - expected).abs().max()) <= 1e-5 * max(1.0, float(expected.abs().max()))
