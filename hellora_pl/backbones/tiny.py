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
