"""Checkpoints a run can resume from: counted in generator updates, on SIGTERM/SIGUSR1, at a numeric stop.

``checkpoints/last.ckpt`` in the run folder is always the latest resumable state: it is
written every ``every_n_updates`` generator updates, when the process is asked to stop
(SIGTERM; SIGUSR1, SLURM's warning before the time limit, which also requeues the job),
and at the end of fit. A write goes to a temporary name first and is renamed, so a kill
during the write leaves the previous checkpoint intact. See ``docs/runs.md``.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from rdm_lightning.callbacks.samples import run_dir
from rdm_lightning.runs import LAST_CHECKPOINT, slurm_job_id

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class RunInterrupted(SystemExit):
    """Raised after the checkpoint a stop signal asked for: the process exits with ``128 + signum``,
    the shell's status of a signalled process, so a launcher never mistakes the stop for success."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(128 + signum)
        self.signum = signum
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}; resume from {self.checkpoint}"


def progress_count(trainer: L.Trainer, pl_module: L.LightningModule) -> int:
    """The run's progress counter: generator updates of a distillation module, else optimizer steps."""
    return getattr(pl_module, "generator_updates", trainer.global_step)


def requeue_slurm_job(job_id: str) -> None:
    """``scontrol requeue JOB``; a failure is reported, not raised (the checkpoint is already written)."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    except FileNotFoundError:
        rank_zero_warn(f"could not requeue SLURM job {job_id}: `scontrol` is not on PATH")
        return
    if result.returncode != 0:
        rank_zero_warn(f"`scontrol requeue {job_id}` failed ({result.returncode}): {result.stderr.strip()}")
    else:
        rank_zero_info(f"rdm: requeued SLURM job {job_id}")


class RunCheckpoint(Checkpoint):
    """Writes ``<run folder>/checkpoints/last.ckpt`` often enough that a crash loses at most one interval.

    - every ``every_n_updates`` generator updates (optimizer steps for modules without a
      generator, the digits teacher pretraining) and at the end of fit (at the end of the last
      iteration, so that a run resumed with a larger budget continues as if it had not stopped);
    - on SIGTERM or SIGUSR1 at the end of the running iteration, then the process exits
      with ``128 + signum`` (:class:`RunInterrupted`); under SLURM, SIGUSR1 first requeues
      the job, whose next launch resumes from this checkpoint (``rdm fit`` finds it);
    - at a numeric stop (``FloatingPointError`` from a non-finite loss) in a single-process
      run: when no role had stepped yet in the failing iteration, the state *before* that
      iteration (its random stream rewound), which is the last good one; otherwise the
      previous checkpoint is kept, as the in-memory state may already be poisoned.

    A Lightning ``Checkpoint``, so Lightning runs it after every other callback's hooks: the
    state it writes includes this iteration's EMA step and evaluation.

    Args:
        every_n_updates: interval in generator updates; 0 writes only at the end and on stops.
        dirpath: folder of ``last.ckpt``; ``None`` is ``checkpoints/`` in the run folder.
    """

    def __init__(self, every_n_updates: int = 100, dirpath: str | None = None):
        if every_n_updates < 0:
            raise ValueError(f"every_n_updates must be >= 0 (0: only at the end and on stops), got {every_n_updates}")
        self.every_n_updates = every_n_updates
        self.dirpath = dirpath
        self.saved_at: int | None = None
        self._received: int | None = None
        self._stopping: RunInterrupted | None = None
        self._previous_handlers: dict[int, object] = {}
        self._batch_start: tuple[dict, object] | None = None
        self.saves = 0
        self.seconds_saving = 0.0

    # ---- where -----------------------------------------------------------------------------
    def checkpoint_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath is not None else run_dir(trainer) / "checkpoints"

    def last_path(self, trainer: L.Trainer) -> Path:
        return self.checkpoint_dir(trainer) / LAST_CHECKPOINT

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        """Write ``last.ckpt`` atomically (every rank takes part, as sharded strategies need)."""
        start = time.perf_counter()
        path = self.last_path(trainer)
        partial = path.with_name(f"{path.name}.partial")
        # Full state (optimizers, loops, callbacks): resuming needs all of it.
        trainer.save_checkpoint(partial, weights_only=False)
        trainer.strategy.barrier("RunCheckpoint.save")
        if trainer.is_global_zero:
            _replace(partial, path)
        trainer.strategy.barrier("RunCheckpoint.replace")
        self.saved_at = progress_count(trainer, pl_module)
        self.saves += 1
        self.seconds_saving += time.perf_counter() - start
        return path

    # ---- signals -----------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        # Only note it: the checkpoint is written at the end of the iteration, in the loop's own thread.
        self._received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed over Lightning's own handlers (registered before on_train_start), which would
        # write SIGUSR1's hpc checkpoint outside the run folder and end a SIGTERM'd run with status 0.
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    # ---- when --------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rng = getattr(pl_module, "rng", None)
        updates = dict(getattr(pl_module, "role_updates", {"optimizer": trainer.global_step}))
        self._batch_start = (updates, rng.get_state() if rng is not None else None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = self._received is not None and self._stopping is None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self._stop(trainer, pl_module)
        updates = progress_count(trainer, pl_module)
        due = self.every_n_updates and updates and updates % self.every_n_updates == 0
        if (due or ends_training(trainer, pl_module)) and updates != self.saved_at:
            self.save(trainer, pl_module)

    def _stop(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        signum = self._received if self._received is not None else signal.SIGTERM
        path = self.save(trainer, pl_module)
        job = slurm_job_id()
        if signum == signal.SIGUSR1 and job is not None and trainer.is_global_zero:
            requeue_slurm_job(job)
        rank_zero_info(
            f"rdm: {signal.Signals(signum).name} received: saved {path} at generator update "
            f"{progress_count(trainer, pl_module)}; stopping (resume with --ckpt_path {path})"
        )
        # Stop through the loop, so this iteration's metrics are still logged; the exit comes at
        # on_train_end, before end-of-fit work (the final evaluation) a preempted job has no time for.
        self._stopping = RunInterrupted(signum, path)
        trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stopping is not None:
            raise self._stopping
        # Fits that end by a limit the batch end cannot foresee (max_epochs, max_time).
        if progress_count(trainer, pl_module) != self.saved_at:
            self.save(trainer, pl_module)
        # The cost of checkpointing, for choosing every_n_updates (README: "Runs, crashes and clusters").
        last = self.last_path(trainer)  # on every process: the run folder (trainer.log_dir) is a collective
        size = _size_bytes(last) / 2**20 if trainer.is_global_zero else 0.0
        rank_zero_info(f"rdm: {self.saves} checkpoints of {size:.1f} MiB written in {self.seconds_saving:.1f} s")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, FloatingPointError):
            return
        last = self.last_path(trainer)
        kept = f"kept {last} from generator update {self.saved_at}" if self.saved_at is not None else "no checkpoint was written"
        if trainer.world_size > 1 or self._batch_start is None:
            rank_zero_warn(f"rdm: numeric stop under {trainer.world_size} processes: {kept}")
            return
        updates, rng_state = self._batch_start
        if dict(getattr(pl_module, "role_updates", {"optimizer": trainer.global_step})) != updates:
            rank_zero_warn(f"rdm: numeric stop after an optimizer step of the failing iteration: {kept}")
            return
        if rng_state is not None:
            pl_module.rng.set_state(rng_state)
        with _before_running_batch(trainer):
            path = self.save(trainer, pl_module)
        rank_zero_warn(f"rdm: numeric stop: saved the state before the failing iteration as {path}")

    def state_dict(self) -> dict:
        return {"saved_at": self.saved_at}

    def load_state_dict(self, state_dict: dict) -> None:
        self.saved_at = state_dict["saved_at"]


def ends_training(trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
    """Whether fit stops after this batch: the generator budget or ``max_steps`` is reached, or a stop was asked.

    The final checkpoint is written at that batch's end: once the loop has wound down, Lightning's
    progress counts the cut epoch as finished, and a run resumed from there would renumber epochs.
    """
    # The module stops itself at its budget only in its own batch-end hook, which runs after this one.
    return (
        trainer.should_stop
        or getattr(pl_module, "budget_reached", False)
        or (trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps)
    )


@contextmanager
def _before_running_batch(trainer: L.Trainer) -> Iterator[None]:
    """Loop progress as it stood before the running batch was fetched, while a checkpoint is written.

    Lightning then resumes as from a checkpoint taken after the previous batch (same batch
    next, same logging step), instead of counting the failed batch as a step.
    """
    progress = trainer.fit_loop.epoch_loop.batch_progress
    counters = (progress.total, progress.current)
    saved = [(c.ready, c.started) for c in counters]
    for c in counters:
        c.ready = c.started = c.processed
    try:
        yield
    finally:
        for c, (ready, started) in zip(counters, saved):
            c.ready, c.started = ready, started


def _size_bytes(path: Path) -> int:
    """Bytes of a checkpoint file, or of all files of a checkpoint folder."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _replace(partial: Path, path: Path) -> None:
    """Move ``partial`` onto ``path``; a checkpoint folder (sharded strategies) is swapped via a side name."""
    if partial.is_dir():
        old = path.with_name(f"{path.name}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(partial, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, path)
