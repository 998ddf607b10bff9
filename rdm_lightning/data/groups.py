"""K-repeat batches for group-relative methods: K samples per prompt in one batch.

:class:`GroupBatchSampler` yields batches of ``batch_size`` indices made of
``batch_size // K`` distinct items, each repeated K times consecutively, so
sample ``i`` of a batch belongs to group ``i // K`` (:func:`group_ids`). Groups
never span ranks: every rank takes its own groups from one shared permutation.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler

from rdm_lightning.core.advantages import check_group_size
from rdm_lightning.data.samplers import EpochShuffleSampler


def check_loader_args(batch_size: int, num_workers: int, group_size: int) -> None:
    """The checks every training DataModule makes of its loader arguments."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    check_group_size(batch_size, group_size)


def check_grouped_prompts(prompts: Sequence[str], group_size: int) -> None:
    """Raise unless ``prompts`` is K-repeated: whole groups of ``group_size`` identical consecutive prompts.

    Raises:
        ValueError: naming the batch size, or the first group whose prompts differ.
    """
    check_group_size(len(prompts), group_size)
    for start in range(0, len(prompts), group_size):
        group = list(prompts[start : start + group_size])
        if len(set(group)) > 1:
            raise ValueError(
                f"batch is not K-repeated for group_size={group_size}: samples {start}..{start + group_size - 1} "
                f"have prompts {group}; set the data module's group_size to {group_size} "
                f"(e.g. DigitsDataModule(group_size={group_size}))"
            )


class GroupBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size // group_size`` distinct items, each repeated ``group_size`` times.

    The item order of epoch ``e`` is the permutation of ``seed + e``
    (:class:`EpochShuffleSampler`, held as :attr:`sampler`: Lightning calls
    ``set_epoch`` on ``batch_sampler.sampler``, not on the batch sampler). Every
    rank draws the same permutation; global batch ``b`` takes the next
    ``num_replicas·batch_size/group_size`` items of it and rank ``r`` its ``r``-th
    share, so ranks hold disjoint groups and as many batches each (the tail
    that cannot fill a batch on every rank is dropped).

    Args:
        num_items: Size of the dataset (prompts, or images that carry a prompt).
        batch_size: Indices per batch on one rank; a multiple of ``group_size``.
        group_size: K, samples per item (prompt) in a batch.
        seed: Seed of the order; epoch ``e`` uses ``seed + e``.
        num_replicas: Number of ranks; by default the ``torch.distributed``
            world size if it is initialised, else 1.
        rank: This rank, in ``[0, num_replicas)``; by default the
            ``torch.distributed`` rank if it is initialised, else 0.

    Raises:
        ValueError: ``group_size`` does not divide ``batch_size``, a bad rank,
            or too few items for one batch on every rank.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        group_size: int,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_group_size(batch_size, group_size)
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas=}, {rank=}")
        self.sampler = EpochShuffleSampler(num_items, seed)
        self.batch_size = batch_size
        self.group_size = group_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.groups_per_batch = batch_size // group_size
        if len(self) == 0:
            raise ValueError(
                f"{num_items} items cannot fill one batch of {self.groups_per_batch} groups "
                f"(batch_size={batch_size}, group_size={group_size}) on each of {num_replicas} ranks; "
                "lower batch_size, raise group_size or add items"
            )

    def set_epoch(self, epoch: int) -> None:
        """Use the order of epoch ``epoch`` (same as ``self.sampler.set_epoch``)."""
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        items_per_step = self.groups_per_batch * self.num_replicas
        for step in range(len(self)):
            start = step * items_per_step + self.rank * self.groups_per_batch
            yield [item for item in order[start : start + self.groups_per_batch] for _ in range(self.group_size)]

    def __len__(self) -> int:
        return self.sampler.num_items // (self.groups_per_batch * self.num_replicas)


def group_ids(batch_size: int, group_size: int) -> Tensor:
    """``[B]`` long tensor, the group of each sample of a K-repeat batch: ``0,…,0, 1,…,1, …`` (each K times)."""
    check_group_size(batch_size, group_size)
    return torch.arange(batch_size) // group_size


def group_noise(
    num_groups: int,
    group_size: int,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    shared: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Initial noise ``[num_groups·group_size, *shape]`` for a K-repeat batch, on the generator's device.

    Args:
        num_groups: Prompts in the batch (B / K).
        group_size: K.
        shape: Shape of one sample's noise, e.g. ``(C, H, W)``.
        generator: Source of the noise; ``None`` uses the global RNG (on the CPU).
        shared: ``True``: the K samples of a group start from the same noise
            (DanceGRPO), groups from different noise; ``False``:
            every sample its own noise.
        dtype: Floating dtype of the noise.
    """
    if num_groups < 1 or group_size < 1:
        raise ValueError(f"need num_groups >= 1 and group_size >= 1, got {num_groups=}, {group_size=}")
    device = generator.device if generator is not None else None
    draws = num_groups if shared else num_groups * group_size
    noise = torch.randn((draws, *shape), generator=generator, device=device, dtype=dtype)
    return noise.repeat_interleave(group_size, dim=0) if shared else noise


def train_loader_sampling(
    num_items: int, batch_size: int, group_size: int, seed: int, trainer: Any | None = None
) -> dict[str, Any]:
    """The DataLoader sampling arguments of a training loader, with or without groups.

    ``group_size == 1``: a reshuffled ``sampler`` with ``batch_size`` and
    ``drop_last``, which Lightning shards across ranks itself. ``group_size > 1``:
    a :class:`GroupBatchSampler` ``batch_sampler`` whose rank and world size come
    from ``trainer`` when one is attached (``torch.distributed`` otherwise).

    Raises:
        ValueError: ``group_size > 1`` under a multi-process trainer that still
            lets Lightning inject its distributed sampler. Lightning cannot
            re-shard a custom batch sampler (and would split groups if it could),
            so such runs must set ``trainer.use_distributed_sampler: false``.
    """
    if group_size == 1:
        return {"batch_size": batch_size, "sampler": EpochShuffleSampler(num_items, seed), "drop_last": True}
    num_replicas = rank = None
    if trainer is not None:
        num_replicas, rank = trainer.world_size, trainer.global_rank
        # Lightning exposes the flag only on its accelerator connector.
        if num_replicas > 1 and trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError(
                f"group_size={group_size} under {num_replicas} processes needs "
                "`trainer.use_distributed_sampler: false`: "
                "GroupBatchSampler already gives every rank its own whole groups, and Lightning's distributed "
                "sampler cannot wrap a batch sampler"
            )
    return {"batch_sampler": GroupBatchSampler(num_items, batch_size, group_size, seed, num_replicas, rank)}
