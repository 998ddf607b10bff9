"""Pure math of RTDMD, ``rdm_lightning.core.rtdmd`` (``docs/methods/rtdmd.md``).

Check 1 (CPS) and the log-prob half of check 5 are covered by ``test_stochastic.py``; here the
final-step log-prob is re-checked inside a SubGRPO rollout.
"""
from __future__ import annotations

import hashlib
import random

import pytest
import torch
from torch import Tensor

from rdm_lightning.core.advantages import combine_weighted, normalize_per_reward
from rdm_lightning.core.dmd import dmd_gradient, dmd_loss
from rdm_lightning.core.rtdmd import (
    acdmd_generator_loss,
    ambient_coefficients,
    ambient_dsm_loss,
    ambient_renoise,
    ambient_target_weight,
    ambient_velocity_target,
    consistency_loss,
    consistency_sigma,
    consistency_transitions,
    denoised_estimate,
    project_to_boundary,
    prompt_noise_seed,
    renoise_timestep_range,
    rtdmd_advantages,
    sample_renoise_sigma,
    shared_step_noise,
    subgrpo_step_noise,
    subgrpo_steps,
)
from rdm_lightning.core.schedules_training import hinge_reward_loss
from rdm_lightning.core.stochastic import cps_step, stochastic_sample

SD3_LEVELS = torch.tensor([1.0, 0.9, 0.75, 0.5], dtype=torch.float64)  # [1000, 750, 500, 250] with shift 3
SD3_BOUNDARIES = (0.9, 0.75, 0.5, 0.0)  # σ_s for k = 1..4
ETA = 0.9


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0, dtype=torch.float32) -> Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _linear_velocity(w: float, b: float):
    """``v = w·x + b·σ``: a cheap deterministic stand-in for a network."""

    def velocity(x: Tensor, sigma: Tensor) -> Tensor:
        return w * x + b * sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    return velocity


# ----------------------------------------------------------------------------------------------
# Check 2: ambient renoising and its target
# ----------------------------------------------------------------------------------------------


def test_ambient_variance_identity():
    """a²σ_s² + σ_rs² = σ_r² (float64) over the SD3 boundaries and random renoise levels."""
    sigma_s = torch.tensor([0.9, 0.75, 0.5, 0.0, 0.958, 0.3], dtype=torch.float64)
    sigma_r = sample_renoise_sigma(sigma_s, _gen(1))
    a, sigma_rs = ambient_coefficients(sigma_s, sigma_r, len(sigma_s))
    assert a.dtype == sigma_rs.dtype == torch.float64
    torch.testing.assert_close(a**2 * sigma_s**2 + sigma_rs**2, sigma_r**2, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(a, (1 - sigma_r) / (1 - sigma_s), rtol=0, atol=0)


def test_ambient_floor_on_the_square():
    """σ_r = σ_s gives σ_rs² = 0, floored at 1e-12 (σ_rs = 1e-6); the weight then vanishes."""
    a, sigma_rs = ambient_coefficients(0.5, 0.5, 1)
    assert a.item() == 1.0 and sigma_rs.item() == pytest.approx(1e-6, rel=1e-12)
    assert ambient_target_weight(sigma_rs).item() == pytest.approx(1e-11)


def test_sigma_s_zero_is_the_flow_forward_process():
    """With σ_s = 0: x_r = (1−σ_r)·x_s + σ_r·n and v* = n − x_s."""
    x_s, n = _rand(3, 2, 4, 4, seed=1), _rand(3, 2, 4, 4, seed=2)
    sigma_r = torch.tensor([0.02, 0.5, 0.98], dtype=torch.float64)
    x_r, a, sigma_rs = ambient_renoise(x_s, 0.0, sigma_r, n)
    s = sigma_r.float().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_r, (1 - s) * x_s + s * n)
    torch.testing.assert_close(sigma_rs, sigma_r, rtol=1e-15, atol=0)
    torch.testing.assert_close(ambient_velocity_target(x_s, 0.0, sigma_r, sigma_rs, n), n - x_s)


def test_target_conditional_mean_is_the_flow_velocity():
    """E[v*|x_r] = ε_tot − x0, the flow velocity at x_r, when x_s ~ p_σs is exact (point-mass x0).

    x_s = (1−σ_s)·x0 + σ_s·ε and x_r = (1−σ_r)·x0 + w, w = a·σ_s·ε + σ_rs·n ~ N(0, σ_r²). v* is
    linear, v* = α·x_s + β·n: x0 must cancel (α·(1−σ_s) = −1) and the regression slope of v* + x0
    on w must be 1/σ_r, i.e. α·σ_s·a·σ_s + β·σ_rs = σ_r. α and β are read off the function.
    """
    sigma_s = torch.tensor([0.75, 0.5, 0.9, 0.0, 0.958], dtype=torch.float64)
    sigma_r = torch.tensor([0.8, 0.93, 0.97, 0.4, 0.98], dtype=torch.float64)
    a, sigma_rs = ambient_coefficients(sigma_s, sigma_r, 5)
    ones, zeros = torch.ones(5, 1, dtype=torch.float64), torch.zeros(5, 1, dtype=torch.float64)
    alpha = ambient_velocity_target(ones, sigma_s, sigma_r, sigma_rs, zeros).flatten()
    beta = ambient_velocity_target(zeros, sigma_s, sigma_r, sigma_rs, ones).flatten()
    torch.testing.assert_close(alpha * (1 - sigma_s), -torch.ones(5, dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(alpha * sigma_s * a * sigma_s + beta * sigma_rs, sigma_r, rtol=1e-12, atol=0)


def test_ambient_weight_caps_at_one():
    sigma_rs = torch.tensor([0.1, 0.3, 0.316, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(
        ambient_target_weight(sigma_rs), torch.tensor([0.1, 0.9, 0.998560, 1.0, 1.0], dtype=torch.float64)
    )
    assert (ambient_target_weight(torch.linspace(1e-6, 1, 101)) <= 1).all()


def test_ambient_dsm_loss_matches_the_reference_scaled_form():
    """mean(min(1, 10σ²)·(v − v*)²) = mean(clamp(1/σ², 0, 10)·(σ·v − σ·v*)²), the released form."""
    v_pred, v_star = _rand(4, 3, 5, 5, seed=5), _rand(4, 3, 5, 5, seed=6)
    sigma_rs = torch.tensor([0.05, 0.2, 0.5, 0.9], dtype=torch.float64)
    loss = ambient_dsm_loss(v_pred, v_star, ambient_target_weight(sigma_rs))
    s = sigma_rs.float().view(-1, 1, 1, 1)
    reference = (torch.clamp(1 / s**2, 0, 10) * (v_pred * s - v_star * s) ** 2).mean()
    torch.testing.assert_close(loss, reference)
    # bf16 predictions are promoted to fp32 before the square.
    assert ambient_dsm_loss(v_pred.bfloat16(), v_star, ambient_target_weight(sigma_rs)).dtype == torch.float32


def test_ambient_rejects_bad_levels():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="sigma_s <= sigma_r"):
        ambient_renoise(x, 0.6, 0.5, x)
    with pytest.raises(ValueError, match="sigma_s < 1"):
        ambient_renoise(x, 1.0, 1.0, x)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ambient_renoise(x, 0.5, 1.5, x)
    with pytest.raises(ValueError, match="shape"):
        ambient_renoise(x, torch.tensor([0.1, 0.2, 0.3]), 0.5, x)


# ----------------------------------------------------------------------------------------------
# Renoise timestep and consistency levels
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_s", [0.9, 0.75, 0.5, 0.0, 0.958, 0.884, 0.718])
def test_renoise_sigma_range(sigma_s):
    """σ_r ∈ [0.02, 0.98] and σ_r ≥ σ_s + 0.01; before the clamp t_r ~ U[1000σ_s + 10, 1000]."""
    sigma_r = sample_renoise_sigma(torch.full((20_000,), sigma_s, dtype=torch.float64), _gen(7))
    assert sigma_r.dtype == torch.float64
    assert (sigma_r >= 0.02).all() and (sigma_r <= 0.98).all()
    assert (sigma_r >= sigma_s + 0.01 - 1e-12).all()
    low, high = renoise_timestep_range(sigma_s)
    assert low.item() == pytest.approx(1000 * sigma_s + 10) and high.item() == 1000
    # The clamp at 980 collects the mass of (980, 1000]: 20/(1000 − low).
    assert (sigma_r == 0.98).double().mean().item() == pytest.approx(20 / (1000 - low.item()), abs=0.02)


def test_renoise_sigma_shared_by_seed_and_integer_mode():
    sigma_s = torch.tensor([0.5, 0.5, 0.0, 0.9], dtype=torch.float64)
    # Two "ranks" with the same-seeded generator draw the same t_r (stage 1 sharing, no collective).
    assert torch.equal(sample_renoise_sigma(sigma_s, _gen(3)), sample_renoise_sigma(sigma_s, _gen(3)))
    t_r = sample_renoise_sigma(sigma_s.repeat(500), _gen(4), integer=True) * 1000
    torch.testing.assert_close(t_r, t_r.round(), rtol=0, atol=1e-9)
    assert (t_r >= 1000 * sigma_s.repeat(500) + 10 - 1e-9).all()


def test_renoise_sigma_rejects_boundary_above_clamp():
    with pytest.raises(ValueError, match="sigma_r < sigma_s"):
        sample_renoise_sigma(torch.tensor([0.975]), _gen(0))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        sample_renoise_sigma(torch.tensor(0.5), _gen(0))


def test_consistency_sigma():
    """Δ ~ UniformInt[1, 200]: σ′ = max(t_r − Δ, 0)/1000, always below σ_r."""
    sigma_r = torch.full((5000,), 0.6123, dtype=torch.float64)
    sigma_p = consistency_sigma(sigma_r, _gen(8))
    delta = (1000 * sigma_r - 1000 * sigma_p).round()
    torch.testing.assert_close(1000 * sigma_r - 1000 * sigma_p, delta, rtol=0, atol=1e-9)
    assert delta.min().item() == 1 and delta.max().item() == 200
    assert delta.mean().item() == pytest.approx(100.5, abs=2.0)
    low = consistency_sigma(torch.full((1000,), 0.02, dtype=torch.float64), _gen(9))
    assert (low >= 0).all() and (low < 0.02).all() and (low == 0).float().mean() > 0.8


# ----------------------------------------------------------------------------------------------
# Check 3: AC-DMD generator gradient
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_s", SD3_BOUNDARIES)
def test_teacher_equals_fake_gives_zero_gradient(sigma_s):
    """Same velocity for the teacher (w = 1) and the fake score, same z: xs_real = xs_fake, so g = 0."""
    x_s = _rand(2, 3, 6, 6, seed=10)
    sigma_r = sample_renoise_sigma(torch.full((2,), sigma_s, dtype=torch.float64), _gen(11))
    x_r, _, _ = ambient_renoise(x_s, sigma_s, sigma_r, _rand(2, 3, 6, 6, seed=12))
    v = _linear_velocity(0.4, -0.3)(x_r, sigma_r)
    z = _rand(2, 3, 6, 6, seed=13)
    xs_real = project_to_boundary(x_r, v, sigma_r, sigma_s, ETA, z).sample
    xs_fake = project_to_boundary(x_r, v.clone(), sigma_r, sigma_s, ETA, z).sample
    g = dmd_gradient(x_s, xs_real, xs_fake)
    assert torch.equal(g, torch.zeros_like(g))


def test_projection_shares_z_and_reaches_x0_at_sigma_zero():
    x_r, v_real, v_fake = _rand(2, 3, 4, 4, seed=14), _rand(2, 3, 4, 4, seed=15), _rand(2, 3, 4, 4, seed=16)
    sigma_r = torch.tensor([0.95, 0.8], dtype=torch.float64)
    # The shared z cancels: xs_fake − xs_real does not depend on it.
    diffs = [
        project_to_boundary(x_r, v_fake, sigma_r, 0.75, ETA, z).sample
        - project_to_boundary(x_r, v_real, sigma_r, 0.75, ETA, z).sample
        for z in (_rand(2, 3, 4, 4, seed=17), _rand(2, 3, 4, 4, seed=18))
    ]
    torch.testing.assert_close(diffs[0], diffs[1])
    # It is one CPS step; into σ_s = 0 it returns x̂0 = x_r − σ_r·v (DMD2 in x0 space).
    z = _rand(2, 3, 4, 4, seed=19)
    step = project_to_boundary(x_r, v_real, sigma_r, 0.5, ETA, z)
    assert torch.equal(step.sample, cps_step(x_r, v_real, sigma_r, 0.5, ETA, noise=z).sample)
    x0 = project_to_boundary(x_r, v_real, sigma_r, 0.0, ETA, z).sample
    torch.testing.assert_close(x0, x_r - sigma_r.float().view(-1, 1, 1, 1) * v_real)


def test_generator_loss_gradient_is_g_over_n():
    """∂L_G/∂x_s = g/N exactly (N a power of two: g/N is exact in fp32); the loss is float64."""
    x_s = _rand(2, 4, 8, 8, seed=20).requires_grad_(True)
    xs_real, xs_fake = _rand(2, 4, 8, 8, seed=21), _rand(2, 4, 8, 8, seed=22)
    g = dmd_gradient(x_s.detach(), xs_real, xs_fake)
    loss = acdmd_generator_loss(x_s, g)
    assert loss.dtype == torch.float64
    loss.backward()
    assert torch.equal(x_s.grad, g / x_s.numel())
    # Any N: the gradient is g/N rounded once from float64.
    y = _rand(3, 5, 7, seed=23).requires_grad_(True)
    g = _rand(3, 5, 7, seed=24)
    acdmd_generator_loss(y, g).backward()
    torch.testing.assert_close(y.grad, (g.double() / y.numel()).float(), rtol=1e-7, atol=0)


def test_generator_loss_keeps_small_g_that_fp32_dmd_loss_loses():
    """Why float64: with |x_s| ≫ |g|, fp32 ``x − g`` rounds to x and core.dmd.dmd_loss's gradient is 0."""
    x = torch.full((1, 16), 1.0e4).requires_grad_(True)
    g = torch.full((1, 16), 1.0e-4)
    acdmd_generator_loss(x, g).backward()
    torch.testing.assert_close(x.grad, g / 16)
    x32 = x.detach().clone().requires_grad_(True)
    dmd_loss(x32, g).backward()
    assert torch.equal(x32.grad, torch.zeros_like(x32))


def test_reward_backprop_is_the_existing_hinge():
    """L_BP = 1e-4·mean(ReLU(3 − R)) is ``hinge_reward_loss(R, 1e-4, 3.0)``: gradient −1e-4/B below 3."""
    rewards = torch.tensor([1.2, 1.6, 3.5, 2.9], requires_grad=True)
    loss = hinge_reward_loss(rewards, weight=1e-4, hinge=3.0)
    torch.testing.assert_close(loss, 1e-4 * torch.relu(3.0 - rewards).mean())
    loss.backward()
    torch.testing.assert_close(rewards.grad, torch.tensor([-1e-4 / 4, -1e-4 / 4, 0.0, -1e-4 / 4]))


# ----------------------------------------------------------------------------------------------
# Consistency term
# ----------------------------------------------------------------------------------------------


def test_consistency_estimator_is_unbiased():
    """mean[(h1 − h0)(h2 − h0)] ≈ mean((E[h(x′)|x_r] − h0)²), where mean((h1 − h0)²) adds Var h.

    Toy: v_φ(x) = w·x, so h(x′) = (1 − σ′w)·x′ and E[h(x′)|x_r] = (1 − σ′w)·μ with μ, ς the CPS
    moments. 250k elements, each an independent pair given x_r.
    """
    w, sigma_r, sigma_p = 0.5, 0.9, 0.7
    x_r = _rand(4, 1, 250, 250, seed=30)
    v_r = w * x_r  # v_φ(x_r), the pass of L_ADSM
    h0 = denoised_estimate(x_r, sigma_r, v_r)
    x1, x2 = consistency_transitions(x_r, v_r, sigma_r, sigma_p, ETA, generator=_gen(31))
    assert not x1.requires_grad and not torch.equal(x1, x2)
    h1, h2 = (denoised_estimate(x, sigma_p, w * x) for x in (x1, x2))
    moments = cps_step(x_r, v_r, sigma_r, sigma_p, ETA, noise=torch.zeros_like(x_r))
    expected_h = (1 - sigma_p * w) * moments.mean
    target = ((expected_h - h0) ** 2).mean()
    estimate = consistency_loss(h0, h1, h2)
    assert estimate.item() == pytest.approx(target.item(), rel=1e-2)
    variance = ((1 - sigma_p * w) * moments.std) ** 2
    biased = ((h1 - h0) ** 2).mean()
    assert (biased - target).item() == pytest.approx(variance.mean().item(), rel=2e-2)


def test_consistency_loss_basics():
    h = _rand(2, 3, 4, seed=32)
    assert consistency_loss(h, h, h).item() == 0.0
    h0 = h.clone().requires_grad_(True)
    h1 = h + 1.0
    consistency_loss(h0, h1, h1).backward()
    # ∂/∂h0 mean((h1 − h0)²) = −2(h1 − h0)/N.
    torch.testing.assert_close(h0.grad, torch.full_like(h, -2.0 / h.numel()))
    bad = h.clone()
    bad[0, 0, 0] = float("nan")
    assert consistency_loss(h, bad, h1).item() == 0.0
    loss, nonfinite = consistency_loss(h, bad, h1, return_nonfinite=True)
    assert loss.item() == 0.0 and nonfinite.tolist() == [1, 0]
    loss, nonfinite = consistency_loss(h0, h1, h1, return_nonfinite=True)
    assert torch.equal(loss, consistency_loss(h0, h1, h1)) and nonfinite.tolist() == [0, 0]
    with pytest.raises(ValueError, match="shapes differ"):
        consistency_loss(h, h[:1], h)


# ----------------------------------------------------------------------------------------------
# Check 4: SubGRPO
# ----------------------------------------------------------------------------------------------


def test_subgrpo_steps_same_on_every_rank_and_vary_by_epoch():
    picks = [subgrpo_steps(42, epoch) for epoch in range(30)]
    # Two "ranks" compute the same steps without any communication.
    assert picks == [subgrpo_steps(42, epoch) for epoch in range(30)]
    assert all(len(p) == 2 and p == sorted(p) and set(p) <= {0, 1, 2} for p in picks)
    assert len({tuple(p) for p in picks}) == 3  # every pair of {0, 1, 2} occurs
    # The reference's local RNG: random.Random(seed + 100000·epoch + 104729).
    assert picks[7] == sorted(random.Random(42 + 100000 * 7 + 104729).sample([0, 1, 2], 2))
    with pytest.raises(ValueError, match="num_selected"):
        subgrpo_steps(0, 0, num_selected=4)


def test_prompt_noise_seed_matches_hashlib():
    for prompt in ["a photo of a cat", "", "café ☕ 日本"]:
        head = int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16)
        for step, epoch in [(0, 0), (1, 3), (2, 25_000)]:
            assert prompt_noise_seed(prompt, step, epoch) == (head + 10007 * step + 100000 * epoch) % 2**31
    assert 0 <= prompt_noise_seed("x", 2, 10**6) < 2**31


def test_shared_step_noise_per_prompt():
    prompts = ["red cube", "red cube", "blue ball", "red cube"]
    noise = shared_step_noise(prompts, step=1, epoch=4, shape=(2, 3, 3))
    assert noise.shape == (4, 2, 3, 3) and noise.dtype == torch.float32
    assert torch.equal(noise[0], noise[1]) and torch.equal(noise[0], noise[3])
    assert not torch.allclose(noise[0], noise[2])
    # Another rank, another batch order: the same noise per prompt.
    other = shared_step_noise(["blue ball", "red cube"], step=1, epoch=4, shape=(2, 3, 3))
    assert torch.equal(other[0], noise[2]) and torch.equal(other[1], noise[0])
    assert torch.equal(noise[0], torch.randn((2, 3, 3), generator=_gen(prompt_noise_seed("red cube", 1, 4))))
    assert not torch.allclose(shared_step_noise(["red cube"], 2, 4, (2, 3, 3))[0], noise[0])
    assert not torch.allclose(shared_step_noise(["red cube"], 1, 5, (2, 3, 3))[0], noise[0])


def test_subgrpo_step_noise_keys():
    prompts = ["p"]
    assert set(subgrpo_step_noise(prompts, [0, 2], epoch=0, num_steps=4, shape=(2,))) == {1}
    assert set(subgrpo_step_noise(prompts, [0, 1], epoch=0, num_steps=4, shape=(2,))) == {2}
    assert set(subgrpo_step_noise(prompts, [], epoch=0, num_steps=4, shape=(2,))) == {0, 1, 2}
    with pytest.raises(ValueError, match="not stochastic"):
        subgrpo_step_noise(prompts, [3], epoch=0, num_steps=4, shape=(2,))


def _step_noise(trajectory, j: int) -> Tensor:
    """ξ_j recovered from a recorded step: (x_{j+1} − μ_j)/ς_j."""
    return (trajectory.latents[j + 1] - trajectory.means[j]) / trajectory.stds[j]


def test_subgrpo_rollouts_share_unselected_noise_across_ranks():
    """Two "ranks" roll out the same prompts from different initial noise and generators.

    Unselected stochastic steps use the same per-prompt ξ on both ranks and within a prompt's group;
    selected steps draw independently; the final step is deterministic with log-prob 0.
    """
    prompts = ["p0", "p0", "p1", "p1"]
    shape = (2, 4, 4)
    seed, epoch = 42, 3
    selected = subgrpo_steps(seed, epoch)
    step_noise = subgrpo_step_noise(prompts, selected, epoch, num_steps=len(SD3_LEVELS), shape=shape)
    velocity = _linear_velocity(0.3, -0.5)
    rollouts = [
        stochastic_sample(
            velocity,
            _rand(4, *shape, seed=100 + rank),
            SD3_LEVELS,
            "cps",
            {"eta": ETA},
            stochastic_steps=set(range(len(SD3_LEVELS) - 1)),
            generator=_gen(200 + rank),
            step_noise=step_noise,
        )
        for rank in range(2)
    ]
    a, b = rollouts
    assert not torch.allclose(a.latents[0], b.latents[0])  # initial latents stay independent
    assert not torch.allclose(a.sample, b.sample)
    for j in range(len(SD3_LEVELS) - 1):
        za, zb = _step_noise(a, j), _step_noise(b, j)
        if j in selected:
            assert not torch.allclose(za, zb, atol=1e-3)
        else:
            torch.testing.assert_close(za, step_noise[j], rtol=0, atol=1e-4)
            torch.testing.assert_close(za, zb, rtol=0, atol=1e-4)
            torch.testing.assert_close(za[0], za[1], rtol=0, atol=1e-4)
            assert not torch.allclose(za[0], za[2], atol=1e-2)
    last = len(SD3_LEVELS) - 1
    assert not a.stochastic[last] and torch.equal(a.log_probs[last], torch.zeros(4))
    assert torch.equal(a.sample, a.final_x0)


# ----------------------------------------------------------------------------------------------
# Check 6: advantages
# ----------------------------------------------------------------------------------------------


def test_rtdmd_advantages_are_standardised():
    k, groups = 8, 6
    gen = _gen(50)
    scores = {
        "clipscore": 0.3 + 0.02 * torch.randn(k * groups, generator=gen),
        "pickscore": 22.0 + 0.8 * torch.randn(k * groups, generator=gen),
        "hpsv2": 0.28 + 0.01 * torch.randn(k * groups, generator=gen),
    }
    adv = rtdmd_advantages(scores, group_size=k)
    assert abs(adv.mean().item()) < 1e-6
    assert adv.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    # It is the composition of the existing helpers, with ω_m = 1 by default ...
    composed = combine_weighted(
        normalize_per_reward(scores, k, std="global"), {m: 1.0 for m in scores}, renormalize=True
    )
    torch.testing.assert_close(adv, composed, rtol=0, atol=0)
    # ... which is, by hand, per reward (r − group mean)/(gathered std + 1e-4), summed, renormalised.
    manual = sum(
        (r.view(-1, k) - r.view(-1, k).mean(1, keepdim=True)).flatten() / (r.std(unbiased=False) + 1e-4)
        for r in scores.values()
    )
    manual = (manual - manual.mean()) / (manual.std(unbiased=False) + 1e-4)
    torch.testing.assert_close(adv, manual)
    # The ±5 clip comes last.
    spiky = {"r": torch.tensor([0.0] * 63 + [100.0])}
    assert rtdmd_advantages(spiky, group_size=64).max().item() > 5
    assert rtdmd_advantages(spiky, group_size=64, clip=5.0).max().item() == 5.0
