"""GDMD (gdmd.md acceptance checks 1, 2, 4, 5 and check 3 at the module level) on a tiny random digits teacher.

The weight functions themselves (check 3: group mean 1 without cap, cap respected)
are covered in ``tests/test_advantages.py``.
"""
from __future__ import annotations

import lightning as L
import pytest
import torch

from rdm_lightning.backbones import DigitsBackbone
from rdm_lightning.core.advantages import group_advantages, softmax_group_weights
from rdm_lightning.core.dmd import dmd_gradient
from rdm_lightning.data.digits import DigitsDataModule
from rdm_lightning.methods import GDMD, DMDConfig, GDMDConfig, OptimizerConfig
from rdm_lightning.rewards import StrokeContrastReward

pytestmark = pytest.mark.filterwarnings(
    "ignore:GDMD group_size=.*:UserWarning",
    "ignore:.*is an instance of `nn.Module`:UserWarning",
    "ignore:.*module\\(s\\) in eval mode:UserWarning",
    "ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`:UserWarning",
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*LeafSpec",
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


def make_gdmd(teacher, rewards=None, **overrides) -> GDMD:
    rewards = rewards or [RecordingReward()]
    settings = dict(group_size=K, cold_start_updates=0, reward_weights={r.name: 1.0 for r in rewards})
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
    loss, logs = module.generator_loss(x0, cond, uncond, {"prompts": PROMPTS})
    (grad,) = torch.autograd.grad(loss, x0)
    module.rng.set_state(state)
    dm_loss, gradient = module.distribution_matching_loss(x0, cond, uncond)
    (dm_grad,) = torch.autograd.grad(dm_loss, x0)
    return loss, grad, logs, dm_loss, dm_grad, gradient


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
    group_gradient = module.dm_gradient(x0, x0_real, x0_fake)
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
        module.generator_loss(x0, cond, uncond, {"prompts": mixed})
    with pytest.raises(ValueError, match="not a multiple of group_size=4"):
        module.generator_loss(x0[:6], cond, uncond, {"prompts": PROMPTS[:6]})


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
    ]:
        with pytest.raises(ValueError, match=message):
            GDMDConfig(**bad)
    with pytest.raises(NotImplementedError, match="grpo"):
        GDMDConfig(mode="grpo")
    with pytest.raises(NotImplementedError, match="B2"):
        GDMDConfig(b2_weight=0.1)
    with pytest.warns(UserWarning, match="K >= 8"):
        GDMDConfig(group_size=4)


def test_short_fit_runs_and_changes_the_generator(tiny_digits_teacher):
    module = GDMD(
        DigitsBackbone(str(tiny_digits_teacher)),
        rewards=[RecordingReward()],
        gdmd=GDMDConfig(group_size=K, cold_start_updates=1, reward_weights={"recording": 1.0}),
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
