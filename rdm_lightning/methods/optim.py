"""Optimizers that know which role (generator, fake score) they update."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn


@dataclass
class OptimizerConfig:
    """AdamW settings of one trainable role (DMD2 defaults)."""

    lr: float = 1e-5
    """Learning rate after warm-up."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW β1, β2."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""
    warmup_updates: int = 0
    """Linear warm-up length, counted in this role's own updates; constant afterwards."""
    grad_clip: float | None = 10.0
    """Clip the gradient norm of this role to this value; ``None`` disables clipping."""

    def __post_init__(self):
        if not 0 < self.lr < math.inf:  # also rejects NaN
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if not (0 <= self.weight_decay < math.inf and self.warmup_updates >= 0):
            raise ValueError(
                f"weight_decay must be a finite number >= 0 and warmup_updates >= 0, "
                f"got {self.weight_decay}, {self.warmup_updates}"
            )
        if self.grad_clip is not None and not 0 < self.grad_clip < math.inf:
            raise ValueError(f"grad_clip must be a finite number > 0, or None (no clipping), got {self.grad_clip}")

    def warmup_factor(self, updates: int) -> float:
        """LR multiplier after ``updates`` updates of the role."""
        return 1.0 if self.warmup_updates == 0 else min(1.0, (updates + 1) / self.warmup_updates)


def role_param_group(role: str, params: Iterable[nn.Parameter], config: OptimizerConfig) -> dict:
    """One AdamW parameter group over the role's own ``params``, tagged with its role."""
    params = list(params)
    modules = [type(p).__name__ for p in params if isinstance(p, nn.Module)]
    if modules:
        raise TypeError(f"role_param_group takes the role's parameters, got modules {modules}: pass module.parameters()")
    return {"params": params, "role": role, "lr": config.lr, "betas": config.betas, "weight_decay": config.weight_decay}


class RoleAwareAdamW(torch.optim.AdamW):
    """One AdamW over several roles whose ``step`` touches only the active role.

    Lightning's DeepSpeed strategy accepts a single optimizer. DeepSpeed fills
    missing gradients with zeros, and a plain AdamW would still move those
    weights (weight decay, momentum) and their moments; here the inactive roles'
    parameter groups are hidden from the step, so their weights and optimizer
    state stay bit-identical.
    """

    def __init__(self, param_groups: list[dict], **defaults):
        roles = [g.get("role") for g in param_groups]
        if None in roles:
            raise ValueError("every parameter group of RoleAwareAdamW needs a 'role' key")
        super().__init__(param_groups, **defaults)
        self.roles = list(dict.fromkeys(roles))
        self.active_role: str | None = None

    @torch.no_grad()
    def step(self, closure=None):
        if self.active_role not in self.roles:
            raise RuntimeError(f"set active_role to one of {self.roles} before step(), got {self.active_role!r}")
        # ZeRO steps one (flattened) group at a time with ``param_groups`` swapped to it,
        # so a call may hold only inactive groups: then it is a no-op.
        all_groups = self.param_groups
        active = [g for g in all_groups if g["role"] == self.active_role]
        if not active:
            return None
        self.param_groups = active
        try:
            return super().step(closure)
        finally:
            self.param_groups = all_groups
