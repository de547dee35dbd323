"""A tiny stand-in for DeepSeekMoE-16B (model_type "deepseek"), for tests and the CPU config twins.

The real model (deepseek-ai/deepseek-moe-16b-base) ships its own modeling code and is loaded with
`trust_remote_code=True`. Its MoE layout is the older one: each MoE block has a `gate` (`MoEGate`,
a bare `weight` [n_routed_experts, hidden]), `experts` (an `nn.ModuleList` of gated MLPs, each with
its own `gate_proj` / `up_proj` / `down_proj` nn.Linear) and optional `shared_experts` (one wider
MLP). This file rebuilds that module tree, its parameter names and the gate's interface
(`(topk_idx, topk_weight, aux_loss)`) in a few small, readable modules, so hellora_pl can exercise
that layout offline. It is written from scratch and is not a copy of the remote code: no KV cache,
no flash-attention or tensor-parallel paths, no rope scaling, attention always through SDPA.
Importing it registers `tiny_deepseek_moe` with `AutoConfig` / `AutoModelForCausalLM`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

MODEL_TYPE = "tiny_deepseek_moe"


class TinyDeepseekMoeConfig(PretrainedConfig):
    """The remote `DeepseekConfig`'s field names, with small defaults."""

    model_type = MODEL_TYPE

    vocab_size: int = 128
    hidden_size: int = 32
    intermediate_size: int = 64  # the dense MLP's width (layers before first_k_dense_replace)
    moe_intermediate_size: int = 16  # one routed expert's width
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    n_routed_experts: int | None = 8
    n_shared_experts: int | None = 1
    num_experts_per_tok: int = 2
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 128
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    use_cache: bool = False  # there is no KV cache; generation re-reads the whole sequence
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)


class DeepseekRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class DeepseekRotaryEmbedding(nn.Module):
    """cos/sin for rotate-half RoPE; computed per call, so there is no buffer to initialise or save."""

    def __init__(self, dim: int, base: float):
        super().__init__()
        self.dim, self.base = dim, base

    def forward(self, position_ids, dtype):
        inv_freq = self.base ** -(torch.arange(0, self.dim, 2, device=position_ids.device).float() / self.dim)
        angles = position_ids[..., None].float() * inv_freq  # [B, S, dim/2]
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, S, dim]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class DeepseekAttention(nn.Module):
    def __init__(self, config: TinyDeepseekMoeConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.rotary_emb = DeepseekRotaryEmbedding(self.head_dim, config.rope_theta)

    def forward(self, hidden_states, attention_mask=None, position_ids=None):
        bsz, seq_len, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.rotary_emb(position_ids, q.dtype)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        # attention_mask: None (plain causal) or a bool [B, 1, S, S] mask, True where a query may look
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq_len, -1))


class DeepseekMLP(nn.Module):
    def __init__(self, config: TinyDeepseekMoeConfig, intermediate_size: int | None = None):
        super().__init__()
        width = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """Softmax router: hidden [B, S, H] -> (topk_idx [B*S, k], topk_weight [B*S, k], aux_loss or None)."""

    def __init__(self, config: TinyDeepseekMoeConfig):
        super().__init__()
        if config.scoring_func != "softmax":
            raise NotImplementedError(f"scoring_func={config.scoring_func!r}; only 'softmax' is supported")
        self.top_k, self.n_routed_experts = config.num_experts_per_tok, config.n_routed_experts
        self.norm_topk_prob, self.alpha, self.seq_aux = config.norm_topk_prob, config.aux_loss_alpha, config.seq_aux
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))

    def forward(self, hidden_states):
        bsz, seq_len, hidden = hidden_states.shape
        scores = F.linear(hidden_states.reshape(-1, hidden), self.weight).softmax(dim=-1, dtype=torch.float32)
        topk_weight, topk_idx = torch.topk(scores, self.top_k, dim=-1)
        if self.norm_topk_prob and self.top_k > 1:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        aux_loss = None
        if self.training and self.alpha > 0:
            # load-balance loss: sum_e f_e * P_e, f_e = share of top-k picks scaled by E, P_e = mean score
            n_experts, picks = self.n_routed_experts, topk_idx.view(bsz, -1)
            if self.seq_aux:  # per sequence, then averaged over the batch
                counts = torch.zeros(bsz, n_experts, device=scores.device)
                counts.scatter_add_(1, picks, torch.ones_like(picks, dtype=counts.dtype))
                load = counts / (seq_len * self.top_k / n_experts)
                aux_loss = (load * scores.view(bsz, seq_len, -1).mean(dim=1)).sum(dim=1).mean() * self.alpha
            else:
                load = F.one_hot(picks.reshape(-1), n_experts).float().mean(0) * n_experts
                aux_loss = (load * scores.mean(0)).sum() * self.alpha
        return topk_idx, topk_weight.to(hidden_states.dtype), aux_loss


class AddAuxiliaryLoss(torch.autograd.Function):
    """Identity on `x` whose backward also hands `loss` a gradient of 1, so the aux loss is trained."""

    @staticmethod
    def forward(ctx, x, loss):
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return x

    @staticmethod
    def backward(ctx, grad_output):
        grad_loss = None
        if ctx.needs_input_grad[1]:
            grad_loss = torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=grad_output.device)
        return grad_output, grad_loss


class DeepseekMoE(nn.Module):
    """Routed experts (each run only on its own tokens) plus always-on shared experts."""

    def __init__(self, config: TinyDeepseekMoeConfig):
        super().__init__()
        self.num_experts_per_tok = config.num_experts_per_tok
        self.experts = nn.ModuleList(
            DeepseekMLP(config, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        self.gate = MoEGate(config)
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = DeepseekMLP(config, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        topk_idx, topk_weight, aux_loss = self.gate(hidden_states)
        x = hidden_states.reshape(-1, shape[-1])
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(topk_idx == e)
            if token_idx.numel() == 0:
                continue
            y.index_add_(0, token_idx, expert(x[token_idx]) * topk_weight[token_idx, slot, None])
        y = y.view(shape)
        if aux_loss is not None:
            y = AddAuxiliaryLoss.apply(y, aux_loss)
        if self.shared_experts is not None:
            y = y + self.shared_experts(hidden_states)
        return y


class DeepseekDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: TinyDeepseekMoeConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DeepseekAttention(config)
        is_moe = (
            config.n_routed_experts is not None
            and layer_idx >= config.first_k_dense_replace
            and layer_idx % config.moe_layer_freq == 0
        )
        self.mlp = DeepseekMoE(config) if is_moe else DeepseekMLP(config)
        self.input_layernorm = DeepseekRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, **kwargs):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attention_mask, position_ids)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class TinyDeepseekMoePreTrainedModel(PreTrainedModel):
    config_class = TinyDeepseekMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["DeepseekDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, MoEGate)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, DeepseekRMSNorm):
            init.ones_(module.weight)


class TinyDeepseekMoeModel(TinyDeepseekMoePreTrainedModel):
    def __init__(self, config: TinyDeepseekMoeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DeepseekRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        bsz, seq_len = hidden_states.shape[:2]
        device = hidden_states.device
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=device).expand(bsz, -1)
        mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
            # padded keys are hidden; every query still sees itself, so no softmax row is empty
            keys = attention_mask[:, None, None, :].bool() | torch.eye(seq_len, dtype=torch.bool, device=device)
            mask = causal & keys
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=mask, position_ids=position_ids)
        return self.norm(hidden_states)


class TinyDeepseekMoeForCausalLM(TinyDeepseekMoePreTrainedModel, GenerationMixin):
    def __init__(self, config: TinyDeepseekMoeConfig):
        super().__init__(config)
        self.model = TinyDeepseekMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, labels=None, use_cache=None, position_ids=None,
                inputs_embeds=None, **kwargs):
        hidden_states = self.model(input_ids, attention_mask, position_ids, inputs_embeds)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shifted, labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # no KV cache: every step re-reads the whole sequence
        return {"input_ids": input_ids, "attention_mask": attention_mask}


AutoConfig.register(MODEL_TYPE, TinyDeepseekMoeConfig, exist_ok=True)
AutoModelForCausalLM.register(TinyDeepseekMoeConfig, TinyDeepseekMoeForCausalLM, exist_ok=True)
