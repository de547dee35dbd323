"""Every tiny backbone x every method fits on CPU; only the plan trains; LoRI and DR-LoRA invariants."""

import pytest
import torch
from lightning.pytorch import Callback

from conftest import RandomTokens, make_trainer
from hellora_pl import (
    DynamicRankCallback,
    HelloraModule,
    HotExpertInjectionCallback,
    LoRIMaskCallback,
    RoutingProfilerCallback,
)
from hellora_pl.adapters import (
    METHODS,
    ExpertDelta,
    ExpertLoRA,
    LoRALinear,
    adapter_state_dict,
    injected_hot_experts,
    layer_expert_adapter,
)
from hellora_pl.adapters.router import router_lora
from hellora_pl.backbones import architecture_for
from hellora_pl.backbones.tiny import TINY_CONFIGS, tiny_backbone_config

RANK = 4


def companions(method, **options):
    if method == "hellori":
        return [LoRIMaskCallback(**{"dense_steps": 2, **options})]
    if method == "dr_lora":
        return [DynamicRankCallback(**{"interval": 1, "rank_step": 1, "grow_fraction": 0.5, **options})]
    return []


def fit(tmp_path, backbone, method, steps=4, extra=(), **companion_options):
    module = HelloraModule(tiny_backbone_config(backbone), learning_rate=1e-2, warmup=0)
    before = {name: t.detach().clone() for name, t in module.model.state_dict().items()}
    injection = HotExpertInjectionCallback(method=method, rank=RANK, alpha=2 * RANK)
    callbacks = [RoutingProfilerCallback(num_batches=2), injection, *companions(method, **companion_options), *extra]
    make_trainer(tmp_path, steps, callbacks).fit(module, datamodule=RandomTokens())
    return module.model, injection.plan, before


def base_name(name: str) -> str:
    """The name a base tensor had before injection wrapped its module."""
    return name.replace(".base_layer.", ".").replace(".parametrizations.weight.original", ".weight")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backbone", list(TINY_CONFIGS))
def test_every_method_trains_only_its_plan(tmp_path, backbone, method):
    model, plan, before = fit(tmp_path, backbone, method)
    arch = architecture_for(model)
    adapters = adapter_state_dict(model)

    # The base is untouched, every base tensor still there under its own name.
    base_after = {base_name(n): t for n, t in model.state_dict().items() if n not in adapters}
    assert base_after.keys() == before.keys()
    assert all(torch.equal(before[name], tensor) for name, tensor in base_after.items())
    # Only adapter tensors train, and some of them moved.
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable <= adapters.keys()
    assert any(t.abs().sum() > 0 for n, t in adapters.items() if t.is_floating_point() and ("lora_B" in n or "lora_delta" in n))

    # What was injected is what the plan says.
    moe_layers = arch.moe_layers(model)
    assert plan.method == method and plan.architecture == arch.name
    assert injected_hot_experts(model) == plan.hot_experts()
    for moe in moe_layers:
        assert (router_lora(moe.router) is not None) == (plan.router_rank is not None)
        adapter = layer_expert_adapter(moe)
        expected = {"esft": ExpertDelta, "attention_only": type(None)}.get(method, ExpertLoRA)
        assert isinstance(adapter, expected)
        if moe.shared is not None:
            shared_wrapped = [n for n in arch.shared_expert_projections if isinstance(getattr(moe.shared, n), LoRALinear)]
            assert shared_wrapped == plan.shared_expert_modules
    attention = arch.attention_module(arch.decoder_layers(model)[0])
    assert [n for n in arch.attention_projections if isinstance(getattr(attention, n, None), LoRALinear)] == (
        plan.attention_modules
    )

    # The plan's parameter count is what the model trains (masked / inactive parts excluded).
    if method == "hellori":
        masks = [t for n, t in adapters.items() if "lora_B_mask" in n]
        kept = sum(int(m.sum()) for m in masks)
        assert plan.lori.masked and abs(kept - plan.trainable_params) <= len(masks)
    elif method == "dr_lora":
        effective = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".hellora_lora." not in n)
        for moe in moe_layers:
            adapter = layer_expert_adapter(moe)
            for out_features, in_features in arch.expert_shapes(moe.experts).values():
                effective += int(adapter.lora_active_rank.sum()) * (out_features + in_features)
        assert effective == plan.trainable_params
    else:
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan.trainable_params
    if method in ("hellora", "hellori", "attention_only"):
        assert plan.trainable_params < plan.lora_all_experts_params
    elif method in ("lora", "dr_lora"):  # DR-LoRA's budget is LoRA's
        assert plan.trainable_params <= plan.lora_all_experts_params


def test_method_defaults_place_adapters_where_documented(tmp_path):
    _, esft, _ = fit(tmp_path / "esft", "qwen2_moe", "esft", steps=1)
    assert esft.attention_modules == [] and esft.router_rank is None and esft.shared_expert_modules == []
    assert esft.expert_adapter == "full" and esft.policy == {"name": "coverage", "coverage": 0.2, "by": "count"}
    _, lora, _ = fit(tmp_path / "lora", "qwen2_moe", "lora", steps=1)
    assert lora.shared_expert_modules == ["gate_proj", "up_proj", "down_proj"] and lora.router_rank == RANK
    assert all(len(layer.hot_experts) == 8 for layer in lora.layers)
    assert lora.trainable_params == lora.lora_all_experts_params
    _, control, _ = fit(tmp_path / "attention", "olmoe", "attention_only", steps=1)
    assert control.router_rank is None and control.expert_modules == [] and control.hot_experts() == {0: [], 1: []}


def test_companion_callbacks_are_required_and_checked(tmp_path):
    module = HelloraModule(tiny_backbone_config("olmoe"))
    trainer = make_trainer(tmp_path, 1, [HotExpertInjectionCallback(method="dr_lora", rank=RANK)])
    with pytest.raises(ValueError, match="needs a DynamicRankCallback.*class_path: hellora_pl.DynamicRankCallback"):
        trainer.fit(module, datamodule=RandomTokens())
    trainer = make_trainer(tmp_path, 1, [HotExpertInjectionCallback(method="hellora"), LoRIMaskCallback()])
    with pytest.raises(ValueError, match="LoRIMaskCallback is in the trainer's callbacks, but method 'hellora'"):
        trainer.fit(HelloraModule(tiny_backbone_config("olmoe")), datamodule=RandomTokens())
    with pytest.raises(ValueError, match="Unknown method 'helora'; choose one of lora, hellora"):
        HotExpertInjectionCallback(method="helora")


# -- HELLoRI ---------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["model", "layer", "matrix"])
def test_hellori_keeps_A_frozen_and_B_zero_outside_its_mask(tmp_path, granularity):
    seen = {}

    class Snapshot(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["A"] = {n: t.clone() for n, t in adapter_state_dict(pl_module.model).items() if ".lora_A" in n}

    model, plan, _ = fit(tmp_path, "qwen2_moe", "hellori", steps=6, extra=[Snapshot()], granularity=granularity)
    tensors = adapter_state_dict(model)
    assert (plan.lori.masked, plan.lori.granularity, plan.lori.switched_at_step) == (True, granularity, 2)
    assert all(torch.equal(seen["A"][n], tensors[n]) for n in seen["A"])  # A never changed
    masks = {n: t for n, t in tensors.items() if "lora_B_mask" in n}
    assert masks and all(m.dtype == torch.bool for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert 0 < kept <= 0.1 * sum(m.numel() for m in masks.values()) + len(masks)
    for mask_name, mask in masks.items():
        b = tensors[mask_name.replace("lora_B_mask", "lora_B")]
        assert torch.count_nonzero(b[~mask]) == 0  # exactly zero outside the mask
    assert any(torch.count_nonzero(tensors[n.replace("lora_B_mask", "lora_B")][m]) > 0 for n, m in masks.items())


def test_hellori_mask_from_a_dense_run_copies_its_A(tmp_path):
    dense_model, dense_plan, _ = fit(tmp_path / "dense", "olmoe", "hellori", steps=3, dense_steps=100)
    assert not dense_plan.lori.masked
    dense = tmp_path / "dense" / "run" / "version_0" / "hellora"
    model, plan, _ = fit(tmp_path / "sparse", "olmoe", "hellori", steps=3, mask_from=str(dense))
    assert plan.lori.masked and plan.lori.mask_from == str(dense)
    ours, theirs = adapter_state_dict(model), adapter_state_dict(dense_model)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours if ".lora_A" in n)
    kept, dropped = [], []
    for name, mask in ((n, t) for n, t in ours.items() if "lora_B_mask" in n):
        dense_b = theirs[name.replace("lora_B_mask", "lora_B")].abs()
        kept.append(dense_b[mask])
        dropped.append(dense_b[~mask])
        assert torch.count_nonzero(ours[name.replace("lora_B_mask", "lora_B")][~mask]) == 0
    # Model-wide granularity: the mask keeps the largest entries of all the dense B matrices together
    # (a matrix with only small entries may keep none of them).
    kept, dropped = torch.cat(kept), torch.cat(dropped)
    assert kept.numel() > 0 and kept.min() >= dropped.max()


# -- DR-LoRA ---------------------------------------------------------------------------------


def test_dr_lora_ranks_only_grow_within_budget(tmp_path):
    history = []

    class RankHistory(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            plan = trainer.callbacks[1].plan
            history.append([r for layer in plan.layers for r in layer.expert_ranks])

    model, plan, _ = fit(tmp_path, "mixtral", "dr_lora", steps=8, extra=[RankHistory()])
    budget = plan.dynamic_rank.budget
    assert budget == RANK * 16 and plan.expert_rank == 2 * RANK
    assert history[0] != history[-1]  # ranks grew
    for earlier, later in zip(history, history[1:]):
        assert all(b >= a for a, b in zip(earlier, later))
        assert sum(later) <= budget
    assert all(1 <= r <= plan.expert_rank for r in history[-1])
    injected = [r for moe in architecture_for(model).moe_layers(model) for r in layer_expert_adapter(moe).lora_active_rank.tolist()]
    assert injected == history[-1]


def test_dr_lora_inactive_rank_slices_have_no_effect(tmp_path):
    model, plan, _ = fit(tmp_path, "olmoe", "dr_lora", steps=2)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        for moe in architecture_for(model).moe_layers(model):
            adapter = layer_expert_adapter(moe)
            for name in adapter.projections:
                for slot, active in enumerate(adapter.lora_active_rank.tolist()):
                    adapter.lora_A[name][slot, active:] = 5.0
                    adapter.lora_B[name][slot, :, active:] = 5.0
        perturbed = model(input_ids=ids).logits
        assert torch.equal(reference, perturbed)  # exactly: the same forward, and inactive slices take no part
        layer_expert_adapter(architecture_for(model).moe_layers(model)[0]).lora_active_rank += 1  # now they act
        assert not torch.allclose(reference, model(input_ids=ids).logits)
