"""Reward logging: every reward of the method (optimized and gold) on fixed prompts, per generator update."""
from __future__ import annotations

import lightning as L
import torch

from rdm_lightning.methods.base import DistillationModule


class RewardLogging(L.Callback):
    """Every ``every_n_updates`` generator updates, score fixed-noise samples with each reward.

    Logs ``reward_eval/<name>/mean`` and ``reward_eval/<name>/std`` for every entry of
    ``pl_module.reward_models()`` (the gold rewards appear as ``gold/<name>``), so
    optimized and gold rewards are compared on the same samples and TrainingCurves
    plots them.

    Args:
        prompts: the prompts to sample (cycled to ``num_samples``).
        num_samples: samples per evaluation.
        every_n_updates: interval in generator updates.
        seed: seed of the fixed noise.
    """

    def __init__(self, prompts: list[str], num_samples: int = 64, every_n_updates: int = 10, seed: int = 0):
        if not prompts:
            raise ValueError("RewardLogging needs at least one prompt")
        if num_samples < 2 or every_n_updates < 1:
            raise ValueError(f"num_samples must be >= 2 and every_n_updates >= 1, got {num_samples}, {every_n_updates}")
        self.prompts = [prompts[i % len(prompts)] for i in range(num_samples)]
        self.every_n_updates = every_n_updates
        self.seed = seed
        self.last_update = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, DistillationModule):
            raise TypeError(f"RewardLogging needs a DistillationModule, got {type(pl_module).__name__}")
        if not pl_module.reward_models():
            raise ValueError(f"{type(pl_module).__name__} has no rewards to log; drop the RewardLogging callback")

    def score(self, pl_module: DistillationModule) -> dict[str, float]:
        """``{<name>/mean, <name>/std}`` of each reward on the fixed samples."""
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((len(self.prompts), *pl_module.backbone.latent_shape), generator=generator)
        images = pl_module.backbone.decode(pl_module.generate(self.prompts, noise.to(pl_module.device), generator=generator))
        stats = {}
        for name, reward in pl_module.reward_models().items():
            scores = reward.score(images, self.prompts)
            stats[f"reward_eval/{name}/mean"] = scores.mean().item()
            stats[f"reward_eval/{name}/std"] = scores.std().item()
        return stats

    def on_train_batch_end(self, trainer, pl_module: DistillationModule, outputs, batch, batch_idx) -> None:
        updates = pl_module.generator_updates
        if updates % self.every_n_updates == 0 and updates != self.last_update:
            self.last_update = updates
            pl_module.log_dict(self.score(pl_module))
