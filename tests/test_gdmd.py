"""GDMD (docs/methods/gdmd.md) on a tiny random digits teacher, its reward weights at the module level.

The weight functions themselves (check 3: group mean 1 without cap, cap respected)
are covered in ``tests/test_advantages.py``. The B2 auxiliary is checked against
closed forms with :class:`LinearReward`, whose gradient is known exactly.
"""
from __future__ import annotations

import math
from dataclasses import replace

import lightning as L
import pytest
import torch

from rdm_lightning.backbones import DigitsBackbone
from rdm_lightning.core.advantages import group_advantages, softmax_group_weights
from rdm_lightning.core.dmd import dmd_gradient
from rdm_lightning.data.digits import DigitsDataModule
from rdm_lightning.methods import GDMD, DMDConfig, GDMDConfig, OptimizerConfig
from rdm_lightning.rewards import StrokeContrastReward
from rdm_lightning.rewards.base import RewardModel
from iterations import loss_state

pytestmark = pytest.mark.filterwarnings(
    "ignore:GDMD group_size=.*:UserWarning",
)

K = 4
PROMPTS = ["a handwritten digit 2"] * K + ["a handwritten digit 5"] * K


class RecordingReward(StrokeContrastReward):
    """Stroke contrast, declared non-differentiable, that records its inputs and whether grad was enabled."""

    differentiable = False

    def __init__(self, name: str = "recording"):
        super().__init__(name=name)
        self.inputs: list[torch.Tensor] = []
        self.grad_enabled: list[bool] = []

    def _score(self, images, prompts):
        self.inputs.append(images.clone())
        self.grad_enabled.append(torch.is_grad_enabled())
        return super()._score(images, prompts)


class ConstantReward(RecordingReward):
    """The same score for every image: every group advantage is 0."""

    def _score(self, images, prompts):
        super()._score(images, prompts)
        return torch.full((len(images),), 0.3)


class LinearReward(RewardModel):
    """``R(image) = Σ_pix a·image`` for a fixed random pattern a: differentiable, ``∇_image R = a`` exactly.

    Records its inputs. Through the digits decode ``clamp((x + 1)/2, 0, 1)`` the latent
    gradient is ``a/2`` where ``|x| < 1`` and 0 where the clamp saturates (:meth:`latent_gradient`).
    """

    differentiable = True

    def __init__(self, name: str = "linear", seed: int = 1):
        super().__init__(name=name)
        self.register_buffer("pattern", torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(seed)))
        self.inputs: list[torch.Tensor] = []

    def _score(self, images, prompts):
        self.inputs.append(images.detach().clone())
        return (images * self.pattern).flatten(1).sum(dim=1)

    def closed_form_score(self, latents: torch.Tensor) -> torch.Tensor:
        return (((latents + 1) / 2).clamp(0, 1) * self.pattern).flatten(1).sum(dim=1)

    def latent_gradient(self, latents: torch.Tensor) -> torch.Tensor:
        """``∇_x R(decode(x))`` in closed form."""
        return 0.5 * self.pattern * (latents.abs() < 1)


def make_gdmd(teacher, rewards=None, weights=None, **overrides) -> GDMD:
    rewards = rewards or [RecordingReward()]
    settings = dict(group_size=K, cold_start_updates=0, reward_weights=weights or {r.name: 1.0 for r in rewards})
    settings.update(overrides)
    return GDMD(DigitsBackbone(str(teacher)), rewards=rewards, gdmd=GDMDConfig(**settings))


def inputs(module: GDMD):
    cond = module.backbone.encode_prompts(PROMPTS)
    uncond = module.backbone.empty_conditioning(len(PROMPTS))
    x0 = (torch.rand(len(PROMPTS), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_(True)
    return x0, cond, uncond


def loss_and_direction(module: GDMD, x0, cond, uncond):
    """GDMD's loss and its x-gradient, plus the DM loss and g of the same random draws."""
    state = module.rng.get_state()
    loss, logs = module.generator_loss(x0, loss_state(x0, cond, uncond, {"prompts": PROMPTS}))
    (grad,) = torch.autograd.grad(loss, x0)
    module.rng.set_state(state)
    dm_loss, gradient, _ = module.distribution_matching_loss(x0, cond, uncond)
    (dm_grad,) = torch.autograd.grad(dm_loss, x0)
    return loss, grad, logs, dm_loss, dm_grad, gradient


def loss_and_grad(module: GDMD, x0, cond, uncond):
    """GDMD's loss, its x-gradient and its logs, leaving the module's random stream where it was."""
    state = module.rng.get_state()
    loss, logs = module.generator_loss(x0, loss_state(x0, cond, uncond, {"prompts": PROMPTS}))
    (grad,) = torch.autograd.grad(loss, x0)
    module.rng.set_state(state)
    return loss, grad, logs


def test_constant_rewards_give_unit_weights_and_the_dm_loss_check_1(tiny_digits_teacher):
    module = make_gdmd(tiny_digits_teacher, rewards=[ConstantReward()])
    loss, grad, logs, dm_loss, dm_grad, gradient = loss_and_direction(module, *inputs(module))
    assert gradient.abs().sum() > 0  # CFG on the real score only: a non-trivial DM direction
    torch.testing.assert_close(loss, dm_loss)
    torch.testing.assert_close(grad, dm_grad)
    assert logs["train/gdmd_weight_min"] == pytest.approx(1.0) and logs["train/gdmd_weight_max"] == pytest.approx(1.0)


@pytest.mark.parametrize("weighting", ["softmax", "linear"])
def test_rewards_of_the_target_weight_the_dm_direction_checks_2_3(tiny_digits_teacher, weighting):
    module = make_gdmd(tiny_digits_teacher, weighting=weighting)
    x0, cond, uncond = inputs(module)
    loss, grad, logs, _, _, gradient = loss_and_direction(module, x0, cond, uncond)
    reward = module.rewards.terms[0].reward
    target_images = module.backbone.decode(x0.detach() - gradient)
    # Scored on decode(x − g) (then on decode(x) for the logs), never with gradients.
    assert len(reward.inputs) == 2 and not any(reward.grad_enabled)
    torch.testing.assert_close(reward.inputs[0], target_images)
    torch.testing.assert_close(reward.inputs[1], module.backbone.decode(x0.detach()))
    assert not torch.equal(reward.inputs[0], reward.inputs[1])
    # The weights are those of the target's rewards, not the samples'.
    target_scores = StrokeContrastReward().score(target_images, PROMPTS)
    weights = module.sample_weights({"recording": target_scores}, {})
    if weighting == "softmax":
        torch.testing.assert_close(weights, softmax_group_weights(group_advantages(target_scores, K), K))
    assert weights.std() > 0 and weights.min() >= 0
    assert weights.max() <= (module.gdmd.w_max if weighting == "softmax" else 1 + 0.5 * 2.0)
    # ∂L/∂x_i = w_i·η·g_i / N: parallel to g_i.
    torch.testing.assert_close(grad, weights.view(-1, 1, 1, 1) * gradient / gradient.numel())
    assert logs["train/gdmd_weight_max"] == pytest.approx(weights.max().item())
    assert "reward/recording/target" in logs and "reward/recording/sample" in logs


def test_eta_moves_the_reward_input_and_scales_the_gradient_check_4(tiny_digits_teacher):
    grads, reward_inputs = {}, {}
    for eta in (1.0, 0.5):
        module = make_gdmd(tiny_digits_teacher, rewards=[ConstantReward()], eta=eta)
        x0, cond, uncond = inputs(module)
        _, grads[eta], _, _, _, gradient = loss_and_direction(module, x0, cond, uncond)
        reward_inputs[eta] = module.rewards.terms[0].reward.inputs[0]
        torch.testing.assert_close(reward_inputs[eta], module.backbone.decode(x0.detach() - eta * gradient))
    torch.testing.assert_close(grads[0.5], 0.5 * grads[1.0])
    assert not torch.equal(reward_inputs[0.5], reward_inputs[1.0])


def test_improvement_signal_uses_the_reward_difference(tiny_digits_teacher):
    module = make_gdmd(tiny_digits_teacher, reward_signal="improvement")
    target = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5])
    sample = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 0.2, 0.3, 0.4])
    weights = module.sample_weights({"recording": target}, {"recording": sample})
    torch.testing.assert_close(weights, softmax_group_weights(group_advantages(target - sample, K), K))


def test_cold_start_calls_no_reward_and_is_dmd_check_5(tiny_digits_teacher):
    module = make_gdmd(tiny_digits_teacher, cold_start_updates=3)
    loss, grad, logs, dm_loss, dm_grad, _ = loss_and_direction(module, *inputs(module))
    assert module.rewards.terms[0].reward.inputs == []
    torch.testing.assert_close(loss, dm_loss)
    torch.testing.assert_close(grad, dm_grad)
    assert not any(key.startswith("reward/") for key in logs)


def test_group_mean_normaliser_rescales_each_sample_by_its_share(tiny_digits_teacher):
    """g_group,i / g_sample,i = (n_i + ε)/(n̄ + ε): one scalar per sample, averaging 1 in each group."""
    module = make_gdmd(tiny_digits_teacher, normalizer="group_mean")
    x0, cond, uncond = inputs(module)
    x0_real, x0_fake, _ = module.dm_estimates(x0, cond, uncond)
    group_gradient, _ = module.dm_gradient(x0, x0_real, x0_fake)
    sample_gradient = dmd_gradient(x0, x0_real, x0_fake, module.dmd.norm_eps)
    mask = sample_gradient.abs() > 1e-6
    ratio = torch.where(mask, group_gradient / torch.where(mask, sample_gradient, 1.0), float("nan"))
    per_sample = ratio.flatten(1).nanmean(dim=1)
    torch.testing.assert_close(ratio.flatten(1).nan_to_num(0), (per_sample[:, None] * mask.flatten(1)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(per_sample.view(-1, K).mean(dim=1), torch.ones(len(PROMPTS) // K))
    assert per_sample.std() > 1e-3


def test_batches_must_be_whole_groups_of_one_prompt(tiny_digits_teacher):
    module = make_gdmd(tiny_digits_teacher)
    x0, cond, uncond = inputs(module)
    mixed = PROMPTS[1:] + PROMPTS[:1]
    with pytest.raises(ValueError, match=r"samples 0\.\.3 have prompts"):
        module.generator_loss(x0, loss_state(x0, cond, uncond, {"prompts": mixed}))
    with pytest.raises(ValueError, match="not a multiple of group_size=4"):
        module.generator_loss(x0[:6], loss_state(x0[:6], cond, uncond, {"prompts": PROMPTS[:6]}))


def test_non_differentiable_rewards_and_config_errors(tiny_digits_teacher):
    make_gdmd(tiny_digits_teacher, rewards=[RecordingReward("a"), ConstantReward("b")])  # no gradient needed
    with pytest.raises(ValueError, match=r"missing \['recording'\]"):
        make_gdmd(tiny_digits_teacher, reward_weights={})
    with pytest.raises(ValueError, match="GAN"):
        GDMD(DigitsBackbone(str(tiny_digits_teacher)), rewards=[RecordingReward()],
             gdmd=GDMDConfig(group_size=K, reward_weights={"recording": 1.0}), dmd=DMDConfig(gan_generator_weight=0.1))
    for bad, message in [
        (dict(weighting="power"), r"weighting must be one of \('softmax', 'linear'\), got 'power'"),
        (dict(eta=0.0), "eta must be > 0"),
        (dict(group_size=1), "group_size must be >= 2"),
        (dict(w_max=0.0), "w_max must be > 0"),
        (dict(b2_weight=-0.1), "b2_weight must be >= 0"),
        (dict(b2_scale="clipped"), r"b2_scale must be one of \('matched', 'raw'\), got 'clipped'"),
        (dict(b2_ramp_updates=-1), "b2_ramp_updates must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            GDMDConfig(**bad)
    with pytest.warns(UserWarning, match="K >= 8"):
        GDMDConfig(group_size=4)


def closed_form_b2_grad(module: GDMD, x0, gradient, lam: float):
    """``∂L/∂x`` of GDMD with B2 at weight λ from closed forms (module docstring, docs/methods/gdmd.md),
    for LinearRewards.

    matched: ``w_i·(η·g_i − λ·Σ_m ω_m·ĝ^m_i) / N``; raw: ``w_i·η·g_i / N − (λ/B)·Σ_m ω_m·γ^m_i``,
    with γ^m at the target ``x̃ = x − η·g`` and N the numel of the batch (the batch mean divides by B).
    """
    eta, terms = module.gdmd.eta, module.rewards.terms
    target = x0.detach() - eta * gradient
    weights = module.sample_weights({t.name: t.reward.closed_form_score(target) for t in terms}, {})
    weights = weights.view(-1, 1, 1, 1)
    gammas = {t.name: t.reward.latent_gradient(target) for t in terms}
    if module.gdmd.b2_scale == "matched":
        direction = eta * gradient
        for t in terms:
            matched = gammas[t.name] / (gammas[t.name].abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-8)
            direction = direction - lam * t.weight * matched
        return weights * direction / x0.numel()
    return weights * eta * gradient / x0.numel() - lam / len(x0) * sum(t.weight * gammas[t.name] for t in terms)


def test_b2_weight_follows_the_w3_cosine_ramp_after_the_cold_start(tiny_digits_teacher):
    module = make_gdmd(
        tiny_digits_teacher, rewards=[LinearReward()], cold_start_updates=2, b2_weight=0.3, b2_ramp_updates=4
    )
    for u, expected in [(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.15 * (1 - math.cos(math.pi / 4))), (4, 0.15),
                        (6, 0.3), (9, 0.3)]:
        module.role_updates["generator"] = u
        assert module.b2_lambda() == pytest.approx(expected, abs=1e-12)
    module.gdmd = replace(module.gdmd, b2_ramp_updates=0)  # no ramp: full weight from N0 on
    assert module.b2_lambda() == 0.3
    module.role_updates["generator"] = 1
    assert module.b2_lambda() == 0.0


@pytest.mark.parametrize("b2_scale", ["matched", "raw"])
@pytest.mark.parametrize("updates, reward_calls", [(1, 0), (2, 2)], ids=["cold_start", "ramp_start"])
def test_b2_at_zero_weight_is_b1_bit_for_bit_check_5(tiny_digits_teacher, b2_scale, updates, reward_calls):
    """λ_B2(u) = 0 in the cold start (u < N0 = 2) and at the ramp's start (u = N0): B2 calls no reward
    and the loss and gradient are B1's bit for bit; in the cold start no reward runs at all."""
    module = make_gdmd(
        tiny_digits_teacher, rewards=[LinearReward()], cold_start_updates=2, b2_weight=0.3, b2_scale=b2_scale,
        b2_ramp_updates=4,
    )
    module.role_updates["generator"] = updates
    x0, cond, uncond = inputs(module)
    loss, grad, logs = loss_and_grad(module, x0, cond, uncond)
    assert logs["train/lambda_b2"] == 0.0
    # Only B1's no-grad scoring of decode(x̃) and decode(x) after the cold start.
    assert len(module.rewards.terms[0].reward.inputs) == reward_calls
    assert not any(key.endswith("/b2") for key in logs)
    module.gdmd = replace(module.gdmd, b2_weight=0.0)
    b1_loss, b1_grad, b1_logs = loss_and_grad(module, x0, cond, uncond)
    assert torch.equal(loss, b1_loss) and torch.equal(grad, b1_grad)
    assert "train/lambda_b2" not in b1_logs


@pytest.mark.parametrize("b2_scale", ["matched", "raw"])
@pytest.mark.parametrize("eta, omegas", [(1.0, {"a": 1.0}), (0.5, {"a": 1.0, "b": 0.5})], ids=["one", "two"])
def test_b2_gradient_matches_its_closed_form(tiny_digits_teacher, b2_scale, eta, omegas):
    """matched: the target moves by λ·Σ_m ω_m·ĝ^m; raw: B1's gradient plus −(λ/B)·Σ_m ω_m·∇R_m at x̃."""
    rewards = [LinearReward(name, seed=seed) for seed, name in enumerate(omegas, start=1)]
    module = make_gdmd(
        tiny_digits_teacher, rewards=rewards, weights=omegas, eta=eta, b2_scale=b2_scale, b2_weight=0.2,
        cold_start_updates=2, b2_ramp_updates=4,
    )
    module.role_updates["generator"] = 4  # halfway up the ramp: λ = 0.1
    x0, cond, uncond = inputs(module)
    loss, grad, logs, _, _, gradient = loss_and_direction(module, x0, cond, uncond)
    assert logs["train/lambda_b2"] == pytest.approx(0.1)
    target = x0.detach() - eta * gradient
    assert 0 < (target.abs() < 1).float().mean() < 1  # the decode's clamp passes some pixels, not all
    for reward in rewards:
        # B1 scores decode(x̃) and decode(x) without grad; B2 then scores decode(x̃) once more, with grad.
        assert len(reward.inputs) == 3
        torch.testing.assert_close(reward.inputs[2], module.backbone.decode(target))
        assert logs[f"reward/{reward.name}/b2"] == pytest.approx(reward.closed_form_score(target).mean().item())
    expected = closed_form_b2_grad(module, x0, gradient, 0.1)
    torch.testing.assert_close(grad, expected)
    assert not torch.allclose(grad, closed_form_b2_grad(module, x0, gradient, 0.0))  # B2 changed B1's gradient
    if b2_scale == "raw":
        # L = L_B1 − λ·mean_i Σ_m ω_m·R_m(decode(x̃_i))
        weights = module.sample_weights({r.name: r.closed_form_score(target) for r in rewards}, {})
        b1_loss = (weights * 0.5 * (eta * gradient).flatten(1).pow(2).mean(dim=1)).mean()
        b2_loss = -0.1 * sum(omegas[r.name] * r.closed_form_score(target) for r in rewards).mean()
        torch.testing.assert_close(loss, b1_loss + b2_loss)
        torch.testing.assert_close(logs["train/loss_b2"], b2_loss)


def test_b2_needs_differentiable_rewards_at_construction(tiny_digits_teacher):
    rewards = [LinearReward("ok"), RecordingReward("scored_only")]
    for b2_scale in ("matched", "raw"):
        with pytest.raises(ValueError, match=r"B2 auxiliary \(b2_weight=0\.1\).*\['scored_only'\]"):
            make_gdmd(tiny_digits_teacher, rewards=rewards, b2_weight=0.1, b2_scale=b2_scale)
    make_gdmd(tiny_digits_teacher, rewards=rewards)  # B1 alone takes any reward


@pytest.mark.parametrize(
    "reward, b2", [(RecordingReward, {}), (LinearReward, dict(b2_weight=0.2, b2_ramp_updates=0))], ids=["b1", "b2"]
)
def test_short_fit_runs_and_changes_the_generator(tiny_digits_teacher, reward, b2):
    reward = reward()
    module = GDMD(
        DigitsBackbone(str(tiny_digits_teacher)),
        rewards=[reward],
        gdmd=GDMDConfig(group_size=K, cold_start_updates=1, reward_weights={reward.name: 1.0}, **b2),
        dmd=DMDConfig(generator_update_ratio=2, norm_eps=1e-8),
        generator_optimizer=OptimizerConfig(lr=1e-3),
        fake_score_optimizer=OptimizerConfig(lr=1e-3),
        max_generator_updates=3,
    )
    before = {k: v.clone() for k, v in module.generator.state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, max_epochs=-1,
    )
    trainer.fit(module, DigitsDataModule(batch_size=8, group_size=K))
    assert module.generator_updates == 3
    assert module.rewards.terms[0].reward.inputs  # rewards ran after the one-update cold start
    assert any(not torch.equal(before[k], v) for k, v in module.generator.state_dict().items())
    assert "train/gdmd_weight_mean" in trainer.callback_metrics
    if b2:
        assert trainer.callback_metrics["train/lambda_b2"] == pytest.approx(0.2)


# ---- B3: mode=grpo ---------------------------------------------------------------------------
def test_b3_rolls_out_after_the_cold_start_and_scores_the_targets(tiny_digits_teacher):
    reward = RecordingReward()
    module = make_gdmd(tiny_digits_teacher, rewards=[reward], mode="grpo", cold_start_updates=1)
    batch = {"prompts": PROMPTS}
    # Cold start: B1's backward simulation, no rollout and no reward call.
    cold = module.training_inputs(batch, update_generator=True)
    assert cold.trajectory is None and not reward.inputs
    module.role_updates["generator"] = 1
    rolled = module.training_inputs(batch, update_generator=True)
    trajectory = rolled.trajectory
    assert torch.equal(rolled.x_in, trajectory.latents[-2]) and trajectory.trainable == [True, True, True, False]
    # The generator's prediction at the last input is the rollout's final sample.
    x0 = module.backbone.predict_x0(module.generator, rolled.x_in, rolled.level, rolled.cond).requires_grad_(True)
    torch.testing.assert_close(x0, trajectory.sample, rtol=0, atol=1e-5)
    loss, logs = module.generator_loss(x0, rolled)
    assert len(reward.inputs) == 1 and not reward.grad_enabled[0]  # R(decode(x̃)) without grad
    assert not torch.equal(reward.inputs[0], module.backbone.decode(x0.detach()))  # at x̃, not x
    assert logs["train/policy_kept"] == 1.0
    # Under the rollout's own parameters every ratio is 1, so the PPO loss is −mean(A): 0 for group-centred A.
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.generator.parameters())


def test_b3_constant_rewards_drop_every_sample(tiny_digits_teacher):
    module = make_gdmd(tiny_digits_teacher, rewards=[ConstantReward()], mode="grpo")
    rolled = module.training_inputs({"prompts": PROMPTS}, update_generator=True)
    x0 = module.backbone.predict_x0(module.generator, rolled.x_in, rolled.level, rolled.cond)
    loss, logs = module.generator_loss(x0, rolled)
    assert loss.item() == 0.0 and logs["train/policy_kept"] == 0.0
