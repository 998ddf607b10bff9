"""Callbacks: resumable checkpoints, generator EMA, progress bar, sample grids, digits evaluation, reward logging,
text-to-image evaluation (rewards, FID, FID-SD), the reward hacking monitor, training curves."""
from rdm_lightning.callbacks.checkpoint import RunCheckpoint, RunInterrupted
from rdm_lightning.callbacks.curves import TrainingCurves, plot_curves
from rdm_lightning.callbacks.digits_eval import DigitsEvaluation
from rdm_lightning.callbacks.ema import GeneratorEMA
from rdm_lightning.callbacks.hacking import RewardHackingMonitor
from rdm_lightning.callbacks.progress import UpdateProgressBar
from rdm_lightning.callbacks.rewards import RewardLogging
from rdm_lightning.callbacks.samples import SampleGrid
from rdm_lightning.callbacks.t2i_eval import T2IEvaluation

__all__ = ["DigitsEvaluation", "GeneratorEMA", "RewardHackingMonitor", "RewardLogging", "RunCheckpoint", "RunInterrupted", "SampleGrid", "T2IEvaluation", "TrainingCurves", "UpdateProgressBar", "plot_curves"]
