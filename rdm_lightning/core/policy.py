"""The GRPO policy loss over recorded stochastic trajectories (``docs/methods/rtdmd.md``; β_KL = 0).

A trajectory's advantage is shared by every trained step; the loss on step ``j`` is PPO's
clipped surrogate of ``ρ = exp(log π_θ − log π_old)`` for ``x_{j+1} | x_j``, averaged over
the trained steps. Samples whose advantage is exactly 0 are dropped:
they carry no signal and would only dilute the mean.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from rdm_lightning.core.advantages import ppo_clipped_loss
from rdm_lightning.core.stochastic import Trajectory, VelocityFn, step_log_prob


def trained_steps(trajectory: Trajectory, steps: Sequence[int] | None = None) -> list[int]:
    """``steps`` (default: every trainable step), checked to have a policy density (ς > 0)."""
    trainable = [j for j in range(trajectory.num_steps) if trajectory.is_trainable(j)]
    if steps is None:
        steps = trainable
    untrainable = sorted(set(steps) - set(trainable))
    if untrainable:
        raise ValueError(f"steps {untrainable} are deterministic (ς = 0) and have no policy density; trainable: {trainable}")
    if not steps:
        raise ValueError(
            f"the trajectory has no trainable step (stochastic with ς > 0) among its {trajectory.num_steps} steps; "
            "a GRPO rollout needs at least one stochastic step before the last"
        )
    return list(steps)


def trajectory_policy_loss(
    denoise_velocity: VelocityFn,
    trajectory: Trajectory,
    advantages: Tensor,
    clip_range: float,
    steps: Sequence[int] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean over the trained steps of the PPO loss of the samples with a non-zero advantage.

    Args:
        denoise_velocity: the current policy's velocity (with gradient).
        trajectory: the rollout, recorded under the old policy.
        advantages: ``[B]`` per-trajectory advantages (detached).
        clip_range: PPO's ε.
        steps: the trained steps (default: all trainable ones).

    Returns:
        The loss and logs: the mean and max |log ρ| and the fraction of kept samples.
    """
    steps = trained_steps(trajectory, steps)
    keep = advantages.detach() != 0
    new = torch.stack([step_log_prob(denoise_velocity, trajectory, j) for j in steps], dim=1)
    old = torch.stack([trajectory.log_probs[j] for j in steps], dim=1)
    log_ratio = (new - old).detach()
    logs = {"train/policy_kept": keep.float().mean(), "train/policy_log_ratio_abs": log_ratio.abs().mean()}
    if not keep.any():
        # Every group is constant: no signal, and a zero loss that still reaches the policy's graph.
        return new.sum() * 0.0, logs
    return ppo_clipped_loss(advantages[keep], new[keep], old[keep], clip_range), logs
