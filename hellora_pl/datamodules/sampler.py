"""A shuffling sampler whose order depends only on (seed, epoch).

Lightning calls `set_epoch` on a sampler that has it at the start of every epoch, so a run
resumed from an end-of-epoch checkpoint sees exactly the batches an uninterrupted run would.
A stateful generator (DataLoader(shuffle=True, generator=...)) would restart its stream instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    def __init__(self, length: int, seed: int = 0):
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length
