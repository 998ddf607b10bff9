"""The GRPO policy loss over recorded trajectories (docs/methods/rtdmd.md, "Stage 2, ``RTDMD``")."""
from __future__ import annotations

import pytest
import torch

from rdm_lightning.core.policy import trained_steps, trajectory_policy_loss
from rdm_lightning.core.stochastic import stochastic_sample, step_log_prob

LEVELS = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)


class ParamVelocity:
    """``v = w·x + b·σ`` with trainable scalars w, b."""

    def __init__(self, w: float = 0.3, b: float = -0.5):
        self.w = torch.tensor(w, requires_grad=True)
        self.b = torch.tensor(b, requires_grad=True)

    def __call__(self, x, sigma):
        return self.w * x + self.b * sigma.to(x.dtype).reshape(-1, 1, 1, 1)


def rollout(policy, eta=0.9, log_prob="exact_mean"):
    noise = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return stochastic_sample(policy, noise, LEVELS, "cps", {"eta": eta}, generator=torch.Generator().manual_seed(1),
                                 log_prob=log_prob)


@pytest.mark.parametrize("log_prob", ["exact_mean", "cps_simplified"])
def test_gradient_at_ratio_one_is_minus_mean_advantage_times_score(log_prob):
    policy = ParamVelocity()
    trajectory = rollout(policy, log_prob=log_prob)
    advantages = torch.tensor([1.0, -1.0, 0.0, 0.5, -0.5, 0.0])
    loss, logs = trajectory_policy_loss(policy, trajectory, advantages, clip_range=1e-4)
    grads = torch.autograd.grad(loss, [policy.w, policy.b])
    # Closed form at ρ = 1: ∂L/∂θ = −(1/(n·T))·Σ_{kept i} Σ_j A_i·∂log π_ij/∂θ, over the 3 stochastic steps
    # and the n = 4 samples with A ≠ 0 (check 5 drops the others).
    steps = [0, 1, 2]
    log_probs = torch.stack([step_log_prob(policy, trajectory, j) for j in steps], dim=1)
    keep = advantages != 0
    reference = -(advantages[keep, None] * log_probs[keep]).sum() / (keep.sum() * len(steps))
    expected = torch.autograd.grad(reference, [policy.w, policy.b])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    assert loss.item() == pytest.approx(-advantages[keep].mean().item(), abs=1e-6)
    assert logs["train/policy_kept"] == pytest.approx(4 / 6)
    assert logs["train/policy_log_ratio_abs"] == 0.0  # recomputed under the rollout's policy: ρ = 1 exactly


def test_zero_advantages_drop_every_sample_check_5():
    policy = ParamVelocity()
    loss, logs = trajectory_policy_loss(policy, rollout(policy), torch.zeros(6), clip_range=1e-4)
    assert loss.item() == 0.0 and logs["train/policy_kept"] == 0.0
    grads = torch.autograd.grad(loss, [policy.w, policy.b])
    assert all(g == 0 for g in grads)


def test_clipped_ratio_on_the_favoured_side_has_no_gradient_check_6():
    policy = ParamVelocity()
    trajectory = rollout(policy)
    with torch.no_grad():
        policy.w += 0.2  # moves the ratios far outside 1 ± 1e-4
    log_ratio = (step_log_prob(policy, trajectory, 1) - trajectory.log_probs[1]).detach()
    assert (log_ratio.abs() > 1e-3).all()
    # A on the side each ratio moved to: every term of step 1 is clipped, so no gradient reaches θ.
    favoured = torch.sign(log_ratio)
    loss, _ = trajectory_policy_loss(policy, trajectory, favoured, clip_range=1e-4, steps=[1])
    assert all(g == 0 for g in torch.autograd.grad(loss, [policy.w, policy.b]))
    # The opposite side stays unclipped and does move θ.
    loss, _ = trajectory_policy_loss(policy, trajectory, -favoured, clip_range=1e-4, steps=[1])
    assert any(g != 0 for g in torch.autograd.grad(loss, [policy.w, policy.b]))


def test_deterministic_steps_cannot_be_trained():
    trajectory = rollout(ParamVelocity())
    assert trained_steps(trajectory) == [0, 1, 2]  # CPS into σ = 0 has ς = 0
    with pytest.raises(ValueError, match=r"steps \[3\] are deterministic"):
        trained_steps(trajectory, [2, 3])
    deterministic = stochastic_sample(ParamVelocity(), torch.zeros(2, 1, 4, 4), LEVELS, "cps", {"eta": 0.9},
                                      stochastic_steps=set())
    with pytest.raises(ValueError, match="no trainable step"):
        trained_steps(deterministic)
