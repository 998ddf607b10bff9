"""Run folders, resuming and one-time work: what ``rdm fit`` decides before Lightning starts.

- A run folder is ``<save_dir>/<name>/<version>``; under SLURM the version is ``job_<id>``,
  so a requeued job finds its own ``checkpoints/last.ckpt`` and a new job never does.
- Resuming keeps the model settings of the checkpoint: only :data:`RESUMABLE_SETTINGS`
  (the budget) may change; any other difference is an error naming it.
- One-time work (training the cached digits teacher or classifiers) runs on rank 0 while
  the other ranks wait for its result (:func:`run_once`).

See ``docs/runs.md``.
"""
from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

LAST_CHECKPOINT = "last.ckpt"
"""The name of a run's latest resumable checkpoint, in ``<run folder>/checkpoints/``."""

RESUMABLE_SETTINGS = ("max_generator_updates",)
"""Model settings a resumed run may change (``model.init_args.<name>``)."""

RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK")
"""Environment variables that give a process's rank before any process group exists, in order."""


def slurm_job_id() -> str | None:
    """The SLURM job id (``<array job>_<task>`` for array tasks), ``None`` outside SLURM."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def run_version() -> str | None:
    """The logger version a run takes from its environment: ``job_<id>`` under SLURM, else ``None``."""
    job = slurm_job_id()
    return f"job_{job}" if job is not None else None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict of ``path`` (on the CPU). Of a checkpoint folder (FSDP2, DeepSpeed), everything but
    the weights and optimizer states (:mod:`rdm_lightning.distributed_checkpoints`).

    Raises:
        FileNotFoundError: ``path`` is neither a file nor a checkpoint folder.
        ValueError: naming the file, when it is not a readable checkpoint (truncated, another format).
    """
    import torch

    from rdm_lightning.distributed_checkpoints import is_checkpoint_folder, read_metadata

    path = Path(path)
    if is_checkpoint_folder(path):
        return read_metadata(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} is not a file (nor a distributed or DeepSpeed checkpoint folder)")
    try:
        # Memory-mapped when torch's zip format allows it: callers read the hyperparameters and loop
        # state, and Lightning loads the weights again itself, so an SD-scale checkpoint is not read
        # twice at start-up.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # torch/zip/pickle errors never name the file
        reason = str(error).strip().split("\n")[0].split(". ")[0]
        raise ValueError(
            f"checkpoint {str(path)!r} cannot be read ({type(error).__name__}: {reason}); it is truncated or not "
            "a checkpoint `rdm fit` wrote"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict'); accepted: a `rdm fit` .ckpt")
    return checkpoint


def latest_checkpoint(experiment_dir: Path, only_version: str | None = None) -> Path:
    """The most recently written ``<version>/checkpoints/last.ckpt`` under ``experiment_dir``.

    Args:
        experiment_dir: ``<save_dir>/<name>`` of the config's logger.
        only_version: search this version folder only (a SLURM job's own); ``None``: all.

    Raises:
        FileNotFoundError: naming the folders searched, when they hold no such checkpoint.
    """
    pattern = f"{only_version or '*'}/checkpoints/{LAST_CHECKPOINT}"
    found = sorted(experiment_dir.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"--ckpt_path last: no {experiment_dir / pattern} to resume from (the run folders of this config's logger)"
        )
    return found[-1]


def checkpoint_in(run_dir: Path) -> Path:
    """``<run_dir>/checkpoints/last.ckpt`` of a run without a logger folder (``default_root_dir``).

    Raises:
        FileNotFoundError: naming the path, when there is no such checkpoint.
    """
    from rdm_lightning.distributed_checkpoints import is_checkpoint_folder

    path = run_dir / "checkpoints" / LAST_CHECKPOINT
    if not (path.is_file() or is_checkpoint_folder(path)):
        raise FileNotFoundError(f"--ckpt_path last: no {path} to resume from (the run has no logger; its folder is default_root_dir)")
    return path


def version_of_checkpoint(checkpoint: Path, experiment_dir: Path) -> str | None:
    """The version folder ``checkpoint`` was written in, when it is ``<experiment_dir>/<version>/checkpoints/``."""
    folder = checkpoint.resolve().parent
    if folder.name == "checkpoints" and folder.parent.parent == experiment_dir.resolve():
        return folder.parent.name
    return None


def _plain(value: Any) -> Any:
    # Tuples and lists, ints and floats compare as a YAML config writes them.
    return json.loads(json.dumps(value, default=str))


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def model_setting_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(setting, checkpoint's value, config's value)`` for every model setting that differs.

    Args:
        saved: the checkpoint's ``hyper_parameters`` (init arguments, ``_class_path``).
        current: the config's model as ``{"class_path", "init_args"}``.
    """
    saved = {k: v for k, v in saved.items() if k not in ("_class_path", "_instantiator")}
    old = _flatten(_plain(saved), "")
    new = _flatten(_plain(current.get("init_args") or {}), "")
    return [(key, old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def check_resumable(saved: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> None:
    """Raise unless the config's model equals the checkpoint's, except :data:`RESUMABLE_SETTINGS`.

    Raises:
        ValueError: naming each changed setting with both values.
    """
    saved_class = saved.get("_class_path")
    if saved_class is not None and saved_class != current.get("class_path"):
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} holds a {saved_class}, the config a {current.get('class_path')}; "
            "resume with the config the run was started with"
        )
    changes = [c for c in model_setting_changes(saved, current) if c[0].split(".")[0] not in RESUMABLE_SETTINGS]
    if changes:
        listed = "; ".join(f"model.init_args.{key}: checkpoint {old!r}, config {new!r}" for key, old, new in changes)
        raise ValueError(
            f"resuming from {str(checkpoint)!r} keeps the run's model settings, but the config changes {listed}. "
            f"Only {', '.join(RESUMABLE_SETTINGS)} (and the trainer, callbacks and data loader) may change on "
            "resume; start a new run (no --ckpt_path) to change the others"
        )


def launch_rank() -> int:
    """This process's global rank from the launcher's environment (0 when there is none)."""
    for name in RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def run_once(done: Callable[[], bool], work: Callable[[], Any], what: str, timeout_s: float = 4 * 3600.0) -> None:
    """Do one-time ``work`` on rank 0; the other ranks wait until ``done()`` (its published result).

    ``work`` must publish atomically (write, then rename), so a waiting rank never reads half
    a result. A single process (or rank 0) just checks ``done()`` and works if needed.

    Raises:
        TimeoutError: a waiting rank saw no result after ``timeout_s`` seconds.
    """
    if done():
        return
    rank = launch_rank()
    if rank == 0:
        work()
        return
    print(f"rdm: rank {rank} waits for rank 0 to {what}")
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank} waited {timeout_s:.0f} s for rank 0 to {what}; check rank 0's log")
        time.sleep(1.0)
