"""AC-DMD, RTDMD stage 1 (docs/methods/rtdmd.md, "Stage 1, ``ACDMD``"; the generator gradient at module level).

On the tiny random digits teacher: the zero gradient of a fresh module and ∂L_G/∂x_s = g/N,
gradient isolation of the rollout prefix, rank-shared k / t_r / Δ, the fake-score loss against
a hand computation, refusal of ε/VP backbones, and a short fit.
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from rdm_lightning.backbones.digits import (
    DigitsBackbone,
    DigitsConfig,
    DigitsDenoiser,
    DigitsTextEncoder,
    save_digits_model,
)
from rdm_lightning.callbacks.ema import GeneratorEMA
from rdm_lightning.core.rtdmd import (
    ambient_dsm_loss,
    ambient_renoise,
    ambient_target_weight,
    ambient_velocity_target,
    consistency_loss,
    consistency_sigma,
    consistency_transitions,
    denoised_estimate,
    sample_renoise_sigma,
)
from rdm_lightning.core.stochastic import cps_step
from rdm_lightning.data.digits import DigitsDataModule
from rdm_lightning.methods import ACDMD, ACDMDConfig, DMDConfig, OptimizerConfig, StudentConfig
from rdm_lightning.methods.grpo import flow_velocity


PROMPTS = ["a handwritten digit 3", "a handwritten digit 7", "a handwritten digit 0", "a handwritten digit 9"]
ETA = 0.9


def make_acdmd(teacher: Path, *, guidance: float = 1.5, ratio: int = 2, lr: float = 1e-3, seed: int = 0, **acdmd) -> ACDMD:
    optimizer = OptimizerConfig(lr=lr)
    return ACDMD(
        DigitsBackbone(path=str(teacher)),
        acdmd=ACDMDConfig(**acdmd),
        dmd=DMDConfig(guidance_scale=guidance, generator_update_ratio=ratio),
        generator_optimizer=optimizer,
        fake_score_optimizer=optimizer,
        student=StudentConfig(num_steps=4),
        seed=seed,
    )


def conditioning(module: ACDMD, prompts=PROMPTS):
    return module.backbone.encode_prompts(prompts), module.backbone.empty_conditioning(len(prompts))


def fix_step(module: ACDMD, k: int) -> None:
    """Make every draw of k return ``k`` (shared_randint draws k − 1)."""
    module.shared_randint = lambda high: k - 1


# ---- config and construction ------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [({"eta": 1.5}, "eta must lie in"), ({"consistency_weight": -0.1}, "consistency_weight"),
     ({"consistency_max_delta": 0}, "consistency_max_delta"), ({"renoise_clamp": (980.0, 20.0)}, "renoise_clamp"),
     ({"adsm_weight_cap": 0.0}, "adsm_weight_cap")],
)
def test_config_names_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ACDMDConfig(**kwargs)


def test_defaults_follow_the_spec():
    config = ACDMDConfig()
    assert (config.eta, config.consistency_weight, config.consistency_max_delta) == (0.9, 0.01, 200)
    assert config.renoise_clamp == (20.0, 980.0) and config.adsm_weight_cap == 10.0


def test_eps_vp_backbone_is_refused_with_a_clear_message(tmp_path):
    config = DigitsConfig(prediction="epsilon", channels=8)
    folder = save_digits_model(
        tmp_path / "eps", config, DigitsTextEncoder(config.text_dim, config.max_tokens), DigitsDenoiser(8, config.text_dim)
    )
    with pytest.raises(ValueError, match="AC-DMD rolls out flow steps .*has a VPSchedule, not a FlowSchedule"):
        ACDMD(DigitsBackbone(path=str(folder)))


def test_gan_head_and_boundaries_without_a_renoise_interval_are_refused(tiny_digits_teacher):
    backbone = DigitsBackbone(path=str(tiny_digits_teacher))
    with pytest.raises(ValueError, match="no GAN head"):
        ACDMD(backbone, dmd=DMDConfig(gan_generator_weight=0.1))
    with pytest.raises(ValueError, match=r"boundary levels \[0\.98\] leave no renoise interval"):
        ACDMD(backbone, student=StudentConfig(num_steps=2, levels=[1.0, 0.98]))


# ---- the generator gradient ------------------------------------------------------------------------
@pytest.mark.parametrize("sigma_s", [0.0, 0.25, 0.5, 0.75])
def test_fake_equal_to_teacher_and_cfg_one_give_zero_gradient_check_3(tiny_digits_teacher, sigma_s):
    module = make_acdmd(tiny_digits_teacher, guidance=1.0)  # the fake score is a fresh copy of the teacher
    cond, uncond = conditioning(module)
    x_s = (torch.rand(4, 1, 8, 8) * 2 - 1).requires_grad_()
    loss, gradient, _ = module.acdmd_loss(x_s, torch.full((4,), sigma_s, dtype=torch.float64), cond, uncond)
    assert torch.equal(gradient, torch.zeros_like(gradient))
    assert loss.dtype == torch.float64 and loss.item() == 0.0
    loss.backward()
    assert torch.equal(x_s.grad, torch.zeros_like(x_s))


@pytest.mark.parametrize("sigma_s", [0.0, 0.5])
def test_generator_loss_gradient_is_g_over_n_check_3(tiny_digits_teacher, sigma_s):
    module = make_acdmd(tiny_digits_teacher, guidance=3.0)
    cond, uncond = conditioning(module)
    x_s = (torch.rand(4, 1, 8, 8) * 2 - 1).requires_grad_()
    loss, gradient, logs = module.acdmd_loss(x_s, torch.full((4,), sigma_s, dtype=torch.float64), cond, uncond)
    assert gradient.abs().max() > 1e-3 and not gradient.requires_grad
    loss.backward()
    torch.testing.assert_close(x_s.grad, gradient / x_s.numel(), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, 0.5 * (gradient.double() ** 2).mean())
    # t_r ~ U[1000·σ_s + 10, 1000] clamped to [20, 980].
    assert max(20.0, 1000 * sigma_s + 10) <= logs["train/renoise_t"] <= 980.0


# ---- rollout: only step k carries gradient ---------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_generator_gradient_reaches_only_step_k(tiny_digits_teacher, k):
    module = make_acdmd(tiny_digits_teacher)
    fix_step(module, k)
    grad_modes = []
    handle = module.generator.register_forward_hook(lambda m, args, out: grad_modes.append(out.requires_grad))
    state = module.training_inputs({"prompts": PROMPTS}, update_generator=True)
    cond, x_in, level, rollout = state.cond, state.x_in, state.level, state.rollout
    assert grad_modes == [False] * (k - 1)  # the prefix: k − 1 CPS steps, none with grad
    assert not x_in.requires_grad and x_in.grad_fn is None
    levels = module.student_levels()
    assert rollout.step == k and torch.equal(level, torch.full((4,), float(levels[k - 1]), dtype=torch.float64))
    sigma_s = float(levels[k]) if k < 4 else 0.0
    assert torch.equal(rollout.sigma_s, torch.full((4,), sigma_s, dtype=torch.float64))

    # Step k itself: the generator's forward with grad, then the differentiable CPS step to σ_s.
    x0 = module.backbone.predict_x0(module.generator, x_in, level, cond)
    assert grad_modes[-1] is True and len(grad_modes) == k
    x_s = module.boundary_sample(rollout, x0)
    expected = x0 if k == 4 else cps_step(
        x_in, flow_velocity(module.backbone, module.generator, cond)(x_in, level), level, rollout.sigma_s, ETA,
        noise=rollout.noise,
    ).sample
    if k == 4:
        assert torch.equal(x_s, x0)  # the last step is deterministic and returns x̂0 itself
    else:
        torch.testing.assert_close(x_s, expected, rtol=1e-5, atol=1e-6)

    # ∂L/∂x̂0 = (∂x_s/∂x̂0)·g/N with ∂x_s/∂x̂0 = (1 − σ_s) − σ_s·cosθ·(1 − σ)/σ: no other path.
    captured = {}
    dm_gradient = module.dm_gradient
    module.dm_gradient = lambda *args: captured.setdefault("g", dm_gradient(*args))
    leaf = x0.detach().requires_grad_()
    loss, logs = module.generator_loss(leaf, state)
    loss.backward()
    sigma = float(levels[k - 1])
    jacobian = (1 - sigma_s) - sigma_s * math.cos(ETA * math.pi / 2) * (1 - sigma) / sigma
    torch.testing.assert_close(leaf.grad, jacobian * captured["g"][0] / leaf.numel(), rtol=1e-5, atol=1e-12)
    assert logs["train/acdmd_step"] == float(k)

    # Through the real generator forward the loss reaches the generator's weights.
    module.dm_gradient = dm_gradient
    loss, _ = module.generator_loss(x0, state)
    module.generator.zero_grad()
    (loss * 1e6).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.generator.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())
    handle.remove()


def test_critic_gets_its_own_rollout_on_generator_iterations(tiny_digits_teacher):
    module = make_acdmd(tiny_digits_teacher)
    steps = iter([2, 4])
    module.shared_randint = lambda high: next(steps) - 1
    state = module.training_inputs({"prompts": PROMPTS}, update_generator=True)
    x0 = module.backbone.predict_x0(module.generator, state.x_in, state.level, state.cond).detach()
    critic, x_s = module.critic_inputs(state, x0)
    assert critic.rollout is state.rollout and state.rollout.step == 2 and state.critic_rollout is None
    assert critic.critic_rollout.step == 4
    assert torch.equal(critic.critic_rollout.sigma_s, torch.zeros(4, dtype=torch.float64))
    assert not x_s.requires_grad
    # On a critic-only iteration the iteration's rollout is the critic's (no new draw of k).
    module.shared_randint = lambda high: 3 - 1
    state = module.training_inputs({"prompts": PROMPTS}, update_generator=False)
    with torch.no_grad():
        x0 = module.backbone.predict_x0(module.generator, state.x_in, state.level, state.cond)
    module.shared_randint = None  # a second draw would fail
    critic, x_s = module.critic_inputs(state, x0)
    assert critic.critic_rollout is state.rollout and critic.critic_rollout.step == 3
    assert torch.equal(x_s, module.boundary_sample(state.rollout, x0))


# ---- k, t_r and Δ are shared across ranks ---------------------------------------------------------
class RecordingStrategy:
    """Rank 0: returns what it is given and records it."""

    def __init__(self):
        self.values = []

    def broadcast(self, value, src=0):
        assert src == 0
        self.values.append(value)
        return value


class ReplayStrategy:
    """Rank 1: returns rank 0's values in order, as a broadcast from rank 0 does."""

    def __init__(self, values):
        self.values = list(values)

    def broadcast(self, value, src=0):
        assert src == 0
        theirs = self.values.pop(0)
        assert type(theirs) is type(value) and getattr(theirs, "shape", None) == getattr(value, "shape", None)
        return theirs


def one_iteration(module: ACDMD, strategy) -> dict:
    """The draws of one generator iteration (generator loss, then the critic's rollout and loss)."""
    used = {"sigma_r": [], "sigma_prime": []}
    renoise, prime = module.renoise_sigma, module.consistency_prime
    module.renoise_sigma = lambda s: used["sigma_r"].append(renoise(s)) or used["sigma_r"][-1]
    module.consistency_prime = lambda s: used["sigma_prime"].append(prime(s)) or used["sigma_prime"][-1]
    module._trainer = SimpleNamespace(strategy=strategy)
    try:
        state = module.training_inputs({"prompts": PROMPTS}, update_generator=True)
        x0 = module.backbone.predict_x0(module.generator, state.x_in, state.level, state.cond)
        module.generator_loss(x0, state)
        critic, x_s = module.critic_inputs(state, x0.detach())
        module.fake_score_loss(x_s, critic)
    finally:
        module._trainer = None
    return {"k": [state.rollout.step, critic.critic_rollout.step], "noise": state.rollout.noise, **used}


def test_k_t_r_and_delta_are_identical_across_ranks(tiny_digits_teacher):
    ranks = [make_acdmd(tiny_digits_teacher, seed=0) for _ in range(2)]
    for rank, module in enumerate(ranks):
        module.rng.manual_seed(module.seed + rank)  # on_fit_start: each rank offsets the seed by its rank
    recorder = RecordingStrategy()
    rank0 = one_iteration(ranks[0], recorder)
    replay = ReplayStrategy(recorder.values)
    rank1 = one_iteration(ranks[1], replay)
    assert not replay.values  # both ranks made the same broadcasts, in the same order
    assert len(recorder.values) == 2 + 2 + 1  # k twice, t_r twice (generator, critic), Δ once
    assert rank0["k"] == rank1["k"]
    for name in ("sigma_r", "sigma_prime"):
        assert len(rank0[name]) == len(rank1[name]) > 0
        assert all(torch.equal(a, b) for a, b in zip(rank0[name], rank1[name]))
    assert not torch.equal(rank0["noise"], rank1["noise"])  # noise stays per rank
    # Without the broadcast the two ranks' streams would disagree on t_r.
    s = torch.full((4,), 0.5, dtype=torch.float64)
    assert not torch.equal(ranks[0].renoise_sigma(s), ranks[1].renoise_sigma(s))


# ---- the fake-score loss ------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.01, 0.0])
@pytest.mark.parametrize("sigma_s", [0.0, 0.5])
def test_fake_score_loss_is_adsm_plus_gamma_consistency_by_hand(tiny_digits_teacher, gamma, sigma_s):
    module = make_acdmd(tiny_digits_teacher, consistency_weight=gamma)
    with torch.no_grad():  # a fake score that differs from the teacher, so every term is non-trivial
        for p in module.fake_score.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cond, _ = conditioning(module)
    x_s = torch.rand(4, 1, 8, 8) * 2 - 1
    sigma = torch.full((4,), sigma_s, dtype=torch.float64)
    module.rng.manual_seed(7)
    loss, logs = module.critic_loss(x_s, sigma, cond)

    rng = torch.Generator().manual_seed(7)
    backbone, fake = module.backbone, module.fake_score
    with torch.no_grad():
        sigma_r = sample_renoise_sigma(sigma, rng, (20.0, 980.0))
        noise = torch.randn(x_s.shape, generator=rng)
        x_r, _, sigma_rs = ambient_renoise(x_s, sigma, sigma_r, noise)
        target = ambient_velocity_target(x_s, sigma, sigma_r, sigma_rs, noise)
        v_r = backbone.network_output(fake, x_r, sigma_r, cond)  # the digits network outputs v directly
        expected_adsm = ambient_dsm_loss(v_r, target, torch.clamp(10 * sigma_rs**2, max=1.0))
        expected = expected_adsm
        if gamma > 0:
            sigma_prime = consistency_sigma(sigma_r, rng, 200)
            x1, x2 = consistency_transitions(x_r, v_r, sigma_r, sigma_prime, ETA, generator=rng)
            h0 = denoised_estimate(x_r, sigma_r, v_r)
            h1 = denoised_estimate(x1, sigma_prime, backbone.network_output(fake, x1, sigma_prime, cond))
            h2 = denoised_estimate(x2, sigma_prime, backbone.network_output(fake, x2, sigma_prime, cond))
            expected_cons = consistency_loss(h0, h1, h2)
            expected = expected_adsm + gamma * expected_cons
            torch.testing.assert_close(logs["train/loss_consistency"], expected_cons, rtol=1e-4, atol=1e-9)
            assert expected_cons != 0
        else:
            assert "train/loss_consistency" not in logs
    torch.testing.assert_close(logs["train/loss_adsm"], expected_adsm, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-9)
    assert torch.equal(ambient_target_weight(sigma_rs), torch.clamp(10 * sigma_rs**2, max=1.0))
    # The loss trains the fake score only.
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.fake_score.parameters())
    assert all(p.grad is None for p in module.generator.parameters())


# ---- a short fit ---------------------------------------------------------------------------------------
def test_short_fit_trains_generator_and_fake_score_and_keeps_the_teacher(tiny_digits_teacher):
    module = make_acdmd(tiny_digits_teacher, ratio=2)
    generator = [p.detach().clone() for p in module.generator.parameters()]
    fake = [p.detach().clone() for p in module.fake_score.parameters()]
    teacher = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[GeneratorEMA(decay=0.99)],
                        max_steps=6)  # 4 iterations: generator at iterations 0 and 2, critic every iteration
    trainer.fit(module, DigitsDataModule(batch_size=8))
    assert module.iterations == 4 and module.generator_updates == 2 and module.role_updates["fake_score"] == 4
    assert any(not torch.equal(a, b) for a, b in zip(generator, module.generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(fake, module.fake_score.parameters()))
    assert all(torch.equal(teacher[k], v) for k, v in module.teacher.state_dict().items())
    for key in ("train/loss_dm", "train/loss_adsm", "train/loss_consistency", "train/loss_fake"):
        assert torch.isfinite(trainer.callback_metrics[key])
    # The student samples with CPS(η): stochastic, reproducible from the noise and the generator.
    noise = torch.randn(2, 1, 8, 8)
    first, again, other = (
        module.generate(PROMPTS[:2], noise, generator=torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)
    )
    assert first.shape == (2, 1, 8, 8) and torch.isfinite(first).all()
    assert torch.equal(first, again) and not torch.equal(first, other)
