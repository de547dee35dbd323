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

import copy
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from .meta import meta_architecture, meta_model
from .registry import UnsupportedArchitectureError


@dataclass(frozen=True)
class ModelShape:
    """The config fields of one public checkpoint, enough to rebuild its parameter shapes."""

    name: str
    hub_id: str
    model_type: str
    config: dict[str, Any] = field(default_factory=dict)
    remote_code: bool = False
    total_params: str = ""  # the published size, for a sanity check
    # For a multimodal checkpoint, its own model_type; `model_type`/`config` are then its text
    # decoder's (the part an MoE adapter plan touches), and the vision tower is not built.
    multimodal_model_type: str | None = None


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

# Qwen/Qwen3.5-35B-A3B (a multimodal checkpoint, model_type "qwen3_5_moe"; recorded: its text
# decoder, model_type "qwen3_5_moe_text", which transformers builds as Qwen3_5MoeForCausalLM).
# Source (a copy of the hub config.json, "transformers_version": "4.57.0.dev0"): ai-dynamo/
# aiconfigurator aic-core/src/aiconfigurator_core/model_configs/Qwen--Qwen3.5-35B-A3B_config.json,
# its text_config. Hybrid decoder: 30 Gated DeltaNet (linear_attention) and 10 gated full-attention
# layers, every layer MoE with one shared expert. Not recorded: vision_config (the vision tower,
# 0.45B, is not built), mtp_num_hidden_layers 1 (transformers builds no multi-token-prediction
# layer), the rope block's mrope fields beyond rope_parameters, dtype fields.
# Published: 35B total, 3B active (model card: "Language Model ... 35B in total and 3B
# activated"; transformers docs/source/en/model_doc/qwen3_5_moe.md "35B total/3B active").
# Precise: 34.7B, the text model of unsloth/Qwen3.5-35B-A3B-GGUF (ggml-org/Llama-macOS PR 63); 34.66B here.
_QWEN3_5_35B_A3B_TEXT = {
    "vocab_size": 248320,
    "hidden_size": 2048,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "num_hidden_layers": 40,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "attn_output_gate": True,
    "attention_bias": False,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "mlp_only_layers": [],
    "full_attention_interval": 4,
    "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 10,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_value_head_dim": 128,
    "rope_parameters": {
        "mrope_interleaved": True,
        "mrope_section": [11, 11, 10],
        "rope_type": "default",
        "rope_theta": 10000000,
        "partial_rotary_factor": 0.25,
    },
    "tie_word_embeddings": False,
    "max_position_embeddings": 262144,
    "eos_token_id": 248044,
}
QWEN3_5_35B_A3B = ModelShape(
    name="qwen3.5-35b-a3b",
    hub_id="Qwen/Qwen3.5-35B-A3B",
    model_type="qwen3_5_moe_text",
    config=_QWEN3_5_35B_A3B_TEXT,
    multimodal_model_type="qwen3_5_moe",
    total_params="35B total, 3B active",
)

# Qwen/Qwen3.6-35B-A3B (model_type "qwen3_5_moe": same architecture and classes as Qwen3.5;
# recorded: its text decoder, as above). Source: ai-dynamo/aiconfigurator aic-core/src/
# aiconfigurator_core/model_configs/nvidia--Qwen3.6-35B-A3B-NVFP4_config.json, the config.json of
# NVIDIA's NVFP4 quantization of this checkpoint ("transformers_version": "5.7.0.dev0"; no copy of
# Qwen's own file was found). Quantization changes how weights are stored, not the config: its
# text_config and vision_config shape fields equal Qwen3.5-35B-A3B's field for field; it adds
# bos_token_id 248044. Parameters are counted as the unquantized model has them.
# Published: 35B total, 3B active (model card: "Language Model ... Number of Parameters: 35B in
# total and 3B activated").
QWEN3_6_35B_A3B = ModelShape(
    name="qwen3.6-35b-a3b",
    hub_id="Qwen/Qwen3.6-35B-A3B",
    model_type="qwen3_5_moe_text",
    config={**_QWEN3_5_35B_A3B_TEXT, "bos_token_id": 248044},
    multimodal_model_type="qwen3_5_moe",
    total_params="35B total, 3B active",
)


def _gpt_oss(layers: int, experts: int) -> dict[str, Any]:
    return {
        "vocab_size": 201088,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_hidden_layers": layers,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "attention_bias": True,
        "num_local_experts": experts,
        "num_experts_per_tok": 4,
        "layer_types": ["sliding_attention", "full_attention"] * (layers // 2),
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
        "pad_token_id": 199999,
        "eos_token_id": 200002,
    }


# openai/gpt-oss-20b and openai/gpt-oss-120b (model_type "gpt_oss"; experts [E, H, 2I] with gate
# and up interleaved, biases, clamped SwiGLU, router with a bias, attention sinks).
# Sources (copies of the hub config.json files, "transformers_version": "4.55.0.dev0"):
# ai-dynamo/aiconfigurator aic-core/src/aiconfigurator_core/model_configs/
# openai--gpt-oss-20b_config.json and openai--gpt-oss-120b_config.json. The two differ only in
# num_hidden_layers (24, 36), num_local_experts (32, 128) and the length of layer_types
# (sliding and full attention alternating). Not recorded: quantization_config (the hub weights
# of the experts are MXFP4; parameters are counted as the dense model has them), the YaRN
# rope_scaling block and rope_theta, experts_per_token (a duplicate of num_experts_per_tok),
# router_aux_loss_coef; none changes a parameter shape.
# Published (gpt-oss model card, arXiv 2508.10925, table 1): gpt-oss-20b 20.91B total, 3.61B
# active per token; gpt-oss-120b 116.83B total, 5.13B active. Its component breakdown (embedding
# + unembedding 1.16B) shows that the active figures leave out the input embedding.
GPT_OSS_20B = ModelShape(
    name="gpt-oss-20b",
    hub_id="openai/gpt-oss-20b",
    model_type="gpt_oss",
    config=_gpt_oss(layers=24, experts=32),
    total_params="20.91B total, 3.61B active",
)
GPT_OSS_120B = ModelShape(
    name="gpt-oss-120b",
    hub_id="openai/gpt-oss-120b",
    model_type="gpt_oss",
    config=_gpt_oss(layers=36, experts=128),
    total_params="116.83B total, 5.13B active",
)

# google/gemma-4-26B-A4B (a multimodal checkpoint, model_type "gemma4"; recorded: its text
# decoder, model_type "gemma4_text", which transformers builds as Gemma4ForCausalLM).
# Source (a copy of the hub config.json, "transformers_version": "5.5.0.dev0"): ai-dynamo/
# aiconfigurator aic-core/src/aiconfigurator_core/model_configs/google--gemma-4-26B-A4B_config.json,
# its text_config. Every layer has a dense MLP (2112 wide) beside its 128-expert MoE block;
# 5 of the 30 layers are full attention, with 512-wide heads, 2 KV heads and keys equal to values
# (attention_k_eq_v). Not recorded: vision_config (the 0.57B vision tower is not built),
# use_bidirectional_attention, dtype fields.
# Published: 25.2B total, 3.8B active (the Gemma 4 model card's figures as quoted by
# huggingface.co/OpenExplorer/gemma-4-26B-A4B-it, "Parameter counts follow the upstream model
# details", which also gives the vision encoder as ~550M apart from them, and vast.ai's model page).
GEMMA_4_26B_A4B = ModelShape(
    name="gemma-4-26b-a4b",
    hub_id="google/gemma-4-26B-A4B",
    model_type="gemma4_text",
    config={
        "vocab_size": 262144,
        "vocab_size_per_layer_input": 262144,
        "hidden_size": 2816,
        "hidden_size_per_layer_input": 0,
        "intermediate_size": 2112,
        "moe_intermediate_size": 704,
        "enable_moe_block": True,
        "num_experts": 128,
        "top_k_experts": 8,
        "use_double_wide_mlp": False,
        "num_hidden_layers": 30,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "num_global_key_value_heads": 2,
        "head_dim": 256,
        "global_head_dim": 512,
        "attention_k_eq_v": True,
        "attention_bias": False,
        "num_kv_shared_layers": 0,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 5,
        "sliding_window": 1024,
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 262144,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 1,
    },
    multimodal_model_type="gemma4",
    total_params="25.2B total, 3.8B active",
)

# zai-org/GLM-4.5-Air (model_type "glm4_moe"; q/k/v projections carry a bias; sigmoid router with a
# correction bias; first layer dense). No copy of the hub config.json itself was found; three
# sources agree on every field recorded here: ms-swift's notes on converting GLM-4.5-Air, which
# print the Glm4MoeConfig transformers 4.54.1 read from the checkpoint's config.json
# (model_dir /models/ZhipuAI/GLM-4.5-Air; all fields below, token ids included); huggingface/
# transformers src/transformers/models/glm4_moe/convert_glm4_moe_weights_to_hf.py CONFIG_100B
# (the same shape fields); vllm-project/vime scripts/models/glm4.5-106B-A12B.sh (Megatron
# arguments: 46 layers, 1 dense, hidden 4096, ffn 10944, moe ffn 1408, shared expert 1408,
# 128 experts, top-8, 96 heads, 8 query groups, kv channels 128, qkv bias, rotary 0.5,
# untied, vocab 151552). Not recorded: num_nextn_predict_layers 1 (the hub checkpoint carries a
# multi-token-prediction layer that transformers does not build), rope_scaling null.
# Published: 106B total, 12B active (zai-org/GLM-4.5 README; GLM-4.5 report, arXiv 2508.06471).
# What transformers builds from these fields: 106.85B. The hub checkpoint also holds the MTP block
# (model.layers.46): one more MoE decoder layer (2.34B), eh_proj/enorm/hnorm (33.6M) and its own copies of
# the embedding and output layer (1.24B), 110.47B in all. Precise public figure: llama.cpp's count of the
# BF16 conversion with the MTP decoder layer, 109.194B (ikawrakow/ik_llama.cpp PR 668), which these fields
# reproduce to its last digit (tests/test_shapes.py). The same rule gives GLM-4.5's hub count, 358.34B.
GLM_4_5_AIR = ModelShape(
    name="glm-4.5-air",
    hub_id="zai-org/GLM-4.5-Air",
    model_type="glm4_moe",
    config={
        "vocab_size": 151552,
        "hidden_size": 4096,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 46,
        "num_attention_heads": 96,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "attention_bias": True,
        "use_qk_norm": False,
        "partial_rotary_factor": 0.5,
        "rope_theta": 1000000,
        "n_routed_experts": 128,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
        "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
        "pad_token_id": 151329,
        "eos_token_id": [151329, 151336, 151338],
    },
    total_params="106B total, 12B active",
)

# deepseek-ai/DeepSeek-V3 (model_type "deepseek_v3"; MLA attention, sigmoid router with group
# limits and a correction bias, 3 dense layers first).
# Source (a copy of the hub config.json): ai-dynamo/aiconfigurator aic-core/src/
# aiconfigurator_core/model_configs/deepseek-ai--DeepSeek-V3_config.json. Not recorded:
# quantization_config (the hub weights are FP8 with block scales; parameters are counted as the
# dense model has them), num_nextn_predict_layers 1 (the 14B multi-token-prediction module, not
# built by transformers), the YaRN rope_scaling block, scoring_func "sigmoid", topk_method
# "noaux_tc", moe_layer_freq 1, ep_size, auto_map (transformers builds deepseek_v3 natively).
# Published: 671B total, 37B active (DeepSeek-V3 technical report, arXiv 2412.19437; the model
# card adds that the hub's 685B are 671B of main model and 14B of MTP module).
DEEPSEEK_V3 = ModelShape(
    name="deepseek-v3",
    hub_id="deepseek-ai/DeepSeek-V3",
    model_type="deepseek_v3",
    config={
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "first_k_dense_replace": 3,
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "max_position_embeddings": 163840,
        "bos_token_id": 0,
        "eos_token_id": 1,
    },
    total_params="671B total, 37B active",
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
        QWEN3_5_35B_A3B,
        QWEN3_6_35B_A3B,
        GPT_OSS_20B,
        GPT_OSS_120B,
        GEMMA_4_26B_A4B,
        GLM_4_5_AIR,
        DEEPSEEK_V3,
    )
}


def shape_config(name: str, *, require_architecture: bool = True) -> PretrainedConfig:
    """The transformers config of the built-in shape `name` (no network, no weights).

    With `require_architecture` (the default) a shape whose model type hellora_pl cannot adapt yet
    is refused by name; pass False to build it anyway, e.g. to count its parameters with
    `meta_model`.
    """
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
    config = AutoConfig.for_model(shape.model_type, **copy.deepcopy(shape.config))
    if require_architecture:
        try:
            meta_architecture(config)  # registered, or detected from the model built on meta
        except UnsupportedArchitectureError as unknown:
            multimodal = shape.multimodal_model_type
            part = f"the text decoder of a {multimodal!r} checkpoint, " if multimodal else ""
            why = f" (detection refused it: {' '.join(unknown.detection.split())})" if unknown.detection else ""
            raise UnsupportedArchitectureError(
                f"Built-in shape {name!r} ({shape.hub_id}; {part}model_type {shape.model_type!r}) is recorded, but "
                f"hellora_pl has no architecture for model_type {shape.model_type!r} yet{why}; support for this "
                "family is planned (issue 15). Until then, describe it with hellora_pl.backbones.MoEArchitecture and "
                "register_architecture (ARCHITECTURE.md, 'Adding an architecture or expert layout'), or count its "
                f"parameters with meta_model(shape_config({name!r}, require_architecture=False)).",
                unknown.detection,
            ) from None
    return config


def has_architecture(config: PretrainedConfig) -> bool:
    """Whether hellora_pl can adapt a model of `config` (an architecture is registered, or detected from
    the model built on meta)."""
    try:
        meta_architecture(config)
    except UnsupportedArchitectureError:
        return False
    return True


def usable_shapes() -> list[str]:
    """Built-in shapes that the budget tool and training can use now (transformers builds them and
    hellora_pl has an architecture for them)."""
    return [
        name
        for name, shape in SHAPES.items()
        if not shape.remote_code and has_architecture(shape_config(name, require_architecture=False))
    ]


__all__ = ["SHAPES", "ModelShape", "meta_model", "has_architecture", "shape_config", "usable_shapes"]
