"""Plans as data: round trip, save/load of adapters, merge, and the parameter counts."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_olmoe
from hellora_pl.adapters import (
    AdapterPlan,
    adapter_state_dict,
    build_plan,
    inject_adapters,
    injected_hot_experts,
    load_adapter,
    merge_adapters,
    save_adapter,
)
from hellora_pl.routing import AllExperts, RoutingRecorder, TopKPerLayer


def profiled_plan(model, batch, policy=None, **kwargs):
    with RoutingRecorder(model) as recorder, torch.no_grad():
        recorder.armed = True
        model(**batch)
    options = dict(rank=4, alpha=8.0, router_rank=2)
    options.update(kwargs)
    return build_plan(model, policy or TopKPerLayer(), recorder.profile(), **options)


def randomize_adapters(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)


def test_plan_json_round_trip(model, token_batch, tmp_path):
    plan = profiled_plan(model, token_batch)
    plan.save(tmp_path / "plan.json")
    again = AdapterPlan.read(tmp_path / "plan.json")
    assert again == plan
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["method"] == "hellora" and len(data["layers"]) == 2
    assert all(len(layer["hot_experts"]) == 2 and len(layer["counts"]) == 8 for layer in data["layers"])


def test_plan_counts_match_injected_parameters(model, token_batch):
    plan = profiled_plan(model, token_batch)
    inject_adapters(model, plan)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == plan.trainable_params == sum(t.numel() for t in adapter_state_dict(model).values())
    assert injected_hot_experts(model) == plan.hot_experts()
    lora_all = tiny_olmoe()
    all_plan = build_plan(lora_all, AllExperts(), None, rank=4, alpha=8.0, router_rank=4)  # the baseline
    inject_adapters(lora_all, all_plan)
    assert plan.lora_all_experts_params == sum(p.numel() for p in lora_all.parameters() if p.requires_grad)
    assert plan.trainable_params < plan.lora_all_experts_params


def test_save_and_load_adapter_reproduces_outputs(model, token_batch, tmp_path):
    plan = profiled_plan(model, token_batch)
    inject_adapters(model, plan)
    randomize_adapters(model)
    with torch.no_grad():
        expected = model(**token_batch).logits
    save_adapter(tmp_path / "hellora", model, plan)
    fresh = tiny_olmoe()
    loaded_plan = load_adapter(fresh, tmp_path / "hellora")
    assert loaded_plan == plan
    with torch.no_grad():
        got = fresh(**token_batch).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)  # bit-identical tensors, same forward, same process


def test_merged_model_equals_adapted_and_saves_pretrained(model, token_batch, tmp_path):
    plan = profiled_plan(model, token_batch)
    inject_adapters(model, plan)
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(**token_batch).logits
    merge_adapters(model)
    assert not adapter_state_dict(model)
    with torch.no_grad():
        merged = model(**token_batch).logits
    torch.testing.assert_close(merged, adapted, atol=2e-5, rtol=2e-5)
    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**token_batch).logits, merged, atol=1e-6, rtol=1e-6)
    assert set(reloaded.state_dict()) == set(tiny_olmoe().state_dict())


def test_load_adapter_rejects_mismatched_tensors(model, token_batch, tmp_path):
    plan = profiled_plan(model, token_batch)
    inject_adapters(model, plan)
    save_adapter(tmp_path, model, plan)
    other = tiny_olmoe()
    plan.layers[0].hot_experts = [e for e in range(8) if e not in plan.layers[0].hot_experts][:3]
    plan.save(tmp_path / "plan.json")
    with pytest.raises(ValueError, match="the injected plan expects"):
        load_adapter(other, tmp_path)


def test_load_adapter_rejects_missing_tensor(model, token_batch, tmp_path):
    plan = profiled_plan(model, token_batch)
    inject_adapters(model, plan)
    save_adapter(tmp_path, model, plan)
    plan.attention_modules = ["q_proj", "k_proj", "v_proj"]
    plan.save(tmp_path / "plan.json")
    with pytest.raises(ValueError, match="do not match the plan"):
        load_adapter(tiny_olmoe(), tmp_path)


def test_remove_adapters_restores_the_base(model, token_batch):
    with torch.no_grad():
        base = model(**token_batch).logits
    inject_adapters(model, profiled_plan(model, token_batch))
    randomize_adapters(model)
    from hellora_pl.adapters import remove_adapters

    remove_adapters(model)
    assert not adapter_state_dict(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**token_batch).logits, base, atol=1e-6, rtol=1e-6)
    assert set(model.state_dict()) == set(tiny_olmoe().state_dict())


def test_a_sharded_run_writes_the_adapter_file_of_an_unsharded_one(tmp_path, monkeypatch):
    """Rank 0 of a sharded fit saves what an unsharded fit saves: on a 4-bit router the LoRA is
    parametrization 1 (after the NF4 storage), and the file names it portably, as parametrization 0."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    import hellora_pl.callbacks.injection as injection
    from hellora_pl import HotExpertInjectionCallback
    from hellora_pl.adapters import ADAPTER_FILE, PLAN_FILE
    from hellora_pl.backbones import BackboneConfig
    from hellora_pl.backbones.tiny import TINY_CONFIGS
    from hellora_pl.loading import load_backbone

    config = BackboneConfig(model_type="mixtral", config=dict(TINY_CONFIGS["mixtral"][1]), quantization="nf4")
    model = load_backbone(config)
    plan = build_plan(model, AllExperts(), None, rank=4, alpha=8.0, router_rank=2)
    inject_adapters(model, plan)
    randomize_adapters(model)
    assert any(".parametrizations.weight.1." in name for name in adapter_state_dict(model))  # the 4-bit case

    callback = HotExpertInjectionCallback(output_dir=str(tmp_path / "sharded"))
    callback._model, callback.plan = model, plan
    # The sharded branch of `_save`: full_tensors copies plain tensors as it gathers DTensors.
    monkeypatch.setattr(injection, "is_sharded", lambda _: True)
    callback._save(SimpleNamespace(fast_dev_run=False, is_global_zero=True, log_dir=str(tmp_path)))
    save_adapter(tmp_path / "unsharded", model, plan)

    sharded = load_file(str(tmp_path / "sharded" / ADAPTER_FILE))
    unsharded = load_file(str(tmp_path / "unsharded" / ADAPTER_FILE))
    assert sorted(sharded) == sorted(unsharded)
    assert not any(".parametrizations.weight.1." in name for name in sharded)
    assert all(torch.equal(sharded[name], unsharded[name]) for name in unsharded)
    assert (tmp_path / "sharded" / PLAN_FILE).read_text() == (tmp_path / "unsharded" / PLAN_FILE).read_text()
