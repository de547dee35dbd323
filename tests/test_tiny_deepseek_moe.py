"""The tiny DeepSeekMoE stand-in: module tree, router interface, MoE maths, masking, generation."""

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from hellora_pl.backbones.tiny_deepseek_moe import (
    DeepseekMLP,
    DeepseekMoE,
    MoEGate,
    TinyDeepseekMoeConfig,
    TinyDeepseekMoeForCausalLM,
)

FIELDS = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "n_routed_experts": 6,
    "n_shared_experts": 2,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "initializer_range": 0.2,
}


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    config = AutoConfig.for_model("tiny_deepseek_moe", **{**FIELDS, **overrides})
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()


def tokens(batch=2, seq=10, seed=1):
    return torch.randint(3, FIELDS["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_auto_classes_build_the_remote_code_module_tree():
    model = build()
    assert isinstance(model, TinyDeepseekMoeForCausalLM)
    assert isinstance(model.config, TinyDeepseekMoeConfig) and model.config.model_type == "tiny_deepseek_moe"
    layers = model.model.layers
    assert type(layers[0].mlp) is DeepseekMLP  # first_k_dense_replace=1
    for layer in layers[1:]:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert isinstance(getattr(layer.self_attn, name), nn.Linear)
        moe = layer.mlp
        assert isinstance(moe, DeepseekMoE) and isinstance(moe.gate, MoEGate)
        assert moe.gate.weight.shape == (6, 32)
        assert isinstance(moe.experts, nn.ModuleList) and len(moe.experts) == 6
        for expert in moe.experts:
            assert all(isinstance(getattr(expert, p), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj"))
            assert expert.gate_proj.weight.shape == (16, 32)
        assert moe.shared_experts.gate_proj.weight.shape == (32, 32)  # 16 * n_shared_experts
    assert isinstance(model.model.embed_tokens, nn.Embedding) and model.get_output_embeddings() is model.lm_head
    assert "model.layers.1.mlp.experts.5.down_proj.weight" in model.state_dict()
    # moe_layer_freq=2: only even layers at or after first_k_dense_replace are MoE; no shared experts
    sparse = build(moe_layer_freq=2, n_shared_experts=None)
    assert [type(layer.mlp) for layer in sparse.model.layers] == [DeepseekMLP, DeepseekMLP, DeepseekMoE]
    assert sparse.model.layers[2].mlp.shared_experts is None


def test_grouped_mm_experts_are_refused_for_module_list_experts():
    config = AutoConfig.for_model("tiny_deepseek_moe", **FIELDS)
    with pytest.raises(ValueError, match="does not support setting experts implementation"):
        AutoModelForCausalLM.from_config(config, experts_implementation="grouped_mm")


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_gate_returns_indices_weights_and_aux_loss(norm_topk_prob):
    gate = build(norm_topk_prob=norm_topk_prob).model.layers[1].mlp.gate
    hidden = torch.randn(2, 5, 32)
    topk_idx, topk_weight, aux_loss = gate(hidden)
    assert topk_idx.shape == topk_weight.shape == (10, 2) and aux_loss is None  # eval: no aux loss
    assert topk_idx.min() >= 0 and topk_idx.max() < 6
    sums = topk_weight.sum(-1)
    if norm_topk_prob:
        torch.testing.assert_close(sums, torch.ones(10))
    else:
        assert (sums < 1).all()  # raw softmax probabilities of the k picks
    gate.train()
    assert gate(hidden)[2].ndim == 0


def test_moe_block_equals_a_naive_loop_over_chosen_experts():
    moe = build().model.layers[1].mlp
    hidden = torch.randn(2, 7, 32)
    topk_idx, topk_weight, _ = moe.gate(hidden)
    flat = hidden.reshape(-1, 32)
    expected = torch.stack([
        sum(w * moe.experts[int(e)](flat[t]) for e, w in zip(topk_idx[t], topk_weight[t])) + moe.shared_experts(flat[t])
        for t in range(flat.shape[0])
    ]).view_as(hidden)
    torch.testing.assert_close(moe(hidden), expected)


def test_training_loss_backprops_to_used_experts_and_aux_loss_to_gate():
    model = build().train()
    input_ids = tokens()
    out = model(input_ids=input_ids, labels=input_ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    moe = model.model.layers[1].mlp
    with torch.no_grad():  # which experts layer 1 routed to on this batch
        hidden = model.model.embed_tokens(input_ids)
        hidden = hidden + model.model.layers[0].self_attn(model.model.layers[0].input_layernorm(hidden), None,
                                                           torch.arange(10).expand(2, -1))
        hidden = hidden + model.model.layers[0].mlp(model.model.layers[0].post_attention_layernorm(hidden))
        hidden = hidden + model.model.layers[1].self_attn(model.model.layers[1].input_layernorm(hidden), None,
                                                           torch.arange(10).expand(2, -1))
        used = set(moe.gate(model.model.layers[1].post_attention_layernorm(hidden))[0].unique().tolist())
    for e, expert in enumerate(moe.experts):
        grad = expert.down_proj.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) if e in used else grad is None
    # the aux loss reaches the gate even when the block's output gets no gradient (AddAuxiliaryLoss)
    moe.zero_grad()
    (moe(torch.randn(2, 5, 32)) * 0).sum().backward()
    assert moe.gate.weight.grad.abs().sum() > 0


def test_causal_and_padding_masks():
    model = build()
    input_ids = tokens()
    changed = input_ids.clone()
    changed[:, 6:] = 3
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        torch.testing.assert_close(model(input_ids=changed).logits[:, :6], logits[:, :6])
        # left padding: what sits under mask 0 does not reach the real tokens
        mask = torch.ones_like(input_ids)
        mask[:, :3] = 0
        repadded = input_ids.clone()
        repadded[:, :3] = 5
        padded = model(input_ids=input_ids, attention_mask=mask).logits
        torch.testing.assert_close(model(input_ids=repadded, attention_mask=mask).logits[:, 3:], padded[:, 3:])
        assert not torch.allclose(padded[:, 3:], logits[:, 3:])  # the mask is honoured at all


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = build().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        input_ids = tokens()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        grads.append(model.model.layers[1].mlp.gate.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_greedy_generate_without_a_cache():
    model = build()
    input_ids = tokens(seq=6)
    generated = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=3,
                               do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 9)
    assert torch.equal(generated[:, :6], input_ids)
    with torch.no_grad():  # an argmax of another forward path: safe, the top two logits are >= 0.026 apart here
        assert torch.equal(generated[:, 6], model(input_ids=input_ids).logits[:, -1].argmax(-1))
