"""LoRIMaskCallback: HELLoRI's sparse B, from a dense run's adapter or a dense phase in this run."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import load_file

from ..adapters import ADAPTER_FILE, PLAN_FILE, AdapterPlan, LoRISpec, adapter_state_dict, update_trainable_params
from ..adapters.io import named_like
from ..adapters.lori import apply_lori_masks, compute_lori_masks, lori_B_tensors
from .injection import injection_callback
from .logging import log_scalars
from .protocol import PlanCompanion


class LoRIMaskCallback(PlanCompanion, Callback):
    """Masks every B to its top `density` share by magnitude and retrains it from zero (LoRI).

    With method "hellori", HotExpertInjectionCallback freezes every A at its random init and
    gives every B a mask (all ones at first). The mask then comes from:

    - `mask_from`: the `hellora/` folder of a dense hellori run with the same plan. Its A is
      copied (LoRI's A stays the random matrix the dense B was trained against) and its B
      ranked; training here is sparse from the first step.
    - otherwise a dense phase in this run: B trains densely for `dense_steps` optimizer steps
      (a count, or a fraction of all steps when below 1), then the mask is taken from it, B
      restarts from zero and its optimizer state is cleared. `sparse_lr_scale` multiplies the
      learning rate from then on (LoRI uses 10x for the sparse phase; default 1).

    `granularity` pools the ranking over the whole model ("model", LoRI's choice), per decoder
    layer, or per matrix.
    """

    spec_type = LoRISpec  # HotExpertInjectionCallback finds this callback by it

    def __init__(
        self,
        density: float = 0.1,
        granularity: str = "model",
        mask_from: str | None = None,
        dense_steps: float = 0.5,
        sparse_lr_scale: float = 1.0,
    ):
        LoRISpec(density, granularity)  # checks both
        if dense_steps <= 0:
            raise ValueError(
                f"dense_steps must be positive (steps, or a fraction of steps below 1), got {dense_steps}."
            )
        if mask_from is not None and not (Path(mask_from) / ADAPTER_FILE).is_file():
            raise FileNotFoundError(
                f"LoRIMaskCallback mask_from={mask_from!r} holds no {ADAPTER_FILE}; give the hellora/ folder of a "
                "dense hellori run."
            )
        self.density = density
        self.granularity = granularity
        self.mask_from = mask_from
        self.dense_steps = dense_steps
        self.sparse_lr_scale = sparse_lr_scale

    def plan_spec(self, rank: int) -> LoRISpec:
        """What the plan records (the rank does not matter to LoRI's mask)."""
        return LoRISpec(self.density, self.granularity, masked=False, mask_from=self.mask_from)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        injection = injection_callback(trainer)
        if injection.plan is None or injection.plan.lori is None or injection.plan.lori.masked:
            return  # not a LoRI plan, or the mask came with a resumed checkpoint
        if self.mask_from is not None:
            self._mask_from_dense_run(injection)
            injection.plan.mark_lori_masked()
            self._announce(trainer, injection, "the dense run's adapter")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx) -> None:
        injection = injection_callback(trainer)
        plan = injection.plan
        if plan is None or plan.lori is None or plan.lori.masked or trainer.global_step < self._switch_step(trainer):
            return
        masks = compute_lori_masks(injection.model, self.density, self.granularity)
        b_params = {id(p) for p in lori_B_tensors(injection.model).values()}
        apply_lori_masks(injection.model, masks)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if id(param) in b_params:
                        optimizer.state.pop(param, None)  # B restarts: so do its Adam moments
                group["lr"] *= self.sparse_lr_scale
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            scheduler.base_lrs = [lr * self.sparse_lr_scale for lr in scheduler.base_lrs]
        plan.mark_lori_masked(switched_at_step=trainer.global_step)
        self._announce(trainer, injection, f"B after {trainer.global_step} dense steps")

    def _switch_step(self, trainer: Trainer) -> int:
        if self.dense_steps >= 1:
            return int(self.dense_steps)
        return max(1, int(self.dense_steps * trainer.estimated_stepping_batches))

    def _mask_from_dense_run(self, injection) -> None:
        folder = Path(self.mask_from)
        dense_plan = AdapterPlan.read(folder / PLAN_FILE)
        ours = injection.plan
        if dense_plan.hot_experts() != ours.hot_experts() or dense_plan.attention_modules != ours.attention_modules:
            raise ValueError(
                f"The dense run in {str(folder)!r} adapted other experts or modules than this run's plan; give "
                "this run the same routing profile (RoutingProfilerCallback(profile_path=...)) or hot experts."
            )
        dense = named_like(injection.model, load_file(str(folder / ADAPTER_FILE)))
        masks = compute_lori_masks(injection.model, self.density, self.granularity, source=dense)
        tensors = adapter_state_dict(injection.model)
        for name, tensor in tensors.items():
            if ".lora_A" in name:
                tensor.data.copy_(dense[name])
        apply_lori_masks(injection.model, masks)

    def _announce(self, trainer: Trainer, injection, source: str) -> None:
        update_trainable_params(injection.model, injection.plan)
        kept = sum(int(t.sum()) for n, t in adapter_state_dict(injection.model).items() if "lora_B_mask" in n)
        rank_zero_info(
            f"[hellora] LoRI mask from {source}: {kept:,} B entries kept ({100 * self.density:g}% by "
            f"{self.granularity}); B restarts from zero"
        )
        log_scalars(trainer, {"hellora/lori_kept_entries": kept}, trainer.global_step)
