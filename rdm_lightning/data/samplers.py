"""Samplers whose order is a function of (seed, epoch), and a loader that resumes mid-epoch, so a resumed run sees the same batches."""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader, Sampler


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


class _AfterFirstBatches:
    """The index batches of ``batch_sampler`` after its first ``skip``; ``len`` stays the whole epoch's,
    as Lightning counts the skipped batches as already fetched."""

    def __init__(self, batch_sampler: Iterable[list[int]], skip: int):
        self.batch_sampler = batch_sampler
        self.skip = skip

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return len(self.batch_sampler)


class ResumableDataLoader(DataLoader):
    """A training DataLoader that resumes mid-epoch at the batch the training loop had reached.

    It follows Lightning's stateful-loader protocol: Lightning stores :meth:`state_dict`
    in the checkpoint and hands it to :meth:`load_state_dict` before the loader is first
    iterated on resume. The state is the epoch and the number of batches the training loop
    has *consumed* of it, read from the ``trainer``'s loop progress: the loader's own count
    would include the batch Lightning prefetches. The first iteration after a resume sets
    the sampler's epoch (Lightning sets it only after that iterator exists) and skips the
    consumed index batches without loading their items, so the run continues bit for bit.

    Args:
        *args, **kwargs: as for ``torch.utils.data.DataLoader``; the order must be a function
            of the epoch (``EpochShuffleSampler``, ``GroupBatchSampler``, or Lightning's
            distributed sampler over them).
        trainer: the Lightning trainer whose training loop consumes the batches; ``None``
            (outside ``fit``) makes the loader an ordinary DataLoader.
    """

    def __init__(self, *args, trainer: Any = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.trainer = trainer
        self._skip = 0

    @property
    def _index_sampler(self):
        # DataLoader's iterators draw their index batches from this property, worker processes included.
        index_sampler = super()._index_sampler
        return _AfterFirstBatches(index_sampler, self._skip) if self._skip else index_sampler

    def __iter__(self):
        iterator = super().__iter__()
        self._skip = 0  # only the first epoch after a resume is partial
        return iterator

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: where the training loop stands (empty outside ``fit``)."""
        if self.trainer is None:
            return {}
        consumed = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if consumed >= len(self):
            # A checkpoint after the epoch's last batch: Lightning resumes at the next epoch's start.
            return {"epoch": self.trainer.current_epoch + 1, "batches": 0}
        return {"epoch": self.trainer.current_epoch, "batches": consumed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Make the next iteration continue epoch ``state_dict["epoch"]`` after its first ``batches``."""
        if not state_dict:
            return
        _set_sampler_epoch(self, state_dict["epoch"])
        self._skip = state_dict["batches"]
