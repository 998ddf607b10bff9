"""Reward logging: every reward of the method (optimized and gold) on fixed prompts, per generator update.

:class:`RewardEvaluationCallback` is what the callbacks that score rewards during fit share
(:class:`RewardLogging` here, :class:`~rdm_lightning.callbacks.t2i_eval.T2IEvaluation`): a history of
their evaluations, kept across resumes, and observers told of each new one
(:class:`~rdm_lightning.callbacks.hacking.RewardHackingMonitor` reads the reward trends there).
"""
from __future__ import annotations

from collections.abc import Callable

import lightning as L

from rdm_lightning.callbacks.samples import fixed_noise_samples
from rdm_lightning.methods.base import DistillationModule

RewardObserver = Callable[[L.Trainer, DistillationModule, "RewardEvaluationCallback"], None]
"""Called with the trainer, the module and the callback right after the callback recorded an evaluation."""


class RewardEvaluationCallback(L.Callback):
    """Base of the callbacks that score rewards on fixed samples during fit.

    ``history`` holds one entry per evaluation, ``{"generator_updates": u, "rewards": {name: {"mean": …, …}}, …}``
    (a subclass may add more figures); every process holds the same history. It is checkpointed
    (:meth:`state_dict`), so a resumed run continues it. ``observers`` are called after each new entry.
    """

    def __init__(self) -> None:
        self.history: list[dict] = []
        self.observers: list[RewardObserver] = []

    def reward_names(self, pl_module: DistillationModule) -> list[str]:
        """The names under which the entries of ``history`` hold reward summaries."""
        raise NotImplementedError

    def add_observer(self, observer: RewardObserver) -> None:
        """Call ``observer`` after every evaluation from now on (once, however often it is added)."""
        if observer not in self.observers:
            self.observers.append(observer)

    def record(self, trainer: L.Trainer, pl_module: DistillationModule, entry: dict) -> None:
        """Append ``entry`` to ``history`` and tell the observers; every process calls it at the same point."""
        self.history.append(entry)
        for observer in self.observers:
            observer(trainer, pl_module, self)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])


class RewardLogging(RewardEvaluationCallback):
    """Every ``every_n_updates`` generator updates, score fixed-noise samples with each reward.

    Logs ``reward_eval/<name>/mean`` and ``reward_eval/<name>/std`` for every entry of
    ``pl_module.reward_models()`` (the gold rewards appear as ``gold/<name>``), so
    optimized and gold rewards are compared on the same samples and TrainingCurves
    plots them. The scores are the rewards' own (the scale of the training logs
    ``reward/<name>``, no ``report_scale``); each evaluation is also kept in ``history``
    (:class:`RewardEvaluationCallback`).

    Args:
        prompts: the prompts to sample (cycled to ``num_samples``).
        num_samples: samples per evaluation.
        every_n_updates: interval in generator updates.
        seed: seed of the fixed noise.
    """

    def __init__(self, prompts: list[str], num_samples: int = 64, every_n_updates: int = 10, seed: int = 0):
        super().__init__()
        if not prompts:
            raise ValueError("RewardLogging needs at least one prompt")
        if num_samples < 2 or every_n_updates < 1:
            raise ValueError(f"num_samples must be >= 2 and every_n_updates >= 1, got {num_samples}, {every_n_updates}")
        self.prompts = [prompts[i % len(prompts)] for i in range(num_samples)]
        self.every_n_updates = every_n_updates
        self.seed = seed

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, DistillationModule):
            raise TypeError(f"RewardLogging needs a DistillationModule, got {type(pl_module).__name__}")
        if not pl_module.reward_models():
            raise ValueError(f"{type(pl_module).__name__} has no rewards to log; drop the RewardLogging callback")

    def reward_names(self, pl_module: DistillationModule) -> list[str]:
        """The keys of ``pl_module.reward_models()``: optimized rewards by name, gold ones as ``gold/<name>``."""
        return list(pl_module.reward_models())

    def summaries(self, pl_module: DistillationModule) -> dict[str, dict[str, float]]:
        """``{name: {"mean", "std"}}`` of each reward on the fixed samples."""
        images = fixed_noise_samples(pl_module, self.prompts, self.seed)
        summaries = {}
        for name, reward in pl_module.reward_models().items():
            scores = reward.score(images, self.prompts)
            summaries[name] = {"mean": scores.mean().item(), "std": scores.std().item()}
        return summaries

    def score(self, pl_module: DistillationModule) -> dict[str, float]:
        """``{reward_eval/<name>/mean, reward_eval/<name>/std}`` of each reward on the fixed samples."""
        return logged_summaries(self.summaries(pl_module))

    def on_train_batch_end(self, trainer, pl_module: DistillationModule, outputs, batch, batch_idx) -> None:
        updates = pl_module.generator_updates
        # The history, not a counter: a critic-only iteration (or a resumed run) at an evaluated update does not repeat it.
        if updates % self.every_n_updates == 0 and (not self.history or self.history[-1]["generator_updates"] != updates):
            summaries = self.summaries(pl_module)
            pl_module.log_dict(logged_summaries(summaries))
            self.record(trainer, pl_module, {"generator_updates": updates, "rewards": summaries})


def logged_summaries(summaries: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{reward_eval/<name>/<stat>: value}``: :meth:`RewardLogging.summaries` as logged."""
    return {f"reward_eval/{name}/{stat}": value for name, summary in summaries.items() for stat, value in summary.items()}
