"""Distributed (FSDP2) checkpoints: reading the folder :class:`~rdm_lightning.strategies.FSDP2Strategy` writes.

Such a checkpoint is a folder, not a file: ``torch.distributed.checkpoint`` shards (``__<rank>_0.distcp``, one
per rank, and the index ``.metadata``) holding the trained model entries (``state_dict.<name>``) and each
optimizer's state (``optimizer_<i>.…``), plus Lightning's ``meta.pt`` with everything else of a Lightning
checkpoint (hyperparameters, loops, callbacks, LR schedulers, the module's ``rdm`` counters and random
streams).

:func:`consolidated_checkpoint` turns the folder into the dict a single-file ``rdm fit`` checkpoint holds (full
tensors, in one process, no process group), and :func:`load_from_checkpoint` loads a module from either form:
what ``rdm sample``, ``rdm evaluate`` and ``rdm export`` need.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

METADATA_FILE = "meta.pt"
"""The file of a distributed checkpoint folder that holds everything but the weights and optimizer states
(Lightning's ``_METADATA_FILENAME``)."""
SHARD_INDEX_FILE = ".metadata"
"""``torch.distributed.checkpoint``'s index of the shards."""
MODEL_KEY = "state_dict"
"""The top-level key of the model entries in the shards (``ModelParallelStrategy.save_checkpoint``)."""


def is_distributed_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a distributed checkpoint folder (``meta.pt`` and the shards' ``.metadata``)."""
    path = Path(path)
    return path.is_dir() and (path / METADATA_FILE).is_file() and (path / SHARD_INDEX_FILE).is_file()


def _require_distributed_checkpoint(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not is_distributed_checkpoint(path):
        raise ValueError(f"{str(path)!r} is not a distributed checkpoint folder (one with {METADATA_FILE} and "
                         f"{SHARD_INDEX_FILE}, as FSDP2Strategy writes)")
    return path


def _shard_index(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(path)).read_metadata().state_dict_metadata


def checkpoint_entries(path: str | Path, key: str = MODEL_KEY) -> set[str]:
    """Names of the entries the shards of ``path`` hold under the top-level ``key`` (``state_dict``: the
    model's state-dict names; ``optimizer_0``: the first optimizer's flattened state)."""
    prefix = f"{key}."
    return {name[len(prefix):] for name in _shard_index(_require_distributed_checkpoint(path)) if name.startswith(prefix)}


def read_metadata(path: str | Path, weights_only: bool = False) -> dict[str, Any]:
    """The ``meta.pt`` of a distributed checkpoint: the checkpoint without weights and optimizer states."""
    return torch.load(_require_distributed_checkpoint(path) / METADATA_FILE, map_location="cpu", weights_only=weights_only)


def consolidated_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model entries of a distributed checkpoint as full CPU tensors, read in this process alone.

    Raises:
        ValueError: ``path`` is not a distributed checkpoint folder, or holds a non-tensor model entry.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = _require_distributed_checkpoint(path)
    prefix = f"{MODEL_KEY}."
    state = {}
    for name, entry in _shard_index(path).items():
        if not name.startswith(prefix):
            continue
        if not isinstance(entry, TensorStorageMetadata):
            raise ValueError(f"checkpoint {str(path)!r}: model entry {name[len(prefix):]!r} is not a tensor")
        state[name[len(prefix):]] = torch.empty(entry.size, dtype=entry.properties.dtype)
    loaded = {MODEL_KEY: state}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": it is
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(loaded, checkpoint_id=str(path), no_dist=True)
    return loaded[MODEL_KEY]


def consolidated_checkpoint(path: str | Path) -> dict[str, Any]:
    """A distributed checkpoint as the dict of a single-file checkpoint, without optimizer states:
    ``meta.pt`` plus ``state_dict`` (full tensors). What sampling, evaluation and export read; it does
    not resume a run (no optimizer state: resume from the folder itself)."""
    checkpoint = read_metadata(path)
    checkpoint[MODEL_KEY] = consolidated_state_dict(path)
    return checkpoint


def load_from_checkpoint(cls, path: str | Path, **kwargs):
    """``cls.load_from_checkpoint(path, **kwargs)`` for a single-file checkpoint or a distributed checkpoint
    folder (consolidated first, through a temporary file that is removed afterwards)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return cls.load_from_checkpoint(path, **kwargs)
    checkpoint = consolidated_checkpoint(path)
    with tempfile.TemporaryDirectory(prefix="rdm_consolidated_") as folder:
        file = Path(folder) / "consolidated.ckpt"
        torch.save(checkpoint, file)
        del checkpoint
        return cls.load_from_checkpoint(file, **kwargs)
