"""The training/validation-loss DataLoader every hellora_pl datamodule builds the same way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import DataLoader

from hellora_pl.datamodules.collate import CausalLMCollator
from hellora_pl.datamodules.sampler import EpochShuffleSampler


class LossLoaders:
    """Mixin for a LightningDataModule with `batch_size`, `seed`, `num_workers` and `tokenizer`:
    right-padded loss batches, shuffled by (seed, the trainer's epoch) so resumes are exact."""

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _loss_loader(self, examples: Sequence[dict[str, Any]], shuffle: bool) -> DataLoader:
        return DataLoader(
            examples,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(examples), self.seed, self._current_epoch) if shuffle else None,
            collate_fn=CausalLMCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
