"""HELLoRI and DR-LoRA resume exactly from a checkpoint; the router load-balancing loss is added as configured."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import RandomTokens, make_trainer
from hellora_pl import (
    DynamicRankCallback,
    HelloraModule,
    HotExpertInjectionCallback,
    LoRIMaskCallback,
    RoutingProfilerCallback,
)
from hellora_pl.adapters import AdapterPlan, adapter_state_dict, layer_expert_adapter
from hellora_pl.backbones import architecture_for
from hellora_pl.backbones.tiny import tiny_backbone_config

RANK = 4
STEPS = 8  # two epochs of RandomTokens' 4 batches
CHECKPOINT = "epoch=0-step=4.ckpt"  # the end of the first epoch
# Saved after the epoch's last optimizer step (on_train_batch_end), as in tests/test_training.py. A
# checkpoint saved by every_n_epochs / save_last (on_train_epoch_end) resumes with the next epoch's
# data shuffled as epoch 2, not 1: see test_epoch_end_checkpoint_resumes_with_the_next_epochs_data.
STEP_CHECKPOINTS = dict(every_n_train_steps=4, save_top_k=-1)


class LossRecorder(Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


class AtTrainStart(Callback):
    """Keeps what `probe(trainer)` returns when training (re)starts, after the checkpoint is restored."""

    def __init__(self, probe):
        self.probe = probe
        self.seen = None

    def on_train_start(self, trainer, pl_module):
        self.seen = self.probe(trainer)


def make_module(backbone):
    return HelloraModule(tiny_backbone_config(backbone), learning_rate=1e-2, warmup=1)


def injection_of(callbacks) -> HotExpertInjectionCallback:
    return next(cb for cb in callbacks if isinstance(cb, HotExpertInjectionCallback))


def straight_then_resumed(tmp_path, backbone, method, companion, extra_resumed=(), checkpointing=STEP_CHECKPOINTS):
    """An uninterrupted fit of STEPS, and a fresh fit resumed from its checkpoint at the end of the first epoch.

    The resumed run logs into the same directory (overwrite=True) and starts from another seed.
    """

    def callbacks(*extra):
        injection = HotExpertInjectionCallback(method=method, rank=RANK, alpha=2 * RANK, overwrite=True)
        return [RoutingProfilerCallback(num_batches=2), injection, companion(), *extra]

    pl.seed_everything(0)
    straight = LossRecorder()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", **checkpointing)
    straight_callbacks = callbacks(checkpoints, straight)
    make_trainer(tmp_path, STEPS, straight_callbacks).fit(make_module(backbone), datamodule=RandomTokens())

    checkpoint = tmp_path / "ckpt" / CHECKPOINT
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["global_step"] == 4 and saved["epoch"] == 0
    pl.seed_everything(1)  # everything that matters must come from the checkpoint
    resumed = LossRecorder()
    resumed_callbacks = callbacks(resumed, *extra_resumed)
    module = make_module(backbone)
    make_trainer(tmp_path, STEPS, resumed_callbacks).fit(module, datamodule=RandomTokens(), ckpt_path=checkpoint)

    assert sorted(resumed.losses) == list(range(5, STEPS + 1))
    assert straight.losses[5] != straight.losses[1]  # the second epoch is shuffled differently
    for step in resumed.losses:
        assert resumed.losses[step] == pytest.approx(straight.losses[step], abs=1e-6)
    return saved, module, resumed_callbacks, straight_callbacks


def test_hellori_resumes_after_the_mask_switch(tmp_path):
    def probe(trainer):
        injection = injection_of(trainer.callbacks)
        return {
            "lori": injection.plan.lori.to_dict(),
            "tensors": {n: t.detach().clone() for n, t in adapter_state_dict(injection.model).items()},
        }

    at_start = AtTrainStart(probe)
    saved, module, callbacks, _ = straight_then_resumed(
        tmp_path, "qwen2_moe", "hellori", lambda: LoRIMaskCallback(dense_steps=2), extra_resumed=[at_start]
    )
    state = saved["callbacks"]["HotExpertInjectionCallback"]
    checkpoint_plan = AdapterPlan.from_dict(state["plan"])
    assert checkpoint_plan.lori.masked and checkpoint_plan.lori.switched_at_step == 2
    saved_masks = {n: t for n, t in state["adapters"].items() if "lora_B_mask" in n}
    saved_A = {n: t for n, t in state["adapters"].items() if ".lora_A" in n}
    assert saved_masks and saved_A
    assert not all(bool(m.all()) for m in saved_masks.values())  # a real mask, not the dense all-ones

    # When training restarts: the checkpoint's masked plan, its masks and its A.
    seen = at_start.seen
    assert seen["lori"]["masked"] is True and seen["lori"]["switched_at_step"] == 2
    assert all(torch.equal(seen["tensors"][n], saved_masks[n]) for n in saved_masks)
    assert all(torch.equal(seen["tensors"][n], t) for n, t in state["adapters"].items())

    # After four more steps: same plan, masks and A; B moved, but only inside its mask.
    injection = injection_of(callbacks)
    assert injection.plan == checkpoint_plan  # restored, not recomputed: exact
    tensors = adapter_state_dict(module.model)
    assert all(torch.equal(tensors[n], saved_masks[n]) for n in saved_masks)
    assert all(torch.equal(tensors[n], saved_A[n]) for n in saved_A)
    b_names = [n.replace("lora_B_mask", "lora_B") for n in saved_masks]
    for b_name, mask in zip(b_names, saved_masks.values()):
        assert torch.count_nonzero(tensors[b_name][~mask]) == 0  # exactly zero outside the mask
    assert any(not torch.equal(tensors[n], state["adapters"][n]) for n in b_names)  # B trained on


def dynamic_of(callbacks) -> DynamicRankCallback:
    return next(cb for cb in callbacks if isinstance(cb, DynamicRankCallback))


def active_ranks(model):
    return [
        r
        for moe in architecture_for(model).moe_layers(model)
        for r in layer_expert_adapter(moe).lora_active_rank.tolist()
    ]


def test_dr_lora_resumes_its_ranks_and_statistics(tmp_path):
    def probe(trainer):
        return {
            "ranks": active_ranks(injection_of(trainer.callbacks).model),
            "state": dynamic_of(trainer.callbacks).state_dict(),
        }

    at_start = AtTrainStart(probe)
    saved, module, callbacks, straight_callbacks = straight_then_resumed(
        tmp_path,
        "olmoe",
        "dr_lora",
        lambda: DynamicRankCallback(interval=1, rank_step=1),
        extra_resumed=[at_start],
    )
    checkpoint_plan = AdapterPlan.from_dict(saved["callbacks"]["HotExpertInjectionCallback"]["plan"])
    checkpoint_ranks = [r for layer in checkpoint_plan.layers for r in layer.expert_ranks]
    initial = checkpoint_plan.dynamic_rank.rank_init
    assert any(r > initial for r in checkpoint_ranks)  # ranks grew before the checkpoint
    assert at_start.seen["ranks"] == checkpoint_ranks
    saved_state = saved["callbacks"]["DynamicRankCallback"]
    assert saved_state["frequency"] and saved_state["importance"]
    assert at_start.seen["state"] == saved_state

    # Both runs end in the same place: plan, ranks and the callback's statistics. Exactly: one process,
    # the same threads and batches, so the resumed run repeats the uninterrupted one's float operations.
    assert injection_of(callbacks).plan == injection_of(straight_callbacks).plan
    straight_dynamic, resumed_dynamic = (dynamic_of(cbs) for cbs in (straight_callbacks, callbacks))
    assert resumed_dynamic.state_dict() == straight_dynamic.state_dict()
    assert active_ranks(module.model) == [
        r for layer in injection_of(callbacks).plan.layers for r in layer.expert_ranks
    ]


def test_dr_lora_grows_once_per_optimizer_step_under_gradient_accumulation(tmp_path):
    history = []  # (global step, total active rank) after each micro-batch

    class Totals(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history.append((trainer.global_step, sum(active_ranks(injection_of(trainer.callbacks).model))))

    callbacks = [
        HotExpertInjectionCallback(method="dr_lora", rank=RANK, alpha=2 * RANK),
        DynamicRankCallback(interval=1, rank_step=1, grow_fraction=0.25),
        Totals(),
    ]
    make_trainer(tmp_path, 3, callbacks, accumulate_grad_batches=2).fit(make_module("olmoe"), datamodule=RandomTokens())
    assert [step for step, _ in history] == [0, 1, 1, 2, 2, 3]
    by_step = dict(history)
    assert all(total == by_step[step] for step, total in history)  # no growth between optimizer steps
    assert by_step[0] < by_step[1] < by_step[2] < by_step[3]  # one growth event per optimizer step
    assert by_step[3] - by_step[0] == 3 * (by_step[1] - by_step[0])


def test_epoch_end_checkpoint_resumes_exactly(tmp_path):
    """Lightning 2.6 sets the sampler epoch one too high after an on_train_epoch_end checkpoint;
    the sampler reads the trainer's current epoch instead, so the resumed epoch is the same."""
    class SamplerEpochs(Callback):
        def __init__(self):
            self.seen = set()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.add((trainer.current_epoch, trainer.train_dataloader.sampler.epoch))

    sampler_epochs = SamplerEpochs()
    straight_then_resumed(tmp_path, "olmoe", "hellora", Callback, [sampler_epochs], dict(every_n_epochs=1, save_top_k=-1))
    assert sampler_epochs.seen == {(1, 1)}


# -- router load-balancing loss ------------------------------------------------------------


def batch():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 64, (2, 10), generator=generator)
    labels = ids.clone()
    labels[:, :4] = -100
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_router_aux_loss_coef_adds_the_load_balancing_loss(tmp_path):
    coef = 0.5
    inputs = batch()
    plain, balanced = (HelloraModule(tiny_backbone_config("olmoe"), router_aux_loss_coef=c) for c in (0.0, coef))
    plain.train(), balanced.train()
    without = plain(inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
    outputs = balanced(inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
    assert without.aux_loss is None and outputs.aux_loss is not None and outputs.aux_loss > 0
    # Exactly: the same weights and ops in this process; the sum is the one the model computes.
    assert torch.equal(outputs.loss, without.loss + coef * outputs.aux_loss)

    trainer = make_trainer(tmp_path, 1, [HotExpertInjectionCallback(rank=RANK, alpha=2 * RANK)])
    trainer.fit(HelloraModule(tiny_backbone_config("olmoe"), router_aux_loss_coef=coef), datamodule=RandomTokens())
    assert "train/aux_loss" in trainer.callback_metrics and trainer.callback_metrics["train/aux_loss"] > 0


@pytest.mark.parametrize("backbone", ["deepseek_v2", "deepseek_v3"])
def test_router_aux_loss_coef_is_refused_without_a_loss(backbone):
    with pytest.raises(ValueError, match="no load-balancing"):
        HelloraModule(tiny_backbone_config(backbone), router_aux_loss_coef=0.5)


def test_router_aux_loss_coef_sets_every_deepseek_moe_gate():
    module = HelloraModule(tiny_backbone_config("deepseek_moe"), router_aux_loss_coef=0.25)
    gates = [moe.router for moe in architecture_for(module.model).moe_layers(module.model)]
    assert gates and all(gate.alpha == 0.25 for gate in gates)
    assert module.model.config.aux_loss_alpha == 0.25


def test_evaluation_loss_leaves_the_aux_loss_out():
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    losses = {}
    for coef in (0.0, 0.5):
        module = HelloraModule(tiny_backbone_config("olmoe"), router_aux_loss_coef=coef)
        module.eval()
        with torch.no_grad():
            losses[coef] = module(ids, torch.ones_like(ids), ids).loss
        module.train()
        with torch.no_grad():
            train_loss = module(ids, torch.ones_like(ids), ids).loss
        assert (train_loss > losses[coef]) == (coef > 0)
    assert torch.equal(losses[0.0], losses[0.5])  # the same forward in this process: the aux loss is left out, not 0x
