"""``RunCSVLogger``: Lightning's CSV logger that a resumed run keeps appending to."""
from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _ResumingExperimentWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv`` up to ``resume_step`` instead of deleting it.

    Rows logged after the checkpoint a run resumes from are dropped: the resumed run
    logs those steps again, so the file stays one series with no step twice.
    """

    def __init__(self, log_dir: str, resume_step: int | None):
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if self.resume_step is None or not os.path.isfile(self.metrics_file_path):
            super()._check_log_dir_exists()
            return
        with open(self.metrics_file_path, newline="") as file:
            reader = csv.DictReader(file)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if int(row["step"]) <= self.resume_step]
        with open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        # Later rows append under this header (Lightning rewrites the file when keys are new).
        self.metrics_keys = header


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume into the same version folder.

    Lightning's ``CSVLogger`` deletes ``metrics.csv`` when it reopens a version folder;
    ``rdm fit`` resumes a run in its own folder (``--ckpt_path``, a SLURM requeue) and sets
    ``resume_step`` to the checkpoint's logging step, so the file continues instead.

    Args:
        save_dir: root of the runs, as ``CSVLogger``.
        name: experiment name (a folder under ``save_dir``).
        version: version folder (``version_N`` when an int; ``None`` takes the next free one).
        resume_step: keep the rows of an existing ``metrics.csv`` up to this step; ``None``
            (a new run) starts the file afresh, as ``CSVLogger`` does.
        **kwargs: further ``CSVLogger`` arguments (``prefix``, ``flush_logs_every_n_steps``).
    """

    def __init__(self, save_dir: str, name: str = "lightning_logs", version: int | str | None = None,
                 resume_step: int | None = None, **kwargs):
        super().__init__(save_dir, name=name, version=version, **kwargs)
        if resume_step is not None and resume_step < 0:
            raise ValueError(f"resume_step must be >= 0 or None, got {resume_step}")
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingExperimentWriter(self.log_dir, self.resume_step)
        return self._experiment
