"""RoutingProfilerCallback: profile routing before training, and optionally watch it during."""

from __future__ import annotations

import math
import time

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from ..adapters import injected_hot_experts
from ..routing import RoutingProfile, RoutingRecorder
from ..routing.heatmap import routing_heatmap
from .logging import log_figure, log_scalars
from .protocol import backbone_of, train_dataloader


class RoutingProfilerCallback(Callback):
    """Counts, per MoE layer, how often each expert is selected and its gate mass.

    Before the optimizer is built (in `setup`), it runs forward passes without gradients over
    `num_batches` training batches, or `fraction` of an epoch when `num_batches` is None, and
    removes its hooks afterwards. Counts are summed over all processes. With
    `watch_every_n_steps > 0` it also records the routing of every n-th training step and logs
    per-layer load entropy, max load, the share routed to adapted experts, and a layer x
    expert heatmap image (TensorBoard).
    """

    def __init__(
        self,
        fraction: float = 0.1,
        num_batches: int | None = None,
        profile_path: str | None = None,
        watch_every_n_steps: int = 0,
        model_attribute: str = "model",
    ):
        if not 0 < fraction <= 1:
            raise ValueError(f"RoutingProfilerCallback fraction must be in (0, 1], got {fraction}.")
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"RoutingProfilerCallback num_batches must be >= 1, got {num_batches}.")
        self.fraction = fraction
        self.num_batches = num_batches
        self.profile_path = profile_path
        self.watch_every_n_steps = watch_every_n_steps
        self.model_attribute = model_attribute
        self.profile: RoutingProfile | None = None
        self._watch: RoutingRecorder | None = None
        self._watching_step = False

    # -- profiling before training -------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # A callback that uses the profile (HotExpertInjectionCallback) asks for it after its own
        # checks, and not at all when it restores a checkpoint's plan; otherwise profile here.
        if stage == "fit" and not any(getattr(cb, "consumes_routing_profile", False) for cb in trainer.callbacks):
            self.ensure_profile(trainer, pl_module)

    def ensure_profile(self, trainer: Trainer, pl_module: LightningModule) -> RoutingProfile:
        """The profile, computed once (other callbacks call this; order does not matter)."""
        if self.profile is None:
            if self.profile_path is not None:
                self.profile = RoutingProfile.read(self.profile_path)
            else:
                self.profile = self._profile(trainer, pl_module)
        return self.profile

    def _profile(self, trainer: Trainer, pl_module: LightningModule) -> RoutingProfile:
        model = backbone_of(pl_module, self.model_attribute)
        loader = train_dataloader(trainer, pl_module)
        num_batches = self._batches_to_profile(loader)
        device = trainer.strategy.root_device
        pl_module.to(device)
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        with RoutingRecorder(model) as recorder, torch.no_grad():
            recorder.armed = True
            for index, batch in zip(range(num_batches), loader):
                if index % trainer.world_size != trainer.global_rank:
                    continue  # each rank profiles its share, so the summed counts are the one-process counts
                batch = move_data_to_device(batch, device)
                mask = batch.get("attention_mask")
                recorder.set_token_mask(mask)
                model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False)
            profile = recorder.profile()
        model.train(was_training)
        profile.counts = trainer.strategy.reduce(profile.counts.to(device), reduce_op="sum").cpu()
        profile.gate_mass = trainer.strategy.reduce(profile.gate_mass.to(device), reduce_op="sum").cpu()
        tokens = torch.tensor(float(profile.tokens), device=device)
        profile.tokens = int(trainer.strategy.reduce(tokens, reduce_op="sum").item())
        rank_zero_info(
            f"[hellora] routing profile: {num_batches} batches, {profile.tokens} tokens, "
            f"{len(profile.layers)} MoE layer{'' if len(profile.layers) == 1 else 's'} x {profile.num_experts} experts "
            f"({time.perf_counter() - start:.1f}s)"
        )
        return profile

    def _batches_to_profile(self, loader) -> int:
        if self.num_batches is not None:
            return self.num_batches
        try:
            return max(1, math.ceil(self.fraction * len(loader)))
        except TypeError:
            raise ValueError(
                "The training dataloader has no length, so `fraction` cannot be turned into a number of "
                "batches; set RoutingProfilerCallback(num_batches=...)."
            ) from None

    # -- reporting and watching during training ------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.profile is not None:
            self._log_routing(trainer, pl_module, self.profile, "routing/profile", trainer.global_step)
        if self.watch_every_n_steps > 0:
            self._watch = RoutingRecorder(backbone_of(pl_module, self.model_attribute))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._watch is None or trainer.global_step % self.watch_every_n_steps != 0:
            return
        self._watch.arm(batch)
        self._watching_step = True

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self._watch is not None:
            self._watch.armed = False  # activation checkpointing re-runs routers in backward

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._watching_step:
            return
        self._watching_step = False
        profile = self._watch.take()
        if profile.tokens > 0:
            self._log_routing(trainer, pl_module, profile, "routing/train", trainer.global_step)

    def _log_routing(self, trainer, pl_module, profile: RoutingProfile, tag: str, step: int) -> None:
        load = profile.load()
        hot = injected_hot_experts(backbone_of(pl_module, self.model_attribute))
        metrics = {}
        for row, layer in enumerate(profile.layers):
            share = load[row]
            entropy = -(share * share.clamp_min(1e-12).log()).sum() / math.log(profile.num_experts)
            metrics[f"{tag}/layer_{layer}/entropy"] = float(entropy)
            metrics[f"{tag}/layer_{layer}/max_load"] = float(share.max() * profile.num_experts)
            if hot.get(layer):
                metrics[f"{tag}/layer_{layer}/adapted_share"] = float(share[hot[layer]].sum())
        log_scalars(trainer, metrics, step)
        log_figure(trainer, f"{tag}/heatmap", lambda: routing_heatmap(profile, hot, title=tag), step)

    def teardown(self, trainer, pl_module, stage) -> None:
        if self._watch is not None:
            self._watch.remove()
            self._watch = None

    def state_dict(self) -> dict:
        return {"profile": None if self.profile is None else self.profile.to_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("profile") is not None:
            self.profile = RoutingProfile.from_dict(state_dict["profile"])
