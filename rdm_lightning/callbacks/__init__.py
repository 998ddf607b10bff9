"""Callbacks: resumable checkpoints, generator EMA, progress bar, sample grids, digits evaluation, reward logging, training curves."""
from rdm_lightning.callbacks.checkpoint import RunCheckpoint, RunInterrupted
from rdm_lightning.callbacks.curves import TrainingCurves, plot_curves
from rdm_lightning.callbacks.digits_eval import DigitsEvaluation
from rdm_lightning.callbacks.ema import GeneratorEMA
from rdm_lightning.callbacks.progress import UpdateProgressBar
from rdm_lightning.callbacks.rewards import RewardLogging
from rdm_lightning.callbacks.samples import SampleGrid

__all__ = ["DigitsEvaluation", "GeneratorEMA", "RewardLogging", "RunCheckpoint", "RunInterrupted", "SampleGrid", "TrainingCurves", "UpdateProgressBar", "plot_curves"]
