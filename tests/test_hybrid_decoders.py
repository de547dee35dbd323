"""Hybrid decoders (layers whose token mixer is attention, Gated DeltaNet or Mamba): each layer type's own
projections are adapted, the plan records which, and the counts and the budget follow the sites."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from hellora_pl.adapters import AdapterPlan, adapter_state_dict, build_plan, inject_adapters
from hellora_pl.adapters.sites import adapter_sites, trainable_params
from hellora_pl.backbones import architecture_for
from hellora_pl.budget import budget, format_text
from hellora_pl.budget import main as budget_main
from hellora_pl.backbones.tiny import tiny_config_for
from hellora_pl.routing import AllExperts
from hellora_pl.support.matrix import check_built

DELTANET = {"in_proj_qkvz", "in_proj_ba", "out_proj"}
ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}


def tiny(model_type: str, **overrides):
    torch.manual_seed(0)
    config = tiny_config_for(model_type)
    for name, value in overrides.items():
        setattr(config, name, value)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_each_layer_type_gets_its_own_projections_and_the_plan_says_which():
    model = tiny("qwen3_next")  # layer 0: linear_attn (Gated DeltaNet), layer 1: self_attn
    plan = build_plan(model, AllExperts(), None, rank=4, alpha=8.0)
    assert plan.mixer_projections == {
        "Qwen3NextGatedDeltaNet": ["in_proj_qkvz", "in_proj_ba", "out_proj"],
        "Qwen3NextAttention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    }
    by_layer = {}
    for site in adapter_sites(model, plan):
        if site.kind == "attention":
            by_layer.setdefault(site.layer, set()).add(site.path)
    assert by_layer == {
        0: {f"model.layers.0.linear_attn.{n}" for n in DELTANET},
        1: {f"model.layers.1.self_attn.{n}" for n in ATTENTION},
    }
    again = AdapterPlan.from_dict(plan.to_dict())  # plan.json round trip keeps the record
    assert again == plan


def test_trainable_counts_equal_the_sites_after_injection():
    model = tiny("qwen3_next")
    plan = build_plan(model, AllExperts(), None, rank=4, alpha=8.0, router_rank=2)
    inject_adapters(model, plan, expert_kernel="torch")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == plan.trainable_params == trainable_params(adapter_sites(model, plan), plan)
    assert trainable == sum(t.numel() for t in adapter_state_dict(model).values())
    deltanet = [n for n in adapter_state_dict(model) if ".linear_attn." in n and "lora_A" in n]
    assert len(deltanet) == len(DELTANET)


def test_a_uniform_decoders_plan_keeps_its_old_form(model):
    """olmoe: one layer type, so plan.json has no mixer_projections (old readers load it)."""
    plan = build_plan(model, AllExperts(), None, rank=4, alpha=8.0)
    assert plan.mixer_projections == {} and "mixer_projections" not in plan.to_dict()
    assert plan.attention_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_a_chosen_projection_is_kept_per_layer_type_and_an_unknown_one_is_refused():
    model = tiny("qwen3_next")
    plan = build_plan(model, AllExperts(), None, rank=4, alpha=8.0, attention_modules=["q_proj", "out_proj"])
    assert plan.mixer_projections == {"Qwen3NextGatedDeltaNet": ["out_proj"], "Qwen3NextAttention": ["q_proj"]}
    with pytest.raises(ValueError, match=r"No decoder layer of qwen3_next has attention projections \['qkv'\]"):
        build_plan(model, AllExperts(), None, rank=4, alpha=8.0, attention_modules=["qkv"])


def test_mamba_projections_whose_weight_the_code_reads_directly_are_not_adapted():
    """Jamba's Mamba mixer reads `self.dt_proj.weight` in its fused path: LoRA there would be bypassed."""
    model = tiny("jamba", attn_layer_offset=1, attn_layer_period=2)  # layer 1: attention
    arch = architecture_for(model)
    assert arch.layer_mixer(model.model.layers[0]) == ("mamba", ("in_proj", "x_proj", "out_proj"))
    assert arch.layer_mixer(model.model.layers[1]) == ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"))


def test_jamba_with_an_attention_layer_matches_the_merged_oracle():
    """The default tiny jamba has no attention layer (transformers' cache then fails); with one it runs."""
    result = check_built(tiny("jamba", attn_layer_offset=1, attn_layer_period=2))
    assert result.status == "supported", result.reason


def test_a_layer_whose_mixer_is_the_moe_block_has_no_attention_site():
    model = tiny("nemotron_h")  # mixers: Mamba2, MoE, attention, MLP
    arch = architecture_for(model)
    kinds = [type(layer.mixer).__name__ for layer in model.model.layers]
    moe = kinds.index("NemotronHMoE")
    assert arch.layer_mixer(model.model.layers[moe]) is None
    plan = build_plan(model, AllExperts(), None, rank=4, alpha=8.0)
    layers = {s.layer for s in adapter_sites(model, plan) if s.kind == "attention"}
    assert moe not in layers and kinds.index("NemotronHAttention") in layers
    assert plan.mixer_projections["NemotronHMamba2Mixer"] == ["in_proj"]  # out_proj: read directly by the fused path


def test_gemma4_experts_beside_a_dense_mlp_match_the_merged_oracle():
    """Gemma 4: router and experts are children of the decoder layer (the layer is the MoE block) and its
    dense MLP, added to the experts' output on every token, is adapted as the shared expert."""
    model = tiny("gemma4_text", enable_moe_block=True)
    arch = architecture_for(model)
    assert (arch.moe_block, arch.router, arch.experts, arch.shared_experts) == ("", "router.proj", "experts", "mlp")
    result = check_built(model)
    assert result.status == "supported", result.reason


def test_the_budget_of_a_hybrid_shape_counts_each_layer_types_projections():
    """qwen3.6-35b-a3b (Qwen3.5-MoE text: 3 Gated DeltaNet layers to 1 gated attention): attention-only LoRA
    counted here from the config's fields, per layer type, equals the budget tool's figure."""
    import json

    from hellora_pl.backbones.shapes import shape_config, usable_shapes

    assert "qwen3.6-35b-a3b" in usable_shapes()
    c, r = shape_config("qwen3.6-35b-a3b"), 8
    key, value = c.linear_num_key_heads * c.linear_key_head_dim, c.linear_num_value_heads * c.linear_value_head_dim
    h = c.hidden_size
    deltanet = [(2 * key + value, h), (value, h), (c.linear_num_value_heads, h), (c.linear_num_value_heads, h), (h, value)]
    q = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    attention = [(2 * q, h), (kv, h), (kv, h), (h, q)]  # q_proj holds the output gate too
    linear_layers = c.layer_types.count("linear_attention")
    expected = linear_layers * sum(r * (o + i) for o, i in deltanet) + (len(c.layer_types) - linear_layers) * sum(
        r * (o + i) for o, i in attention
    )
    report = budget_main(["--shape", "qwen3.6-35b-a3b", "--method", "attention_only", "--rank", str(r), "--json"])
    assert report["figures"]["trainable_params"]["value"] == expected
    assert json.loads(json.dumps(report)) == report  # what --json prints
    per_type = report["settings"]["mixer_projections"]
    assert per_type == {
        "Qwen3_5MoeGatedDeltaNet": ["out_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"],
        "Qwen3_5MoeAttention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    }
    line = next(x for x in format_text(report).splitlines() if x.strip().startswith("adapters"))
    assert "Qwen3_5MoeGatedDeltaNet out_proj,in_proj_qkv,in_proj_z,in_proj_b,in_proj_a | Qwen3_5MoeAttention " in line


def test_the_budget_says_which_projections_detection_left_out():
    model = tiny("deepseek_v4")
    report = budget(model, method="attention_only", rank=4)
    assert [n for n in report["notes"] if "Not adapted (deepseek_v4): self_attn.o_a_proj" in n]
    assert "o_a_proj" not in report["settings"]["attention_modules"]


def test_memory_attention_terms_follow_each_layer_type():
    """qwen3_next: layer 0 is Gated DeltaNet (no q/k norm), layer 1 attention with q/k norms per head. The
    attention widths come from an attention layer, and the DeltaNet layer keeps its projections' outputs."""
    from hellora_pl.memory import MemorySettings, attention_widths, mixer_activations

    model = tiny("qwen3_next")
    arch = architecture_for(model)
    layers = model.model.layers
    heads = model.config.num_attention_heads
    assert attention_widths(model).q_norm_rows == heads and attention_widths(model).k_norm_rows > 0
    assert attention_widths(model, layers[0]).q_norm_rows == 0
    settings = MemorySettings(batch_size=2, seq_len=8, dtype="bfloat16", adapter_dtype="bfloat16")
    n = settings.tokens
    outputs = sum(m.out_features for m in layers[0].linear_attn.children() if isinstance(m, torch.nn.Linear))
    widths = attention_widths(model, layers[0])
    assert mixer_activations(arch, layers[0], [], widths, n, settings) == 2 * n * outputs
    attention = mixer_activations(arch, layers[1], [], attention_widths(model, layers[1]), n, settings)
    assert attention > mixer_activations(arch, layers[1], [], dataclasses.replace(widths, q_norm_rows=0), n, settings)


def test_deepseek_v4_leaves_its_grouped_projection_out_and_its_hash_router_lora_is_live():
    """DeepSeek-V4's o_a_proj is an nn.Linear subclass acting block-diagonally per group (a LoRA beside it would
    compute another map): left out and recorded. Its first MoE layer routes by a token-id table (hash router),
    but the router's weight still scales the chosen experts, so router LoRA there trains (liveness probe)."""
    from hellora_pl.adapters.liveness import check_liveness
    from hellora_pl.adapters.router import RouterLoRA

    model = tiny("deepseek_v4")
    arch = architecture_for(model)
    assert "o_a_proj" not in arch.attention_projections and "o_b_proj" in arch.attention_projections
    assert [entry.split(" ")[0] for entry in arch.left_out] == ["self_attn.o_a_proj"]
    assert "DeepseekV4GroupedLinear" in arch.left_out[0]
    hash_router = arch.moe_layers(model)[0].router
    assert type(hash_router).__name__ == "DeepseekV4HashRouter"
    plan = build_plan(model, AllExperts(), None, rank=4, alpha=8.0, router_rank=2)
    inject_adapters(model, plan, expert_kernel="torch")
    assert any(isinstance(m, RouterLoRA) for m in hash_router.modules())
    ids = torch.randint(3, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    report = check_liveness(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, plan)
    assert report.sites == len(adapter_sites(model, plan)) and report.sites > 0
