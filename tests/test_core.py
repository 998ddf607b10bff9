"""Pure tensor math of ``rdm_lightning.core`` against closed forms and invariants.

Covers schedules, parameterizations, the DM gradient and GAN losses, the few-step
sampler / backward simulation and the parameter EMA (``docs/methods/dmd.md``).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from rdm_lightning.core.dmd import (
    classifier_free_guidance,
    dmd_gradient,
    dmd_loss,
    dmd_normalizer,
    gan_discriminator_loss,
    gan_generator_loss,
    nonfinite_per_sample,
)
from rdm_lightning.core.ema import ema_update
from rdm_lightning.core.parameterization import (
    Prediction,
    eps_from_v,
    eps_from_velocity,
    eps_from_x0,
    prediction_to_x0,
    training_target,
    v_target,
    velocity_target,
    vp_to_flow,
    x0_from_eps,
    x0_from_v,
    x0_from_velocity,
)
from rdm_lightning.core.sampling import backward_simulation_input, few_step_sample, next_sample, renoise
from rdm_lightning.core.schedules import (
    FlowSchedule,
    VPSchedule,
    _per_sample,
    dynamic_shift_sigmas,
    flux_mu,
    shift_sigmas,
    vp_alphas_cumprod,
)


SHAPE = (4, 3, 5, 5)
F64 = dict(rtol=1e-12, atol=1e-12)


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_vp_alphas_cumprod_matches_diffusers(beta_schedule):
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012).alphas_cumprod
    ours = vp_alphas_cumprod(beta_schedule)
    assert ours.dtype == torch.float64
    assert ours.shape == (1000,)
    # diffusers accumulates in float32; ours in float64.
    torch.testing.assert_close(ours, reference.double(), rtol=5e-6, atol=1e-7)


def test_vp_alphas_cumprod_closed_form_and_monotone():
    abar = vp_alphas_cumprod("linear", beta_start=0.1, beta_end=0.2, num_train_timesteps=3)
    torch.testing.assert_close(abar, torch.tensor([0.9, 0.9 * 0.85, 0.9 * 0.85 * 0.8], dtype=torch.float64), **F64)
    sl = vp_alphas_cumprod("scaled_linear")
    assert (sl[1:] < sl[:-1]).all() and 0 < sl[-1] < sl[0] < 1


def test_vp_alphas_cumprod_unknown_name():
    with pytest.raises(ValueError, match="squaredcos_cap_v2"):
        vp_alphas_cumprod("squaredcos_cap_v2")


def test_shift_sigmas_closed_form():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    s = shift_sigmas(u, 3.0)
    assert shift_sigmas(torch.tensor(0.5, dtype=torch.float64), 3.0).item() == pytest.approx(0.75, abs=1e-15)
    assert s[0].item() == 0.0 and s[-1].item() == 1.0
    assert (s[1:] > s[:-1]).all()
    torch.testing.assert_close(s, 3 * u / (1 + 2 * u), **F64)
    torch.testing.assert_close(shift_sigmas(u, 1.0), u, **F64)  # s = 1 is the identity
    assert (s >= u).all()  # s > 1 shifts toward noise


def test_dynamic_shift_sigmas_closed_form():
    mu = 0.8
    u = torch.linspace(0.01, 1, 100, dtype=torch.float64)
    expected = math.exp(mu) / (math.exp(mu) + 1 / u - 1)
    torch.testing.assert_close(dynamic_shift_sigmas(u, mu), expected, **F64)
    ends = dynamic_shift_sigmas(torch.tensor([0.0, 1.0], dtype=torch.float64), mu)
    assert ends.tolist() == [0.0, 1.0]
    full = dynamic_shift_sigmas(torch.linspace(0, 1, 50, dtype=torch.float64), mu)
    assert torch.isfinite(full).all() and (full[1:] > full[:-1]).all()
    # e^μ / (e^μ + 1/u − 1) is the static shift with s = e^μ.
    torch.testing.assert_close(dynamic_shift_sigmas(u, mu), shift_sigmas(u, math.exp(mu)), **F64)


def test_flux_mu_endpoints():
    assert flux_mu(256) == pytest.approx(0.5, abs=1e-12)
    assert flux_mu(4096) == pytest.approx(1.15, abs=1e-12)
    assert flux_mu(2176) == pytest.approx(0.825, abs=1e-12)  # linear in between


def test_vp_generator_levels():
    schedule = VPSchedule()
    assert schedule.generator_levels(4).tolist() == [999, 749, 499, 249]
    assert schedule.generator_levels(1).tolist() == [999]
    assert schedule.generator_levels(2).tolist() == [999, 499]
    with pytest.raises(ValueError, match="0"):
        schedule.generator_levels(0)


def test_flow_generator_levels_shifted():
    levels = FlowSchedule(shift=3.0).generator_levels(4)
    torch.testing.assert_close(levels, torch.tensor([1.0, 0.9, 0.75, 0.5], dtype=torch.float64), **F64)
    assert FlowSchedule().generator_levels(1).tolist() == [1.0]
    assert FlowSchedule(dynamic_shift_mu=1.15).generator_levels(3)[0].item() == 1.0


def test_flow_schedule_rejects_nonpositive_shift():
    with pytest.raises(ValueError, match="-1"):
        FlowSchedule(shift=-1.0)


def test_vp_timestep_bounds():
    schedule = VPSchedule()
    assert schedule.timestep_bounds(0.02, 0.98) == (20, 980)
    assert schedule.timestep_bounds(0.0, 1.0) == (0, 999)


def test_vp_sample_levels_within_bounds_and_hit_both_ends():
    """Acceptance check 5: L_DM draws in [20, 980]; L_fake/GAN draws in [0, 999]."""
    schedule = VPSchedule()
    gen = torch.Generator().manual_seed(0)
    t = schedule.sample_levels(20000, 0.02, 0.98, generator=gen)
    assert t.dtype == torch.int64
    assert t.min().item() == 20 and t.max().item() == 980
    t_full = schedule.sample_levels(20000, 0.0, 1.0, generator=gen)
    assert t_full.min().item() == 0 and t_full.max().item() == 999


@pytest.mark.parametrize("schedule", [FlowSchedule(shift=3.0), FlowSchedule(), FlowSchedule(dynamic_shift_mu=1.15)])
def test_flow_sample_levels_within_shifted_bounds(schedule):
    low, high = 0.02, 0.98
    levels = schedule.sample_levels(5000, low, high, generator=torch.Generator().manual_seed(1))
    lo, hi = (schedule.levels_from_fraction(torch.tensor(v, dtype=torch.float64)).float().item() for v in (low, high))
    assert lo <= levels.min().item() and levels.max().item() <= hi
    # The draws actually spread over the interval (not constant).
    assert levels.max().item() - levels.min().item() > 0.9 * (hi - lo)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_add_noise_per_sample(kind):
    x0, eps = _rand(*SHAPE, seed=1), _rand(*SHAPE, seed=2)
    if kind == "vp":
        schedule = VPSchedule()
        level = torch.tensor([0, 17, 500, 999])
        abar = vp_alphas_cumprod()[level]
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    else:
        schedule = FlowSchedule(shift=3.0)
        level = torch.tensor([0.0, 0.25, 0.6, 1.0], dtype=torch.float64)
        alpha, sigma = 1 - level, level
    x_t = schedule.add_noise(x0, eps, level)
    for i in range(len(level)):
        torch.testing.assert_close(x_t[i], alpha[i] * x0[i] + sigma[i] * eps[i], **F64)
    a, s = schedule.alpha_sigma(level)
    torch.testing.assert_close(a**2 + s**2 if kind == "vp" else a + s, torch.ones(4, dtype=torch.float64), **F64)


def test_model_timestep():
    assert VPSchedule().model_timestep(torch.tensor([999.0, 20.0])).tolist() == [999, 20]
    torch.testing.assert_close(
        FlowSchedule().model_timestep(torch.tensor([1.0, 0.25])), torch.tensor([1000.0, 250.0])
    )


# ----------------------------------------------------------------------------------------------
# Parameterization
# ----------------------------------------------------------------------------------------------


def _noisy(kind: str, seed: int = 0):
    """x0, ε, per-sample (α, σ) and x_t = α·x0 + σ·ε, float64."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(*SHAPE, generator=g, dtype=torch.float64)
    eps = torch.randn(*SHAPE, generator=g, dtype=torch.float64)
    if kind == "vp":
        level = torch.randint(0, 1000, (SHAPE[0],), generator=g)
        level[0] = 999
        schedule = VPSchedule()
    else:
        level = torch.rand(SHAPE[0], generator=g, dtype=torch.float64) * 0.98 + 0.01
        schedule = FlowSchedule()
    alpha, sigma = _per_sample(schedule.alpha_sigma(level), x0)
    return x0, eps, alpha, sigma, alpha * x0 + sigma * eps


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_eps_x0_round_trip(kind):
    x0, eps, alpha, sigma, x_t = _noisy(kind)
    torch.testing.assert_close(x0_from_eps(x_t, eps, alpha, sigma), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eps_from_x0(x_t, x0, alpha, sigma), eps, rtol=1e-10, atol=1e-10)
    assert x0_from_eps(x_t.float(), eps.float(), alpha, sigma).dtype == torch.float64


def test_vp_v_prediction_round_trip():
    x0, eps, alpha, sigma, x_t = _noisy("vp")
    v = alpha * eps - sigma * x0
    torch.testing.assert_close(v_target(x0, eps, alpha, sigma), v, **F64)
    torch.testing.assert_close(x0_from_v(x_t, v, alpha, sigma), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eps_from_v(x_t, v, alpha, sigma), eps, rtol=1e-10, atol=1e-10)
    # The VP-only spec forms (α² + σ² = 1).
    torch.testing.assert_close(x0_from_v(x_t, v, alpha, sigma), alpha * x_t - sigma * v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eps_from_v(x_t, v, alpha, sigma), sigma * x_t + alpha * v, rtol=1e-10, atol=1e-10)


def test_v_prediction_general_form_on_flow_schedule():
    x0, eps, alpha, sigma, x_t = _noisy("flow")
    v = v_target(x0, eps, alpha, sigma)
    torch.testing.assert_close(x0_from_v(x_t, v, alpha, sigma), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eps_from_v(x_t, v, alpha, sigma), eps, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_velocity_round_trip(kind):
    x0, eps, alpha, sigma, x_t = _noisy(kind)
    v = eps - x0
    torch.testing.assert_close(velocity_target(x0, eps), v, **F64)
    torch.testing.assert_close(x0_from_velocity(x_t, v, alpha, sigma), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eps_from_velocity(x_t, v, alpha, sigma), eps, rtol=1e-10, atol=1e-10)
    if kind == "flow":
        # Spec forms: x̂0 = x_σ − σ·v, ε̂ = x_σ + (1−σ)·v, v = ε̂ − x̂0.
        torch.testing.assert_close(x0_from_velocity(x_t, v, alpha, sigma), x_t - sigma * v, **F64)
        torch.testing.assert_close(eps_from_velocity(x_t, v, alpha, sigma), x_t + (1 - sigma) * v, **F64)


def test_vp_to_flow_bridge():
    x0, eps, alpha, sigma, x_t = _noisy("vp", seed=3)
    x_flow, sigma_f = vp_to_flow(x_t, alpha, sigma)
    torch.testing.assert_close(sigma_f, sigma / (alpha + sigma), **F64)
    # The flow point with that σ built from the same (x0, ε) ...
    torch.testing.assert_close(x_flow, (1 - sigma_f) * x0 + sigma_f * eps, rtol=1e-10, atol=1e-10)
    # ... so its flow velocity is ε − x0.
    v = eps - x0
    torch.testing.assert_close(x_flow - sigma_f * v, x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x_flow + (1 - sigma_f) * v, eps, rtol=1e-10, atol=1e-10)
    assert ((sigma_f > 0) & (sigma_f < 1)).all()


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("prediction", list(Prediction))
def test_prediction_to_x0_and_training_target(kind, prediction):
    x0, eps, alpha, sigma, x_t = _noisy(kind, seed=4)
    named_target = {
        Prediction.EPSILON: eps,
        Prediction.V_PREDICTION: v_target(x0, eps, alpha, sigma),
        Prediction.FLOW_VELOCITY: velocity_target(x0, eps),
    }[prediction]
    named_x0 = {
        Prediction.EPSILON: x0_from_eps,
        Prediction.V_PREDICTION: x0_from_v,
        Prediction.FLOW_VELOCITY: x0_from_velocity,
    }[prediction]
    target = training_target(prediction, x0, eps, alpha, sigma)
    assert target.dtype == torch.float32
    assert torch.equal(target, named_target.float())
    # The string value is accepted as well.
    assert torch.equal(training_target(prediction.value, x0, eps, alpha, sigma), target)

    output = named_target  # an exact network
    x0_hat = prediction_to_x0(prediction, output, x_t, alpha, sigma)
    assert x0_hat.dtype == torch.float32
    assert torch.equal(x0_hat, named_x0(x_t, output, alpha, sigma).float())
    torch.testing.assert_close(x0_hat, x0.float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(prediction_to_x0(prediction.value, output, x_t, alpha, sigma), x0_hat)


def test_prediction_unknown_kind():
    x0, eps, alpha, sigma, x_t = _noisy("flow")
    with pytest.raises(ValueError, match="sample"):
        prediction_to_x0("sample", eps, x_t, alpha, sigma)
    with pytest.raises(ValueError, match="sample"):
        training_target("sample", x0, eps, alpha, sigma)


# ----------------------------------------------------------------------------------------------
# DM gradient and losses
# ----------------------------------------------------------------------------------------------


def test_dm_loss_gradient_is_g_over_numel():
    """Acceptance check 1: ∂L_DM/∂x = g/numel(x) and L_DM = ½·mean(g²)."""
    g0 = torch.Generator().manual_seed(0)
    x = torch.randn(*SHAPE, generator=g0).requires_grad_(True)
    x_real = torch.randn(*SHAPE, generator=g0)
    x_fake = torch.randn(*SHAPE, generator=g0)
    g = dmd_gradient(x, x_real, x_fake)
    assert not g.requires_grad
    loss = dmd_loss(x, g)
    loss.backward()
    expected = g / x.numel()
    # x − (x − g) in float32 differs from g by at most one rounding of x − g.
    tol = 2 * torch.finfo(torch.float32).eps * (x.detach().abs() + g.abs()).max().item() / x.numel()
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=tol)
    torch.testing.assert_close(loss, 0.5 * g.pow(2).mean(), rtol=1e-5, atol=0)


def test_dm_loss_gradient_exact_when_representable():
    # Values on a coarse dyadic grid and numel a power of two: x − (x − g) == g and g/N exactly in float32.
    x = (torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4) / 8 - 1).requires_grad_(True)
    g = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4).flip(-1) / 16 - 0.5
    loss = dmd_loss(x, g)
    loss.backward()
    assert torch.equal(x.grad, g / x.numel())
    assert loss.item() == pytest.approx(0.5 * g.pow(2).mean().item(), rel=1e-7)


def test_dmd_gradient_closed_form():
    g0 = torch.Generator().manual_seed(1)
    x, x_real, x_fake = (torch.randn(*SHAPE, generator=g0, dtype=torch.float64) for _ in range(3))
    n = (x - x_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    normalizer = dmd_normalizer(x, x_real)
    assert normalizer.shape == (SHAPE[0], 1, 1, 1)
    torch.testing.assert_close(normalizer, n, **F64)
    torch.testing.assert_close(dmd_normalizer(x, x_real, eps=1e-3), n + 1e-3, **F64)
    torch.testing.assert_close(dmd_gradient(x, x_real, x_fake), (x_fake - x_real) / n, **F64)
    torch.testing.assert_close(dmd_gradient(x, x_real, x_fake, norm_eps=0.5), (x_fake - x_real) / (n + 0.5), **F64)
    # Per sample: scaling one sample's residual rescales only that sample's g.
    x2 = x.clone()
    x2[1] = x_real[1] + 2 * (x[1] - x_real[1])
    g1, g2 = dmd_gradient(x, x_real, x_fake), dmd_gradient(x2, x_real, x_fake)
    torch.testing.assert_close(g2[1], g1[1] / 2, **F64)
    torch.testing.assert_close(g2[[0, 2, 3]], g1[[0, 2, 3]], **F64)


def test_dmd_gradient_nan_to_num():
    g0 = torch.Generator().manual_seed(2)
    x, x_real, x_fake = (torch.randn(3, 2, 4, 4, generator=g0) for _ in range(3))
    x[0] = x_real[0]
    x_fake[0] = x_real[0]  # 0/0 → NaN → 0
    x[1] = x_real[1]  # d/0 → ±inf → finite
    with torch.no_grad():
        raw = (x_fake - x_real) / dmd_normalizer(x, x_real, 0.0)
    assert torch.isnan(raw[0]).all() and torch.isinf(raw[1]).all()
    g = dmd_gradient(x, x_real, x_fake, norm_eps=0.0)
    assert torch.isfinite(g).all()
    assert torch.equal(g[0], torch.zeros_like(g[0]))
    assert (g[1].abs() == torch.finfo(g.dtype).max).all()
    assert torch.equal(torch.sign(g[1]), torch.sign(x_fake[1] - x_real[1]))
    torch.testing.assert_close(g[2], raw[2])


def test_dmd_gradient_counts_the_entries_it_replaced():
    """Finite inputs: count 0 and g bit-identical to the plain call; NaN/inf samples: their entries counted."""
    g0 = torch.Generator().manual_seed(3)
    x, x_real, x_fake = (torch.randn(4, 2, 4, 4, generator=g0) for _ in range(3))
    gradient, nonfinite = dmd_gradient(x, x_real, x_fake, norm_eps=1e-8, return_nonfinite=True)
    assert torch.equal(gradient, dmd_gradient(x, x_real, x_fake, norm_eps=1e-8))
    assert torch.equal(nonfinite, torch.zeros(4, dtype=torch.int64))

    x_real[1, 0, 0, 0] = float("nan")  # one NaN in the estimate: n is NaN, so all 32 entries of sample 1
    x_fake[2, 1, :2, :] = float("inf")  # 8 entries of sample 2 are ±inf (n stays finite)
    gradient, nonfinite = dmd_gradient(x, x_real, x_fake, return_nonfinite=True)
    assert nonfinite.tolist() == [0, 32, 8, 0]
    assert torch.isfinite(gradient).all()
    assert torch.equal(gradient[[0, 3]], dmd_gradient(x, x_real, x_fake)[[0, 3]])
    assert torch.equal(nonfinite_per_sample(torch.full((2, 3), float("-inf"))), torch.tensor([3, 3]))


def test_identical_scores_give_no_generator_gradient():
    """Acceptance check 2 at the core level: x̂_fake == x̂_real ⇒ g = 0 and no gradient."""
    x = torch.randn(*SHAPE).requires_grad_(True)
    x_hat = torch.randn(*SHAPE)
    real = classifier_free_guidance(x_hat, x_hat, 1.0)  # CFG w = 1 of the same network
    g = dmd_gradient(x, real, x_hat.clone())
    assert torch.equal(g, torch.zeros_like(g))
    dmd_loss(x, g).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_gan_losses_at_zero_logits():
    """Acceptance check 4."""
    zeros = torch.zeros(8)
    assert gan_discriminator_loss(zeros, zeros).item() == pytest.approx(2 * math.log(2), rel=1e-6)
    assert gan_generator_loss(zeros).item() == pytest.approx(math.log(2), rel=1e-6)


def test_gan_losses_closed_form():
    real = torch.tensor([3.0, -1.0, 0.5])
    fake = torch.tensor([-2.0, 0.0, 4.0, 1.0])

    def softplus(t):
        return torch.log1p(torch.exp(t))

    torch.testing.assert_close(gan_discriminator_loss(real, fake), softplus(fake).mean() + softplus(-real).mean())
    torch.testing.assert_close(gan_generator_loss(fake), softplus(-fake).mean())
    # A perfect discriminator has ~0 loss; fooling it gives the generator ~0 loss.
    assert gan_discriminator_loss(torch.full((4,), 50.0), torch.full((4,), -50.0)).item() < 1e-10
    assert gan_generator_loss(torch.full((4,), 50.0)).item() < 1e-10


def test_classifier_free_guidance():
    g0 = torch.Generator().manual_seed(3)
    u, c = (torch.randn(*SHAPE, generator=g0, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(classifier_free_guidance(u, c, 1.0), c, **F64)
    assert torch.equal(classifier_free_guidance(u, c, 0.0), u)
    for w in (-1.0, 1.75, 8.0):
        torch.testing.assert_close(classifier_free_guidance(u, c, w), u + w * (c - u), **F64)
    # Linear (affine) in w.
    a, b = 2.0, 6.0
    mid = classifier_free_guidance(u, c, (a + b) / 2)
    torch.testing.assert_close(mid, (classifier_free_guidance(u, c, a) + classifier_free_guidance(u, c, b)) / 2, **F64)
    # A per-sample tensor scale broadcasts.
    w = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64).reshape(-1, 1, 1, 1)
    out = classifier_free_guidance(u, c, w)
    assert torch.equal(out[0], u[0])
    torch.testing.assert_close(out[3], u[3] + 3 * (c[3] - u[3]), **F64)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

SCHEDULES = {"vp": VPSchedule(), "flow": FlowSchedule(shift=3.0)}


class CountingDenoiser:
    """Returns a fixed x̂0 for any input and records every call."""

    def __init__(self, x0):
        self.x0 = x0
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x_t, level):
        self.calls.append((x_t.clone(), level.clone()))
        return self.x0.expand_as(x_t).clone()


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("rule", ["sde", "ode"])
def test_few_step_sample_with_constant_denoiser(kind, rule):
    schedule = SCHEDULES[kind]
    x0 = _rand(*SHAPE, seed=5)
    noise = _rand(*SHAPE, seed=6)
    levels = schedule.generator_levels(4)
    denoiser = CountingDenoiser(x0)
    out = few_step_sample(denoiser, noise, levels, schedule, rule, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, x0)
    assert len(denoiser.calls) == 4
    assert torch.equal(denoiser.calls[0][0], noise)
    for (_, level), expected in zip(denoiser.calls, levels):
        assert level.shape == (SHAPE[0],)
        assert (level == expected).all()


def test_few_step_sample_empty_levels():
    with pytest.raises(ValueError):
        few_step_sample(CountingDenoiser(torch.zeros(1)), torch.zeros(2, 1), torch.tensor([]), FlowSchedule())


def test_ode_rule_on_flow_is_euler_step():
    schedule = FlowSchedule()
    x, x0 = _rand(*SHAPE, seed=7), _rand(*SHAPE, seed=8)
    sigma = torch.tensor([1.0, 0.75, 0.5, 0.3], dtype=torch.float64)
    sigma_next = torch.tensor([0.75, 0.5, 0.1, 0.0], dtype=torch.float64)
    out = next_sample(x, x0, sigma, sigma_next, schedule, "ode")
    s, s_next = sigma.reshape(-1, 1, 1, 1), sigma_next.reshape(-1, 1, 1, 1)
    v = (x - x0) / s  # = ε̂ − x̂0 with ε̂ = (x − (1−σ)·x0)/σ
    torch.testing.assert_close(out, x + (s_next - s) * v, rtol=1e-10, atol=1e-10)
    eps_hat = (x - (1 - s) * x0) / s
    torch.testing.assert_close(out, (1 - s_next) * x0 + s_next * eps_hat, rtol=1e-10, atol=1e-10)
    # A jump to σ' = 0 returns x̂0.
    torch.testing.assert_close(out[3], x0[3], **F64)


def test_ode_rule_on_vp_is_ddim_eta0():
    from diffusers import DDIMScheduler

    abar = vp_alphas_cumprod()
    x = _rand(2, 3, 4, 4, seed=9, dtype=torch.float32)
    eps_hat = _rand(2, 3, 4, 4, seed=10, dtype=torch.float32)
    t, t_next = 999, 749
    x0_hat = x0_from_eps(x, eps_hat, abar[t].sqrt(), (1 - abar[t]).sqrt()).float()
    ours = next_sample(x, x0_hat, torch.full((2,), t), torch.full((2,), t_next), VPSchedule(), "ode")
    # Closed form: x' = √ᾱ'·x̂0 + √(1−ᾱ')·ε̂.
    closed = abar[t_next].sqrt() * x0_hat.double() + (1 - abar[t_next]).sqrt() * eps_hat.double()
    torch.testing.assert_close(ours.double(), closed, rtol=1e-5, atol=1e-5)
    # Reference: diffusers' DDIM step with η = 0 (4 inference steps: 999 → 749).
    ddim = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False
    )
    ddim.set_timesteps(4)
    reference = ddim.step(eps_hat, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_sde_rule_renoises_with_fresh_noise():
    schedule = VPSchedule()
    x, x0 = _rand(*SHAPE, seed=11), _rand(*SHAPE, seed=12)
    level, nxt = torch.full((4,), 999), torch.full((4,), 499)
    out = next_sample(x, x0, level, nxt, schedule, "sde", generator=torch.Generator().manual_seed(7))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    torch.testing.assert_close(out, renoise(x0, noise, nxt, schedule), **F64)
    torch.testing.assert_close(out, schedule.add_noise(x0, noise, nxt), **F64)


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("rule", ["sde", "ode"])
def test_point_mass_exact_denoiser(kind, rule):
    schedule = SCHEDULES[kind]
    x_star = _rand(1, 3, 5, 5, seed=13)
    noise = _rand(*SHAPE, seed=14)
    levels = schedule.generator_levels(4)
    denoiser = CountingDenoiser(x_star)
    out = few_step_sample(denoiser, noise, levels, schedule, rule, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x_star.expand_as(out), **F64)
    if rule == "ode":
        # Along the ODE of a point mass the implied ε̂ never changes.
        eps_hats = []
        for x_t, level in denoiser.calls:
            alpha, sigma = _per_sample(schedule.alpha_sigma(level), x_t)
            eps_hats.append(eps_from_x0(x_t, x_star, alpha, sigma))
        for eps_hat in eps_hats[1:]:
            torch.testing.assert_close(eps_hat, eps_hats[0], rtol=1e-8, atol=1e-8)
        if kind == "flow":
            torch.testing.assert_close(eps_hats[0], noise, **F64)


@pytest.mark.parametrize("kind,top", [("vp", 999), ("flow", 1.0)])
def test_backward_simulation_step_zero_is_pure_noise(kind, top):
    """Acceptance check 6 (k = 0): the trained input is the pure noise at the top level."""
    schedule = SCHEDULES[kind]
    noise = _rand(*SHAPE, seed=15)
    denoiser = CountingDenoiser(_rand(*SHAPE, seed=16))
    x_in, level = backward_simulation_input(denoiser, noise, schedule.generator_levels(4), 0, schedule)
    assert torch.equal(x_in, noise)
    assert level.shape == (SHAPE[0],) and (level == top).all()
    assert denoiser.calls == []


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("rule", ["sde", "ode"])
@pytest.mark.parametrize("step", [1, 2, 3])
def test_backward_simulation_step_k(kind, rule, step):
    schedule = SCHEDULES[kind]
    levels = schedule.generator_levels(4)
    noise = _rand(*SHAPE, seed=17)
    x0 = _rand(*SHAPE, seed=18)
    denoiser = CountingDenoiser(x0)
    torch.manual_seed(0)
    x_in, level = backward_simulation_input(denoiser, noise, levels, step, schedule, rule)
    assert len(denoiser.calls) == step
    assert [c[1][0].item() for c in denoiser.calls] == levels[:step].tolist()
    assert torch.equal(denoiser.calls[0][0], noise)
    assert level.shape == (SHAPE[0],) and (level == levels[step]).all()
    assert x_in.shape == noise.shape
    # The trained input is a fresh re-noising of the last x̂0 to levels[step] (global RNG;
    # the "sde" transitions before it draw step − 1 noises from the same stream first).
    torch.manual_seed(0)
    for _ in range(step - 1 if rule == "sde" else 0):
        torch.randn(x0.shape, dtype=x0.dtype)
    fresh = torch.randn_like(x0)
    torch.testing.assert_close(x_in, schedule.add_noise(x0, fresh, level), **F64)


def test_backward_simulation_carries_no_gradient():
    """Acceptance check 6: the simulated steps run without grad."""
    schedule = VPSchedule()
    net = nn.Conv2d(3, 3, 1).double()
    denoiser = lambda x_t, level: net(x_t)  # noqa: E731
    x_in, _ = backward_simulation_input(denoiser, _rand(*SHAPE, seed=19), schedule.generator_levels(4), 3, schedule)
    assert not x_in.requires_grad and x_in.grad_fn is None


@pytest.mark.parametrize("step", [-1, 4, 10])
def test_backward_simulation_out_of_range(step):
    schedule = VPSchedule()
    with pytest.raises(ValueError, match=str(step)):
        backward_simulation_input(CountingDenoiser(torch.zeros(1)), torch.zeros(2, 1), schedule.generator_levels(4), step, schedule)


def test_next_sample_unknown_rule():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="euler"):
        next_sample(x, x, torch.full((2,), 999), torch.full((2,), 499), VPSchedule(), "euler")


# ----------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("counter", torch.tensor([seed, 7 * seed], dtype=torch.int64))
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.num_batches_tracked.fill_(seed)


def _floats(module):
    return {k: v.clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def test_ema_decay_zero_copies():
    ema, live = TinyNet(1), TinyNet(2)
    live_before = copy.deepcopy(live.state_dict())
    ema_update(ema, live, 0.0)
    for key, value in ema.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, live.state_dict()[key]), key
    for key, value in live.state_dict().items():
        assert torch.equal(value, live_before[key]), key  # live untouched


@pytest.mark.parametrize("decay", [0.9, 1 - 1e-3])
def test_ema_decay_moves_by_one_minus_decay(decay):
    ema, live = TinyNet(1).double(), TinyNet(2).double()
    before = _floats(ema)
    weight_ptr = ema.lin.weight.data_ptr()
    ema_update(ema, live, decay)
    live_sd = live.state_dict()
    for key, value in _floats(ema).items():
        torch.testing.assert_close(value - before[key], (1 - decay) * (live_sd[key] - before[key]), rtol=1e-9, atol=1e-12)
    # Parameters are updated in place (the module still owns the same tensors).
    assert ema.lin.weight.data_ptr() == weight_ptr


def test_ema_integer_buffers_untouched():
    ema, live = TinyNet(1), TinyNet(2)
    ema_update(ema, live, 0.0)
    assert ema.counter.tolist() == [1, 7]
    assert ema.bn.num_batches_tracked.item() == 1


def test_ema_decay_one_keeps_ema():
    ema, live = TinyNet(1), TinyNet(2)
    before = _floats(ema)
    ema_update(ema, live, 1.0)
    for key, value in _floats(ema).items():
        assert torch.equal(value, before[key]), key


class TiedNet(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(3, 3, bias=False)
        self.b = nn.Linear(3, 3, bias=False)
        self.b.weight = self.a.weight  # tied, as e.g. embedding / output projections


def test_ema_tied_parameters_updated_once():
    ema, live = TiedNet(1).double(), TiedNet(2).double()
    before = ema.a.weight.detach().clone()
    ema_update(ema, live, 0.9)
    torch.testing.assert_close(ema.a.weight.detach(), 0.9 * before + 0.1 * live.a.weight.detach(), rtol=1e-9, atol=1e-12)
