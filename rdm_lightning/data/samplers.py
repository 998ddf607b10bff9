"""Samplers whose order is a function of (seed, epoch), so a resumed run sees the same batches."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(num_items)`` drawn from ``seed + epoch``.

    Lightning calls :meth:`set_epoch` before each epoch, so the order of epoch
    ``e`` is the same whether the run got there directly or by resuming.
    """

    def __init__(self, num_items: int, seed: int = 0):
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_items, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_items
