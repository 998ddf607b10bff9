"""The GRPO mode shared by GNDM-A3 and GDMD-B3: stochastic rollouts and the PPO loss.

``docs/methods/gndm.md`` (``gndm.mode``) and ``docs/methods/gdmd.md`` (``mode``) describe the mode.

In this mode a generator update rolls the student out with CPS steps (no grad), scores each
final sample with a per-trajectory reward (GNDM: the R_dm ``elbo_diff`` scalar; GDMD: the
rewards of the implicit target), turns the rewards into group advantages and steps on the
clipped PPO loss of every stochastic step. The critic trains on the rollouts' final samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rdm_lightning.backbones.base import Backbone, Conditioning
from rdm_lightning.core.advantages import group_advantages
from rdm_lightning.core.policy import trajectory_policy_loss
from rdm_lightning.core.schedules import FlowSchedule
from rdm_lightning.core.stochastic import LOG_PROBS, Trajectory, VelocityFn, stochastic_sample
from rdm_lightning.methods.base import check_choice, check_finite
from rdm_lightning.methods.dmd import Iteration

ADVANTAGE_STDS = ("global", "group")


def require_flow(backbone: Backbone, what: str) -> None:
    """Stochastic rollouts take flow steps: refuse other schedules, naming ``what`` needs them."""
    if not isinstance(backbone.schedule, FlowSchedule):
        raise ValueError(
            f"{what} rolls out flow steps (CPS / Flow-GRPO SDE); "
            f"{type(backbone).__name__} has a {type(backbone.schedule).__name__}, not a FlowSchedule"
        )


def flow_velocity(backbone: Backbone, network: torch.nn.Module, cond: Conditioning) -> VelocityFn:
    """``network`` as a flow velocity ``v = (x − x̂0)/σ``, the form the stochastic steps take."""

    def velocity(x: Tensor, sigma: Tensor) -> Tensor:
        x0 = backbone.predict_x0(network, x, sigma, cond)
        return (x.float() - x0) / sigma.float().view(-1, *[1] * (x.ndim - 1))

    return velocity


@dataclass
class GRPOConfig:
    """Rollouts and loss of the GRPO modes (GNDM ``mode=grpo``, ``docs/methods/gndm.md``; GDMD
    ``mode=grpo``, ``docs/methods/gdmd.md``)."""

    eta: float = 0.9
    """CPS η of the rollout steps; the last step, into σ = 0, is deterministic (ς = 0) and untrained."""
    log_prob: Literal["exact_mean", "exact_sum", "cps_simplified"] = "exact_mean"
    """Stored log π: Gaussian averaged (``exact_mean``, the default for new methods) or summed over
    dimensions, or CPS's ``−mean((x′ − μ)²)`` of the reference repositories."""
    clip_range: float = 1e-4
    """PPO's ε (Flow-GRPO: 1e-4 with averaged log-probs)."""
    advantage_std: Literal["global", "group"] = "global"
    """Scale of the group advantages: std over the batch (Flow-GRPO's default) or over the group."""
    advantage_clip: float = 5.0
    """Advantages are clipped to ±this (docs/methods/rtdmd.md, "Stage 2, ``RTDMD``")."""

    def __post_init__(self):
        if not 0 < self.eta <= 1:
            raise ValueError(f"grpo.eta must be in (0, 1], got {self.eta}")
        check_choice("grpo.log_prob", self.log_prob, LOG_PROBS)
        if not 0 <= self.clip_range < 1:
            raise ValueError(f"grpo.clip_range must be in [0, 1), got {self.clip_range}")
        check_choice("grpo.advantage_std", self.advantage_std, ADVANTAGE_STDS)
        check_finite("grpo.advantage_clip", self.advantage_clip)
        if self.advantage_clip <= 0:
            raise ValueError(f"grpo.advantage_clip must be > 0, got {self.advantage_clip}")


class GRPOMixin:
    """The GRPO mode's rollout and loss, for :class:`~rdm_lightning.methods.dmd.DMD` subclasses
    that set ``self.grpo`` (a :class:`GRPOConfig`)."""

    grpo: GRPOConfig

    def check_grpo(self) -> None:
        """A GRPO mode needs a flow backbone and a stochastic step before the last."""
        require_flow(self.backbone, f"{type(self).__name__} mode='grpo'")
        if len(self.student_levels()) < 2:
            raise ValueError("mode='grpo' needs a student of >= 2 steps: the last step (into σ = 0) is deterministic")

    def policy_inputs(self, batch: dict) -> Iteration:
        """A generator update's state: the student rolled out (no grad) as its ``trajectory``, and the
        last step's input ``(x_{T−1}, σ_{T−1})``: the generator's prediction there is the final sample."""
        prompts = batch["prompts"]
        cond = self.backbone.encode_prompts(prompts)
        noise = self.randn((len(prompts), *self.backbone.latent_shape))
        with torch.no_grad():
            trajectory = stochastic_sample(
                flow_velocity(self.backbone, self.generator, cond), noise, self.student_levels(), "cps",
                {"eta": self.grpo.eta}, generator=self.rng, log_prob=self.grpo.log_prob,
            )
        x_in = trajectory.latents[-2]
        return self.iteration(
            batch=batch, update_generator=True, cond=cond, x_in=x_in,
            level=trajectory.sigmas[-2].to(x_in).expand(len(x_in)), trajectory=trajectory,
        )

    def policy_advantages(self, rewards: Tensor, group_size: int) -> Tensor:
        """Group advantages of per-trajectory rewards (mean over the group; global or group std; clipped)."""
        return group_advantages(rewards, group_size, self.grpo.advantage_std, clip=self.grpo.advantage_clip)

    def policy_loss(self, trajectory: Trajectory, cond: Conditioning, advantages: Tensor) -> tuple[Tensor, dict]:
        """The PPO loss of every stochastic step of ``trajectory`` under the current generator."""
        velocity = flow_velocity(self.backbone, self.generator, cond)
        loss, logs = trajectory_policy_loss(velocity, trajectory, advantages, self.grpo.clip_range)
        return loss, {**logs, "train/loss_policy": loss.detach(), "train/advantage_abs": advantages.abs().mean()}
