"""The small protocol the callbacks need from a LightningModule they did not write.

1. The module holds a transformers MoE causal LM at `pl_module.<model_attribute>`
   (default `model`), built by the end of `__init__` or `setup` (before the callbacks' setup
   runs, the model must exist; build it in `__init__` if in doubt).
2. Training batches are dicts with `input_ids` and, optionally, `attention_mask`.
3. `configure_optimizers` optimizes only parameters with `requires_grad=True` at the time it is
   called (the callbacks freeze the base and add adapters before that).
"""

from __future__ import annotations

from typing import ClassVar

from lightning.pytorch import LightningModule, Trainer
from torch import nn

from ..backbones import architecture_for


def backbone_of(pl_module: LightningModule, model_attribute: str) -> nn.Module:
    model = getattr(pl_module, model_attribute, None)
    if model is None:
        raise AttributeError(
            f"{type(pl_module).__name__} has no attribute {model_attribute!r} holding the transformers model; "
            "set the callback's `model_attribute` to the attribute that holds it."
        )
    architecture_for(model)
    return model


def train_dataloader(trainer: Trainer, pl_module: LightningModule):
    """The training data however it was given: a datamodule, `train_dataloaders=`, or the module."""
    # The fit loop's data source resolves all three; it is the one place Lightning keeps that.
    source = getattr(trainer.fit_loop, "_data_source", None)
    if source is not None and source.is_defined():
        return source.dataloader()
    raise RuntimeError(
        "Routing profiling needs training data: pass a datamodule or train_dataloaders to trainer.fit, "
        "or define train_dataloader() on the LightningModule."
    )


class PlanCompanion:
    """A callback a method needs beside HotExpertInjectionCallback (LoRIMaskCallback for hellori,
    DynamicRankCallback for dr_lora): it gives the plan its settings, a `spec_type` instance, and
    later changes the plan through the plan's own methods."""

    spec_type: ClassVar[type]  # LoRISpec or DynamicRankSpec

    def plan_spec(self, rank: int):
        raise NotImplementedError
