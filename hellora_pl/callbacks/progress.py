"""The progress bar, without Lightning's "Epoch 1/-2" when only max_steps bounds a run."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepBoundProgressBar(RichProgressBar):
    """Lightning's rich bar; with max_epochs -1 (unbounded, max_steps decides) it shows "Epoch N" alone."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs < 0:
            description = description.replace(f"/{max_epochs - 1}", "", 1)
        return description
