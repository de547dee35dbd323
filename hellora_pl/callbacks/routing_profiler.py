"""RoutingProfilerCallback: profile routing before training, and optionally watch it during."""

from __future__ import annotations

import math
import time

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..adapters import injected_hot_experts
from ..adapters.inject import injected_plan
from ..routing import RoutingDrift, RoutingProfile, RoutingRecorder, policy_from_description, routing_drift
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

    Routing drift (an extension beyond the paper, which names drift as a limitation): on every
    watched step with expert adapters injected, it compares the step's routing with the plan's
    adapted experts and logs `routing/drift/{adapted_share,overlap,jaccard}` and, per layer,
    `routing/drift/layer_<i>/{adapted_share,overlap,jaccard,newly_hot}` (`hellora_pl.routing.drift`:
    overlap = |adapted & hot now| / |hot now|, where "hot now" is what the plan's own policy would
    choose from this step's routing). When a layer's overlap falls below `drift_warn_below`
    (default 0.5; None: never) it warns once per layer, naming the layers, the figures and the fix,
    HotExpertInjectionCallback(reselect_every_n_steps=...), which reads the watched routing
    accumulated here since its last re-selection (`take_recent_routing`; kept in checkpoints).
    """

    def __init__(
        self,
        fraction: float = 0.1,
        num_batches: int | None = None,
        profile_path: str | None = None,
        watch_every_n_steps: int = 0,
        model_attribute: str = "model",
        drift_warn_below: float | None = 0.5,
    ):
        if not 0 < fraction <= 1:
            raise ValueError(f"RoutingProfilerCallback fraction must be in (0, 1], got {fraction}.")
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"RoutingProfilerCallback num_batches must be >= 1, got {num_batches}.")
        if not isinstance(watch_every_n_steps, int) or watch_every_n_steps < 0:
            raise ValueError(
                f"RoutingProfilerCallback watch_every_n_steps must be an integer >= 0 (0: no watch), "
                f"got {watch_every_n_steps!r}."
            )
        if drift_warn_below is not None and not 0 <= drift_warn_below <= 1:
            raise ValueError(
                f"RoutingProfilerCallback drift_warn_below is an overlap of hot-expert sets, in [0, 1] "
                f"(or null: never warn), got {drift_warn_below!r}."
            )
        self.fraction = fraction
        self.drift_warn_below = drift_warn_below
        self.num_batches = num_batches
        self.profile_path = profile_path
        self.watch_every_n_steps = watch_every_n_steps
        self.model_attribute = model_attribute
        self.profile: RoutingProfile | None = None
        self._watch: RoutingRecorder | None = None
        self._watching_step = False
        self._folded = False  # the watched batch's routing is in _recent already
        self._recent: RoutingProfile | None = None  # watched routing since the last take_recent_routing()
        self._drift_warned: set[int] = set()  # MoE layers warned about (once each)
        self._no_policy_noted = False

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
                self.profile = self.measure_routing(trainer, pl_module)
        return self.profile

    def measure_routing(self, trainer: Trainer, pl_module: LightningModule) -> RoutingProfile:
        """A routing profile of the model as it is now, on the first training batches (the same ones
        every call): `ensure_profile` takes it once before training; taken again after training, it
        shows how fine-tuning moved the routing."""
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
            self._fold()  # before any on_train_batch_end, so a checkpoint saved there has this step's routing

    def _fold(self) -> None:
        """Add a watched batch's routing to the recent routing (once per batch)."""
        if self._watching_step and not self._folded:
            self._folded = True
            profile = self._watch.profile()
            if profile.tokens > 0:
                self._recent = profile if self._recent is None else _summed(self._recent, profile)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._watching_step:
            return
        self._fold()
        self._watching_step = self._folded = False
        profile = self._watch.take()
        if profile.tokens > 0:
            self._log_routing(trainer, pl_module, profile, "routing/train", trainer.global_step)
            self._log_drift(trainer, pl_module, profile)

    def take_recent_routing(self) -> RoutingProfile | None:
        """The watched routing since the last call (or the fit's start), then start again; None when
        no step was watched in between (HotExpertInjectionCallback's re-selection reads it)."""
        recent, self._recent = self._recent, None
        return recent

    def _log_drift(self, trainer, pl_module, profile: RoutingProfile) -> RoutingDrift | None:
        plan = injected_plan(backbone_of(pl_module, self.model_attribute))
        if plan is None or not any(layer.hot_experts for layer in plan.layers):
            return None  # no expert adapters: nothing to drift from
        policy = policy_from_description(plan.policy)
        if policy is None:
            if not self._no_policy_noted:
                self._no_policy_noted = True
                rank_zero_info(
                    f"[hellora] routing drift: the plan's policy {plan.policy} cannot be rebuilt from its "
                    "description, so only the adapted share is logged (routing/train/layer_<i>/adapted_share)."
                )
            return None
        drift = routing_drift(profile, plan.hot_experts(), policy)
        log_scalars(trainer, drift.metrics("routing/drift"), trainer.global_step)
        if self.drift_warn_below is not None:
            self._warn_drift(trainer, plan, drift)
        return drift

    def _warn_drift(self, trainer, plan, drift: RoutingDrift) -> None:
        fresh = [e for e in drift.below(self.drift_warn_below) if e.layer not in self._drift_warned]
        if not fresh:
            return
        self._drift_warned.update(e.layer for e in fresh)
        planned = {entry.layer: entry for entry in plan.layers}
        lines = [
            f"    layer {e.layer}: overlap {e.overlap:.2f}, adapted share {e.adapted_share:.3f} (when planned: "
            f"{_planned_share(planned[e.layer], e.adapted)}), hot now {e.hot_now}, adapted {e.adapted}"
            for e in fresh
        ]
        every = max((getattr(cb, "reselect_every_n_steps", 0) for cb in trainer.callbacks), default=0)
        fix = (
            f"Re-selection (every {every} steps) adds adapters on the experts that are hot in the routing watched "
            "until then; a smaller reselect_every_n_steps follows drift sooner."
            if every
            else "To add adapters on newly hot experts during training, set "
            "HotExpertInjectionCallback(reselect_every_n_steps=N) (--hellora.reselect_every_n_steps N); or "
            "profile on data closer to the training data."
        )
        rank_zero_warn(
            f"[hellora] routing drift at step {trainer.global_step}: in MoE layer"
            f"{'s' if len(fresh) > 1 else ''} {', '.join(str(e.layer) for e in fresh)} the experts the "
            f"{plan.policy.get('name')} policy would choose now overlap the adapted ones by less than "
            f"drift_warn_below={self.drift_warn_below}:\n" + "\n".join(lines) + "\n"
            f"The adapters now see fewer of the tokens they were placed for. {fix} "
            "Each layer is reported once (drift_warn_below=null silences this)."
        )

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
        return {
            "profile": None if self.profile is None else self.profile.to_dict(),
            "recent": None if self._recent is None else self._recent.to_dict(),
            "drift_warned": sorted(self._drift_warned),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("profile") is not None:
            self.profile = RoutingProfile.from_dict(state_dict["profile"])
        recent = state_dict.get("recent")
        self._recent = None if recent is None else RoutingProfile.from_dict(recent)
        self._drift_warned = set(state_dict.get("drift_warned", []))


def _summed(a: RoutingProfile, b: RoutingProfile) -> RoutingProfile:
    return RoutingProfile(a.layers, a.counts + b.counts, a.gate_mass + b.gate_mass, a.tokens + b.tokens, a.top_k)


def _planned_share(entry, adapted: list[int]) -> str:
    """The share of the planning profile's selections on `adapted`, or "n/a" without one."""
    total = sum(entry.counts)
    return f"{sum(entry.counts[e] for e in adapted) / total:.3f}" if entry.counts and total else "n/a"
