"""The training/validation-loss DataLoaders every hellora_pl datamodule builds the same way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import DataLoader

from hellora_pl.datamodules.collate import CausalLMCollator
from hellora_pl.datamodules.resumable import ResumableDataLoader, TrainLoaderCheckpoint
from hellora_pl.datamodules.sampler import EpochShuffleSampler


class LossLoaders(TrainLoaderCheckpoint):
    """Mixin for a LightningDataModule with `batch_size`, `seed`, `num_workers` and `tokenizer`:
    right-padded loss batches. Training batches are shuffled by (seed, the trainer's epoch) and
    resume mid-epoch exactly (`ResumableDataLoader`, `TrainLoaderCheckpoint`); validation batches
    keep their order."""

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _loss_loader(self, examples: Sequence[dict[str, Any]], shuffle: bool) -> DataLoader:
        options = dict(
            batch_size=self.batch_size,
            collate_fn=CausalLMCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
        if not shuffle:
            return DataLoader(examples, **options)
        # The loader sets the sampler's epoch itself (see ResumableDataLoader), so no epoch_fn here.
        self._check_resume_layout(len(examples))
        sampler = EpochShuffleSampler(len(examples), self.seed)
        return ResumableDataLoader(
            examples,
            sampler=sampler,
            epoch_fn=self._current_epoch,
            resume_fn=self._take_train_loader_resume,
            **options,
        )
