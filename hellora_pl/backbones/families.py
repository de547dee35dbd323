"""The built-in architecture descriptions.

transformers 5 models store each layer's experts fused in 3D tensors and their routers return
(logits, weights, indices). DeepSeekMoE-16B (remote code, model type "deepseek") keeps experts
as an nn.ModuleList of MLPs and its gate returns (indices, weights, aux_loss).
"""

from .architecture import MoEArchitecture
from .registry import register_architecture

OLMOE = register_architecture(
    MoEArchitecture(
        name="olmoe",
        model_types=("olmoe",),
        notes="softmax router, top-k, optional renormalisation (norm_topk_prob)",
    )
)

MIXTRAL = register_architecture(
    MoEArchitecture(
        name="mixtral",
        model_types=("mixtral",),
        num_experts_field="num_local_experts",
        notes="softmax router, top-2 renormalised; w1/w3/w2 checkpoints are fused on load",
    )
)

QWEN2_MOE = register_architecture(
    MoEArchitecture(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        shared_experts="shared_expert",
        notes="a shared expert on every token, scaled by a sigmoid shared_expert_gate (H -> 1, left frozen)",
    )
)

QWEN3_MOE = register_architecture(
    MoEArchitecture(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        notes="softmax router, top-k, no shared expert",
    )
)

_MLA_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")

DEEPSEEK_V2 = register_architecture(
    MoEArchitecture(
        name="deepseek_v2",
        model_types=("deepseek_v2",),
        attention_projections=_MLA_PROJECTIONS,
        shared_experts="shared_experts",
        num_experts_field="n_routed_experts",
        aux_loss_field=None,
        notes="multi-head latent attention; the first first_k_dense_replace layers are dense",
    )
)

DEEPSEEK_V3 = register_architecture(
    MoEArchitecture(
        name="deepseek_v3",
        model_types=("deepseek_v3",),
        attention_projections=_MLA_PROJECTIONS,
        shared_experts="shared_experts",
        num_experts_field="n_routed_experts",
        aux_loss_field=None,
        notes="sigmoid scores plus e_score_correction_bias, group-limited top-k; dense first layers",
    )
)

DEEPSEEK_MOE = register_architecture(
    MoEArchitecture(
        name="deepseek_moe",
        model_types=("deepseek", "tiny_deepseek_moe"),
        expert_layout="module_list",
        expert_projections=("gate_proj", "up_proj", "down_proj"),
        shared_experts="shared_experts",
        routing="gate_topk",
        num_experts_field="n_routed_experts",
        aux_loss_field="aux_loss_alpha",
        notes="DeepSeekMoE-16B remote code (trust_remote_code); experts as an nn.ModuleList of MLPs",
    )
)
