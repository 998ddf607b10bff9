"""Fault injection for the crash and preemption tests: a callback that breaks a run at a chosen iteration."""
from __future__ import annotations

import os
import signal

import lightning as L
import torch

FAULTS = ("sigkill", "sigterm", "sigusr1", "nan")


class FaultAt(L.Callback):
    """At the start of iteration ``iteration`` (a distillation module's own counter, else the
    optimizer step): send this process a signal (``sigkill``, ``sigterm``, ``sigusr1``), or make the
    iteration's first loss NaN (``nan``, distillation modules).

    Signals arrive mid-iteration, as a scheduler's would; the run must handle them at its end.
    """

    def __init__(self, iteration: int, fault: str):
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
        self.iteration = iteration
        self.fault = fault

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if getattr(pl_module, "iterations", trainer.global_step) != self.iteration:
            return
        if self.fault == "nan":
            step_role = pl_module.step_role
            pl_module.step_role = lambda role, loss: step_role(role, loss * torch.tensor(float("nan")))
        else:
            os.kill(os.getpid(), getattr(signal, self.fault.upper()))
