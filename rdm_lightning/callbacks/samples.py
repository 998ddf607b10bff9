"""Sample grids with fixed prompts and seeds, saved as PNG and logged."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch

from rdm_lightning.evaluation.grid import image_grid, save_image_grid
from rdm_lightning.methods.base import DistillationModule


def run_dir(trainer: L.Trainer) -> Path:
    """The run's output folder: the logger's folder, else ``default_root_dir``.

    Every process must call it (``trainer.log_dir`` broadcasts rank 0's folder): callbacks that write on
    rank 0 only resolve it in ``setup`` and keep it.
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


def fixed_noise_samples(
    pl_module: DistillationModule, prompts: list[str], seed: int, role: str = "generator"
) -> torch.Tensor:
    """Decoded images of ``role`` for ``prompts`` from the noise of ``seed``: a CPU generator seeded
    ``seed`` draws the initial noise, then any noise the sampler draws between steps, so the same
    weights, prompts and seed always give the same images (grids, reward logging, evaluation)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), *pl_module.backbone.latent_shape), generator=generator).to(pl_module.device)
    return pl_module.backbone.decode(pl_module.generate(prompts, noise, role=role, generator=generator))


class SampleGrid(L.Callback):
    """Every ``every_n_updates`` generator updates (and at the end of fit), sample fixed prompts.

    Args:
        prompts: the prompts, one grid row each.
        num_per_prompt: images per prompt (grid columns).
        seed: seed of the fixed initial noise, so grids are comparable over training.
        every_n_updates: interval in generator updates; 0 samples only at the end of fit.
        scale: pixel repetition factor of the PNG (8×8 digits are tiny).
    """

    def __init__(
        self, prompts: list[str], num_per_prompt: int = 8, seed: int = 0, every_n_updates: int = 100, scale: int = 4
    ):
        if not prompts:
            raise ValueError("SampleGrid needs at least one prompt")
        if num_per_prompt < 1 or every_n_updates < 0 or scale < 1:
            raise ValueError(
                f"num_per_prompt and scale must be >= 1 and every_n_updates >= 0, got {num_per_prompt}, {scale}, {every_n_updates}"
            )
        self.prompts = prompts
        self.num_per_prompt = num_per_prompt
        self.seed = seed
        self.every_n_updates = every_n_updates
        self.scale = scale
        self.last_update = -1
        self.folder: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.folder = run_dir(trainer)

    def sample(self, pl_module: DistillationModule, role: str = "generator") -> torch.Tensor:
        """Decoded images, prompt-major, from the fixed noise."""
        prompts = [p for p in self.prompts for _ in range(self.num_per_prompt)]
        return fixed_noise_samples(pl_module, prompts, self.seed, role)

    def save(self, trainer: L.Trainer, pl_module: DistillationModule, name: str, role: str = "generator") -> Path | None:
        """Sample ``role`` on every process (a sharded network needs all of them in its forward) and write the
        grid ``samples/<name>.png`` and log it on rank 0; the path on rank 0, ``None`` elsewhere."""
        images = self.sample(pl_module, role)
        if not trainer.is_global_zero:
            return None
        path = save_image_grid(images, self.folder / "samples" / f"{name}.png", self.num_per_prompt, self.scale)
        log_image = getattr(trainer.logger, "log_image", None)
        if callable(log_image):
            log_image(key=f"samples/{role}", images=[image_grid(images, self.num_per_prompt, scale=self.scale)])
        else:
            experiment = getattr(trainer.logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                grid = image_grid(images, self.num_per_prompt, scale=self.scale)
                experiment.add_image(f"samples/{role}", np.ascontiguousarray(grid), trainer.global_step, dataformats="HWC")
        return path

    def on_train_batch_end(self, trainer, pl_module: DistillationModule, outputs, batch, batch_idx) -> None:
        updates = pl_module.generator_updates
        if self.every_n_updates and updates % self.every_n_updates == 0 and updates != self.last_update:
            self.last_update = updates
            self.save(trainer, pl_module, f"generator_u{updates:06d}")

    def on_fit_end(self, trainer, pl_module: DistillationModule) -> None:
        self.save(trainer, pl_module, "generator_final")
        self.save(trainer, pl_module, "teacher", role="teacher")
