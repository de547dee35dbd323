"""Built-in model shapes: meta-device builds match the published sizes and expert layouts."""

import time

import pytest
import torch

from hellora_pl.backbones.shapes import SHAPES, ModelShape, meta_model, shape_config

# name -> (published total parameters, an MoE layer index, E, I (expert width), H)
EXPECTED = {
    "olmoe-1b-7b": (6.92e9, 0, 64, 1024, 2048),
    "mixtral-8x7b": (46.7e9, 0, 8, 14336, 4096),
    "deepseek-v2-lite": (15.7e9, 1, 64, 1408, 2048),  # layer 0 is dense (first_k_dense_replace=1)
    "qwen1.5-moe-a2.7b": (14.3e9, 0, 60, 1408, 2048),
    "qwen3-30b-a3b": (30.5e9, 0, 128, 768, 2048),
}

BUILDABLE = [name for name, shape in SHAPES.items() if not shape.remote_code]


def test_every_buildable_shape_has_an_expectation():
    assert sorted(BUILDABLE) == sorted(EXPECTED)
    assert [name for name, shape in SHAPES.items() if shape.remote_code] == ["deepseek-moe-16b"]


def test_shape_records_are_consistent():
    for name, shape in SHAPES.items():
        assert isinstance(shape, ModelShape)
        assert shape.name == name
        assert "/" in shape.hub_id
        assert shape.total_params
        assert {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"} <= set(shape.config)


@pytest.mark.parametrize("name", BUILDABLE)
def test_meta_model_matches_published_size_and_expert_shapes(name):
    published, layer, experts, width, hidden = EXPECTED[name]
    config = shape_config(name)
    assert config.model_type == SHAPES[name].model_type

    model = meta_model(config)
    params = list(model.parameters())
    assert all(p.device.type == "meta" for p in params)
    total = sum(p.numel() for p in params)
    assert abs(total - published) / published < 0.02, f"{name}: {total / 1e9:.3f}B vs {published / 1e9}B"

    fused = model.model.layers[layer].mlp.experts
    assert tuple(fused.gate_up_proj.shape) == (experts, 2 * width, hidden)
    assert tuple(fused.down_proj.shape) == (experts, hidden, width)


def test_deepseek_v2_lite_layer_layout():
    model = meta_model(shape_config("deepseek-v2-lite"))
    assert not hasattr(model.model.layers[0].mlp, "experts")  # dense first layer
    attention = model.model.layers[1].self_attn
    assert tuple(attention.q_proj.weight.shape) == (16 * (128 + 64), 2048)  # q_lora_rank=None
    assert tuple(attention.kv_a_proj_with_mqa.weight.shape) == (512 + 64, 2048)


def test_qwen1_5_moe_has_qkv_bias_and_shared_expert():
    model = meta_model(shape_config("qwen1.5-moe-a2.7b"))
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.bias is not None and attention.o_proj.bias is None
    assert tuple(model.model.layers[0].mlp.shared_expert.gate_proj.weight.shape) == (5632, 2048)


def test_building_every_shape_on_meta_is_fast():
    start = time.perf_counter()
    for name in BUILDABLE:
        meta_model(shape_config(name))
    assert time.perf_counter() - start < 10.0


def test_meta_build_allocates_no_real_tensors():
    model = meta_model(shape_config("mixtral-8x7b"))
    assert all(t.device == torch.device("meta") for t in model.state_dict().values())


def test_unknown_name_lists_known_shapes():
    with pytest.raises(ValueError) as info:
        shape_config("no-such-model")
    message = str(info.value)
    assert "no-such-model" in message
    for name in SHAPES:
        assert name in message


def test_remote_code_shape_explains_what_it_needs():
    assert SHAPES["deepseek-moe-16b"].config["n_routed_experts"] == 64
    with pytest.raises(ValueError, match="trust_remote_code") as info:
        shape_config("deepseek-moe-16b")
    assert "config.json" in str(info.value)
