"""Tiny configs of every supported family: built offline in seconds, for tests, CPU twins and benchmarks.

Each has two decoder layers (DeepSeek's first is dense, as in the real models), 8 experts with
top-2 routing, and the family's extras (shared experts, latent attention, group-limited routing).
"""

from __future__ import annotations

from .config import BackboneConfig

_COMMON = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "initializer_range": 0.2,
}

_DEEPSEEK_MLA = {
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "head_dim": 8,
}

TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "olmoe": ("olmoe", {**_COMMON, "intermediate_size": 24, "num_experts": 8, "num_experts_per_tok": 2}),
    "mixtral": ("mixtral", {**_COMMON, "intermediate_size": 24, "num_local_experts": 8, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        "qwen2_moe",
        {
            **_COMMON,
            "intermediate_size": 48,
            "moe_intermediate_size": 24,
            "shared_expert_intermediate_size": 32,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "decoder_sparse_step": 1,
        },
    ),
    "qwen3_moe": (
        "qwen3_moe",
        {
            **_COMMON,
            "intermediate_size": 48,
            "moe_intermediate_size": 24,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "head_dim": 16,
        },
    ),  # fmt: skip
    "deepseek_v2": (
        "deepseek_v2",
        {
            **_COMMON,
            **_DEEPSEEK_MLA,
            "intermediate_size": 48,
            "moe_intermediate_size": 24,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "q_lora_rank": None,
        },
    ),  # fmt: skip
    "deepseek_v3": (
        "deepseek_v3",
        {
            **_COMMON,
            **_DEEPSEEK_MLA,
            "intermediate_size": 48,
            "moe_intermediate_size": 24,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "q_lora_rank": 16,
            "n_group": 2,
            "topk_group": 1,
        },
    ),  # fmt: skip
    "deepseek_moe": (
        "tiny_deepseek_moe",
        {
            **_COMMON,
            "intermediate_size": 48,
            "moe_intermediate_size": 24,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "aux_loss_alpha": 0.0,
        },
    ),  # fmt: skip
}


def tiny_backbone_config(name: str) -> BackboneConfig:
    """A BackboneConfig for the tiny model of family `name` (a key of TINY_CONFIGS)."""
    if name not in TINY_CONFIGS:
        raise ValueError(f"No tiny config {name!r}; choose one of {', '.join(TINY_CONFIGS)}.")
    model_type, config = TINY_CONFIGS[name]
    return BackboneConfig(model_type=model_type, config=dict(config))


# -- tiny configs of any transformers family whose experts use the experts interface -------------
# Each size field present in the family's config defaults is shrunk; the rest stay the defaults.
_TINY_SIZES = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 48,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 32,
    "expert_intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 8,
    "max_position_embeddings": 64,
    "num_experts": 8,
    "num_local_experts": 8,
    "n_routed_experts": 8,
    "moe_num_experts": 8,
    "num_experts_per_tok": 2,
    "num_experts_per_token": 2,
    "top_k_experts": 2,
    "moe_topk": 2,
    "first_k_dense_replace": 1,
    "num_dense_layers": 1,
    "decoder_sparse_step": 1,
    "n_shared_experts": 1,
    "moe_num_shared_experts": 1,
    "num_shared_experts": 1,
    "n_group": 2,
    "topk_group": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "sliding_window": 16,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Fields set even where the defaults leave them None (the model cannot be built without them).
_ALWAYS = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
    "num_experts_per_tok",
    "n_shared_experts",
)

# Per-layer lists in a config: cut to num_hidden_layers.
_PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "moe_layer_types")

# Families the generic shrink leaves unbuildable, without an MoE layer or too big: set last, each
# with its reason. Hybrids keep one layer of each mixer and at least one MoE layer.
_FAMILY_OVERRIDES: dict[str, dict] = {
    # 8 experts in 8 groups leave one expert per group, fewer than top-2 picks from it
    "bailing_hybrid": {"num_expert_group": 2, "linear_head_dim": 8, "linear_num_heads": 4, "qk_head_dim": 16},
    # mlp_only_layers [0, 1] makes both tiny layers dense
    "flint": {"mlp_only_layers": [0]},
    # the MoE block is off by default; per-layer-input embeddings default to 262144 x 256 per layer
    "gemma4_text": {
        "enable_moe_block": True,
        "num_experts": 8,
        "top_k_experts": 2,
        "moe_intermediate_size": 16,
        "vocab_size_per_layer_input": 128,
        "hidden_size_per_layer_input": 8,
    },  # fmt: skip
    "hunyuan_v1_moe": {"head_dim": 8},  # None by default (derived nowhere)
    # needs one full-attention layer (its cache asks one for the sequence length), the first dense
    "kimi_linear": {
        "layer_types": ["linear_attention", "full_attention"],
        "mlp_layer_types": ["dense", "sparse"],
        "linear_head_dim": 8,
        "linear_num_heads": 4,
        "qk_head_dim": 16,
    },  # fmt: skip
    # indexed attention needs its indexer sizes (None by default); hyper-connections shrunk
    "qwen4_exp_text": {
        "layer_types": ["linear_attention", "indexed_attention"],
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 8,
        "indexer_budget": 4,
        "indexer_compress_ratio": 2,
        "hc_lowrank": 8,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 8,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
    },  # fmt: skip
    "zaya": {"num_experts_per_tok": 1, "router_hidden_size": 16},  # its validator allows top-1 only
    # the defaults put attention at layer 4 of 8 (none in 2 layers: the cache needs one); layer 1 is the MoE one
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 0, "mamba_dt_rank": 8, "use_mamba_kernels": False},
    # mamba heads must tile mamba_expand * hidden_size; one attention layer beside the mamba one
    "granitemoehybrid": {
        "layer_types": ["linear_attention", "attention"],
        "mamba_n_heads": 4,
        "mamba_d_head": 16,
        "mamba_d_state": 16,
        "mamba_chunk_size": 16,
        "shared_intermediate_size": 32,
    },  # fmt: skip
    # layer_types defaults to None; the first layer dense (num_dense_layers 1), then conv and attention MoE layers
    "lfm2_moe": {"num_hidden_layers": 3, "layer_types": ["full_attention", "conv", "full_attention"]},
    # its sizes have their own names (num_layers: decoder layers of two attention sublayers each, ffn_hidden_size,
    # expert_ffn_hidden_size), so the generic shrink misses them; 256 zero (identity) experts by default, 2 kept
    "longcat_flash": {"num_layers": 2, "ffn_hidden_size": 48, "expert_ffn_hidden_size": 16, "zero_expert_num": 2},
    # MLA: RoPE spans head_dim * partial_rotary_factor, head_dim = qk_nope_head_dim + qk_rope_head_dim (as in its defaults)
    "mistral4": {"head_dim": 16},
    # thinker + talker + code2wav (generate only); the talker's text defaults lack shared_expert_intermediate_size
    # and it is not what is fine-tuned: left out; the thinker (its own row, qwen3_omni_moe_thinker) built tiny
    "qwen3_omni_moe": {"enable_audio_output": False},
}

# Sub-configs that are themselves multimodal wrappers: built by `tiny_wrapper_config` of the given type.
_WRAPPER_SUB_CONFIGS: dict[str, dict[str, str]] = {
    "qwen3_omni_moe": {"thinker_config": "qwen3_omni_moe_thinker"},
}


def tiny_config_for(model_type: str, overrides: dict | None = None):
    """A tiny config of any transformers `model_type`, from its config class's defaults, offline.

    Every size field of `_TINY_SIZES` the defaults have is shrunk (fields left None stay None, as
    q_lora_rank in some MLA families); per-layer lists keep their first entry and their last ones, to the tiny depth.
    `_FAMILY_OVERRIDES` then fixes the families this leaves unbuildable or without an MoE layer; `overrides`
    (a wrapper's, for its text decoder) are set last.
    """
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"transformers {model_type!r} is not a known model_type; it has no config class to shrink.")
    config_class = CONFIG_MAPPING[model_type]
    defaults = config_class().to_dict()
    sizes = {k: v for k, v in _TINY_SIZES.items() if k in defaults and (defaults[k] is not None or k in _ALWAYS)}
    layers = sizes.get("num_hidden_layers", defaults.get("num_hidden_layers"))
    for name in _PER_LAYER_LISTS:
        if isinstance(defaults.get(name), list) and layers is not None:
            pattern = defaults[name]  # the first layer (often dense) and the last ones (the repeating pattern)
            sizes[name] = (pattern[:1] + pattern[len(pattern) - layers + 1 :])[:layers]
    for name, wrapper_type in _WRAPPER_SUB_CONFIGS.get(model_type, {}).items():
        sizes[name] = tiny_wrapper_config(wrapper_type).to_dict()
    return config_class(**{**sizes, **_FAMILY_OVERRIDES.get(model_type, {}), **(overrides or {})})


# Sizes of a multimodal wrapper's other towers (vision, audio): built, never run by a text-only batch.
_TINY_TOWER_SIZES = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 1,
    "n_layers": 1,
    "depth": 1,
    "num_heads": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "out_hidden_size": 32,
    "embed_dim": 32,
    "projection_dim": 32,
    "projection_hidden_dim": 32,
    "output_dim": 32,
    "output_channels": 32,
    "mlp_dim": 48,
    "d_model": 32,
    "encoder_layers": 1,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 48,
    "head_dim": 16,
    "vocab_size": 128,
    "adapter_in_dim": 32,  # dots3_note: a tower's adapter into the text decoder (text hidden_size: 32)
    "adapter_input_size": 32,
    "adapter_out_dim": 32,
    "downsample_hidden_size": 32,
}

# Per-layer lists of a tower (one entry per tower layer, or one per stage of a staged tower): cut to one.
_TOWER_LISTS = ("layer_types", "global_attn_indexes", "depths", "hidden_sizes", "patch_sizes")

# Wrappers the generic shrink leaves unbuildable: set last, each with its reason. "text_config" entries
# go into the text decoder's tiny config (wrapper-only text types: not in the decoder matrix).
_WRAPPER_OVERRIDES: dict[str, dict] = {
    # the rotary split defaults to [8, 12, 12] (head_dim 128); the tiny rotary half is head_dim 8 * 0.5 / 2 = 2
    "glm4v_moe": {"text_config": {"rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 0]}}},
    # mrope_section must sum to qk_rope_head_dim // 2 (4 in the tiny config)
    "hy_v4_vl": {"text_config": {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1]}}},
    # DSA (indexed) attention layers take no RoPE (qk_rope_head_dim 0, as in the defaults); the generic cut
    # keeps two linear-attention layers, and the cache needs one attention layer; linear/indexer heads shrunk
    "glm5_next": {
        "text_config": {
            "qk_rope_head_dim": 0,
            "layer_types": ["linear_attention", "indexed_attention"],
            "linear_head_dim": 8,
            "index_n_heads": 2,
            "index_head_dim": 8,
        }
    },
    # one intermediate size per expert group (text, vision); top-k is moe_k
    # its rotary split defaults to [22, 22, 20] (head_dim 128); the tiny head_dim 8 has 4 frequencies
    "ernie4_5_vl_moe": {
        "text_config": {
            "moe_intermediate_size": [16, 16],
            "moe_k": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [1, 1, 2]},
        }
    },
    # mlp_layer_types is None by default (derived nowhere): the first layer dense, the second MoE
    "deepseek_ocr2": {"text_config": {"mlp_layer_types": ["dense", "sparse"]}},
    # as gemma4_text: the experts' sizes are None by default; per-layer exceptions beyond the tiny depth
    "diffusion_gemma": {
        "text_config": {
            "enable_moe_block": True,
            "num_experts": 8,
            "top_k_experts": 2,
            "moe_intermediate_size": 16,
            "per_layer_config": {},
        }
    },
    # one audio stage of the four: patch_sizes/hidden_sizes/depths have one entry per audio layer
    # the experts run at moe_hidden_size (4096 vs hidden_size 8192 by default): kept apart from hidden_size, small
    "muse_spark": {
        "audio_config": {"hidden_sizes": [32], "patch_sizes": [16], "depths": [1]},
        "text_config": {"moe_hidden_size": 16},
    },
    # the diarization head reads the shrunk diarization encoder (512 wide by default); the word-timestamp head's
    # blank class is its last one (23862 of 23863 by default, the tiny vocabulary has 128)
    "nemo_speechlm": {
        "audio_config": {"diarization_config": {"head_config": {"audio_hidden_size": 32}}},
        "word_timestamp_config": {"blank_token_id": 127},
    },
    # its vision default (radio) gets video_temporal_patch_size from the wrapper's sub-config spec, which a dict
    # replaces; the projector's input is the vision width (1280 by default), its hidden width 4096 (21M parameters)
    "nemotron_h_omni": {
        "vision_config": {"video_temporal_patch_size": 2},
        "vision_hidden_size": 32,
        "projector_hidden_size": 32,
    },
    # the decoder builds its sliding-window mask on every forward (sliding_window None by default); real
    # checkpoints mix sliding and full attention layers: one of each
    "step3p7": {"text_config": {"sliding_window": 16, "layer_types": ["full_attention", "sliding_attention"]}},
    # the vision encoder plans one scale per layer: with fewer layers than scales (1 + prime factors of patch and
    # temporal patch sizes: 6 by default, 24 layers) it calls scipy's linear_sum_assignment; as in the real model,
    # at least as many layers as scales (patch 4: 4 scales), so no scipy
    "inkling_mm_model": {"vision_config": {"n_layers": 4, "patch_size": 4}},
}

# Attributes a wrapper's forward reads that its config class does not define (a checkpoint's config.json has them).
_WRAPPER_ATTRIBUTES: dict[str, dict] = {
    # the thinker's rope index reads config.vision_start_token_id (Qwen3-Omni's value; never a tiny token id)
    "qwen3_omni_moe_thinker": {"vision_start_token_id": 151652},
}


def _shrunk_fields(config) -> dict:
    """The tower size fields of a (sub-)config instance, shrunk; its nested sub-configs shrunk the same way."""
    defaults = config.to_dict()
    fields = {
        k: v for k, v in _TINY_TOWER_SIZES.items() if isinstance(defaults.get(k), int) and not isinstance(defaults[k], bool)
    }
    for name in _TOWER_LISTS:
        if isinstance(defaults.get(name), list) and defaults[name]:
            fields[name] = defaults[name][-1:]
    if isinstance(defaults.get("layer_types"), list):  # the last layer's type (often the full-attention one)
        fields["layer_types"] = defaults["layer_types"][-1:]
    if "global_attn_indexes" in fields:
        fields["global_attn_indexes"] = [0]
    if defaults.get("per_layer_config"):  # per-layer exceptions keyed by layer index: none in one layer
        fields["per_layer_config"] = {}
    for name in getattr(type(config), "sub_configs", None) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            fields[name] = {"model_type": sub.model_type, **_shrunk_fields(sub)}
    return fields


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "rope_parameters"
        merged[key] = _merge(merged[key], value) if both_dicts else value
    return merged


def tiny_wrapper_config(model_type: str):
    """A tiny config of a multimodal wrapper (`qwen3_vl_moe`, ...): its text decoder from
    `tiny_config_for` of the text sub-config's type, its other towers (vision, audio, and theirs) shrunk to
    one small layer, also a tower the wrapper picks through AutoConfig (it gets its default type's fields);
    `_WRAPPER_OVERRIDES` last (sub-config entries merged into the sub-config, other entries set on the wrapper).
    Offline, from the config classes' defaults."""
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"transformers {model_type!r} is not a known model_type; it has no config class to shrink.")
    config_class = CONFIG_MAPPING[model_type]
    sub_configs = getattr(config_class, "sub_configs", None) or {}
    if "text_config" not in sub_configs:
        raise ValueError(f"{model_type!r} has no text_config: it is not a multimodal wrapper; use tiny_config_for.")
    defaults = config_class()
    overrides = _WRAPPER_OVERRIDES.get(model_type, {})
    parts = {}
    for name in sub_configs:
        sub = getattr(defaults, name, None)
        if name == "text_config":
            parts[name] = tiny_config_for(sub.model_type, overrides.get(name)).to_dict()
        elif sub is not None and hasattr(sub, "to_dict"):
            parts[name] = {"model_type": sub.model_type, **_shrunk_fields(sub)}
    parts = _merge(parts, {k: v for k, v in overrides.items() if k in parts})
    for name, part in parts.items():  # a tower projecting into the text decoder is told its width
        if name != "text_config" and hasattr(getattr(defaults, name), "text_hidden_size"):
            part["text_hidden_size"] = parts["text_config"]["hidden_size"]
    config = config_class(**parts, **{k: v for k, v in overrides.items() if k not in sub_configs})
    for name, value in _WRAPPER_ATTRIBUTES.get(model_type, {}).items():
        setattr(config, name, value)
    return config
