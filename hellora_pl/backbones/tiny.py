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


def tiny_config_for(model_type: str):
    """A tiny config of any transformers `model_type`, from its config class's defaults, offline.

    Every size field of `_TINY_SIZES` the defaults have is shrunk (fields left None stay None, as
    q_lora_rank in some MLA families); per-layer lists keep their first entry and their last ones, to the tiny depth.
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
    return config_class(**sizes)
