"""Built-in model shapes: the config fields of a few public MoE checkpoints, no weights.

A parameter/FLOP budget tool can ask about one of these models with no network access:
`shape_config(name)` gives a transformers config and `meta_model(config)` builds the model
on the meta device (no memory), so parameter counts and tensor shapes can be read off it.

Only the fields that determine parameter shapes (plus a few harmless ones a config needs,
such as token ids) are recorded. Each entry cites where its values were read; the hub's own
config.json files could not be fetched here, so the sources are copies of those files kept
in public repositories, the model cards, and the architecture papers' descriptions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)


@dataclass(frozen=True)
class ModelShape:
    """The config fields of one public checkpoint, enough to rebuild its parameter shapes."""

    name: str
    hub_id: str
    model_type: str
    config: dict[str, Any] = field(default_factory=dict)
    remote_code: bool = False
    total_params: str = ""  # the published size, for a sanity check


# allenai/OLMoE-1B-7B-0924 (model_type "olmoe").
# Sources: allenai/OLMoE configs/olmoe-8x1b-newhp-newds-cx5-fine1-normreorder.yml (the OLMoE
# training config: d_model 2048, n_heads 16, n_layers 16, mlp_ratio 1 with SwiGLU, i.e. a
# 1024-wide expert, embedding_size 50304, max_sequence_length 4096, moe_num_experts 64,
# moe_top_k 8, weight_tying false); NVIDIA-NeMo/Megatron-Bridge docs/models/llm/olmoe.md
# (hidden 2048, expert FFN 1024, 16 layers, 16 query heads / 16 KV groups, vocab 50,304,
# 4K context); transformers OlmoeConfig (checkpoint "allenai/OLMoE-1B-7B-0924") for
# norm_topk_prob False, clip_qkv None, pad/eos token ids 1/50279.
# Published: 6.9B total, 1.3B active (OLMoE paper, arXiv 2409.02060).
OLMOE_1B_7B = ModelShape(
    name="olmoe-1b-7b",
    hub_id="allenai/OLMoE-1B-7B-0924",
    model_type="olmoe",
    config={
        "vocab_size": 50304,
        "hidden_size": 2048,
        "intermediate_size": 1024,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "norm_topk_prob": False,
        "clip_qkv": None,
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096,
        "pad_token_id": 1,
        "bos_token_id": None,
        "eos_token_id": 50279,
    },
    total_params="6.9B total, 1.3B active",
)

# mistralai/Mixtral-8x7B-v0.1 (model_type "mixtral").
# Sources (two copies of the hub config.json, identical): ai-dynamo/aiconfigurator
# aic-core/src/aiconfigurator_core/model_configs/mistralai--Mixtral-8x7B-v0.1_config.json;
# NVIDIA/TensorRT-LLM tests/unittest/_torch/modeling/test_modeling_mixtral.py
# (MIXTRAL_8X7B_CONFIG, "transformers_version": "4.36.0.dev0"). No head_dim field: it is
# hidden_size / num_attention_heads = 128.
# Published: 46.7B total, 12.9B active (Mistral AI release post; model card).
MIXTRAL_8X7B = ModelShape(
    name="mixtral-8x7b",
    hub_id="mistralai/Mixtral-8x7B-v0.1",
    model_type="mixtral",
    config={
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "max_position_embeddings": 32768,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    total_params="46.7B total, 12.9B active",
)

# deepseek-ai/DeepSeek-V2-Lite (model_type "deepseek_v2"; transformers builds it natively).
# Sources: mlc-ai/pith-train examples/pretrain_lm/deepseek-v2-lite/config.json (the hub
# config's fields: 27 layers, hidden 2048, intermediate 10944, moe_intermediate 1408,
# 64 routed + 2 shared experts, top-6, first_k_dense_replace 1, kv_lora_rank 512,
# q_lora_rank null, qk_nope/qk_rope/v head dims 128/64/128, vocab 102400, untied, token ids
# 100000/100001); the DeepSeek-V2-Lite model card ("27 layers ... hidden dimension of 2048
# ... 16 attention heads ... KV compression dimension is 512 ... does not compress the
# queries ... all FFNs except for the first layer are replaced with MoE layers ... 2 shared
# experts and 64 routed experts ... 1408 ... 6 experts", huggingface.co/deepseek-ai/
# DeepSeek-V2-Lite). Not recorded: max_position_embeddings and the YaRN rope_scaling block
# (the pith-train copy rewrites them and no verbatim copy was found); neither changes a
# parameter shape. moe_layer_freq is not a transformers DeepseekV2Config field (every layer
# from first_k_dense_replace on is MoE), so it is left out.
# Published: 15.7B total, 2.4B active (model card).
DEEPSEEK_V2_LITE = ModelShape(
    name="deepseek-v2-lite",
    hub_id="deepseek-ai/DeepSeek-V2-Lite",
    model_type="deepseek_v2",
    config={
        "vocab_size": 102400,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "greedy",
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": False,
        "kv_lora_rank": 512,
        "q_lora_rank": None,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
    },
    total_params="15.7B total, 2.4B active",
)

# Qwen/Qwen1.5-MoE-A2.7B (model_type "qwen2_moe"; q/k/v projections carry a bias).
# Sources: transformers Qwen2MoeConfig (src/transformers/models/qwen2_moe/
# configuration_qwen2_moe.py, documented against checkpoint "Qwen/Qwen1.5-MoE-A2.7B"):
# vocab 151936, hidden 2048, intermediate 5632, 24 layers, 16 heads / 16 KV heads,
# moe_intermediate 1408, shared_expert_intermediate 5632, 60 experts, top-4,
# decoder_sparse_step 1, norm_topk_prob False, qkv_bias True; the same shape fields appear in
# copies of the Qwen1.5-MoE-A2.7B(-Chat) config.json in third-party tests; the model card
# and the Qwen blog (qwenlm.github.io/blog/qwen-moe) give 60 routed experts, 4 active, a
# shared expert the size of 4 experts, 14.3B total. Not recorded: max_position_embeddings
# (third-party copies disagree, 8192 vs 32768 for the Chat variant, and no verbatim copy of
# the base config.json was found); it changes no parameter shape.
# Published: 14.3B total, 2.7B active (model card).
QWEN1_5_MOE_A2_7B = ModelShape(
    name="qwen1.5-moe-a2.7b",
    hub_id="Qwen/Qwen1.5-MoE-A2.7B",
    model_type="qwen2_moe",
    config={
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": False,
        "qkv_bias": True,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
    total_params="14.3B total, 2.7B active",
)

# Qwen/Qwen3-30B-A3B (model_type "qwen3_moe").
# Sources (two copies of the hub config.json, identical, "transformers_version": "4.51.0"):
# ai-dynamo/aiconfigurator aic-core/src/aiconfigurator_core/model_configs/
# Qwen--Qwen3-30B-A3B_config.json; alibaba/InferSim hf_configs/qwen3-30B-A3B_config.json.
# head_dim 128 is explicit (32 heads x 128 = 4096 != hidden_size 2048).
# Published: 30.5B total, 3.3B active (model card).
QWEN3_30B_A3B = ModelShape(
    name="qwen3-30b-a3b",
    hub_id="Qwen/Qwen3-30B-A3B",
    model_type="qwen3_moe",
    config={
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "max_position_embeddings": 40960,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    total_params="30.5B total, 3.3B active",
)

# deepseek-ai/deepseek-moe-16b-base (model_type "deepseek": the hub ships its own modeling
# code, transformers has no "deepseek" model type, so this shape cannot be built here).
# Sources: verylucky01/MindIE-LLM examples/atb_models/atb_llm/models/deepseek/
# config_deepseek.py (a dataclass mirroring the hub config.json: vocab 102400, hidden 2048,
# intermediate 10944, moe_intermediate 1408, 28 layers, 16 heads / 16 KV heads, 64 routed +
# 2 shared experts, top-6, first_k_dense_replace 1, moe_layer_freq 1, norm_topk_prob False,
# max_position_embeddings 4096, untied, token ids 100000/100001); deepseek-ai/DeepSeek-MoE
# README.md (16.4B parameters, 4096 context). A hand count from these fields gives 16.38B.
# Published: 16.4B total, 2.8B active (README; DeepSeekMoE paper, arXiv 2401.06066).
DEEPSEEK_MOE_16B = ModelShape(
    name="deepseek-moe-16b",
    hub_id="deepseek-ai/deepseek-moe-16b-base",
    model_type="deepseek",
    config={
        "vocab_size": 102400,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
    },
    remote_code=True,
    total_params="16.4B total, 2.8B active",
)

SHAPES: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        OLMOE_1B_7B,
        MIXTRAL_8X7B,
        DEEPSEEK_V2_LITE,
        QWEN1_5_MOE_A2_7B,
        QWEN3_30B_A3B,
        DEEPSEEK_MOE_16B,
    )
}


def shape_config(name: str) -> PretrainedConfig:
    """The transformers config of the built-in shape `name` (no network, no weights)."""
    shape = SHAPES.get(name)
    if shape is None:
        raise ValueError(f"Unknown model shape {name!r}; known shapes: {', '.join(sorted(SHAPES))}.")
    if shape.remote_code:
        raise ValueError(
            f"Model shape {name!r} ({shape.hub_id}, model_type {shape.model_type!r}) is defined by "
            "the checkpoint's own modeling code, which transformers does not ship: it needs "
            "trust_remote_code=True and a local config.json with that code; its recorded fields "
            f"are in SHAPES[{name!r}].config."
        )
    return AutoConfig.for_model(shape.model_type, **shape.config)


def meta_model(config: PretrainedConfig) -> PreTrainedModel:
    """Build the causal-LM model for `config` on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


__all__ = ["SHAPES", "ModelShape", "meta_model", "shape_config"]
