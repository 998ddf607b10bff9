"""Digits evaluation during and after fit: digits-FD, pixel FD, prompt accuracy, NFE, sampling time."""
from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch

from rdm_lightning.callbacks.samples import fixed_noise_samples, run_dir
from rdm_lightning.data.digits import digit_prompt
from rdm_lightning.evaluation.digits import DigitsEvaluator
from rdm_lightning.methods.base import DistillationModule


def balanced_digit_prompts(num_samples: int) -> list[str]:
    """``num_samples`` prompts cycling through the digits 0–9."""
    return [digit_prompt(i % 10) for i in range(num_samples)]


def evaluate_sampler(
    pl_module: DistillationModule, evaluator: DigitsEvaluator, num_samples: int, seed: int, role: str = "generator"
) -> dict:
    """Sample ``num_samples`` class-balanced digits from fixed noise and score them."""
    prompts = balanced_digit_prompts(num_samples)
    start = time.perf_counter()
    images = fixed_noise_samples(pl_module, prompts, seed, role)
    seconds = time.perf_counter() - start
    metrics = evaluator.evaluate(images.cpu(), prompts)
    rewards = {f"reward/{name}": reward.score(images, prompts).mean().item() for name, reward in pl_module.reward_models().items()}
    return {**metrics, **rewards, "nfe": pl_module.nfe(role), "sampling_seconds_per_image": seconds / num_samples}


class DigitsEvaluation(L.Callback):
    """Scores the (EMA) generator on the digits metrics and writes ``metrics.json`` in the run folder.

    Args:
        every_n_updates: interval in generator updates; 0 evaluates only at the end of fit.
        num_samples: generated images per evaluation (class-balanced prompts).
        seed: seed of the fixed evaluation noise.
        evaluate_teacher: also score the teacher's default sampler at the end of fit.
    """

    def __init__(self, every_n_updates: int = 0, num_samples: int = 1000, seed: int = 1234, evaluate_teacher: bool = True):
        if every_n_updates < 0 or num_samples < 10:
            raise ValueError(f"every_n_updates must be >= 0 and num_samples >= 10, got {every_n_updates}, {num_samples}")
        self.every_n_updates = every_n_updates
        self.num_samples = num_samples
        self.seed = seed
        self.evaluate_teacher = evaluate_teacher
        self.history: list[dict] = []
        self._evaluator: DigitsEvaluator | None = None
        self._validation: list[tuple[torch.Tensor, list[str]]] = []
        self.folder: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.folder = run_dir(trainer)  # on every process: rank 0 writes later

    @property
    def evaluator(self) -> DigitsEvaluator:
        if self._evaluator is None:
            self._evaluator = DigitsEvaluator.default()
        return self._evaluator

    def _evaluate(self, trainer: L.Trainer, pl_module: DistillationModule) -> dict:
        metrics = evaluate_sampler(pl_module, self.evaluator, self.num_samples, self.seed)
        entry = {"generator_updates": pl_module.generator_updates, **metrics}
        self.history.append(entry)
        # NFE and sample count are fixed per run: metrics.json has them; curves get what changes.
        logged = {k: v for k, v in metrics.items() if k not in ("nfe", "num_samples")}
        pl_module.log_dict({f"eval/{k}": float(v) for k, v in logged.items()}, rank_zero_only=True)
        return entry

    def on_train_batch_end(self, trainer, pl_module: DistillationModule, outputs, batch, batch_idx) -> None:
        updates = pl_module.generator_updates
        due = self.every_n_updates and updates % self.every_n_updates == 0
        # Every process samples (a sharded network needs all of them); the fixed noise gives each the same figures.
        if due and (not self.history or self.history[-1]["generator_updates"] != updates):
            self._evaluate(trainer, pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._validation.append((outputs.cpu(), list(batch["prompts"])))

    def on_validation_epoch_end(self, trainer, pl_module: DistillationModule) -> None:
        """Score the images :meth:`DistillationModule.validation_step` generated (``rdm validate``)."""
        if not self._validation:
            return
        images = torch.cat([images for images, _ in self._validation])
        prompts = [p for _, batch_prompts in self._validation for p in batch_prompts]
        self._validation = []
        metrics = self.evaluator.evaluate(images, prompts)
        pl_module.log_dict({f"val/{k}": float(v) for k, v in metrics.items()}, rank_zero_only=True)

    def on_fit_end(self, trainer, pl_module: DistillationModule) -> None:
        # Sampled on every process, as in on_train_batch_end; rank 0 writes.
        report = {"student": evaluate_sampler(pl_module, self.evaluator, self.num_samples, self.seed)}
        report["student"]["generator_updates"] = pl_module.generator_updates
        if self.evaluate_teacher:
            report["teacher"] = evaluate_sampler(pl_module, self.evaluator, self.num_samples, self.seed, role="teacher")
        report["real_data_floor"] = self.evaluator.real_data_floor()
        report["history"] = self.history
        if trainer.is_global_zero:
            self._write(report)

    def on_exception(self, trainer, pl_module: DistillationModule, exception: BaseException) -> None:
        """A stopped run (signal, numeric stop, crash) still writes the evaluations it made, without a final one."""
        if trainer.is_global_zero and self.folder is not None:  # not when fit failed before setup
            self._write({"history": self.history, "stopped": f"{type(exception).__name__}: {exception}"})

    def _write(self, report: dict) -> None:
        path = self.folder / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])
