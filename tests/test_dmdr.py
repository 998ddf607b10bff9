"""DMDR (docs/methods/dmdr.md) and its schedules, DynaDG's included."""
from __future__ import annotations

import math

import pytest
import torch

from rdm_lightning.backbones import DigitsBackbone
from rdm_lightning.core.dmd import dmd_gradient, dmd_loss
from rdm_lightning.core.schedules_training import (
    cosine_decay,
    cosine_ramp,
    dynamic_guidance_scale,
    dynamic_renoise_beta,
    hinge_reward_loss,
    sample_beta,
)
from rdm_lightning.methods import DMDR, DMDConfig, DMDRConfig
from rdm_lightning.rewards import DigitsGoldReward, RewardModel
from iterations import loss_state
from reward_doubles import CountingReward

PROMPTS = ["a handwritten digit 2", "a handwritten digit 5"]


def test_dynamic_guidance_schedule_check_1():
    assert dynamic_guidance_scale(0, 0.5, 2000) == 0.5
    assert dynamic_guidance_scale(1000, 0.5, 2000) == pytest.approx(0.25)
    assert dynamic_guidance_scale(2000, 0.5, 2000) == 0.0 and dynamic_guidance_scale(5000, 0.5, 2000) == 0.0
    assert dynamic_guidance_scale(0, 0.5, 0) == 0.0  # K_dg = 0 switches DynaDG off


def test_dynamic_renoise_beta_check_2():
    assert dynamic_renoise_beta(0, 2000) == (4.0, 1.5)
    assert dynamic_renoise_beta(2000, 2000) == (1.0, 1.0) and dynamic_renoise_beta(9999, 2000) == (1.0, 1.0)
    assert dynamic_renoise_beta(0, 0) == (1.0, 1.0)  # K_rs = 0: uniform
    draws = sample_beta(100_000, *dynamic_renoise_beta(0, 2000), torch.Generator().manual_seed(0))
    assert abs(draws.mean().item() - 4 / 5.5) < 0.01


def test_sample_beta_follows_its_generator():
    a = sample_beta(5, 2.0, 3.0, torch.Generator().manual_seed(1))
    b = sample_beta(5, 2.0, 3.0, torch.Generator().manual_seed(1))
    c = sample_beta(5, 2.0, 3.0, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cosine_ramp_and_decay():
    assert cosine_decay(0, 10) == 1.0 and cosine_decay(5, 10) == pytest.approx(0.5) and cosine_decay(10, 10) == 0.0
    assert cosine_ramp(99, 100, 50, 0.3) == 0.0
    assert cosine_ramp(125, 100, 50, 0.3) == pytest.approx(0.15)
    assert cosine_ramp(1000, 100, 50, 0.3) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="period"):
        cosine_decay(1, -1)


def test_hinge_gradient_check_4():
    rewards = torch.tensor([0.2, 0.69, 0.7, 0.9], requires_grad=True)
    hinge_reward_loss(rewards, weight=0.3, hinge=0.7).backward()
    torch.testing.assert_close(rewards.grad, torch.tensor([-0.3 / 4, -0.3 / 4, 0.0, 0.0]))


def test_no_nan_when_all_estimates_coincide_check_6():
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    gradient = dmd_gradient(x.detach(), x.detach(), x.detach(), norm_eps=1e-8)
    assert torch.equal(gradient, torch.zeros_like(gradient))
    loss = dmd_loss(x, gradient)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(x.grad).all()


def make_dmdr(teacher, rewards=None, **dmdr_overrides) -> DMDR:
    rewards = rewards or [CountingReward()]
    config = DMDRConfig(cold_start_updates=2, reward_weights={r.name: 0.5 for r in rewards}, **dmdr_overrides)
    return DMDR(DigitsBackbone(str(teacher)), rewards=rewards, dmdr=config)


def test_cold_start_calls_no_reward_and_loss_is_dm_check_5(tiny_digits_teacher):
    module = make_dmdr(tiny_digits_teacher)
    cond, uncond = module.backbone.encode_prompts(PROMPTS), module.backbone.empty_conditioning(2)
    x0 = torch.randn(2, 1, 8, 8, requires_grad=True)
    state = module.rng.get_state()
    loss, logs = module.generator_loss(x0, loss_state(x0, cond, uncond, {"prompts": PROMPTS}))
    module.rng.set_state(state)
    dm_loss, _, _ = module.distribution_matching_loss(x0, cond, uncond)
    assert module.rewards.terms[0].reward.calls == 0
    assert torch.equal(loss, dm_loss) and not any(k.startswith("reward/") for k in logs)


def test_after_cold_start_the_hinge_term_is_added(tiny_digits_teacher):
    module = make_dmdr(tiny_digits_teacher)
    module.role_updates["generator"] = 2
    cond, uncond = module.backbone.encode_prompts(PROMPTS), module.backbone.empty_conditioning(2)
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    state = module.rng.get_state()
    loss, logs = module.generator_loss(x0, loss_state(x0, cond, uncond, {"prompts": PROMPTS}))
    module.rng.set_state(state)
    dm_loss, _, _ = module.distribution_matching_loss(x0, cond, uncond)
    reward = module.rewards.terms[0].reward
    expected = dm_loss + hinge_reward_loss(reward.score(module.backbone.decode(x0), PROMPTS), 0.5, 0.7)
    torch.testing.assert_close(loss, expected)
    assert reward.calls == 2 and "reward/counting" in logs


def test_rewards_and_gold_rewards_are_checked_and_kept_out_of_checkpoints(tiny_digits_teacher, rdm_cache, monkeypatch):
    monkeypatch.setenv("RDM_CACHE", str(rdm_cache))
    gold = DigitsGoldReward(name="gold")
    with pytest.raises(ValueError, match="gold"):
        make_dmdr(tiny_digits_teacher, rewards=[gold])  # not differentiable: cannot be optimized
    with pytest.raises(ValueError, match=r"missing \['counting'\]"):
        DMDR(DigitsBackbone(str(tiny_digits_teacher)), rewards=[CountingReward()], dmdr=DMDRConfig(reward_weights={}))
    with pytest.raises(ValueError, match="GAN"):
        DMDR(DigitsBackbone(str(tiny_digits_teacher)), rewards=[CountingReward()],
             dmdr=DMDRConfig(reward_weights={"counting": 1.0}), dmd=DMDConfig(gan_generator_weight=0.1))
    module = DMDR(DigitsBackbone(str(tiny_digits_teacher)), rewards=[CountingReward()], gold_rewards=[gold],
                  dmdr=DMDRConfig(reward_weights={"counting": 1.0}))
    assert set(module.reward_models()) == {"counting", "gold/gold"}
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert not any(k.startswith(("rewards.", "gold_rewards.")) for k in checkpoint["state_dict"])
    assert all(isinstance(r, RewardModel) and not any(p.requires_grad for p in r.parameters()) for r in module.reward_models().values())


def test_rewards_live_outside_the_module_tree_compute_in_teacher_dtype_and_move_with_the_module(
        tiny_digits_teacher, rdm_cache, monkeypatch):
    monkeypatch.setenv("RDM_CACHE", str(rdm_cache))
    module = DMDR(DigitsBackbone(str(tiny_digits_teacher)), rewards=[CountingReward()],
                  gold_rewards=[DigitsGoldReward(name="gold")], dmdr=DMDRConfig(reward_weights={"counting": 1.0}),
                  teacher_dtype="bfloat16")
    gold = module.reward_models()["gold/gold"]
    # Not submodules: no strategy wraps, shards or checkpoints them.
    reward_parameters = {id(p) for r in module.reward_models().values() for p in r.parameters()}
    assert reward_parameters and not reward_parameters & {id(p) for p in module.parameters()}
    assert not any(name.startswith(("rewards", "gold_rewards")) for name, _ in module.named_modules())
    assert {p.dtype for p in gold.parameters()} == {torch.bfloat16}
    module.to(torch.float64)
    assert {p.dtype for p in gold.parameters()} == {torch.float64}
    scores = gold.score(torch.rand(2, 1, 8, 8), PROMPTS)
    assert scores.dtype == torch.float32 and scores.shape == (2,)


def test_dynamic_renoise_levels_follow_the_schedule(tiny_digits_teacher):
    module = make_dmdr(tiny_digits_teacher, dynamic_renoise_updates=100)
    early = module.dm_levels(20_000).double().mean().item()
    module.role_updates["generator"] = 100
    late = module.dm_levels(20_000).double().mean().item()
    assert early == pytest.approx(4 / 5.5, abs=0.01) and late == pytest.approx(0.5, abs=0.01)


def test_real_guidance_is_jittered_within_its_range(tiny_digits_teacher):
    module = make_dmdr(tiny_digits_teacher, guidance_jitter=0.5)
    scales = [module.real_guidance_scale() for _ in range(200)]
    w = module.dmd.guidance_scale
    assert min(scales) >= w - 0.5 and max(scales) <= w + 0.5 and max(scales) - min(scales) > 0.8


def test_reward_logging_scores_every_reward_on_fixed_samples(tiny_digits_teacher, rdm_cache, monkeypatch, tmp_path):
    import lightning as L

    from rdm_lightning.callbacks import RewardLogging
    from rdm_lightning.data import DigitsDataModule

    monkeypatch.setenv("RDM_CACHE", str(rdm_cache))
    module = DMDR(DigitsBackbone(str(tiny_digits_teacher)), rewards=[CountingReward()],
                  gold_rewards=[DigitsGoldReward(name="gold")],
                  dmdr=DMDRConfig(cold_start_updates=0, reward_weights={"counting": 0.5}),
                  dmd=DMDConfig(generator_update_ratio=1), max_generator_updates=2)
    logging = RewardLogging(PROMPTS, num_samples=6, every_n_updates=1)
    first = logging.score(module)
    assert set(first) == {f"reward_eval/{n}/{s}" for n in ("counting", "gold/gold") for s in ("mean", "std")}
    assert logging.score(module) == first  # fixed noise: same samples, same scores
    trainer = L.Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[logging])
    trainer.fit(module, DigitsDataModule(batch_size=8))
    assert "reward_eval/gold/gold/std" in trainer.callback_metrics
    assert trainer.callback_metrics["reward_eval/counting/mean"].item() != first["reward_eval/counting/mean"]
    with pytest.raises(ValueError, match="at least one prompt"):
        RewardLogging([])


def test_reward_logging_refuses_a_method_without_rewards(tiny_digits_teacher):
    from rdm_lightning.callbacks import RewardLogging
    from rdm_lightning.methods import DMD

    with pytest.raises(ValueError, match="DMD has no rewards"):
        RewardLogging(PROMPTS).setup(None, DMD(DigitsBackbone(str(tiny_digits_teacher))), "fit")
