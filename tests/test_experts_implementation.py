"""Injection switches a model's experts implementation only when the plan has expert adapters, and
merge/remove put back exactly what injection replaced (issue: attention_only never touches the experts
implementation, so it works on expert layouts the adapted path does not handle)."""

from __future__ import annotations

import pytest
import torch

from hellora_pl.adapters import adapter_sites, inject_adapters, merge_adapters, remove_adapters
from hellora_pl.adapters.methods import resolve_method
from hellora_pl.backbones import BackboneConfig
from hellora_pl.backbones.tiny import TINY_CONFIGS
from hellora_pl.loading import load_backbone
from hellora_pl.routing import RoutingRecorder

FAMILY = "olmoe"  # fused experts: the ones that go through transformers' experts interface


def tiny_model(experts_implementation: str):
    model_type, config = TINY_CONFIGS[FAMILY]
    cfg = BackboneConfig(model_type=model_type, config=config, experts_implementation=experts_implementation)
    return load_backbone(cfg).eval()


def tokens():
    ids = torch.randint(3, TINY_CONFIGS[FAMILY][1]["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def planned(method: str, experts_implementation: str = "eager"):
    model = tiny_model(experts_implementation)
    with RoutingRecorder(model) as recorder, torch.no_grad():
        recorder.armed = True
        model(**tokens())
    plan = resolve_method(method, rank=4, alpha=8.0).build(model, recorder.profile())
    return model, plan


def implementation(model) -> str:
    return model.config._experts_implementation


@pytest.mark.parametrize("strip", [merge_adapters, remove_adapters])
def test_attention_only_leaves_the_experts_implementation_alone(strip):
    model, plan = planned("attention_only")
    assert not any(site.kind == "routed_expert" for site in adapter_sites(model, plan))
    assert implementation(model) == "eager"
    inject_adapters(model, plan, expert_kernel="torch")
    assert implementation(model) == "eager"  # was "hellora_torch": the adapted path, needed by no adapter here
    with torch.no_grad():
        model(**tokens())  # runs the model's own experts path
    strip(model)
    assert implementation(model) == "eager"  # was forced to "grouped_mm"


@pytest.mark.parametrize("strip", [merge_adapters, remove_adapters])
def test_strip_restores_what_injection_replaced(strip):
    model, plan = planned("hellora")
    inject_adapters(model, plan, expert_kernel="torch")
    assert implementation(model) == "hellora_torch"  # expert adapters need the adapted path
    strip(model)
    assert implementation(model) == "eager"  # what it was before injection, not a fixed default


def test_an_explicit_experts_implementation_still_wins():
    model, plan = planned("hellora")
    inject_adapters(model, plan, expert_kernel="torch")
    merge_adapters(model, experts_implementation="grouped_mm")
    assert implementation(model) == "grouped_mm"
    model, plan = planned("attention_only", "grouped_mm")
    inject_adapters(model, plan, expert_kernel="torch")
    remove_adapters(model, experts_implementation="eager")
    assert implementation(model) == "eager"


def test_attention_only_logits_equal_the_base_with_b_zero():
    """No switch means the base experts path is the one that ran: B = 0 gives the base logits."""
    model, plan = planned("attention_only")
    with torch.no_grad():
        base = model(**tokens()).logits
    inject_adapters(model, plan, expert_kernel="torch")
    with torch.no_grad():
        adapted = model(**tokens()).logits
    torch.testing.assert_close(adapted, base, rtol=0, atol=1e-6)
