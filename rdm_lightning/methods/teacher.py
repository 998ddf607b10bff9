"""Pretraining of the digits teacher, so the embedded default needs no download.

The text encoder and the denoiser train together on the digits train split
with the backbone's denoising loss (flow velocity by default, ε as an option)
and prompt dropout for classifier-free guidance. An EMA of both is what is
saved, as a digits model folder that :class:`DigitsBackbone` loads.
"""
from __future__ import annotations

import copy
import math
import os
import shutil
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from rdm_lightning.backbones.digits import (
    DigitsConfig,
    DigitsDenoiser,
    DigitsTextEncoder,
    default_teacher_path,
    digits_schedule,
    save_digits_model,
    tokenize,
)
from rdm_lightning.core.ema import ema_update
from rdm_lightning.core.parameterization import Prediction, training_target
from rdm_lightning.core.schedules import _per_sample
from rdm_lightning.runs import run_once


class DigitsTeacherPretraining(L.LightningModule):
    """Train a digits teacher from scratch and save it where :class:`DigitsBackbone` looks.

    Args:
        config: architecture and prediction type of the teacher.
        output_path: folder to save the teacher in; ``None`` is the library cache for ``config.prediction``.
        lr: AdamW learning rate.
        prompt_dropout: probability of replacing a prompt by ``""`` (trains the CFG branch).
        ema_decay: decay of the parameter EMA that is saved.
    """

    def __init__(
        self,
        config: DigitsConfig = DigitsConfig(),
        output_path: str | None = None,
        lr: float = 2e-3,
        prompt_dropout: float = 0.1,
        ema_decay: float = 0.999,
    ):
        super().__init__()
        if not 0 < lr < math.inf:  # also rejects NaN
            raise ValueError(f"lr must be a finite number > 0, got {lr}")
        if not 0.0 <= prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must lie in [0, 1), got {prompt_dropout}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")
        self.save_hyperparameters()
        self.config = config
        self.output_path = Path(output_path) if output_path else default_teacher_path(config.prediction)
        self.schedule = digits_schedule(config.prediction)
        self.text_encoder = DigitsTextEncoder(config.text_dim, config.max_tokens)
        self.denoiser = DigitsDenoiser(config.channels, config.text_dim)
        self.ema = nn.ModuleDict({"text_encoder": copy.deepcopy(self.text_encoder), "denoiser": copy.deepcopy(self.denoiser)})
        self.ema.requires_grad_(False)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x0 = batch["images"] * 2.0 - 1.0
        prompts = ["" if torch.rand(()) < self.hparams.prompt_dropout else p for p in batch["prompts"]]
        text = self.text_encoder(tokenize(prompts, self.config.max_tokens).to(self.device))
        # Flow: σ ~ U[0, 1]; VP: t ~ U{0, …, 999}.
        level = self.schedule.sample_levels(len(x0), 0.0, 1.0).to(self.device)
        noise = torch.randn_like(x0)
        x_t = self.schedule.add_noise(x0, noise, level)
        alpha, sigma = _per_sample(self.schedule.alpha_sigma(level), x0)
        target = training_target(Prediction(self.config.prediction), x0, noise, alpha, sigma)
        output = self.denoiser(x_t, self.schedule.model_timestep(level).to(self.device), text)
        loss = torch.nn.functional.mse_loss(output, target)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        # The EMA steps right after the optimizer, inside the step: a checkpoint written at the
        # batch's end by a callback (which Lightning calls before the module's hooks) includes it.
        super().optimizer_step(*args, **kwargs)
        steps = self.global_step + 1  # Lightning counts this step only once optimizer_step returns
        decay = min(self.hparams.ema_decay, (1 + steps) / (10 + steps))
        ema_update(self.ema["text_encoder"], self.text_encoder, decay)
        ema_update(self.ema["denoiser"], self.denoiser, decay)

    def configure_optimizers(self):
        params = list(self.text_encoder.parameters()) + list(self.denoiser.parameters())
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=0.0)
        total = self.trainer.estimated_stepping_batches
        # Cosine decay to 10 %: a small model on 1,437 images benefits from annealing.
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * min(step / total, 1.0)))).item()
        )
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    def configure_callbacks(self) -> list[L.Callback]:
        """Progress in optimizer steps out of ``max_steps``, with rate and time left
        (:class:`~rdm_lightning.callbacks.progress.UpdateProgressBar`), here and in :func:`ensure_digits_teacher`."""
        from rdm_lightning.callbacks.progress import default_progress_bar  # the callbacks import the methods

        return default_progress_bar(self.trainer)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Prompt dropout, levels and noise come from torch's global stream, which Lightning does not
        # checkpoint: without it a resumed pretraining would not continue bit for bit.
        checkpoint["torch_rng"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resumed_rng = checkpoint.get("torch_rng")

    def on_train_start(self) -> None:
        # Set here, not on load: building the resumed data loader's iterator draws from the stream.
        if getattr(self, "_resumed_rng", None) is not None:
            torch.set_rng_state(self._resumed_rng)
            self._resumed_rng = None

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            save_digits_model(self.output_path, self.config, self.ema["text_encoder"], self.ema["denoiser"])


def ensure_digits_teacher(prediction: str = "flow_velocity", max_steps: int = 3000, batch_size: int = 128) -> Path:
    """The cached digits teacher for ``prediction``, trained first if it is missing."""
    path = default_teacher_path(prediction)
    # Under a multi-process launch rank 0 trains while the other ranks wait for the folder.
    run_once(lambda: (path / "denoiser.safetensors").exists(), lambda: _train_digits_teacher(path, prediction, max_steps, batch_size),
             f"train the digits teacher into {path}")
    return path


def _train_digits_teacher(path: Path, prediction: str, max_steps: int, batch_size: int) -> None:
    # Imported here: data is a sibling layer only this entry point needs.
    from rdm_lightning.data.digits import DigitsDataModule

    print(f"rdm: training the digits teacher ({prediction}, {max_steps} steps) into {path}")
    # Written under a side name and renamed, so a waiting rank or a crash never sees half a teacher.
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = DigitsTeacherPretraining(DigitsConfig(prediction=prediction), output_path=str(partial))
        trainer = L.Trainer(
            max_steps=max_steps, logger=False, enable_checkpointing=False, enable_model_summary=False,
            accelerator="auto", devices=1,
        )
        trainer.fit(module, DigitsDataModule(batch_size=batch_size))
    if (path / "denoiser.safetensors").exists():  # another run on this machine published it first
        shutil.rmtree(partial)
    else:
        os.replace(partial, path)
