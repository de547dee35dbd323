"""DynamicRankCallback: DR-LoRA's per-expert ranks, grown by saliency within a rank budget."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from ..adapters import DynamicRankSpec, ExpertLoRA, update_trainable_params
from ..adapters.dynamic_rank import (
    apply_expert_ranks,
    expert_rank_importance,
    grow_ranks,
    ranked_expert_adapters,
    saliency,
)
from ..routing import RoutingRecorder
from ..routing.heatmap import heatmap_image
from .injection import injection_callback
from .logging import log_image, log_scalars, log_text
from .protocol import PlanCompanion


class DynamicRankCallback(PlanCompanion, Callback):
    """Grows the active rank of the most salient experts every `interval` optimizer steps.

    With method "dr_lora", HotExpertInjectionCallback allocates every expert adapter at
    `rank_max` (default 2 x the plan's rank) and activates `rank_init` (default half the plan's
    rank) per expert; rank slices beyond an expert's active rank have no effect and get no
    gradient. The budget is the total rank of a uniform-rank LoRA on the same experts (the
    plan's rank x adapted experts), so DR-LoRA never trains more than LoRA would.

    Saliency per expert (defaults in brackets): an EMA (`ema_decay` [0.9] per optimizer step; under
    gradient accumulation, over all micro-batches of the step) of its routing share in its layer,
    and an EMA of its rank importance (sum of |theta * grad theta| over its active slices, per
    active rank), each normalised to mean 1, combined as
    `frequency_weight` [0.5] * f + (1 - w) * i ("sum") or f^w * i^(1-w) ("product"). At each
    growth event the top `grow_fraction` [0.25] of experts below rank_max gain `rank_step` [2]
    ranks each while budget remains. Ranks never shrink. The rank map is logged as a heatmap and
    the plan (plan.json, checkpoints) records the current ranks.
    """

    spec_type = DynamicRankSpec  # HotExpertInjectionCallback finds this callback by it

    def __init__(
        self,
        rank_init: int | None = None,
        rank_max: int | None = None,
        interval: int = 50,
        grow_fraction: float = 0.25,
        rank_step: int = 2,
        ema_decay: float = 0.9,
        frequency_weight: float = 0.5,
        combination: str = "sum",
        model_attribute: str = "model",
    ):
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}.")
        self._schedule = {
            "interval": interval,
            "grow_fraction": grow_fraction,
            "rank_step": rank_step,
            "frequency_weight": frequency_weight,
            "combination": combination,
        }
        DynamicRankSpec(1, 1, **self._schedule)  # checks the schedule now, before any model work
        self.rank_init = rank_init
        self.rank_max = rank_max
        self.interval = interval
        self.grow_fraction = grow_fraction
        self.rank_step = rank_step
        self.ema_decay = ema_decay
        self.frequency_weight = frequency_weight
        self.combination = combination
        self.model_attribute = model_attribute
        self.frequency: dict[int, torch.Tensor] = {}  # per MoE layer: EMA of routing share per hot expert
        self.importance: dict[int, torch.Tensor] = {}  # per MoE layer: EMA of rank importance per hot expert
        self._recorder: RoutingRecorder | None = None  # armed on every training batch
        self._stepped_at: int | None = None  # global step at the last update (accumulation: one per step)

    def plan_spec(self, rank: int) -> DynamicRankSpec:
        return DynamicRankSpec.for_rank(rank, self.rank_init, self.rank_max, **self._schedule)

    def _adapters(self, trainer: Trainer) -> dict[int, ExpertLoRA]:
        return ranked_expert_adapters(injection_callback(trainer).model)

    # -- statistics ------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        plan = injection_callback(trainer).plan
        if plan is None or plan.dynamic_rank is None:
            raise ValueError("DynamicRankCallback needs HotExpertInjectionCallback(method='dr_lora').")
        self._recorder = RoutingRecorder(injection_callback(trainer).model)
        self._log_ranks(trainer)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stepped_at = trainer.global_step  # restored by now when resuming

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._recorder is not None:
            self._recorder.arm(batch)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self._recorder is not None:
            self._recorder.armed = False  # activation checkpointing re-runs routers in backward

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        decay = self.ema_decay
        for layer, adapter in self._adapters(trainer).items():
            value = expert_rank_importance(adapter).cpu()
            previous = self.importance.get(layer)
            self.importance[layer] = value if previous is None else decay * previous + (1 - decay) * value

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._recorder is None or trainer.global_step == self._stepped_at:
            return  # no optimizer step yet (gradient accumulation): keep counting this step's routing
        self._stepped_at = trainer.global_step
        profile = self._recorder.take()
        adapters = self._adapters(trainer)
        for row, layer in enumerate(profile.layers):
            if layer not in adapters or profile.tokens == 0:
                continue
            counts = profile.counts[row].double()
            share = counts[adapters[layer].hot_experts.cpu()] / counts.sum().clamp_min(1) * profile.num_experts
            previous = self.frequency.get(layer)
            self.frequency[layer] = (
                share if previous is None else self.ema_decay * previous + (1 - self.ema_decay) * share
            )
        if trainer.global_step > 0 and trainer.global_step % self.interval == 0:
            self.grow(trainer)

    # -- growth ----------------------------------------------------------------------------
    def grow(self, trainer: Trainer) -> None:
        injection = injection_callback(trainer)
        plan = injection.plan
        adapters = self._adapters(trainer)
        layers = [layer for layer in adapters if layer in self.frequency and layer in self.importance]
        if not layers:
            return
        planned = {entry.layer: entry.expert_ranks for entry in plan.layers}
        ranks = torch.cat([torch.tensor(planned[layer], dtype=torch.long) for layer in layers])
        scores = saliency(
            torch.cat([self.frequency[layer].float() for layer in layers]),
            torch.cat([self.importance[layer].float() for layer in layers]),
            self.frequency_weight,
            self.combination,
        )
        spec = plan.dynamic_rank
        grown = grow_ranks(ranks, scores, spec.rank_max, spec.budget, self.grow_fraction, self.rank_step)
        if torch.equal(grown, ranks):
            return
        for layer, new in zip(layers, torch.split(grown, [len(planned[layer]) for layer in layers])):
            plan.set_expert_ranks(layer, new.tolist())
        apply_expert_ranks(injection.model, plan)
        update_trainable_params(injection.model, plan)
        rank_zero_info(
            f"[hellora] DR-LoRA step {trainer.global_step}: total active rank {int(grown.sum())} of "
            f"{spec.budget} ({plan.trainable_params:,} trainable parameters)"
        )
        self._log_ranks(trainer)

    def _log_ranks(self, trainer: Trainer) -> None:
        plan = injection_callback(trainer).plan
        rank_map = torch.zeros(len(plan.layers), plan.num_experts)
        for row, entry in enumerate(plan.layers):
            if entry.expert_ranks:
                rank_map[row, entry.hot_experts] = torch.tensor(entry.expert_ranks, dtype=torch.float32)
        step = trainer.global_step
        log_scalars(
            trainer,
            {"dr_lora/total_active_rank": float(rank_map.sum()), "dr_lora/budget": plan.dynamic_rank.budget},
            step,
        )
        log_image(trainer, "dr_lora/rank_map", heatmap_image(rank_map, vmax=plan.dynamic_rank.rank_max), step)
        text = "\n".join(f"    layer {e.layer}: {dict(zip(e.hot_experts, e.expert_ranks or []))}" for e in plan.layers)
        log_text(trainer, "dr_lora/ranks", text, step)

    # -- state -----------------------------------------------------------------------------
    def teardown(self, trainer, pl_module, stage) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

    def state_dict(self) -> dict:
        return {
            "frequency": {k: v.tolist() for k, v in self.frequency.items()},
            "importance": {k: v.tolist() for k, v in self.importance.items()},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.frequency = {
            int(k): torch.tensor(v, dtype=torch.float64) for k, v in state_dict.get("frequency", {}).items()
        }
        self.importance = {int(k): torch.tensor(v) for k, v in state_dict.get("importance", {}).items()}
