"""Reward hacking monitor: an optimized reward that keeps rising while a gold reward falls.

The optimized rewards are the ones the generator is trained on; the gold rewards are scored,
never optimized (``gold_rewards`` of DMDR, GDMD, GNDMR, RTDMD, or an eval-only reward of
:class:`~rdm_lightning.callbacks.t2i_eval.T2IEvaluation`). When the generator learns to please
an optimized reward in ways the gold one disagrees with, the two trends part: that is the signal.

The trend of a reward over the last ``window`` evaluations is its *fitted change*: the
least-squares slope of the values against the generator updates they were taken at, times the
span of those updates. It is the rise the best straight line through the points makes across the
window, in the reward's own units; with two points it is ``last − first``, and one noisy
evaluation moves it less than it moves ``last − first``.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from rdm_lightning.callbacks.rewards import RewardEvaluationCallback
from rdm_lightning.callbacks.samples import run_dir
from rdm_lightning.methods.base import DistillationModule

HACKING_FILE = "hacking.json"


def fitted_change(values: Sequence[float], positions: Sequence[float] | None = None) -> float:
    """The least-squares line's change across ``values``: ``slope · (x_last − x_first)``.

    ``slope = Σ(x − x̄)(y − ȳ) / Σ(x − x̄)²`` with ``x = positions`` (``0, 1, …, n−1`` when ``None``).
    With two values it is ``values[-1] − values[0]``.

    Raises:
        ValueError: fewer than 2 values, non-finite values or positions, a length mismatch, or
            positions that do not strictly increase.
    """
    y = np.asarray(values, dtype=np.float64)
    x = np.arange(len(y), dtype=np.float64) if positions is None else np.asarray(positions, dtype=np.float64)
    if y.ndim != 1 or len(y) < 2:
        raise ValueError(f"a trend needs at least 2 values, got {len(y)}")
    if x.shape != y.shape:
        raise ValueError(f"got {len(y)} values but {len(x)} positions; pass one position per value")
    if not (np.isfinite(y).all() and np.isfinite(x).all()):
        raise ValueError(f"values and positions must be finite, got values {y.tolist()} at {x.tolist()}")
    if not (np.diff(x) > 0).all():
        raise ValueError(f"positions must strictly increase, got {x.tolist()}")
    dx = x - x.mean()
    slope = float((dx * (y - y.mean())).sum() / (dx * dx).sum())
    return slope * float(x[-1] - x[0])


def check_signal_settings(window: int, min_rise: float, min_fall: float) -> None:
    """A ValueError unless ``window`` is an integer >= 2 and both thresholds are finite and >= 0."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an integer >= 2 (a trend needs 2 evaluations), got {window!r}")
    for name, threshold in (("min_rise", min_rise), ("min_fall", min_fall)):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {threshold!r}")


@dataclass(frozen=True)
class HackingSignal:
    """The trends of one optimized and one gold reward over a window of evaluations."""

    rise: float
    """Fitted change of the optimized reward (:func:`fitted_change`); > 0 when it rose."""
    fall: float
    """Minus the fitted change of the gold reward; > 0 when it fell."""
    hacking: bool
    """``rise > min_rise`` and ``fall > min_fall``."""


def hacking_signal(
    optimized: Sequence[float],
    gold: Sequence[float],
    window: int,
    min_rise: float = 0.0,
    min_fall: float = 0.0,
    positions: Sequence[float] | None = None,
) -> HackingSignal:
    """Whether, over the last ``window`` evaluations, the optimized reward rose while the gold one fell.

    Args:
        optimized: The optimized reward at each evaluation so far, oldest first.
        gold: The gold reward at the same evaluations.
        window: How many of the latest evaluations the trends span, >= 2.
        min_rise: The optimized reward's fitted change must exceed this (>= 0, reward units).
        min_fall: The gold reward's fitted change must be below ``-min_fall`` (>= 0, reward units).
        positions: Where each evaluation was taken (generator updates), increasing; ``None``
            spaces them evenly.

    Raises:
        ValueError: ``window`` below 2 or longer than the series, series of different lengths,
            or thresholds that are negative or not finite (and what :func:`fitted_change` refuses).
    """
    check_signal_settings(window, min_rise, min_fall)
    if len(optimized) != len(gold) or (positions is not None and len(positions) != len(gold)):
        lengths = (len(optimized), len(gold), None if positions is None else len(positions))
        raise ValueError(f"optimized, gold and positions must have one entry per evaluation, got lengths {lengths}")
    if len(gold) < window:
        raise ValueError(f"window={window} needs at least {window} evaluations, got {len(gold)}")
    span = None if positions is None else list(positions)[-window:]
    rise = fitted_change(list(optimized)[-window:], span)
    fall = -fitted_change(list(gold)[-window:], span)
    return HackingSignal(rise, fall, rise > min_rise and fall > min_fall)


class RewardHackingMonitor(L.Callback):
    """Warns (and optionally stops the run) when an optimized reward rises while a gold reward falls.

    It judges the evaluations of one reward-scoring callback of the run, its *source*
    (:class:`~rdm_lightning.callbacks.rewards.RewardLogging` or
    :class:`~rdm_lightning.callbacks.t2i_eval.T2IEvaluation`): after each of them, with at least
    ``window`` evaluations so far, every (optimized, gold) pair gets a :func:`hacking_signal` of the
    rewards' means at the last ``window`` evaluations against their generator updates. Any pair
    that hacks is an event: a rank-zero warning naming the rewards and their trends, an entry in
    ``hacking.json`` in the run folder, and with ``stop`` the end of fit (``trainer.should_stop``,
    on every process). The evaluation interval is the source's ``every_n_updates``.

    Args:
        optimized: Names of the optimized rewards as the source records them (``stroke_contrast``).
        gold: Names of the gold rewards (``gold/digits_gold``; for T2IEvaluation also an eval-only reward's name).
        window: Evaluations the trends span, >= 2.
        min_rise: The optimized reward's fitted change over the window must exceed this (reward units, >= 0).
        min_fall: The gold reward's fitted change must be below ``-min_fall`` (reward units, >= 0).
        stop: End fit at the first event.
        source: Class name of the source callback (``RewardLogging``, ``T2IEvaluation``); ``None``: the
            run's only reward-scoring callback.
    """

    def __init__(
        self,
        optimized: list[str],
        gold: list[str],
        window: int = 3,
        min_rise: float = 0.0,
        min_fall: float = 0.0,
        stop: bool = False,
        source: str | None = None,
    ):
        if not optimized or not gold:
            raise ValueError(f"RewardHackingMonitor needs at least one optimized and one gold reward, got {optimized}, {gold}")
        both = sorted(set(optimized) & set(gold))
        if both:
            raise ValueError(f"rewards {both} are listed as both optimized and gold; a gold reward is one the run does not optimize")
        check_signal_settings(window, min_rise, min_fall)
        self.optimized = list(optimized)
        self.gold = list(gold)
        self.window = window
        self.min_rise = float(min_rise)
        self.min_fall = float(min_fall)
        self.stop = stop
        self.source_name = source
        self.events: list[dict] = []
        self.folder: Path | None = None
        """The run folder, resolved at the start of fit."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, DistillationModule):
            raise TypeError(f"RewardHackingMonitor needs a DistillationModule, got {type(pl_module).__name__}")
        source = find_source(trainer.callbacks, self.source_name)
        names = source.reward_names(pl_module)
        unknown = [name for name in self.optimized + self.gold if name not in names]
        if unknown:
            raise ValueError(
                f"RewardHackingMonitor: unknown rewards {unknown}; {type(source).__name__} of "
                f"{type(pl_module).__name__} records {names}"
            )
        source.add_observer(self.observe)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Resolved on every process (``trainer.log_dir`` is a collective), for rank 0's writes later.
        self.folder = run_dir(trainer)

    def observe(self, trainer: L.Trainer, pl_module: DistillationModule, source: RewardEvaluationCallback) -> None:
        """Judge the source's latest evaluation (its observer hook; every process calls it at the same point)."""
        history = source.history
        if len(history) < self.window:
            return
        entries = history[-self.window:]
        updates = [entry["generator_updates"] for entry in entries]
        means = {name: [entry["rewards"][name]["mean"] for entry in entries] for name in self.optimized + self.gold}
        signals = {
            (o, g): hacking_signal(means[o], means[g], self.window, self.min_rise, self.min_fall, updates)
            for o in self.optimized for g in self.gold
        }
        pairs = [pair for pair, signal in signals.items() if signal.hacking]
        stop = self.stop and bool(pairs)
        if trainer.world_size > 1:
            # The histories are the same on every process; the reduction keeps the stop collective even so.
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            trainer.should_stop = True
        if not pairs:
            return
        event = {
            "generator_updates": updates[-1],
            "window_updates": updates,
            "pairs": [{"optimized": o, "gold": g, **asdict(signals[o, g])} for o, g in pairs],
            "means": means,
            "stopped": stop,
        }
        self.events.append(event)
        rank_zero_warn(hacking_message(event, self.min_rise, self.min_fall))
        if trainer.is_global_zero:
            self.write()

    def write(self) -> Path:
        """``hacking.json`` in the run folder: the settings and every event so far."""
        report = {
            "optimized": self.optimized, "gold": self.gold, "window": self.window,
            "min_rise": self.min_rise, "min_fall": self.min_fall, "stop": self.stop, "events": self.events,
        }
        path = self.folder / HACKING_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        return path

    def state_dict(self) -> dict:
        return {"events": self.events}

    def load_state_dict(self, state_dict: dict) -> None:
        self.events = list(state_dict["events"])


def find_source(callbacks: Sequence[L.Callback], name: str | None) -> RewardEvaluationCallback:
    """The reward-scoring callback of ``callbacks`` named ``name`` (its class name), or the only one when ``None``.

    Raises:
        ValueError: none, or several without a ``name`` to choose, or none of that name.
    """
    sources = [callback for callback in callbacks if isinstance(callback, RewardEvaluationCallback)]
    found = sorted(type(callback).__name__ for callback in sources)
    if name is not None:
        sources = [callback for callback in sources if type(callback).__name__ == name]
    if len(sources) != 1:
        wanted = f"a {name} callback" if name is not None else "one reward-scoring callback (RewardLogging or T2IEvaluation)"
        raise ValueError(
            f"RewardHackingMonitor needs {wanted} in trainer.callbacks, found {found or 'none'}"
            + ("; choose one with source=<class name>" if name is None and len(sources) > 1 else "")
        )
    return sources[0]


def hacking_message(event: dict, min_rise: float, min_fall: float) -> str:
    """The warning of one event: each hacking pair with its trends and the values across the window."""
    first, last = event["window_updates"][0], event["window_updates"][-1]
    means = event["means"]
    parts = [
        f"{pair['optimized']} rose by {pair['rise']:.4g} ({means[pair['optimized']][0]:.4g} → {means[pair['optimized']][-1]:.4g}) "
        f"while {pair['gold']} fell by {pair['fall']:.4g} ({means[pair['gold']][0]:.4g} → {means[pair['gold']][-1]:.4g})"
        for pair in event["pairs"]
    ]
    action = "stopping the run" if event["stopped"] else "training continues"
    return (
        f"rdm: reward hacking suspected between generator updates {first} and {last} "
        f"(fitted changes over {len(event['window_updates'])} evaluations, thresholds rise > {min_rise:g}, "
        f"fall > {min_fall:g}): {'; '.join(parts)}; {action}"
    )
