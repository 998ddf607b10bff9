"""Generator prompts read from a file: the prompt source of every text-to-image run.

A prompt file is ``.txt`` (one prompt per line), ``.jsonl`` (one JSON object per
line, the prompt under a field) or ``.csv`` (a header row, the prompt in a
column). Batches are ``{"prompts": list[str]}``: the generator samples its own
noise, so a prompt is all a batch needs.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset

from rdm_lightning.data.groups import check_loader_args, train_loader_sampling
from rdm_lightning.data.samplers import ResumableDataLoader

PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv")


def load_prompts(path: str | Path, field: str = "prompt") -> list[str]:
    """Read the prompts of a ``.txt``, ``.jsonl`` or ``.csv`` file, in file order.

    Args:
        path: The prompt file; its suffix picks the format.
        field: Key of the prompt in each ``.jsonl`` object, or the ``.csv``
            column holding it; unused for ``.txt``.

    Returns:
        The prompts, surrounding whitespace stripped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown suffix, a malformed line or row, or no prompts at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = _read_txt(path)
    elif suffix == ".jsonl":
        prompts = _read_jsonl(path, field)
    elif suffix == ".csv":
        prompts = _read_csv(path, field)
    else:
        raise ValueError(f"unknown prompt file suffix {suffix!r} of {str(path)!r}; accepted: {PROMPT_SUFFIXES}")
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} holds no prompts")
    return prompts


def _read_txt(path: Path) -> list[str]:
    # Blank lines are layout (trailing newline, paragraph breaks), not prompts.
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _read_jsonl(path: Path, field: str) -> list[str]:
    prompts = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{str(path)!r} line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is not valid JSON: {error}") from error
        if not isinstance(record, dict) or field not in record:
            raise ValueError(f"{where} has no field {field!r}; expected a JSON object with a string under {field!r}")
        prompts.append(_check_prompt(record[field], where, field))
    return prompts


def _read_csv(path: Path, field: str, delimiter: str = ",", quoting: int = csv.QUOTE_MINIMAL) -> list[str]:
    # A tab-separated file whose fields hold bare quotes (PartiPrompts.tsv) reads with csv.QUOTE_NONE.
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting)
        columns = reader.fieldnames or []
        if field not in columns:
            raise ValueError(f"{str(path)!r} has no column {field!r}; its columns are {columns}")
        # Line numbers count the header as line 1, as an editor shows them.
        return [
            _check_prompt(row[field], f"{str(path)!r} line {reader.line_num}", field)
            for row in reader
        ]


def _check_prompt(value: object, where: str, field: str) -> str:
    """A non-empty string prompt, stripped; anything else is an error, never skipped."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {field!r} must be a non-empty string, got {value!r}")
    return value.strip()


class PromptDataset(Dataset):
    """A list of prompts as a map-style dataset of strings."""

    def __init__(self, prompts: list[str]) -> None:
        self.prompts = list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> str:
        return self.prompts[index]


def collate_prompts(prompts: list[str]) -> dict[str, list[str]]:
    """Batch prompts as ``{"prompts": [...]}`` (module level so worker processes can pickle it)."""
    return {"prompts": list(prompts)}


class PromptDataModule(L.LightningDataModule):
    """Prompts from a file for generator training, shuffled reproducibly.

    Args:
        train_file: Prompt file for training (``.txt``, ``.jsonl`` or ``.csv``).
        val_file: Prompt file for validation; ``None`` validates on the first
            ``batch_size`` training prompts.
        batch_size: Prompts per batch; the last incomplete training batch is dropped.
        num_workers: DataLoader worker processes.
        shuffle_seed: Seed of the training order: the same seed gives the same
            order on every run, another seed another order; epoch ``e`` uses
            ``shuffle_seed + e``, so resumed runs see the same batches. Under
            multi-process strategies Lightning shards this order across ranks.
        field: Key of the prompt in ``.jsonl`` objects and the ``.csv`` column.
        group_size: K, samples per prompt in a training batch (group-relative
            methods); must divide ``batch_size``. Above 1 a training batch holds
            ``batch_size // K`` distinct prompts, each K times in a row
            (:class:`~rdm_lightning.data.groups.GroupBatchSampler`), every rank
            its own prompts; multi-process runs then need
            ``trainer.use_distributed_sampler: false``.
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        shuffle_seed: int = 0,
        field: str = "prompt",
        group_size: int = 1,
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, num_workers, group_size)
        self.save_hyperparameters()
        self.train_file = train_file
        self.val_file = val_file
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_seed = shuffle_seed
        self.field = field
        self.group_size = group_size
        self.train_prompts: list[str] | None = None
        self.val_prompts: list[str] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read the prompt files (once; later calls reuse them)."""
        if self.train_prompts is not None:
            return
        train_prompts = load_prompts(self.train_file, self.field)
        # drop_last would otherwise yield an empty epoch without any error.
        if len(train_prompts) < self.batch_size // self.group_size:
            raise ValueError(
                f"{self.train_file!r} holds {len(train_prompts)} prompts, fewer than the "
                f"{self.batch_size // self.group_size} of one batch (batch_size={self.batch_size}, "
                f"group_size={self.group_size}); lower batch_size or add prompts"
            )
        if self.val_file is None:
            self.val_prompts = train_prompts[: self.batch_size]
        else:
            self.val_prompts = load_prompts(self.val_file, self.field)
        self.train_prompts = train_prompts

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches (of whole prompt groups) whose order depends only on ``shuffle_seed``."""
        self.setup()
        dataset = PromptDataset(self.train_prompts)
        return ResumableDataLoader(
            dataset,
            num_workers=self.num_workers,
            collate_fn=collate_prompts,
            trainer=self.trainer,
            **train_loader_sampling(len(dataset), self.batch_size, self.group_size, self.shuffle_seed, self.trainer),
        )

    def val_dataloader(self) -> DataLoader:
        """Validation prompts in file order."""
        self.setup()
        return DataLoader(
            PromptDataset(self.val_prompts),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_prompts,
        )
