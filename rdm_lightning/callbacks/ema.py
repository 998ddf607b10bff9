"""Exponential moving average of the generator, counted in generator updates."""
from __future__ import annotations

import lightning as L
from rdm_lightning.core.ema import ema_update, ema_warmup_decay
from rdm_lightning.methods.base import DistillationModule


class GeneratorEMA(L.Callback):
    """Keeps ``pl_module.generator_ema``, the EMA of the generator only.

    The EMA steps once per generator update (not per Lightning optimizer step),
    and the module then samples, evaluates and exports with it.

    Args:
        decay: EMA decay per EMA step (the maximum decay under ``warmup``).
        start_after: generator updates before averaging starts (the EMA copies the generator until then).
        every_n_updates: the EMA steps after every n-th generator update (RTDMD stage 2: 8).
        warmup: decay ``min((1 + n)/(10 + n), decay)`` after n generator updates (Flow-GRPO, RTDMD stage 2).
    """

    def __init__(self, decay: float = 0.99, start_after: int = 0, every_n_updates: int = 1, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        if start_after < 0:
            raise ValueError(f"start_after must be >= 0, got {start_after}")
        if every_n_updates < 1:
            raise ValueError(f"every_n_updates must be >= 1, got {every_n_updates}")
        self.decay = decay
        self.start_after = start_after
        self.every_n_updates = every_n_updates
        self.warmup = warmup
        self.updates_seen = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, DistillationModule):
            raise TypeError(f"GeneratorEMA needs a DistillationModule, got {type(pl_module).__name__}")
        pl_module.enable_generator_ema()

    def on_train_batch_end(self, trainer, pl_module: DistillationModule, outputs, batch, batch_idx) -> None:
        updates = pl_module.generator_updates
        if updates == self.updates_seen:
            return
        self.updates_seen = updates
        if updates <= self.start_after:
            decay = 0.0
        elif updates % self.every_n_updates:
            return
        else:
            decay = ema_warmup_decay(updates - 1, self.decay) if self.warmup else self.decay
        ema_update(pl_module.generator_ema, pl_module.generator, decay)

    def state_dict(self) -> dict:
        return {"updates_seen": self.updates_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.updates_seen = state_dict["updates_seen"]
