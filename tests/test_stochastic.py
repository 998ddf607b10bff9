"""Stochastic few-step sampler and step rules of ``rdm_lightning.core.stochastic``.

Zero noise gives the Euler step, the CPS forms agree, the noise variance, and the sampler's
recording and recompute contract (advantages and the PPO loss are tested elsewhere), with the CPS
steps of ``docs/methods/rtdmd.md``.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from rdm_lightning.core.schedules import FlowSchedule
from rdm_lightning.core.stochastic import (
    LOG_PROBS,
    RULES,
    StepResult,
    Trajectory,
    cps_simplified_log_prob,
    cps_step,
    dance_grpo_step,
    euler_step,
    flow_grpo_sde_step,
    gaussian_log_prob,
    recompute_step,
    step_log_prob,
    stochastic_sample,
    transition_log_prob,
)

SHAPE = (4, 3, 5, 5)
LEVELS = torch.tensor([1.0, 0.9, 0.75, 0.5], dtype=torch.float64)  # SD3 shift 3, 4 steps




def _rand(*shape, seed=0, dtype=torch.float32) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class LinearVelocity:
    """``v = w·x + b·σ``: a cheap deterministic policy whose parameters can be changed."""

    def __init__(self, w: float = 0.3, b: float = -0.5):
        self.w, self.b = w, b
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        assert sigma.shape == (len(x),)
        self.calls += 1
        return self.w * x + self.b * sigma.to(x.dtype).reshape(-1, 1, 1, 1)


def _step(rule: str, x, v, sigma, sigma_next, level: float, noise=None, generator=None) -> StepResult:
    if rule == "cps":
        return cps_step(x, v, sigma, sigma_next, eta=level, noise=noise, generator=generator)
    if rule == "flowgrpo_sde":
        return flow_grpo_sde_step(
            x, v, sigma, sigma_next, noise_level=level, noise=noise, sigma_1=0.9, generator=generator
        )
    return dance_grpo_step(x, v, sigma, sigma_next, eta=level, noise=noise, generator=generator)


# ----------------------------------------------------------------------------------------------
# Acceptance check 1: zero noise is Euler
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["cps", "flowgrpo_sde", "dance"])
@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.9), (0.75, 0.5), (0.5, 0.0)])
def test_zero_noise_is_euler_exactly(rule, sigma, sigma_next):
    x, v, xi = _rand(*SHAPE, seed=0), _rand(*SHAPE, seed=1), _rand(*SHAPE, seed=2)
    step = _step(rule, x, v, sigma, sigma_next, 0.0, noise=xi)
    euler = x + (sigma_next - sigma) * v
    assert torch.equal(step.mean, euler)
    assert torch.equal(step.sample, euler)
    assert torch.equal(step.std, torch.zeros(SHAPE[0], 1, 1, 1))
    assert torch.equal(euler_step(x, v, sigma, sigma_next).sample, euler)


def test_euler_to_zero_is_x0_hat():
    x, v = _rand(*SHAPE, seed=0), _rand(*SHAPE, seed=1)
    assert torch.equal(euler_step(x, v, 0.5, 0.0).sample, x - 0.5 * v)


# ----------------------------------------------------------------------------------------------
# Acceptance check 2: CPS forms agree; the step is μ + ς·ξ
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.9), (0.9, 0.75), (0.5, 0.0)])
def test_cps_matches_flow_grpo_and_rtdmd_forms(eta, sigma, sigma_next):
    x, v, xi = _rand(*SHAPE, seed=0), _rand(*SHAPE, seed=1), _rand(*SHAPE, seed=2)
    x0_hat, eps_hat = x - sigma * v, x + (1 - sigma) * v
    # Flow-GRPO repository form, a ≡ η.
    std_fg = sigma_next * math.sin(eta * math.pi / 2)
    mean_fg = (1 - sigma_next) * x0_hat + math.sqrt(max(sigma_next**2 - std_fg**2, 0.0)) * eps_hat
    # RTDMD form.
    theta = eta * math.pi / 2
    mean_rt = (1 - sigma_next) * x0_hat + sigma_next * math.cos(theta) * eps_hat
    std_rt = sigma_next * math.sin(theta)
    step = cps_step(x, v, sigma, sigma_next, eta, noise=xi)
    tol = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean_fg, mean_rt, **tol)
    torch.testing.assert_close(step.mean, mean_rt, **tol)
    torch.testing.assert_close(step.std, torch.full((SHAPE[0], 1, 1, 1), std_rt), **tol)
    torch.testing.assert_close(step.std, torch.full((SHAPE[0], 1, 1, 1), std_fg), **tol)
    # x′ = μ + ς·ξ in both written forms (RTDMD's, docs/methods/rtdmd.md:
    # x_σ′ = (1−σ′)·x̂0 + σ′·cosθ·ε̂ + σ′·sinθ·z).
    torch.testing.assert_close(step.sample, mean_fg + std_fg * xi, **tol)
    torch.testing.assert_close(step.sample, mean_rt + std_rt * xi, **tol)
    assert torch.equal(step.sample, step.mean + step.std * xi)


def test_cps_to_zero_returns_x0_hat():
    x, v = _rand(*SHAPE, seed=0), _rand(*SHAPE, seed=1)
    step = cps_step(x, v, 0.5, 0.0, eta=0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(step.sample, x - 0.5 * v)
    assert torch.equal(step.std, torch.zeros(SHAPE[0], 1, 1, 1))


def test_per_sample_sigmas_match_per_sample_calls():
    x, v, xi = _rand(*SHAPE, seed=0), _rand(*SHAPE, seed=1), _rand(*SHAPE, seed=2)
    sigma = torch.tensor([1.0, 0.9, 0.75, 0.5], dtype=torch.float64)
    sigma_next = torch.tensor([0.9, 0.75, 0.5, 0.0], dtype=torch.float64)
    for rule in ("cps", "flowgrpo_sde", "dance"):
        batched = _step(rule, x, v, sigma, sigma_next, 0.7, noise=xi)
        for i in range(len(x)):
            one = slice(i, i + 1)
            single = _step(rule, x[one], v[one], sigma[i].item(), sigma_next[i].item(), 0.7, noise=xi[one])
            torch.testing.assert_close(batched.sample[one], single.sample, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(batched.std[one], single.std)


# ----------------------------------------------------------------------------------------------
# Flow-GRPO SDE and DanceGRPO formulas
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma,sigma_next", [(0.9, 0.75), (0.75, 0.5), (0.5, 0.0)])
def test_flow_grpo_sde_matches_reference_code_form(sigma, sigma_next):
    x, v, xi = (_rand(*SHAPE, seed=seed, dtype=torch.float64) for seed in (0, 1, 2))
    a, dt = 0.7, sigma_next - sigma
    std_dev_t = math.sqrt(sigma / (1 - sigma)) * a
    # flow_grpo sde_step_with_logprob, written with x and v.
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    step = flow_grpo_sde_step(x, v, sigma, sigma_next, a, noise=xi)
    torch.testing.assert_close(step.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step.sample, mean + std_dev_t * math.sqrt(-dt) * xi, rtol=1e-12, atol=1e-12)


def test_flow_grpo_sde_at_sigma_one_uses_sigma_1():
    x, v, xi = (_rand(*SHAPE, seed=seed, dtype=torch.float64) for seed in (0, 1, 2))
    a, sigma_1 = 0.7, 0.9
    gamma = a * math.sqrt(1.0 / (1 - sigma_1))
    step = flow_grpo_sde_step(x, v, 1.0, sigma_1, a, noise=xi, sigma_1=sigma_1)
    assert step.std.flatten().tolist() == pytest.approx([gamma * math.sqrt(0.1)] * SHAPE[0], rel=1e-12)
    # In μ only γ changes: (1 − σ) stays 0 at σ = 1.
    expected = x + v * -0.1 + (gamma**2 / 2) * x * -0.1
    torch.testing.assert_close(step.mean, expected, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(step.sample).all()
    with pytest.raises(ValueError, match="sigma_1"):
        flow_grpo_sde_step(x, v, 1.0, 0.9, a, noise=xi)
    with pytest.raises(ValueError, match="sigma_1"):
        flow_grpo_sde_step(x, v, 1.0, 0.9, a, noise=xi, sigma_1=1.0)
    flow_grpo_sde_step(x, v, 0.9, 0.75, a, noise=xi)  # σ_1 is only needed at σ = 1


def test_dance_grpo_matches_reference_code_form():
    x, v, xi = (_rand(*SHAPE, seed=seed, dtype=torch.float64) for seed in (0, 1, 2))
    sigma, sigma_next, eta = 0.75, 0.5, 0.3
    dsigma = sigma_next - sigma
    pred_original_sample = x - sigma * v
    score_estimate = -(x - pred_original_sample * (1 - sigma)) / sigma**2
    mean = x + dsigma * v + (-0.5 * eta**2 * score_estimate) * dsigma
    step = dance_grpo_step(x, v, sigma, sigma_next, eta, noise=xi)
    torch.testing.assert_close(step.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step.sample, mean + eta * math.sqrt(sigma - sigma_next) * xi, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Acceptance check 3: noise variance
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule,level", [("cps", 0.9), ("flowgrpo_sde", 0.7), ("dance", 0.3)])
def test_noise_variance_matches_std(rule, level):
    draws = 100_000
    x = _rand(1, 1, 1, 1, seed=0).expand(draws, 1, 1, 1)
    v = _rand(1, 1, 1, 1, seed=1).expand(draws, 1, 1, 1)
    step = _step(rule, x, v, 0.75, 0.5, level, generator=torch.Generator().manual_seed(3))
    variance = ((step.sample - step.mean) ** 2).double().mean()
    assert variance.item() == pytest.approx(step.std[0].item() ** 2, rel=0.01)


# ----------------------------------------------------------------------------------------------
# Log-probabilities
# ----------------------------------------------------------------------------------------------


def test_gaussian_log_prob_matches_torch_normal():
    mean, sample = _rand(*SHAPE, seed=0), _rand(*SHAPE, seed=1)
    std = torch.tensor([0.1, 0.5, 1.0, 2.0]).reshape(-1, 1, 1, 1)
    reference = torch.distributions.Normal(mean, std.expand(SHAPE)).log_prob(sample)
    torch.testing.assert_close(gaussian_log_prob(sample, mean, std), reference.mean((1, 2, 3)))
    torch.testing.assert_close(gaussian_log_prob(sample, mean, std, reduce="sum"), reference.sum((1, 2, 3)))
    torch.testing.assert_close(transition_log_prob(sample, mean, std, "exact_sum"), reference.sum((1, 2, 3)))


def test_zero_std_log_probs_are_exactly_zero():
    x, v, xi = _rand(*SHAPE, seed=0), _rand(*SHAPE, seed=1), _rand(*SHAPE, seed=2)
    for step in (cps_step(x, v, 0.75, 0.5, eta=0.0, noise=xi), cps_step(x, v, 0.5, 0.0, eta=0.9, noise=xi)):
        assert torch.equal(cps_simplified_log_prob(step.sample, step.mean), torch.zeros(SHAPE[0]))
        assert torch.equal(gaussian_log_prob(step.sample, step.mean, step.std), torch.zeros(SHAPE[0]))
    # Mixed batch: only the samples with ς = 0 get 0, and gradients stay finite.
    mean = _rand(*SHAPE, seed=3).requires_grad_()
    std = torch.tensor([0.0, 0.5, 0.0, 1.0]).reshape(-1, 1, 1, 1)
    lp = gaussian_log_prob(mean.detach() + std * xi, mean, std)
    assert lp[0].item() == 0.0 and lp[2].item() == 0.0 and lp[1].item() != 0.0
    lp.sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.equal(mean.grad[0], torch.zeros(SHAPE[1:]))


def test_cps_simplified_log_prob_formula():
    mean, sample = _rand(*SHAPE, seed=0), _rand(*SHAPE, seed=1)
    torch.testing.assert_close(cps_simplified_log_prob(sample, mean), -((sample - mean) ** 2).mean((1, 2, 3)))


def test_log_prob_name_errors_list_accepted():
    t = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="exact_mean.*cps_simplified"):
        transition_log_prob(t, t, t, "exact")
    with pytest.raises(ValueError, match="'mean', 'sum'"):
        gaussian_log_prob(t, t, t, reduce="max")
    with pytest.raises(ValueError, match="cps_simplified"):
        stochastic_sample(LinearVelocity(), torch.zeros(2, 1, 2, 2), LEVELS, "cps", {"eta": 0.9}, log_prob="simplified")
    assert set(LOG_PROBS) == {"exact_mean", "exact_sum", "cps_simplified"}


# ----------------------------------------------------------------------------------------------
# Sampler: recording, reproducibility, recompute
# ----------------------------------------------------------------------------------------------

RULE_CASES = [
    ("cps", {"eta": 0.9}, None),
    ("cps", {"eta": 0.9}, "exact_mean"),
    ("flowgrpo_sde", {"noise_level": 0.7}, None),
    ("dance", {"eta": 0.3}, None),
]


def _sample(rule, kwargs, log_prob=None, seed=0, steps=None, **extra) -> Trajectory:
    noise = _rand(*SHAPE, seed=100)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        return stochastic_sample(
            LinearVelocity(), noise, LEVELS, rule, kwargs, steps, generator, log_prob=log_prob, **extra
        )


@pytest.mark.parametrize("rule,kwargs,log_prob", RULE_CASES)
def test_recompute_with_same_policy_gives_ratio_one(rule, kwargs, log_prob):
    traj = _sample(rule, kwargs, log_prob, steps={0, 1, 3})
    assert traj.stochastic == [True, True, False, True]
    for j in range(traj.num_steps):
        recomputed = step_log_prob(LinearVelocity(), traj, j)
        assert torch.equal(recomputed, traj.log_probs[j])
        assert torch.equal(torch.exp(recomputed - traj.log_probs[j]), torch.ones(SHAPE[0]))
        assert torch.isfinite(traj.log_probs[j]).all() and traj.log_probs[j].dtype == torch.float32


@pytest.mark.parametrize("rule,kwargs,log_prob", RULE_CASES)
def test_changed_policy_changes_log_prob_on_trainable_steps_only(rule, kwargs, log_prob):
    traj = _sample(rule, kwargs, log_prob, steps={0, 1, 3})
    changed = LinearVelocity(w=0.35)
    for j in range(traj.num_steps):
        lp = step_log_prob(changed, traj, j)
        if traj.trainable[j]:
            assert not torch.equal(lp, traj.log_probs[j])
        else:
            assert torch.equal(lp, torch.zeros(SHAPE[0])) and torch.equal(traj.log_probs[j], torch.zeros(SHAPE[0]))


def test_deterministic_steps_are_euler_and_untrainable():
    traj = _sample("cps", {"eta": 0.9}, steps={0})
    assert traj.trainable == [True, False, False, False]
    for j in (1, 2, 3):
        x, v = traj.latents[j], traj.velocities[j]
        assert torch.equal(traj.latents[j + 1], x + (traj.sigmas[j + 1] - traj.sigmas[j]).float() * v)
        assert torch.equal(traj.stds[j], torch.zeros(SHAPE[0], 1, 1, 1))
    # No forward pass is spent on a deterministic step.
    policy = LinearVelocity()
    step_log_prob(policy, traj, 2)
    assert policy.calls == 0
    # CPS into σ = 0 is stochastic by rule but has ς = 0: log π = 0 and not trainable.
    full = _sample("cps", {"eta": 0.9})
    assert full.stochastic == [True] * 4 and full.trainable == [True, True, True, False]
    assert torch.equal(full.log_probs[3], torch.zeros(SHAPE[0]))
    assert torch.equal(step_log_prob(LinearVelocity(w=0.35), full, 3), torch.zeros(SHAPE[0]))


def test_trajectory_records_the_contract():
    traj = _sample("cps", {"eta": 0.9}, steps={0, 1, 2})
    assert traj.num_steps == 4 and len(traj.latents) == 5
    assert traj.sigmas.tolist() == [1.0, 0.9, 0.75, 0.5, 0.0]
    assert torch.equal(traj.latents[0], _rand(*SHAPE, seed=100))
    assert traj.log_prob == "cps_simplified"
    # The deterministic last step lands on x̂0 of the last executed step.
    assert torch.equal(traj.sample, traj.final_x0)
    for j in range(traj.num_steps):
        x, v, sigma = traj.latents[j], traj.velocities[j], traj.sigmas[j].float()
        torch.testing.assert_close(traj.x0_preds[j], x - sigma * v)
    step = recompute_step(LinearVelocity(), traj, 1)
    assert torch.equal(step.mean, traj.means[1]) and torch.equal(step.std, traj.stds[1])
    assert torch.equal(step.sample, traj.latents[2])
    assert torch.equal(_sample("cps", {"eta": 0.9}, steps={0, 1, 2}, return_trajectory=False), traj.sample)


def test_flow_grpo_sampler_defaults_sigma_1_to_second_grid_value():
    traj = _sample("flowgrpo_sde", {"noise_level": 0.7})
    assert traj.rule_kwargs["sigma_1"].item() == 0.9
    expected_std = 0.7 * math.sqrt(1.0 / (1 - 0.9)) * math.sqrt(0.1)
    assert traj.stds[0].flatten().tolist() == pytest.approx([expected_std] * SHAPE[0], rel=1e-6)
    assert traj.log_prob == "exact_mean"
    assert all(traj.trainable)  # the SDE step into σ = 0 keeps ς > 0


def test_seeded_generator_reproduces_the_trajectory():
    a, b = _sample("cps", {"eta": 0.9}, seed=7), _sample("cps", {"eta": 0.9}, seed=7)
    c = _sample("cps", {"eta": 0.9}, seed=8)
    for xa, xb in zip(a.latents, b.latents):
        assert torch.equal(xa, xb)
    assert all(torch.equal(la, lb) for la, lb in zip(a.log_probs, b.log_probs))
    assert not torch.equal(a.latents[1], c.latents[1])


def test_prefix_run_is_the_start_of_the_full_run():
    full = _sample("cps", {"eta": 0.9}, seed=7)
    prefix = _sample("cps", {"eta": 0.9}, seed=7, num_steps=2)
    assert prefix.num_steps == 2 and len(prefix.latents) == 3
    assert all(torch.equal(a, b) for a, b in zip(prefix.latents, full.latents[:3]))
    assert all(torch.equal(a, b) for a, b in zip(prefix.log_probs, full.log_probs[:2]))
    empty = _sample("cps", {"eta": 0.9}, num_steps=0)
    assert empty.num_steps == 0 and torch.equal(empty.sample, _rand(*SHAPE, seed=100))
    with pytest.raises(ValueError, match="num_steps 9 outside"):
        _sample("cps", {"eta": 0.9}, num_steps=9)


def test_step_noise_overrides_the_generator():
    shared = _rand(*SHAPE, seed=5)
    a = _sample("cps", {"eta": 0.9}, seed=1, step_noise={1: shared})
    b = _sample("cps", {"eta": 0.9}, seed=2, step_noise={1: shared})
    assert not torch.equal(a.latents[1], b.latents[1])
    assert torch.equal(b.latents[2], b.means[1] + b.stds[1] * shared)
    with pytest.raises(ValueError, match="step_noise"):
        _sample("cps", {"eta": 0.9}, steps={0}, step_noise={1: shared})


def test_eta_zero_sampler_equals_euler_sampler():
    cps = _sample("cps", {"eta": 0.0})
    euler = _sample("euler", {}, steps=set())
    for xa, xb in zip(cps.latents, euler.latents):
        assert torch.equal(xa, xb)


def test_sampler_runs_on_shifted_flow_schedule_levels():
    levels = FlowSchedule(shift=3.0).generator_levels(4)
    traj = stochastic_sample(LinearVelocity(), _rand(*SHAPE, seed=0), levels, "dance", {"eta": 0.3})
    assert traj.sigmas[:-1].tolist() == levels.tolist()  # never re-shifted


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors():
    noise, policy = _rand(*SHAPE, seed=0), LinearVelocity()
    with pytest.raises(ValueError, match="'euler', 'cps', 'flowgrpo_sde', 'dance'"):
        stochastic_sample(policy, noise, LEVELS, "ddim", {})
    assert RULES == ("euler", "cps", "flowgrpo_sde", "dance")
    with pytest.raises(ValueError, match="missing \\['eta'\\]"):
        stochastic_sample(policy, noise, LEVELS, "cps", {})
    with pytest.raises(ValueError, match="unknown \\['noise_level'\\]"):
        stochastic_sample(policy, noise, LEVELS, "cps", {"eta": 0.9, "noise_level": 0.7})
    with pytest.raises(ValueError, match="stochastic_steps \\[4\\]"):
        stochastic_sample(policy, noise, LEVELS, "cps", {"eta": 0.9}, {4})
    with pytest.raises(ValueError, match="strictly decreasing"):
        stochastic_sample(policy, noise, torch.tensor([0.5, 0.9]), "cps", {"eta": 0.9})
    with pytest.raises(ValueError, match="strictly decreasing"):
        stochastic_sample(policy, noise, torch.tensor([1.0, 0.5, 0.0]), "cps", {"eta": 0.9})
    with pytest.raises(ValueError, match="empty"):
        stochastic_sample(policy, noise, torch.tensor([]), "cps", {"eta": 0.9})
    x = _rand(*SHAPE, seed=1)
    with pytest.raises(ValueError, match="eta must lie in \\[0.0, 1.0\\], got 1.5"):
        cps_step(x, x, 0.5, 0.25, eta=1.5)
    with pytest.raises(ValueError, match="noise_level"):
        flow_grpo_sde_step(x, x, 0.5, 0.25, noise_level=-0.1)
    with pytest.raises(ValueError, match="sigma_next=\\[0.75"):
        dance_grpo_step(x, x, 0.5, 0.75, eta=0.3)
    with pytest.raises(ValueError, match="noise shape"):
        cps_step(x, x, 0.5, 0.25, eta=0.9, noise=x[:1])
    traj = _sample("cps", {"eta": 0.9})
    with pytest.raises(ValueError, match="step_index 4"):
        step_log_prob(policy, traj, 4)
