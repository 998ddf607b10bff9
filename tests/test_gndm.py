"""GNDM / GNDMR (docs/methods/gndm.md); the weight and gradient-scale helpers are tested in test_advantages.py."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from rdm_lightning.backbones import DigitsBackbone
from rdm_lightning.core.advantages import scale_matched_gradient
from rdm_lightning.core.dmd import dmd_gradient, dmd_loss
from rdm_lightning.core.group_dmd import (
    center_gradient,
    elbo_diff_scalar,
    group_dmd_gradient,
    group_mean_normalizer,
    mismatch_scalar,
    weighted_dmd_loss,
)
from rdm_lightning.core.schedules_training import hinge_reward_loss
from rdm_lightning.data.digits import DigitsDataModule
from rdm_lightning.data.groups import check_grouped_prompts
from rdm_lightning.core.schedules import VPSchedule
from rdm_lightning.methods import DMD, GNDM, DMDConfig, DMDRConfig, GNDMConfig, Iteration, StudentConfig
from rdm_lightning.methods.gndm import ImportanceSamplingConfig, ReuseIteration, StoredRollout
from rdm_lightning.rewards import RewardModel
from iterations import loss_state
from reward_doubles import CountingReward

PROMPTS = ["a handwritten digit 2"] * 4 + ["a handwritten digit 5"] * 4


# ---- pure functions -----------------------------------------------------------------------
def test_group_size_one_is_per_sample_dmd_check_1():
    x, real, fake = torch.randn(3, 6, 1, 5, 5).unbind(0)
    assert torch.equal(group_dmd_gradient(x, real, fake, 1, 1e-8), dmd_gradient(x, real, fake, 1e-8))
    g = dmd_gradient(x, real, fake, 1e-8)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss_a, loss_b = weighted_dmd_loss(a, g), dmd_loss(b, g)
    (loss_a + loss_b).backward()
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)


def test_identical_samples_in_a_group_give_the_per_sample_gradient_check_1():
    x, real = torch.randn(2, 2, 1, 5, 5).repeat_interleave(4, dim=1).unbind(0)  # groups of 4 identical samples
    fake = torch.randn_like(x)
    torch.testing.assert_close(group_dmd_gradient(x, real, fake, 4), dmd_gradient(x, real, fake, 1e-8))


def test_group_mean_normalizer_closed_form():
    x, real = torch.zeros(4, 1, 2, 2), torch.tensor([1.0, 3.0, 2.0, 6.0]).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    n = group_mean_normalizer(x, real, group_size=2, eps=0.0)
    assert n.shape == (4, 1, 1, 1) and n.flatten().tolist() == [2.0, 2.0, 4.0, 4.0]


def test_group_gradient_counts_the_entries_it_replaced():
    """A NaN in one sample makes its group's mean normaliser NaN: every entry of that group is replaced."""
    x, real, fake = torch.randn(3, 4, 1, 5, 5).unbind(0)
    gradient, nonfinite = group_dmd_gradient(x, real, fake, 2, return_nonfinite=True)
    assert torch.equal(gradient, group_dmd_gradient(x, real, fake, 2)) and nonfinite.tolist() == [0, 0, 0, 0]
    real[1, 0, 2, 2] = float("nan")
    gradient, nonfinite = group_dmd_gradient(x, real, fake, 2, return_nonfinite=True)
    assert nonfinite.tolist() == [25, 25, 0, 0]
    assert torch.equal(gradient[:2], torch.zeros_like(gradient[:2]))


def test_gradient_norms_keep_relative_magnitudes_in_a_group_check_2():
    x, real, fake = torch.randn(3, 4, 1, 6, 6).unbind(0)
    fake = real + torch.tensor([0.1, 1.0, 3.0, 0.5]).view(4, 1, 1, 1) * (fake - real)
    x = x.requires_grad_()
    weighted_dmd_loss(x, group_dmd_gradient(x.detach(), real, fake, 4)).backward()
    grad_norms = x.grad.flatten(1).norm(dim=1)
    d_norms = (fake - real).flatten(1).norm(dim=1)
    torch.testing.assert_close(grad_norms / grad_norms[0], d_norms / d_norms[0])


def test_weighted_loss_gradient_is_w_h_over_n_exactly():
    # Quarter-integers make x − (x − h) exact in float32, so only the final scaling can round.
    generator = torch.Generator().manual_seed(0)
    x = (torch.randint(-8, 9, (4, 1, 3, 3), generator=generator) / 4.0).requires_grad_()
    h = torch.randint(-8, 9, (4, 1, 3, 3), generator=generator) / 4.0
    w = torch.tensor([0.0, 0.5, 1.0, 2.0])
    weighted_dmd_loss(x, h, w).backward()
    torch.testing.assert_close(x.grad, w.view(4, 1, 1, 1) * h / x.numel(), rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        weighted_dmd_loss(x, h, torch.ones(3))


def test_center_gradient_removes_the_group_mean():
    g = torch.randn(8, 1, 2, 2)
    centered = center_gradient(g, 4)
    torch.testing.assert_close(centered.view(2, 4, -1).sum(dim=1), torch.zeros(2, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(g - centered, g.view(2, 4, 1, 2, 2).mean(1, keepdim=True).expand(2, 4, 1, 2, 2).reshape(8, 1, 2, 2))


def test_rdm_scalars_closed_form():
    g1, g2 = torch.full((2, 1, 2, 2), 1.0), torch.full((2, 1, 2, 2), 3.0)
    assert mismatch_scalar([g1, g2]).tolist() == [-5.0, -5.0]
    x = torch.zeros(2, 1, 2, 2)
    real, fake = torch.full_like(x, 1.0), torch.full_like(x, 2.0)  # the real score denoises x better
    assert elbo_diff_scalar(x, [real, real], [fake, fake]).tolist() == [3.0, 3.0]
    with pytest.raises(ValueError, match="same number"):
        elbo_diff_scalar(x, [real], [])


def test_grouped_prompts_are_checked():
    check_grouped_prompts(PROMPTS, 4)
    with pytest.raises(ValueError, match="not a multiple of group_size=4"):
        check_grouped_prompts(PROMPTS[:6], 4)
    with pytest.raises(ValueError, match=r"samples 0\.\.3"):
        check_grouped_prompts(PROMPTS[2:] + PROMPTS[:2], 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"normalizer": "group"}, "normalizer must be one of"), ({"adv_weighting": "soft"}, "adv_weighting"),
     ({"rdm_scalar": "elbo"}, "rdm_scalar"), ({"reward_combination": "sum"}, "reward_combination"),
     ({"rdm_draws": 0}, "rdm_draws"), ({"group_size": 0}, "group_size"), ({"adv_clip": 0.0}, "adv_clip")],
)
def test_config_names_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GNDMConfig(**kwargs)


# ---- the module -----------------------------------------------------------------------------


class ConstantReward(RewardModel):
    """A non-differentiable reward that is the same for every image."""

    def _score(self, images, prompts):
        return torch.full((len(images),), 0.25, device=images.device)


def make_gndm(teacher, rewards=(), cold_start=2, ratio=5, **gndm) -> GNDM:
    config = DMDRConfig(cold_start_updates=cold_start, reward_weights={r.name: 0.5 for r in rewards})
    return GNDM(DigitsBackbone(str(teacher)), rewards=list(rewards), dmdr=config, gndm=GNDMConfig(**gndm),
                dmd=DMDConfig(generator_update_ratio=ratio, norm_eps=1e-8))


def loss_and_grad(module, x0, batch_prompts=PROMPTS, seed=0):
    module.rng.manual_seed(seed)
    cond = module.backbone.encode_prompts(batch_prompts)
    uncond = module.backbone.empty_conditioning(len(batch_prompts))
    x = x0.clone().requires_grad_()
    loss, logs = module.generator_loss(x, loss_state(x, cond, uncond, {"prompts": batch_prompts}))
    loss.backward()
    return loss.detach(), x.grad, logs


def test_gndm_with_group_size_one_reproduces_dmd_check_1(tiny_digits_teacher):
    module = make_gndm(tiny_digits_teacher, group_size=1)
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    loss, grad, logs = loss_and_grad(module, x0)
    module.rng.manual_seed(0)
    x = x0.clone().requires_grad_()
    cond, uncond = module.backbone.encode_prompts(PROMPTS), module.backbone.empty_conditioning(8)
    dmd_value, _, _ = DMD.distribution_matching_loss(module, x, cond, uncond)
    dmd_value.backward()
    torch.testing.assert_close(loss, dmd_value.detach())
    torch.testing.assert_close(grad, x.grad, rtol=1e-6, atol=1e-12)
    assert "train/rdm_scalar" in logs and logs["train/rdm_scalar"] <= 0


def test_non_k_repeated_batch_is_refused(tiny_digits_teacher):
    module = make_gndm(tiny_digits_teacher)
    with pytest.raises(ValueError, match="not K-repeated"):
        loss_and_grad(module, torch.zeros(8, 1, 8, 8), PROMPTS[1:] + PROMPTS[:1])


def test_lambda_zero_gives_bit_identical_gradients_to_gndm_check_4(tiny_digits_teacher):
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    gndm = make_gndm(tiny_digits_teacher)
    reward = CountingReward()
    gndmr = make_gndm(tiny_digits_teacher, rewards=[reward], lambda_ramp_updates=4)
    # u = 1 is the cold start, u = N0 = 2 the start of W3 (λ = 0); DynaRS depends on u, so compare at equal u.
    for u in (1, 2):
        gndm.role_updates["generator"] = gndmr.role_updates["generator"] = u
        _, plain, _ = loss_and_grad(gndm, x0)
        _, steered, logs = loss_and_grad(gndmr, x0)
        assert torch.equal(steered, plain)
    assert reward.calls == 0 and logs["train/lambda/counting"] == 0.0
    gndm.role_updates["generator"] = gndmr.role_updates["generator"] = 10  # ramp done: λ = λ_max = 0.5
    _, plain, _ = loss_and_grad(gndm, x0)
    _, steered, logs = loss_and_grad(gndmr, x0)
    assert logs["train/lambda/counting"] == 0.5 and "reward/counting" in logs and reward.calls == 1
    assert not torch.equal(steered, plain)


def test_w2_direction_is_g_minus_lambda_times_unit_scale_reward_gradient(tiny_digits_teacher):
    gndmr = make_gndm(tiny_digits_teacher, rewards=[CountingReward()], lambda_ramp_updates=0)
    gndmr.role_updates["generator"] = 2
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    _, steered, _ = loss_and_grad(gndmr, x0)
    gndm = make_gndm(tiny_digits_teacher)
    gndm.role_updates["generator"] = 2
    _, plain, _ = loss_and_grad(gndm, x0)
    _, gamma = gndmr.reward_gradient(gndmr.rewards.terms[0].reward, x0, PROMPTS)
    matched = scale_matched_gradient(gamma)
    q = gamma.abs().flatten(1).mean(1)
    torch.testing.assert_close(matched.abs().flatten(1).mean(1), q / (q + 1e-8))
    torch.testing.assert_close(steered, plain - 0.5 * matched / x0.numel(), rtol=1e-5, atol=1e-9)


def test_identical_rewards_give_unit_weights_and_weights_are_bounded_check_3(tiny_digits_teacher):
    constant = make_gndm(tiny_digits_teacher, rewards=[ConstantReward(name="constant")], cold_start=0)
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    _, grad, logs = loss_and_grad(constant, x0)  # W1 only (not differentiable), all Â = 0
    _, plain, _ = loss_and_grad(make_gndm(tiny_digits_teacher), x0)
    assert logs["train/weight_min"] == logs["train/weight_max"] == 1.0 and torch.equal(grad, plain)
    weighted = make_gndm(tiny_digits_teacher, adv_weighting="clipped", rdm_scalar="elbo_diff", rdm_draws=3)
    _, _, logs = loss_and_grad(weighted, x0)
    assert 0.0 <= logs["train/weight_min"] < logs["train/weight_max"] <= 1.0 + 0.5 * 2.0


def test_refl_sum_adds_dmdrs_hinge_to_the_gndm_loss(tiny_digits_teacher):
    module = make_gndm(tiny_digits_teacher, rewards=[CountingReward()], cold_start=0, reward_combination="refl_sum")
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    loss, _, logs = loss_and_grad(module, x0)
    plain, _, _ = loss_and_grad(make_gndm(tiny_digits_teacher), x0)  # both at u = 0
    scores = module.rewards.terms[0].reward.score(module.backbone.decode(x0), PROMPTS)
    torch.testing.assert_close(loss, plain + hinge_reward_loss(scores, 0.5, 0.7))
    assert "reward/counting" in logs


def test_constructor_checks_rewards(tiny_digits_teacher):
    backbone = DigitsBackbone(str(tiny_digits_teacher))
    with pytest.raises(ValueError, match=r"missing \['counting'\]"):
        GNDM(backbone, rewards=[CountingReward()])
    with pytest.raises(ValueError, match="not differentiable"):
        make_gndm(tiny_digits_teacher, rewards=[ConstantReward(name="c")], reward_combination="refl_sum")
    with pytest.raises(ValueError, match="reserved"):
        make_gndm(tiny_digits_teacher, rewards=[CountingReward(name="dm")])
    assert make_gndm(tiny_digits_teacher).reward_models() == {}


@pytest.mark.parametrize("rewards", [(), (CountingReward(),)], ids=["gndm", "gndmr"])
def test_short_fit_changes_the_generator(tiny_digits_teacher, rewards):
    module = make_gndm(tiny_digits_teacher, rewards=rewards, cold_start=1, ratio=1, lambda_ramp_updates=1)
    before = [p.detach().clone() for p in module.generator.parameters()]
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        max_steps=6)  # 3 iterations: generator + critic steps
    trainer.fit(module, DigitsDataModule(batch_size=8, group_size=4))
    assert module.generator_updates == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, module.generator.parameters()))
    if rewards:
        assert rewards[0].calls > 0


# ---- importance sampling (docs/methods/gndm.md, "Importance sampling") ------------------------
def make_is_gndm(teacher, ratio=1, **importance) -> GNDM:
    return GNDM(DigitsBackbone(str(teacher)), dmdr=DMDRConfig(cold_start_updates=0),
                importance_sampling=ImportanceSamplingConfig(enabled=True, **importance),
                dmd=DMDConfig(generator_update_ratio=ratio, norm_eps=1e-8))


def stored_prefix(module, step: int) -> tuple[StoredRollout, object]:
    """A stored rollout of ``step`` prefix steps for PROMPTS, as a fresh generator update stores it."""
    module.shared_randint = lambda high: step
    state = module.training_inputs({"prompts": PROMPTS}, update_generator=True)
    assert torch.equal(state.sample_weights, torch.ones(len(PROMPTS)))  # ρ = 1 on the first use
    assert state.critic_weights is None and not isinstance(state, ReuseIteration)
    assert torch.equal(state.x_in, module.stored_rollout.trajectory.latents[-1])
    assert torch.allclose(state.level, torch.full((len(PROMPTS),), float(module.student_levels()[step])))
    return module.stored_rollout, state.cond


@pytest.mark.parametrize("log_prob", ["exact_mean", "exact_sum"])
def test_importance_ratio_is_one_unchanged_then_clipped_and_detached_check_5(tiny_digits_teacher, log_prob):
    module = make_is_gndm(tiny_digits_teacher, log_prob=log_prob)
    stored, cond = stored_prefix(module, step=3)
    assert stored.trajectory.num_steps == 3 and all(stored.trajectory.trainable)
    # Under the rollout's own parameters the recomputed log-probs are bit-identical: ρ = 1 exactly.
    assert torch.equal(module.prefix_ratio(stored.trajectory, cond), torch.ones(len(PROMPTS)))
    with torch.no_grad():
        for p in module.generator.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ratios = module.prefix_ratio(stored.trajectory, cond)
    epsilon = 1e-3 if log_prob == "exact_mean" else 0.2
    steps = 1 if log_prob == "exact_mean" else 3  # exact_sum multiplies per-step clipped ratios
    assert not ratios.requires_grad
    assert ((ratios >= (1 - epsilon) ** steps) & (ratios <= (1 + epsilon) ** steps)).all()
    assert not torch.equal(ratios, torch.ones_like(ratios))
    # The reuse hands those ratios to the loss and then drops the rollout (n_reuse = 2).
    incoming = {"prompts": ["a handwritten digit 7"] * 8}
    state = module.training_inputs(incoming, update_generator=True)
    assert state.reused is stored and state.prompts == PROMPTS and torch.equal(state.sample_weights, ratios)
    assert state.batch is incoming and state.critic_weights is None  # target=generator: the critic's weights stay 1
    assert torch.equal(state.x_in, stored.trajectory.latents[-1]) and module.stored_rollout is None


def test_prefix_of_zero_steps_is_pure_noise_with_unit_ratio(tiny_digits_teacher):
    module = make_is_gndm(tiny_digits_teacher)
    stored, cond = stored_prefix(module, step=0)
    assert stored.trajectory.num_steps == 0
    assert torch.equal(module.prefix_ratio(stored.trajectory, cond), torch.ones(len(PROMPTS)))


def test_importance_weights_scale_each_samples_gradient(tiny_digits_teacher):
    module = make_is_gndm(tiny_digits_teacher)
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    ratios = torch.linspace(0.999, 1.001, 8)
    _, plain, _ = loss_and_grad(module, x0)
    module.rng.manual_seed(0)
    x = x0.clone().requires_grad_()
    cond = module.backbone.encode_prompts(PROMPTS)
    state = loss_state(x, cond, module.backbone.empty_conditioning(8), {"prompts": PROMPTS}, sample_weights=ratios)
    loss, logs = module.generator_loss(x, state)
    loss.backward()
    torch.testing.assert_close(x.grad, plain * ratios.view(-1, 1, 1, 1), rtol=1e-6, atol=0)
    assert logs["train/is_ratio_min"] == ratios.min()


@pytest.mark.parametrize("target", ["generator", "fake_score"])
def test_the_critic_of_a_reuse_trains_on_a_fresh_rollout_or_on_the_reused_one_weighted(tiny_digits_teacher, target):
    module = make_is_gndm(tiny_digits_teacher, target=target)
    stored, _ = stored_prefix(module, step=2)
    incoming = {"prompts": ["a handwritten digit 7"] * 8}
    state = module.training_inputs(incoming, update_generator=True)
    x0 = module.backbone.predict_x0(module.generator, state.x_in, state.level, state.cond)
    critic, critic_x0 = module.critic_inputs(state, x0)
    if target == "fake_score":  # the reused samples, weighted by ρ
        assert critic is state and critic_x0 is x0 and torch.equal(critic.critic_weights, state.sample_weights)
        return
    # A fresh rollout of the incoming batch, unweighted; the generator's state is left as it was.
    assert critic.prompts == incoming["prompts"] and critic.batch is incoming and type(critic) is Iteration
    assert critic.critic_weights is None and critic.sample_weights is None
    assert module.rollouts["fake_score"] == 1 and not torch.equal(critic.x_in, state.x_in)
    expected = module.backbone.encode_prompts(incoming["prompts"]).tensors
    assert all(torch.equal(critic.cond.tensors[k], v) for k, v in expected.items())
    assert not critic_x0.requires_grad and state.prompts == PROMPTS


@pytest.mark.parametrize("target", ["generator", "fake_score"])
def test_each_rollout_serves_n_reuse_generator_updates(tiny_digits_teacher, target):
    module = make_is_gndm(tiny_digits_teacher, ratio=2, reuses=2, target=target)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        max_steps=12)  # 8 iterations, 4 generator updates
    trainer.fit(module, DigitsDataModule(batch_size=8, group_size=4))
    assert module.generator_updates == 4 and module.iterations == 8
    assert module.rollouts["generator"] == 2  # half the generator updates roll out afresh
    # Critic-only iterations always roll out; reuse iterations do too when the critic trains on fresh samples.
    assert module.rollouts["fake_score"] == (4 + 2 if target == "generator" else 4)


def test_stored_rollout_survives_a_checkpoint(tiny_digits_teacher):
    module = make_is_gndm(tiny_digits_teacher, rule="flowgrpo_sde")
    stored, cond = stored_prefix(module, step=2)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    restored = make_is_gndm(tiny_digits_teacher, rule="flowgrpo_sde")
    restored.on_load_checkpoint(checkpoint)
    assert restored.stored_rollout.prompts == PROMPTS and restored.stored_rollout.uses == 1
    assert all(torch.equal(a, b) for a, b in zip(restored.stored_rollout.trajectory.latents, stored.trajectory.latents))
    assert torch.equal(restored.prefix_ratio(restored.stored_rollout.trajectory, cond), torch.ones(len(PROMPTS)))


def test_importance_sampling_needs_a_flow_schedule(tiny_digits_teacher):
    backbone = DigitsBackbone(str(tiny_digits_teacher))
    backbone.schedule = VPSchedule()
    with pytest.raises(ValueError, match="not a FlowSchedule"):
        GNDM(backbone, importance_sampling=ImportanceSamplingConfig(enabled=True))
    with pytest.raises(ValueError, match="importance_sampling.rule must be one of"):
        ImportanceSamplingConfig(rule="ddim")


# ---- A3: mode=grpo ------------------------------------------------------------------------------
def test_a3_steps_on_the_rdm_advantage_of_cps_rollouts(tiny_digits_teacher):
    module = make_gndm(tiny_digits_teacher, rewards=(CountingReward(),), cold_start=0, mode="grpo",
                       rdm_scalar="elbo_diff", lambda_path=0.5)
    state = module.training_inputs({"prompts": PROMPTS}, update_generator=True)
    trajectory = state.trajectory
    assert trajectory.rule == "cps" and trajectory.trainable == [True, True, True, False]
    x0 = module.backbone.predict_x0(module.generator, state.x_in, state.level, state.cond)
    loss, logs = module.generator_loss(x0, state)
    assert logs["train/policy_kept"] == 1.0 and "train/loss_dm" in logs and "reward/counting" in logs
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.generator.parameters())
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, max_steps=4)
    trainer.fit(make_gndm(tiny_digits_teacher, ratio=1, mode="grpo"), DigitsDataModule(batch_size=8, group_size=4))
    assert "train/loss_policy" in trainer.callback_metrics


def test_a3_refuses_importance_sampling_and_one_step_students(tiny_digits_teacher):
    backbone = DigitsBackbone(str(tiny_digits_teacher))
    with pytest.raises(ValueError, match="not with mode='grpo'"):
        GNDM(backbone, gndm=GNDMConfig(mode="grpo"), importance_sampling=ImportanceSamplingConfig(enabled=True))
    with pytest.raises(ValueError, match=">= 2 steps"):
        GNDM(backbone, gndm=GNDMConfig(mode="grpo"), student=StudentConfig(num_steps=1))
    with pytest.raises(ValueError, match="mode must be one of"):
        GNDMConfig(mode="ppo")


@pytest.mark.parametrize("group_level", [True, False])
def test_dm_levels_are_shared_within_a_group(tiny_digits_teacher, group_level):
    module = make_gndm(tiny_digits_teacher, group_level=group_level)
    levels = module.dm_levels(8).view(2, 4)
    shared = bool((levels == levels[:, :1]).all())
    assert shared == group_level
    assert levels[0, 0] != levels[1, 0]
