"""Routers whose logits layer is not [E, H] (hellora_pl/backbones/detect.py `_router_name`).

Inkling scores its shared experts with the routed ones ([E + n_shared_experts, H] gate); ZAYA's router is
an MLP whose last layer writes E + 1 logits (a skip expert) from router_hidden_size. Detection takes that
layer as the router, the router adapter sits on its real shape, changes the model as the merged weight
does, and the liveness probe finds it live. A router with other extra rows stays refused, by name.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from hellora_pl.adapters import adapter_state_dict, inject_adapters
from hellora_pl.adapters.liveness import check_liveness
from hellora_pl.adapters.methods import resolve_method
from hellora_pl.adapters.router import RouterLoRA
from hellora_pl.adapters.sites import adapter_sites
from hellora_pl.backbones import UnsupportedArchitectureError, architecture_for
from hellora_pl.backbones.tiny import tiny_config_for
from hellora_pl.routing import RoutingRecorder
from hellora_pl.support.oracle import merged_copy

ORACLE_TOLERANCE = 1e-5  # fp32, relative to the base logits' largest magnitude (0.016 inkling, 0.68 zaya)
CHANGED = 1e-3  # the router adapter alone moves the logits by more than this, relative to the same (seen: 3.6e-3)


def tiny(model_type: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config_for(model_type), dtype=torch.float32).eval()


def tokens(config) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def expected_router(model_type: str, config) -> tuple[str, tuple[int, int]]:
    if model_type == "zaya":  # [E + 1 (skip expert), router_hidden_size]
        return "gate.router_mlp.out_proj", (config.num_experts + 1, config.router_hidden_size)
    return "gate", (config.n_routed_experts + config.n_shared_experts, config.hidden_size)


@pytest.mark.parametrize("model_type", ["inkling_text", "zaya"])
def test_the_router_logits_layer_is_adapted_at_its_real_shape(model_type):
    base = tiny(model_type)
    arch = architecture_for(base)
    path, shape = expected_router(model_type, base.config)
    assert arch.router == path
    assert shape[0] != arch.num_experts(base.config) or shape[1] != base.config.hidden_size  # not [E, H]

    batch = tokens(base.config)
    with RoutingRecorder(base) as recorder, torch.no_grad():
        recorder.armed = True
        base(**batch)
    model = copy.deepcopy(base)
    plan = resolve_method("hellora", rank=4, alpha=8.0).build(model, recorder.profile())
    routers = [site for site in adapter_sites(model, plan) if site.kind == "router"]
    assert len(routers) == len(arch.moe_layers(model)) >= 1
    assert {site.shape for site in routers} == {shape}

    inject_adapters(model, plan, expert_kernel="torch")
    model.train()
    report = check_liveness(model, {**batch, "labels": batch["input_ids"]}, plan)
    assert "live" in report.summary()

    model.eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, tensor in adapter_state_dict(model).items():  # the router's B only: its effect alone
            if ".gate." in name and "lora_B" in name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
        routed = {n for n, m in model.named_modules() if isinstance(m, RouterLoRA)}
        assert routed and all(f".mlp.{path}.parametrizations" in n for n in routed)
        base_logits = base(**batch).logits
        adapted = model(**batch).logits
        oracle = merged_copy(base, model)(**batch).logits
    scale = float(base_logits.abs().max())
    assert float((adapted - base_logits).abs().max()) > CHANGED * scale, "the router adapter changes nothing"
    assert float((adapted - oracle).abs().max()) <= ORACLE_TOLERANCE * scale


def test_inklings_batched_shared_experts_are_named_as_not_adapted():
    arch = architecture_for(tiny("inkling_text"))
    assert arch.shared_experts is None
    assert any(entry.startswith("mlp.shared_experts (InklingSharedExperts") for entry in arch.left_out)


def test_a_router_with_other_extra_rows_is_refused_naming_what_was_looked_for():
    model = tiny("zaya")
    experts, hidden = model.config.num_experts, model.config.router_hidden_size
    for layer in model.model.layers:  # 3 extra classes: neither a skip expert nor shared experts
        layer.mlp.gate.router_mlp.out_proj = nn.Linear(hidden, experts + 3, bias=False)
    with pytest.raises(UnsupportedArchitectureError) as refused:
        architecture_for(model)
    flat = " ".join(str(refused.value).split())
    assert f"no child with an [{experts}, {model.config.hidden_size}] router weight" in flat
    assert f"nor one logits layer of {experts + 1} rows in its gate or router child" in flat
