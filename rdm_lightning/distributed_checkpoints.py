"""Checkpoint folders of sharded strategies: reading what :class:`~rdm_lightning.strategies.FSDP2Strategy` and
DeepSpeed (:class:`~rdm_lightning.strategies.DeepSpeedZeroStrategy`, Lightning's ``DeepSpeedStrategy``) write.

A distributed (FSDP2) checkpoint is a folder, not a file: ``torch.distributed.checkpoint`` shards
(``__<rank>_0.distcp``, one per rank, and the index ``.metadata``) holding the trained model entries
(``state_dict.<name>``) and each optimizer's state (``optimizer_<i>.…``), plus Lightning's ``meta.pt`` with
everything else of a Lightning checkpoint (hyperparameters, loops, callbacks, LR schedulers, the module's ``rdm``
counters and random streams).

A DeepSpeed checkpoint is a folder too (docs/scaling.md, "DeepSpeed ZeRO-2 and ZeRO-3"): ``latest`` (the tag,
``checkpoint``), and in ``checkpoint/`` the module state (``mp_rank_00_model_states.pt``; under ZeRO-3 one
``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` per rank, with the parameters' partitions) holding Lightning's
state beside DeepSpeed's, and one ``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per rank with ZeRO's
partition of the float32 master weights and optimizer state. DeepSpeed's ``zero_to_fp32`` gathers the weights.

:func:`consolidated_checkpoint` turns either folder into the dict a single-file ``rdm fit`` checkpoint holds (full
tensors, in one process, no process group), and :func:`load_from_checkpoint` loads a module from any of the
three forms: what ``rdm sample``, ``rdm evaluate`` and ``rdm export`` need.
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
DEEPSPEED_TAG_FILE = "latest"
"""The file of a DeepSpeed checkpoint folder that names its tag folder (Lightning's tag: ``checkpoint``)."""
DEEPSPEED_STATE_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps", "global_steps",
    "global_samples", "dp_world_size", "mp_world_size", "checkpoint_parallel_dimensions", "ds_config", "ds_version",
    "universal_checkpoint_info",
})
"""DeepSpeed's own entries of its module-state file (DeepSpeed 0.19); the others are Lightning's checkpoint."""


def is_distributed_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a distributed checkpoint folder (``meta.pt`` and the shards' ``.metadata``)."""
    path = Path(path)
    return path.is_dir() and (path / METADATA_FILE).is_file() and (path / SHARD_INDEX_FILE).is_file()


def deepspeed_tag_folder(path: str | Path) -> Path | None:
    """The tag folder (``<path>/checkpoint``) of a DeepSpeed checkpoint folder ``path``, ``None`` when ``path``
    is not one (a ``latest`` file naming a folder with a ``*_model_states.pt``)."""
    path = Path(path)
    if not (path / DEEPSPEED_TAG_FILE).is_file():
        return None
    folder = path / (path / DEEPSPEED_TAG_FILE).read_text().strip()
    return folder if folder.is_dir() and any(folder.glob("*_model_states.pt")) else None


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a DeepSpeed checkpoint folder (:func:`deepspeed_tag_folder`)."""
    return Path(path).is_dir() and deepspeed_tag_folder(path) is not None


def is_checkpoint_folder(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint folder this module reads: distributed (FSDP2) or DeepSpeed."""
    return is_distributed_checkpoint(path) or is_deepspeed_checkpoint(path)


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
    """The checkpoint without weights and optimizer states: the ``meta.pt`` of a distributed checkpoint, or
    Lightning's entries of a DeepSpeed checkpoint's module-state file (:func:`read_deepspeed_metadata`)."""
    if is_deepspeed_checkpoint(path):
        return read_deepspeed_metadata(path, weights_only)
    return torch.load(_require_distributed_checkpoint(path) / METADATA_FILE, map_location="cpu", weights_only=weights_only)


def _require_deepspeed_checkpoint(path: str | Path) -> Path:
    path = Path(path).expanduser()
    folder = deepspeed_tag_folder(path) if path.is_dir() else None
    if folder is None:
        raise ValueError(f"{str(path)!r} is not a DeepSpeed checkpoint folder (one with {DEEPSPEED_TAG_FILE} naming a "
                         "folder of *_model_states.pt and *_optim_states.pt, as DeepSpeedZeroStrategy writes)")
    return folder


def deepspeed_world_size(path: str | Path) -> int:
    """How many processes wrote the DeepSpeed checkpoint folder ``path``: its ZeRO optimizer partitions, one file
    per data-parallel process (``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt``)."""
    return len(list(_require_deepspeed_checkpoint(path).glob("*zero_pp_rank_*_optim_states.pt")))


def read_deepspeed_metadata(path: str | Path, weights_only: bool = False) -> dict[str, Any]:
    """Lightning's checkpoint entries (hyperparameters, loops, callbacks, LR schedulers, the module's ``rdm``
    counters) of a DeepSpeed checkpoint folder: its (rank 0) module-state file without DeepSpeed's own
    entries (:data:`DEEPSPEED_STATE_KEYS`: the module state, the parameters' copies, DeepSpeed's config).

    Raises:
        ValueError: ``path`` is not a DeepSpeed checkpoint folder.
    """
    files = sorted(_require_deepspeed_checkpoint(path).glob("*_model_states.pt"))
    rank0_names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO-1/2, ZeRO-3
    rank0 = next((f for f in files if f.name in rank0_names), files[0])
    state = torch.load(rank0, map_location="cpu", weights_only=weights_only)
    return {key: value for key, value in state.items() if key not in DEEPSPEED_STATE_KEYS}


def deepspeed_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model entries of a DeepSpeed checkpoint folder as full float32 CPU tensors, read in this process
    alone by DeepSpeed's ``zero_to_fp32``: the trained roles from ZeRO's float32 master weights, the parameters
    outside the optimizer (the generator's EMA; under Lightning's own strategy also the frozen networks) from
    DeepSpeed's copy of them, and the buffers.

    Raises:
        ValueError: ``path`` is not a DeepSpeed checkpoint folder.
        ImportError: DeepSpeed is not installed (the ``deepspeed`` extra).
    """
    folder = _require_deepspeed_checkpoint(path)
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as error:
        raise ImportError(f"reading the DeepSpeed checkpoint {str(path)!r} needs DeepSpeed: pip install "
                          f"'rdm-lightning[deepspeed]' ({error})") from error
    return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name))


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
    """A distributed or DeepSpeed checkpoint folder as the dict of a single-file checkpoint, without optimizer
    states: its metadata (:func:`read_metadata`) plus ``state_dict`` (full tensors). What sampling, evaluation
    and export read; it does not resume a run (no optimizer state: resume from the folder itself)."""
    checkpoint = read_metadata(path)
    checkpoint[MODEL_KEY] = deepspeed_state_dict(path) if is_deepspeed_checkpoint(path) else consolidated_state_dict(path)
    return checkpoint


def load_from_checkpoint(cls, path: str | Path, **kwargs):
    """``cls.load_from_checkpoint(path, **kwargs)`` for a single-file checkpoint, or a distributed or DeepSpeed
    checkpoint folder (consolidated first, through a temporary file that is removed afterwards)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return cls.load_from_checkpoint(path, **kwargs)
    checkpoint = consolidated_checkpoint(path)
    with tempfile.TemporaryDirectory(prefix="rdm_consolidated_") as folder:
        file = Path(folder) / "consolidated.ckpt"
        torch.save(checkpoint, file)
        del checkpoint
        return cls.load_from_checkpoint(file, **kwargs)
