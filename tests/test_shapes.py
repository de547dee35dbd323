"""Built-in model shapes: meta-device builds match the published sizes and expert layouts."""

import time

import pytest
import torch

from hellora_pl.backbones import UnsupportedArchitectureError
from hellora_pl.backbones.shapes import SHAPES, ModelShape, meta_model, shape_config, usable_shapes

# name -> (published total parameters, an MoE layer index, E, I (expert width), H)
EXPECTED = {
    "olmoe-1b-7b": (6.92e9, 0, 64, 1024, 2048),
    "mixtral-8x7b": (46.7e9, 0, 8, 14336, 4096),
    "deepseek-v2-lite": (15.7e9, 1, 64, 1408, 2048),  # layer 0 is dense (first_k_dense_replace=1)
    "qwen1.5-moe-a2.7b": (14.3e9, 0, 60, 1408, 2048),
    "qwen3-30b-a3b": (30.5e9, 0, 128, 768, 2048),
}

# Today's models (issue 15, acceptance 4): name -> (published total, published active per token,
# where both are published). Each count must be within 0.5% of the figure, or within the figure's
# own rounding (half a unit in its last digit) where the publisher rounds more coarsely than that
# (e.g. "3.8B" stands for [3.75B, 3.85B), 1.3% either side); a figure with three or more digits is
# held to 0.5%. Wherever a precise public figure exists it is the one compared (not a rounded card
# figure); see the source of each. Active parameters are counted as the gpt-oss card's breakdown
# shows (and as the budget tool counts them): every parameter but the input embedding (a lookup; a
# tied matrix still counts, the output layer uses it), with top_k of the E routed experts of each MoE
# layer. Quantized checkpoints (gpt-oss MXFP4, DeepSeek-V3 FP8) are counted as the dense model has
# them; vision towers, which the meta model does not build, are not counted; multi-token-prediction
# (MTP) layers, which transformers does not build, are counted only where the figure counts them
# (MTP_DECODER_LAYERS). None: no public active figure is compared here (see below).
PUBLISHED = {
    "gpt-oss-20b": ("20.91B", "3.61B", "gpt-oss model card, arXiv 2508.10925, table 1"),
    "gpt-oss-120b": ("116.83B", "5.13B", "gpt-oss model card, arXiv 2508.10925, table 1"),
    "deepseek-v3": ("671B", "37B", "DeepSeek-V3 technical report, arXiv 2412.19437 (the hub's 685B add the 14B MTP module)"),
    "gemma-4-26b-a4b": ("25.2B", "3.8B", "Gemma 4 model card (26B A4B: total, active)"),
    # The model card's "35B"/"3B" are rounded. Precise: 34.7B, the parameter count of the text model in
    # unsloth/Qwen3.5-35B-A3B-GGUF (vision tower in the separate mmproj file, no MTP layer), as listed in
    # ggml-org/Llama-macOS pull request 63 ("35B-A3B | 34.7B"). No precise active figure was found.
    "qwen3.5-35b-a3b": ("34.7B", "3B", "unsloth/Qwen3.5-35B-A3B-GGUF text model, ggml-org/Llama-macOS PR 63; card: 3B active"),
    # No precise figure for Qwen3.6 itself was found: its card gives "35B"/"3B" (rounded). Its text
    # config equals Qwen3.5-35B-A3B's field for field (shapes.py), so it is also held to Qwen3.5's
    # precise count by test_qwen3_6_counts_as_qwen3_5.
    "qwen3.6-35b-a3b": ("35B", "3B", "Qwen3.6-35B-A3B model card, language model"),
    # Zhipu's "106B total, 12B active" (zai-org/GLM-4.5 README; arXiv 2508.06471) is not a precise
    # figure and follows no counting rule that also gives its GLM-4.5 "355B" (see
    # test_glm_4_5_air_published_round_figures_are_pinned). Precise: the llama.cpp load log of the
    # BF16 conversion of zai-org/GLM-4.5-Air, which keeps the checkpoint's MTP block as a 47th decoder
    # layer (blk.46: its attention and MoE) but not its eh_proj/enorm/hnorm nor its copies of the
    # embedding and output layer: "model params = 109.194 B", "repeating layers = 107.952 B"
    # (ikawrakow/ik_llama.cpp pull request 668, comment of 2025-08-02).
    "glm-4.5-air": ("109.194B", None, "llama.cpp load log of the BF16 GGUF with the MTP layer, ikawrakow/ik_llama.cpp PR 668"),
}

# Decoder layers of a checkpoint's MTP block that its published figure counts: each is one more MoE
# decoder layer of the model's own shape (GLM-4.5-Air: num_nextn_predict_layers 1).
MTP_DECODER_LAYERS = {"glm-4.5-air": 1}

BUILDABLE = [name for name, shape in SHAPES.items() if not shape.remote_code]


def test_every_buildable_shape_has_an_expectation():
    assert sorted(BUILDABLE) == sorted([*EXPECTED, *PUBLISHED])
    assert [name for name, shape in SHAPES.items() if shape.remote_code] == ["deepseek-moe-16b"]


def test_shape_records_are_consistent():
    for name, shape in SHAPES.items():
        assert isinstance(shape, ModelShape)
        assert shape.name == name
        assert "/" in shape.hub_id
        assert shape.total_params
        assert {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"} <= set(shape.config)


@pytest.mark.parametrize("name", sorted(EXPECTED))
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
        meta_model(shape_config(name, require_architecture=False))
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


def _figure(text: str) -> tuple[float, float]:
    """A published figure such as "20.91B": its value, and the relative tolerance it allows
    (0.5%, or half a unit in its last digit where that is wider)."""
    assert text.endswith("B")
    digits = text[:-1]
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    value = float(digits) * 1e9
    rounding = 0.5 * 10.0**-decimals * 1e9 / value
    return value, max(0.005, rounding)


def _counts(name: str) -> tuple[int, float]:
    """Total parameters of the shape's meta model, and active parameters per token (see PUBLISHED),
    each with the MTP decoder layers the published figure counts (MTP_DECODER_LAYERS)."""
    config = shape_config(name, require_architecture=False)
    model = meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    experts_fields = ("num_local_experts", "num_experts", "n_routed_experts")
    experts = next(getattr(config, f) for f in experts_fields if hasattr(config, f))
    top_k = next(getattr(config, f) for f in ("num_experts_per_tok", "top_k_experts") if hasattr(config, f))
    routed = 0
    for param_name, param in model.named_parameters():
        if ".experts." in param_name:  # fused routed experts; shared experts are "shared_expert(s)."
            assert param.shape[0] == experts, param_name
            routed += param.numel()
    assert routed > 0
    lookup = 0 if config.tie_word_embeddings else model.get_input_embeddings().weight.numel()
    mtp_layers = MTP_DECODER_LAYERS.get(name, 0)
    if mtp_layers:  # the MTP block's decoder layer has the shape of the last (MoE) decoder layer
        last = model.model.layers[-1]
        last_routed = sum(p.numel() for n, p in last.named_parameters() if ".experts." in f".{n}")
        total += mtp_layers * sum(p.numel() for p in last.parameters())
        routed += mtp_layers * last_routed
    return total, total - lookup - routed * (experts - top_k) / experts


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_todays_models_match_their_published_parameter_counts(name):
    published_total, published_active, _source = PUBLISHED[name]
    total, active = _counts(name)
    figures = (("total", total, published_total), ("active", active, published_active))
    for label, count, figure in (f for f in figures if f[2] is not None):
        value, tolerance = _figure(figure)
        gap = abs(count - value) / value
        assert gap <= tolerance, f"{name} {label}: {count / 1e9:.3f}B vs {figure} ({gap:.2%} > {tolerance:.2%})"


def test_figures_with_three_or_more_digits_are_held_to_half_a_percent():
    assert _figure("20.91B")[1] == 0.005 and _figure("671B")[1] == 0.005 and _figure("25.2B")[1] == 0.005
    assert _figure("34.7B")[1] == 0.005 and _figure("109.194B")[1] == 0.005
    assert _figure("3.8B")[1] == pytest.approx(0.05 / 3.8)
    assert _figure("35B")[1] == pytest.approx(0.5 / 35)


def test_glm_4_5_air_matches_the_llama_cpp_count_of_its_checkpoint():
    """Both figures of the llama.cpp log, to their last printed digit: the 46 decoder layers recorded
    here plus the MTP block's decoder layer (107.952B "repeating layers"), and those with the
    embedding, output layer and final norm (109.194B)."""
    model = meta_model(shape_config("glm-4.5-air", require_architecture=False))
    trunk = sum(p.numel() for p in model.parameters())
    assert trunk == 106_852_245_504  # what transformers builds: no MTP layer
    layers = sum(p.numel() for p in model.model.layers.parameters()) + sum(
        p.numel() for p in model.model.layers[-1].parameters()
    )
    assert abs(layers / 1e9 - 107.952) < 0.0005
    assert abs(_counts("glm-4.5-air")[0] / 1e9 - 109.194) < 0.0005


def test_glm_4_5_air_published_round_figures_are_pinned():
    """Zhipu's "106B total, 12B active" are below what the recorded fields give, with or without the
    MTP layer (106.85B / 12.80B without it); the gap is pinned here, not hidden by a tolerance."""
    model = meta_model(shape_config("glm-4.5-air", require_architecture=False))
    total = sum(p.numel() for p in model.parameters())
    assert abs(total / 106e9 - 1) == pytest.approx(0.0080, abs=5e-4)
    _total, active = _counts("glm-4.5-air")
    assert active / 1e9 == pytest.approx(13.07, abs=0.005)  # with the MTP layer; 12.80B without it (budget tool)


def test_qwen3_6_counts_as_qwen3_5():
    assert SHAPES["qwen3.6-35b-a3b"].config == {**SHAPES["qwen3.5-35b-a3b"].config, "bos_token_id": 248044}
    assert _counts("qwen3.6-35b-a3b") == _counts("qwen3.5-35b-a3b")


def test_multimodal_shapes_build_their_text_decoder_only():
    for name, multimodal in (("qwen3.5-35b-a3b", "qwen3_5_moe"), ("gemma-4-26b-a4b", "gemma4")):
        assert SHAPES[name].multimodal_model_type == multimodal
        config = shape_config(name, require_architecture=False)
        assert config.model_type == f"{multimodal}_text"
        names = [n for n, _ in meta_model(config).named_parameters()]
        assert not any("visual" in n or "vision" in n for n in names)


def test_gpt_oss_layout_is_transposed_and_biased():
    model = meta_model(shape_config("gpt-oss-20b", require_architecture=False))
    experts = model.model.layers[0].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (32, 2880, 2 * 2880)  # [E, H, 2I]
    assert tuple(experts.gate_up_proj_bias.shape) == (32, 2 * 2880)
    assert len(model.model.layers) == 24


# A recorded shape hellora_pl cannot adapt: a dense model (no MoE block to detect). The built-in
# shapes' own families gain support over time, so the refusal is checked on this stand-in.
_DENSE = ModelShape(
    name="dense-stand-in",
    hub_id="example/dense-stand-in",
    model_type="llama",
    config={"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4},
    total_params="a stand-in",
)  # fmt: skip


@pytest.fixture
def dense_shape(monkeypatch):
    monkeypatch.setitem(SHAPES, _DENSE.name, _DENSE)
    return _DENSE.name


def test_shape_without_an_architecture_is_refused_by_name(dense_shape):
    with pytest.raises(UnsupportedArchitectureError) as info:
        shape_config(dense_shape)
    message = str(info.value)
    assert f"'{dense_shape}'" in message and "'llama'" in message and "require_architecture=False" in message
    assert "\n" not in message
    shape_config(dense_shape, require_architecture=False)  # still buildable for counting


def test_usable_shapes_are_those_with_an_architecture(dense_shape):
    usable = usable_shapes()
    assert {"olmoe-1b-7b", "qwen3-30b-a3b", "deepseek-v3"} <= set(usable)
    assert not {dense_shape, "deepseek-moe-16b"} & set(usable)
    for name in usable:
        shape_config(name)  # no refusal
    for name in set(BUILDABLE) - set(usable):
        with pytest.raises(UnsupportedArchitectureError):
            shape_config(name)


def test_budget_refuses_an_unsupported_shape_in_one_line(capsys, dense_shape):
    from hellora_pl.budget.cli import main, make_parser

    with pytest.raises(SystemExit) as info:
        main(["--shape", dense_shape])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'llama'" in err and "planned" in err
    help_text = " ".join(make_parser().format_help().split())
    assert "deepseek-v3" in help_text and "refused until their model types are supported" in help_text
