"""A progress bar counted in generator updates (or optimizer steps) out of the run's budget.

Lightning's bar counts batches of an epoch, which says nothing in an unbounded fit
(``Epoch 90/-2``). This one counts what the budget counts, with the rate and the time
left. In a terminal it is a tqdm bar on stderr; when stderr is not a terminal (a log
file, e.g. under SLURM) it prints a plain line every few percent of the budget or
every few minutes instead of carriage-return redraws.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Mapping

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from tqdm import tqdm

from rdm_lightning.callbacks.checkpoint import progress_count

LIGHTNING_DEFAULT_BARS = (TQDMProgressBar, RichProgressBar)
"""The bars Lightning adds by itself (Rich when it is installed), which :func:`default_progress_bar` replaces."""
LOSS_PREFIX = "train/loss"
"""Logged metrics shown beside the count: the losses (``train/loss_dm`` shows as ``loss_dm``)."""


def progress_budget(trainer: L.Trainer, pl_module: L.LightningModule) -> int | None:
    """The budget of :func:`~rdm_lightning.callbacks.checkpoint.progress_count`: ``max_generator_updates``
    of a distillation module, else the trainer's optimizer steps (``max_steps``, or epochs × batches);
    ``None`` when unbounded."""
    if hasattr(pl_module, "generator_updates"):
        return pl_module.max_generator_updates
    steps = trainer.estimated_stepping_batches
    return int(steps) if math.isfinite(steps) else None


def seconds_left(done: int, remaining: int, elapsed_s: float) -> float | None:
    """Time left at the mean rate so far: ``remaining · elapsed_s / done``; ``None`` before the first one is done."""
    return remaining * elapsed_s / done if done > 0 else None


def format_rate(done: int, elapsed_s: float, unit: str) -> str | None:
    """``"5.00 updates/s"``, or ``"2.50 s/update"`` below one per second; ``None`` before the first one."""
    if done == 0 or elapsed_s <= 0:
        return None
    rate = done / elapsed_s
    return f"{rate:.2f} {unit}s/s" if rate >= 1 else f"{1 / rate:.2f} s/{unit}"


def loss_summary(metrics: Mapping[str, object]) -> dict[str, float]:
    """The logged losses (``train/loss*``) by short name: ``{"loss_dm": 0.0123, ...}``."""
    return {name.removeprefix("train/"): float(value) for name, value in metrics.items() if name.startswith(LOSS_PREFIX)}


def progress_line(
    label: str, unit: str, count: int, total: int | None, done: int, elapsed_s: float, losses: Mapping[str, float]
) -> str:
    """One plain progress line: ``generator updates 250/1000 (25%) | 5.00 updates/s | elapsed 00:50 |
    left 02:30 | loss_dm 0.0123``.

    Args:
        label: what is counted (``generator updates``, ``steps``).
        unit: one of it, for the rate (``update``, ``step``).
        count: how many so far; ``total``: the budget (``None``: unbounded, no percentage or time left).
        done: how many this process did, in ``elapsed_s`` seconds (a resumed run starts above 0).
        losses: the current losses by name.
    """
    parts = [f"{label} {count}/{total} ({100 * count / total:.0f}%)" if total else f"{label} {count}"]
    rate = format_rate(done, elapsed_s, unit)
    if rate is not None:
        parts.append(rate)
    parts.append(f"elapsed {tqdm.format_interval(elapsed_s)}")
    left = seconds_left(done, total - count, elapsed_s) if total else None
    if left is not None:
        parts.append(f"left {tqdm.format_interval(left)}")
    if losses:
        parts.append(" ".join(f"{name} {value:.4g}" for name, value in losses.items()))
    return " | ".join(parts)


class UpdateProgressBar(TQDMProgressBar):
    """Progress in generator updates (``pl_module.generator_updates`` of ``max_generator_updates``), or
    optimizer steps (``trainer.global_step`` of ``max_steps``) for other modules, with rate, time left
    and the current losses.

    In a terminal: one tqdm bar on stderr for the whole fit (not one per epoch). Otherwise plain
    lines (:func:`progress_line`) at the start, every ``log_every_percent`` % of the budget or
    ``log_every_seconds`` seconds, whichever comes first, and at the end; validation bars are off.

    Args:
        refresh_rate: redraw the terminal bar every this many updates (0 hides the bar and the lines).
        log_every_percent: without a terminal, a line every this share of the budget.
        log_every_seconds: without a terminal, a line at least this often while the count moves.
        terminal: draw the bar (``True``) or write lines (``False``); ``None``: whether stderr is a terminal.
    """

    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
    """Lightning's format with ``rate_fmt``, which turns into s/update below one update per second."""

    def __init__(
        self,
        refresh_rate: int = 1,
        log_every_percent: float = 5.0,
        log_every_seconds: float = 120.0,
        terminal: bool | None = None,
    ):
        super().__init__(refresh_rate=refresh_rate)
        if not 0 < log_every_percent <= 100:
            raise ValueError(f"log_every_percent must lie in (0, 100], got {log_every_percent}")
        if not 0 < log_every_seconds < math.inf:
            raise ValueError(f"log_every_seconds must be a finite number > 0, got {log_every_seconds}")
        self.log_every_percent = log_every_percent
        self.log_every_seconds = log_every_seconds
        self._terminal = terminal
        self.label, self.unit = "steps", "step"
        """What is counted and one of it (``generator updates``/``update`` for a distillation module)."""
        self.total: int | None = None
        """The budget of this fit (``None``: unbounded)."""
        self.start_count = 0
        """The count when this fit started (above 0 when resumed)."""
        self.start_time = 0.0
        """``time.monotonic()`` when this fit started."""
        self.shown_count = 0
        """The latest count seen."""
        self.line_count = 0
        """The count of the last line written."""
        self.line_time = 0.0
        """``time.monotonic()`` of the last line written."""

    @property
    def terminal(self) -> bool:
        """Whether the bar is drawn (a terminal) rather than written as lines."""
        return sys.stderr.isatty() if self._terminal is None else self._terminal

    @property
    def is_enabled(self) -> bool:
        """Whether tqdm bars are drawn: in a terminal only (lines are written by :meth:`write_line`)."""
        return super().is_enabled and self.terminal

    @property
    def writes_lines(self) -> bool:
        """Whether this process writes progress lines: not in a terminal, on rank 0, not hidden."""
        return self._enabled and self.refresh_rate > 0 and not self.terminal

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """The bar's postfix: the current losses only (every logged metric would not fit on a line)."""
        return loss_summary(trainer.callback_metrics)

    def init_train_tqdm(self) -> Tqdm:
        """One bar for the fit: ``label`` from ``start_count`` to ``total``, on stderr."""
        return Tqdm(
            desc=self.label, total=self.total, initial=self.start_count, unit=self.unit, disable=self.is_disabled,
            leave=True, dynamic_ncols=True, file=sys.stderr, smoothing=0, bar_format=self.BAR_FORMAT,
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        distilling = hasattr(pl_module, "generator_updates")
        self.label, self.unit = ("generator updates", "update") if distilling else ("steps", "step")
        self.total = progress_budget(trainer, pl_module)
        self.start_count = self.shown_count = self.line_count = progress_count(trainer, pl_module)
        self.start_time = self.line_time = time.monotonic()
        super().on_train_start(trainer, pl_module)
        if self.writes_lines:
            self.write_line(trainer, self.start_count, self.start_time)

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        """Nothing: the bar spans the whole fit in updates, so an epoch neither resets nor renames it."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        count = progress_count(trainer, pl_module)
        if count == self.shown_count:  # a critic-only iteration
            return
        self.shown_count = count
        now = time.monotonic()
        if self.terminal:
            if self._should_update(count, self.total):
                bar = self.train_progress_bar
                bar.n = count
                bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
                bar.refresh()
        elif self.writes_lines and self.line_due(count, now):
            self.write_line(trainer, count, now)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.writes_lines and self.shown_count != self.line_count:
            self.write_line(trainer, self.shown_count, time.monotonic())
        super().on_train_end(trainer, pl_module)

    def line_due(self, count: int, now: float) -> bool:
        """Whether ``count`` crossed the next ``log_every_percent`` mark, ends the budget, or
        ``log_every_seconds`` passed since the last line."""
        if now - self.line_time >= self.log_every_seconds:
            return True
        if not self.total:
            return False
        step = self.total * self.log_every_percent / 100
        return count >= self.total or math.floor(count / step) > math.floor(self.line_count / step)

    def write_line(self, trainer: L.Trainer, count: int, now: float) -> None:
        """Write the :func:`progress_line` of ``count`` to stderr."""
        line = progress_line(
            self.label, self.unit, count, self.total, count - self.start_count, now - self.start_time,
            loss_summary(trainer.callback_metrics),
        )
        print(line, file=sys.stderr, flush=True)
        self.line_count, self.line_time = count, now


def default_progress_bar(trainer: L.Trainer) -> list[L.Callback]:
    """For a module's ``configure_callbacks``: an :class:`UpdateProgressBar` in place of the bar
    Lightning added by itself; nothing when the bar is off (``enable_progress_bar: false``) or the
    run chose its own."""
    bar = trainer.progress_bar_callback
    if type(bar) not in LIGHTNING_DEFAULT_BARS:
        return []
    # Lightning lets a module's callback replace a trainer's only of a class it derives from, and
    # Rich's bar is not a TQDM one: take the default out here, whichever it is.
    trainer.callbacks.remove(bar)
    return [UpdateProgressBar()]
