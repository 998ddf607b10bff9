"""Group advantages, reward weights, gradient-scale matching, IS ratios and the PPO loss.

Closed forms and invariants, plus the GNDM (``docs/methods/gndm.md``), GDMD (``docs/methods/gdmd.md``) and PPO
(``docs/methods/rtdmd.md``) requirements as far as they concern these functions.
"""
from __future__ import annotations

import math

import pytest
import torch

from rdm_lightning.core.advantages import (
    clipped_advantage_weights,
    clipped_importance_ratio,
    combine_weighted,
    gather_batch,
    group_advantages,
    normalize_per_reward,
    ppo_clipped_loss,
    reward_guided_direction,
    scale_matched_gradient,
    softmax_group_weights,
)

EPS = 1e-4




def random_rewards(batch_size: int = 12, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(batch_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- group_advantages -------------------------------------------------------------------------


def test_group_advantages_closed_form_and_constant_group_is_zero():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0], dtype=torch.float64)
    advantages = group_advantages(rewards, 4)
    std = math.sqrt(1.25)  # population std of 1, 2, 3, 4
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=torch.float64) / (std + EPS)
    torch.testing.assert_close(advantages[:4], expected)
    assert torch.equal(advantages[4:], torch.zeros(4, dtype=torch.float64))  # 0, not NaN


def test_std_is_the_population_one():
    # Flow-GRPO's np.std: for {0, 1} the std is 0.5 (the unbiased one would be 0.707).
    advantages = group_advantages(torch.tensor([0.0, 1.0], dtype=torch.float64), 2)
    torch.testing.assert_close(advantages, torch.tensor([-0.5, 0.5], dtype=torch.float64) / (0.5 + EPS))


@pytest.mark.parametrize("std", ["group", "global", "none"])
def test_advantages_of_each_group_sum_to_zero(std):
    advantages = group_advantages(random_rewards(), 3, std=std)
    torch.testing.assert_close(advantages.view(4, 3).sum(dim=1), torch.zeros(4, dtype=torch.float64))


def test_global_std_uses_the_whole_batch_and_none_only_centres():
    rewards = random_rewards()
    centred = rewards - rewards.view(4, 3).mean(dim=1).repeat_interleave(3)
    global_std = rewards.std(unbiased=False)
    torch.testing.assert_close(group_advantages(rewards, 3, std="global"), centred / (global_std + EPS))
    torch.testing.assert_close(group_advantages(rewards, 3, std="none"), centred)
    # One group spanning the batch: group and global statistics coincide.
    torch.testing.assert_close(group_advantages(rewards, 12, std="global"), group_advantages(rewards, 12))


def test_clipping_bounds_the_advantages():
    rewards = torch.tensor([0.0, 0.0, 0.0, 100.0])
    unclipped = group_advantages(rewards, 4)
    clipped = group_advantages(rewards, 4, clip=1.0)
    assert unclipped.abs().max() > 1
    assert clipped.abs().max() <= 1
    torch.testing.assert_close(clipped, unclipped.clamp(-1, 1))


def test_advantages_are_detached_and_integers_are_accepted():
    rewards = random_rewards().requires_grad_()
    assert not group_advantages(rewards, 3).requires_grad
    torch.testing.assert_close(group_advantages(torch.tensor([0, 2]), 2), torch.tensor([-1.0, 1.0]) / (1 + EPS))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: group_advantages(torch.zeros(6), 4), "batch_size=6.*group_size=4"),
        (lambda: group_advantages(torch.zeros(6), 2, std="batch"), "std must be one of.*'batch'"),
        (lambda: group_advantages(torch.zeros(6), 2, clip=0.0), "clip.*0.0"),
        (lambda: group_advantages(torch.zeros(6, 1), 2), "1-D.*\\(6, 1\\)"),
    ],
)
def test_group_advantage_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- per-reward normalisation and weighted combination -----------------------------------------


def test_per_reward_normalisation_makes_every_reward_unit_scale():
    scores = {"hps": random_rewards(seed=1, scale=0.01), "clip": random_rewards(seed=2, scale=1000.0)}
    advantages = normalize_per_reward(scores, 3)
    assert set(advantages) == {"hps", "clip"}
    for name, values in advantages.items():
        # Each group's std is s/(s + ε) ≈ 1, whatever the reward's own scale s.
        reward_std = scores[name].view(4, 3).std(dim=1, unbiased=False)
        group_std = values.view(4, 3).std(dim=1, unbiased=False)
        torch.testing.assert_close(group_std, reward_std / (reward_std + EPS))
        assert (group_std - 1).abs().max() < 0.05
    torch.testing.assert_close(advantages["clip"], group_advantages(scores["clip"], 3))


def test_combine_weighted_closed_form_and_renormalisation():
    advantages = {"a": torch.tensor([1.0, -1.0, 2.0, -2.0]), "b": torch.tensor([0.5, -0.5, 0.0, 0.0])}
    combined = combine_weighted(advantages, {"a": 0.3, "b": 2.0})
    torch.testing.assert_close(combined, torch.tensor([1.3, -1.3, 0.6, -0.6]))
    renormalized = combine_weighted(advantages, {"a": 0.3, "b": 2.0}, renormalize=True)
    torch.testing.assert_close(renormalized, (combined - combined.mean()) / (combined.std(unbiased=False) + EPS))


@pytest.mark.parametrize(
    ("weights", "message"),
    [({"a": 1.0}, "missing weights for \\['b'\\]"), ({"a": 1.0, "b": 1.0, "ocr": 1.0}, "unknown rewards \\['ocr'\\]")],
)
def test_combine_weighted_names_missing_and_unknown_weights(weights, message):
    with pytest.raises(ValueError, match=message):
        combine_weighted({"a": torch.zeros(2), "b": torch.zeros(2)}, weights)


# --- weights (docs/methods/gndm.md, docs/methods/gdmd.md) --------------------------------------


def test_identical_rewards_give_unit_weights_and_weights_are_bounded():
    constant = group_advantages(torch.full((8,), 0.7), 4)
    assert torch.equal(clipped_advantage_weights(constant), torch.ones(8))
    assert torch.equal(softmax_group_weights(constant, 4), torch.ones(8))
    advantages = 10 * random_rewards(64)
    weights = clipped_advantage_weights(advantages, kappa=0.5, clip=2.0)
    assert weights.min() >= 0 and weights.max() <= 1 + 0.5 * 2.0
    assert weights.min() == 0 and weights.max() == 2.0  # both bounds reached at this spread
    torch.testing.assert_close(clipped_advantage_weights(torch.tensor([0.4, -1.0])), torch.tensor([1.2, 0.5]))


def test_softmax_weights_average_one_per_group_without_cap_and_respect_the_cap():
    advantages = 3 * random_rewards(16)
    uncapped = softmax_group_weights(advantages, 4, w_max=None)
    torch.testing.assert_close(uncapped.view(4, 4).mean(dim=1), torch.ones(4, dtype=torch.float64))
    assert uncapped.max() > 3
    capped = softmax_group_weights(advantages, 4, w_max=3.0)
    assert capped.min() >= 0 and capped.max() <= 3.0
    torch.testing.assert_close(capped, uncapped.clamp_max(3.0))
    torch.testing.assert_close(softmax_group_weights(advantages, 4, temperature=2.0, w_max=None),
                               softmax_group_weights(advantages / 2, 4, w_max=None))


# --- gradient-scale matching (docs/methods/gndm.md, W2) ----------------------------------------


def test_scale_matched_gradient_has_mean_abs_q_over_q_plus_eps():
    gamma = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gamma = gamma * torch.tensor([1e-6, 1.0, 1e3], dtype=torch.float64).view(3, 1, 1, 1)
    q = gamma.abs().mean(dim=(1, 2, 3))
    matched = scale_matched_gradient(gamma)
    torch.testing.assert_close(matched.abs().mean(dim=(1, 2, 3)), q / (q + 1e-8))
    assert torch.equal(scale_matched_gradient(torch.zeros(2, 3)), torch.zeros(2, 3))  # 0, not NaN


def test_reward_guided_direction_closed_form_and_zero_lambda_is_bit_identical():
    g = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    hps, clip = torch.randn(2, 5), torch.full((2, 5), float("nan"))
    assert reward_guided_direction(g, {"hps": hps, "clip": clip}, {"hps": 0.0, "clip": 0.0}) is g
    torch.testing.assert_close(reward_guided_direction(g, {"hps": hps, "clip": clip}, {"hps": 0.3, "clip": 0.0}),
                               g - 0.3 * hps)
    with pytest.raises(ValueError, match="missing \\['clip'\\], unknown \\['ocr'\\]"):
        reward_guided_direction(g, {"hps": hps, "clip": clip}, {"hps": 0.3, "ocr": 0.1})


# --- importance ratios (docs/methods/gndm.md, "Importance sampling") ---------------------------


def test_importance_ratio_is_one_when_unchanged_and_without_prefix():
    log_prob = torch.randn(4, 3, requires_grad=True)
    assert torch.equal(clipped_importance_ratio(log_prob, log_prob.detach().clone(), 1e-3), torch.ones(4))
    assert torch.equal(clipped_importance_ratio(torch.zeros(4, 0), torch.zeros(4, 0), 1e-3), torch.ones(4))


def test_importance_ratio_sums_steps_is_clipped_and_detached():
    new = torch.tensor([[1e-4, 2e-4], [-5.0, 0.0], [3.0, 0.0]], requires_grad=True)
    ratio = clipped_importance_ratio(new, torch.zeros(3, 2), 1e-3)
    assert not ratio.requires_grad
    torch.testing.assert_close(ratio, torch.tensor([math.exp(3e-4), 1 - 1e-3, 1 + 1e-3]))
    with pytest.raises(ValueError, match="clip_range.*1.5"):
        clipped_importance_ratio(new, new, 1.5)


# --- PPO loss (docs/methods/rtdmd.md, "Stage 2, `RTDMD`") --------------------------------------


def test_ppo_loss_is_minus_mean_advantage_at_ratio_one():
    advantages = torch.tensor([1.0, -2.0, 0.5])
    old = torch.tensor([-1.0, 0.3, 2.0])
    new = old.clone().requires_grad_()
    loss = ppo_clipped_loss(advantages, new, old, 1e-4)
    torch.testing.assert_close(loss, -advantages.mean())
    loss.backward()
    # ∂L/∂log π_i = −A_i·∂ρ_i/∂log π_i / n with ρ = 1.
    torch.testing.assert_close(new.grad, -advantages / 3)


def test_ppo_gradient_is_zero_exactly_when_clipped_on_the_side_the_advantage_favours():
    epsilon = 0.1
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    log_ratio = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.05])  # bad side, bad side, other side, other side, inside
    new = log_ratio.clone().requires_grad_()
    ppo_clipped_loss(advantages, new, torch.zeros(5), epsilon).backward()
    ratio = log_ratio.exp()
    expected = -advantages * ratio / 5  # −A·∂ρ/∂log π, averaged
    expected[:2] = 0
    torch.testing.assert_close(new.grad, expected)


def test_ppo_broadcasts_the_advantage_over_steps_and_never_differentiates_old_or_advantage():
    advantages = torch.tensor([1.0, -1.0], requires_grad=True)
    old = torch.zeros(2, 3, requires_grad=True)
    new = torch.zeros(2, 3, requires_grad=True)
    loss = ppo_clipped_loss(advantages, new, old, 0.2)
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[-1.0] * 3, [1.0] * 3]) / 6)
    assert advantages.grad is None and old.grad is None
    with pytest.raises(ValueError, match="\\(2, 3\\).*\\(2,\\)"):
        ppo_clipped_loss(advantages, new, torch.zeros(2), 0.2)


# --- cross-rank statistics (docs/methods/gndm.md) ----------------------------------------------


def test_gathered_statistics_are_identical_on_every_rank():
    rewards = random_rewards(16)
    per_rank = rewards.view(2, 8)  # 2 ranks, 2 whole groups of 4 each

    def all_gather(values: torch.Tensor) -> torch.Tensor:
        return per_rank  # what every rank receives: [world, B]

    gathered = [gather_batch(per_rank[rank], all_gather) for rank in range(2)]
    assert torch.equal(gathered[0], gathered[1]) and torch.equal(gathered[0], rewards)
    advantages = [group_advantages(values, 4, std="global") for values in gathered]
    assert torch.equal(advantages[0], advantages[1])
    torch.testing.assert_close(advantages[0], group_advantages(rewards, 4, std="global"))
    # A single process: all_gather returns its input, and gathering is the identity.
    assert torch.equal(gather_batch(rewards, lambda values: values), rewards)
