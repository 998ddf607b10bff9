"""Loss and metric curves over generator updates, drawn to a PNG in the run folder."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402

from rdm_lightning.callbacks.samples import run_dir  # noqa: E402
from rdm_lightning.methods.base import DistillationModule  # noqa: E402


def held_until(points: list[tuple[int, float]], until: int | None) -> list[tuple[int, float]]:
    """``points`` (value changes) with the last value held up to update ``until`` when it ends earlier."""
    if until is None or points[-1][0] >= until:
        return points
    return [*points, (until, points[-1][1])]


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: str | Path, until: int | None = None) -> Path:
    """One panel per curve of ``(generator update, value)`` points; saves and returns ``path``.

    With ``until``, a curve whose last point comes earlier is held at its last value up to that
    update (the points are value changes, so a constant metric is a flat line, not one dot).
    """
    if not curves:
        raise ValueError("no curves to plot")
    columns = min(3, len(curves))
    rows = math.ceil(len(curves) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for axis, (name, points) in zip(axes.flat, sorted(curves.items())):
        points = held_until(points, until)
        updates, values = zip(*points)
        axis.plot(updates, values, marker="." if len(points) < 30 else None)
        axis.set_title(name)
        axis.set_xlabel("generator updates")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(curves):]:
        axis.axis("off")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


class TrainingCurves(L.Callback):
    """Records every logged ``train/*``, ``eval/*``, ``reward/*`` and ``reward_eval/*`` scalar;
    plots them to ``curves.png``.

    ``callback_metrics`` keeps a metric's last value until it is logged again, so a
    point is recorded when a value changes (losses every logged step, evaluations
    when they run).

    Args:
        every_n_updates: redraw interval in generator updates; the plot is always drawn at the end of fit.
    """

    def __init__(self, every_n_updates: int = 100):
        if every_n_updates < 1:
            raise ValueError(f"every_n_updates must be >= 1, got {every_n_updates}")
        self.every_n_updates = every_n_updates
        self.curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.last_drawn = 0
        self.folder: Path | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.folder = run_dir(trainer)  # on every process: rank 0 draws later

    def on_train_batch_end(self, trainer, pl_module: DistillationModule, outputs, batch, batch_idx) -> None:
        updates = pl_module.generator_updates
        for name, value in trainer.callback_metrics.items():
            if name.startswith(("train/", "eval/", "reward/", "reward_eval/")) and value.numel() == 1:
                points = self.curves[name]
                if not points or points[-1][1] != float(value):
                    points.append((updates, float(value)))
        if trainer.is_global_zero and updates - self.last_drawn >= self.every_n_updates:
            self.last_drawn = updates
            plot_curves(self.curves, self.folder / "curves.png", until=updates)

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.curves:
            plot_curves(self.curves, self.folder / "curves.png", until=pl_module.generator_updates)

    def state_dict(self) -> dict:
        return {"curves": dict(self.curves), "last_drawn": self.last_drawn}

    def load_state_dict(self, state_dict: dict) -> None:
        self.curves = defaultdict(list, {k: list(v) for k, v in state_dict["curves"].items()})
        self.last_drawn = state_dict["last_drawn"]
