"""Fit with the callbacks: only the plan trains, resume is exact, nothing is overwritten."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import TINY_OLMOE, RandomTokens, make_trainer
from hellora_pl import BackboneConfig, HelloraModule, HotExpertInjectionCallback, RoutingProfilerCallback
from hellora_pl.adapters import AdapterPlan, adapter_state_dict, injected_hot_experts
from hellora_pl.routing import AllExperts, FractionPerLayer


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


def make_module():
    return HelloraModule(BackboneConfig(model_type="olmoe", config=TINY_OLMOE), learning_rate=1e-2, warmup=1)


def test_only_plan_tensors_train_and_files_are_written(tmp_path):
    module = make_module()
    base_before = {id(p): p.detach().clone() for p in module.parameters()}
    injection = HotExpertInjectionCallback(rank=4, alpha=8)
    trainer = make_trainer(tmp_path, 3, [RoutingProfilerCallback(num_batches=2), injection])
    trainer.fit(module, datamodule=RandomTokens())
    base_now = [p for p in module.parameters() if id(p) in base_before]
    assert len(base_now) == len(base_before)  # injection wraps the base tensors, it does not copy them
    assert all(torch.equal(base_before[id(p)], p) for p in base_now)
    adapters = adapter_state_dict(module.model)
    assert all(not torch.equal(t, torch.zeros_like(t)) for name, t in adapters.items() if "lora_B" in name)
    plan_path = Path(trainer.log_dir) / "hellora" / "plan.json"
    plan = AdapterPlan.read(plan_path)
    assert plan == injection.plan  # the same plan written and read back: exact
    assert injected_hot_experts(module.model) == plan.hot_experts()
    assert (plan_path.parent / "adapter.safetensors").is_file()
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == plan.trainable_params


def test_resume_gives_the_same_loss_as_an_uninterrupted_run(tmp_path):
    def callbacks():
        return [
            RoutingProfilerCallback(num_batches=2),
            HotExpertInjectionCallback(rank=4, alpha=8),
            ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1),
        ]

    pl.seed_everything(0)
    straight = LossRecorder()
    make_trainer(tmp_path / "a", 7, [*callbacks(), straight]).fit(make_module(), datamodule=RandomTokens())

    pl.seed_everything(1)  # a different seed: everything that matters must come from the checkpoint
    resumed = LossRecorder()
    # a different policy too: the checkpoint's plan must replace the one this run would make
    other_policy = HotExpertInjectionCallback(hot_experts=FractionPerLayer(0.5), rank=4, alpha=8)
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"  # the end of the first epoch (4 batches)
    saved = torch.load(checkpoint, weights_only=False)
    assert not saved["state_dict"]  # no frozen base, and the adapters travel with the plan
    assert saved["callbacks"]["HotExpertInjectionCallback"]["adapters"]
    resumed_module = make_module()
    trainer = make_trainer(tmp_path / "b", 7, [RoutingProfilerCallback(num_batches=2), other_policy, resumed])
    trainer.fit(resumed_module, datamodule=RandomTokens(), ckpt_path=checkpoint)
    assert other_policy.plan.policy == {"name": "top_k", "k": None}
    assert injected_hot_experts(resumed_module.model) == other_policy.plan.hot_experts()
    assert sorted(resumed.losses) == [5, 6, 7]
    assert straight.losses[5] != straight.losses[1]  # the second epoch is shuffled differently
    for step in (5, 6, 7):
        assert resumed.losses[step] == pytest.approx(straight.losses[step], abs=1e-6)


def test_existing_plan_is_not_overwritten(tmp_path):
    make_trainer(tmp_path, 1, [HotExpertInjectionCallback(rank=4, alpha=8)]).fit(
        make_module(), datamodule=RandomTokens()
    )
    plan_path = tmp_path / "run" / "version_0" / "hellora" / "plan.json"
    written = plan_path.read_text()
    trainer = make_trainer(tmp_path, 1, [HotExpertInjectionCallback(hot_experts=AllExperts(), rank=4, alpha=8)])
    with pytest.raises(FileExistsError, match="overwrite"):
        trainer.fit(make_module(), datamodule=RandomTokens())
    assert plan_path.read_text() == written


def test_lora_baseline_trains_more_parameters_than_hellora(tmp_path):
    counts = {}
    for name in ["hellora", "lora"]:
        injection = HotExpertInjectionCallback(method=name, rank=4, alpha=8)
        make_trainer(tmp_path / name, 1, [injection]).fit(make_module(), datamodule=RandomTokens())
        counts[name] = injection.plan.trainable_params
        assert injection.plan.method == name
        assert injection.plan.policy["name"] == {"hellora": "top_k", "lora": "all"}[name]
    assert counts["lora"] > counts["hellora"]


def test_gradient_checkpointing_trains_adapters_and_routing_is_counted_once(tmp_path):
    module = HelloraModule(BackboneConfig(model_type="olmoe", config=TINY_OLMOE), gradient_checkpointing=True)
    profiler = RoutingProfilerCallback(num_batches=1, watch_every_n_steps=1)
    counted = []
    original = profiler.on_train_batch_end

    def spy(trainer, pl_module, outputs, batch, batch_idx):
        counted.append(profiler._watch.profile().counts.sum(dim=1).tolist())
        original(trainer, pl_module, outputs, batch, batch_idx)

    profiler.on_train_batch_end = spy
    injection = HotExpertInjectionCallback(rank=4, alpha=8)
    make_trainer(tmp_path, 2, [profiler, injection]).fit(module, datamodule=RandomTokens())
    assert module.model.is_gradient_checkpointing
    tokens_per_batch, top_k = 2 * 10, TINY_OLMOE["num_experts_per_tok"]
    assert counted == [[tokens_per_batch * top_k] * 2] * 2  # the recomputation in backward is not counted
    assert all(not torch.equal(t, torch.zeros_like(t)) for n, t in adapter_state_dict(module.model).items() if "lora_B" in n)
