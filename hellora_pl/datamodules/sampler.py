"""A shuffling sampler whose order depends only on (seed, epoch).

Lightning calls `set_epoch` on a sampler that has it at the start of every epoch. That number
is one too high after resuming from a checkpoint written at an epoch's end (Lightning 2.6 counts
the replayed epoch end again), and on a resume it comes after the loader's iterator was built.
So the epoch must come from the trainer when the iterator is built: either the loader sets it
(hellora_pl's datamodules use `ResumableDataLoader`, which also restores the position inside the
epoch), or, with a plain DataLoader, pass `epoch_fn` returning the trainer's `current_epoch`
(it then overrides `set_epoch`). A stateful generator (DataLoader(shuffle=True, generator=...))
would restart its stream instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    def __init__(self, length: int, seed: int = 0, epoch_fn: Callable[[], int] | None = None):
        self.length = length
        self.seed = seed
        self.epoch = 0
        self.epoch_fn = epoch_fn

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.epoch_fn is not None:
            self.epoch = self.epoch_fn()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length
