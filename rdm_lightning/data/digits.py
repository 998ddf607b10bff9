"""The digits domain: scikit-learn's 8×8 handwritten digits with text prompts.

It ships with scikit-learn (1,797 images, values 0..16, 10 classes), so every
method runs end to end offline on a CPU. Images are scaled to ``[0, 1]`` and
shaped ``(N, 1, 8, 8)``; each label is written as the prompt
``"a handwritten digit N"`` so the same prompt → embedding → denoiser path as
a text-to-image model runs.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from rdm_lightning.data.groups import check_loader_args, train_loader_sampling
from rdm_lightning.data.samplers import ResumableDataLoader

DIGIT_PROMPT = "a handwritten digit {label}"
NUM_CLASSES = 10
# sklearn's pixel values are integers in 0..16.
PIXEL_MAX = 16.0

_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# A digit is a lone numeral or its English word, so "digit 7" and "a seven." both
# parse while "12", "7th" or "0.5" (not a digit 0-9) do not.
_DIGIT_PATTERN = re.compile(
    r"(?<!\w)(?<!\d\.)(\d|" + "|".join(_DIGIT_WORDS) + r")(?!\w)(?!\.\d)", re.IGNORECASE
)


def digit_prompt(label: int) -> str:
    """The prompt naming digit ``label`` (0-9), e.g. ``"a handwritten digit 7"``."""
    try:
        # operator.index takes Python, NumPy and 0-d torch integers, and refuses 7.0 or "7".
        value = operator.index(label)
    except TypeError:
        value = None
    if isinstance(label, bool) or value is None or not 0 <= value < NUM_CLASSES:
        raise ValueError(f"digit label must be an integer in 0..9, got {label!r}")
    return DIGIT_PROMPT.format(label=value)


def digit_from_prompt(prompt: str) -> int:
    """The digit a prompt names: a lone numeral 0-9 or its English word.

    Raises:
        ValueError: the prompt names no digit, or names different digits.
    """
    found = {_digit_value(match) for match in _DIGIT_PATTERN.findall(prompt)}
    if len(found) != 1:
        problem = "names no digit 0-9" if not found else f"names several digits {sorted(found)}"
        raise ValueError(
            f"prompt {prompt!r} {problem}; accepted: one digit as a numeral or word, "
            f"e.g. {DIGIT_PROMPT.format(label=7)!r}"
        )
    return found.pop()


def _digit_value(token: str) -> int:
    return int(token) if token.isdigit() else _DIGIT_WORDS.index(token.lower())


@dataclass(frozen=True)
class DigitsSplit:
    """A stratified train/test split of the digits, images float32 in ``[0, 1]`` shaped ``(N, 1, 8, 8)``."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def digits_split(test_fraction: float = 0.2, seed: int = 0) -> DigitsSplit:
    """The fixed stratified split of the 1,797 digits (1,437 train / 360 test by default).

    Args:
        test_fraction: Share of the images held out for testing, in ``(0, 1)``.
        seed: ``random_state`` of the split; the same seed always gives the same split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    data = load_digits()
    images = torch.from_numpy((data.images / PIXEL_MAX).astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(data.target.astype(np.int64))
    # Stratified so that every class has its share in both halves (36 ± 1 test images each by default).
    train_index, test_index = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=data.target, random_state=seed
    )
    train_index, test_index = torch.from_numpy(train_index), torch.from_numpy(test_index)
    return DigitsSplit(images[train_index], labels[train_index], images[test_index], labels[test_index])


class _LabelledDigits(Dataset):
    """Images with their labels, one ``(image, label)`` pair per item."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]


def collate_digits(items: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor | list[str]]:
    """Batch ``(image, label)`` pairs as ``{"images", "labels", "prompts"}``."""
    images, labels = zip(*items)
    labels = torch.stack(labels)
    return {
        "images": torch.stack(images),
        "labels": labels,
        "prompts": [digit_prompt(label) for label in labels.tolist()],
    }


def collate_digit_prompts(labels: list[int]) -> dict[str, Tensor | list[str]]:
    """Batch labels as the prompts that name them, ``{"prompts", "labels"}``."""
    return {"prompts": [digit_prompt(label) for label in labels], "labels": torch.tensor(labels, dtype=torch.long)}


class DigitsDataModule(L.LightningDataModule):
    """The digits domain as a LightningDataModule.

    Training batches are real images with their labels and prompts,
    ``{"images": (B, 1, 8, 8) in [0, 1], "labels": (B,) long, "prompts": [...]}``,
    shuffled reproducibly, the last incomplete batch dropped. Validation batches
    are prompts only, ``{"prompts": [...], "labels": (B,)}``: validation
    generates the images, so it needs a fixed, class-balanced list of prompts.

    Args:
        batch_size: Images (training) or prompts (validation) per batch.
        num_workers: DataLoader worker processes.
        test_fraction: Share of the digits held out as the test split, in ``(0, 1)``;
            training only sees the rest.
        split_seed: Seed of the stratified train/test split.
        shuffle_seed: Seed of the training order: the same seed gives the same
            order on every run, another seed another order; epoch ``e`` uses
            ``shuffle_seed + e``, so resumed runs see the same batches. Under
            multi-process strategies Lightning shards this order across ranks.
        val_size: How many prompts validation generates for, digits cycling 0..9.
        group_size: K, copies of each image (and so of its prompt) in a training
            batch (group-relative methods); must divide ``batch_size``. Above 1 a
            training batch holds ``batch_size // K`` distinct images, each K times
            in a row (:class:`~rdm_lightning.data.groups.GroupBatchSampler`), every
            rank its own images; multi-process runs then need
            ``trainer.use_distributed_sampler: false``.
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        shuffle_seed: int = 0,
        val_size: int = 100,
        group_size: int = 1,
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, num_workers, group_size)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if val_size < 1:
            raise ValueError(f"val_size must be >= 1, got {val_size}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.shuffle_seed = shuffle_seed
        self.val_size = val_size
        self.group_size = group_size
        self.split: DigitsSplit | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load the split (once; later calls reuse it)."""
        if self.split is not None:
            return
        split = digits_split(self.test_fraction, self.split_seed)
        # drop_last would otherwise yield an empty epoch without any error.
        if len(split.train_labels) < self.batch_size // self.group_size:
            raise ValueError(
                f"the train split holds {len(split.train_labels)} images, fewer than the "
                f"{self.batch_size // self.group_size} of one batch (batch_size={self.batch_size}, "
                f"group_size={self.group_size}); lower batch_size or test_fraction"
            )
        self.split = split

    def val_labels(self) -> list[int]:
        """The validation labels: ``val_size`` digits cycling 0, 1, …, 9, 0, …"""
        return [index % NUM_CLASSES for index in range(self.val_size)]

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (of whole image groups) whose order depends only on ``shuffle_seed``."""
        self.setup()
        dataset = _LabelledDigits(self.split.train_images, self.split.train_labels)
        return ResumableDataLoader(
            dataset,
            num_workers=self.num_workers,
            collate_fn=collate_digits,
            trainer=self.trainer,
            **train_loader_sampling(len(dataset), self.batch_size, self.group_size, self.shuffle_seed, self.trainer),
        )

    def val_dataloader(self) -> DataLoader:
        """The fixed, class-balanced validation prompts, in order."""
        return DataLoader(
            self.val_labels(),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_digit_prompts,
        )
