"""``dmd.generator_samples``: which generator x̂0 the DM loss and the fake score see (``docs/methods/dmd.md``)."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from rdm_lightning.backbones import DigitsBackbone
from rdm_lightning.backbones.mixture import MixtureBackbone, MixtureDataModule
from rdm_lightning.methods import (
    ACDMD, DMD, DMDR, GDMD, GNDM, RTDMD, DMDRConfig, GDMDConfig, GNDMConfig, ImportanceSamplingConfig,
)
from rdm_lightning.methods.base import StudentConfig
from rdm_lightning.methods.dmd import GENERATOR_SAMPLES, DMDConfig
from rdm_lightning.methods.optim import OptimizerConfig
from rdm_lightning.rewards import StrokeContrastReward

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ROLLOUT = DMDConfig(guidance_scale=1.0, generator_update_ratio=2, generator_samples="rollout")


def mixture_dmd(dmd: DMDConfig, num_steps: int = 4, updates: int = 3) -> DMD:
    torch.manual_seed(0)
    return DMD(
        MixtureBackbone(), dmd=dmd, generator_optimizer=OptimizerConfig(lr=1e-3),
        fake_score_optimizer=OptimizerConfig(lr=1e-3), student=StudentConfig(num_steps=num_steps), seed=0,
        max_generator_updates=updates,
    )


def fit(module: DMD) -> None:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=MixtureDataModule(batch_size=32, seed=0))


def test_generator_samples_settings_are_checked():
    assert DMDConfig().generator_samples == "backward_simulation"
    assert GENERATOR_SAMPLES == ("backward_simulation", "first_step", "rollout")
    with pytest.raises(ValueError, match=r"generator_samples='unrolled': expected one of \('backward_simulation'"):
        DMDConfig(generator_samples="unrolled")
    with pytest.raises(ValueError, match="already fits the rollout's final output"):
        DMDConfig(generator_samples="rollout", critic_on_final_step=True)


def test_rollout_sends_the_gradient_through_every_student_step(monkeypatch):
    module = mixture_dmd(ROLLOUT)
    outputs, levels = [], []
    predict = module.backbone.predict_x0

    def record(network, x, t, cond):
        out = predict(network, x, t, cond)
        if network is module.generator:
            if out.requires_grad:
                out.retain_grad()
            outputs.append(out)
            levels.append(float(t[0]))
        return out

    monkeypatch.setattr(module.backbone, "predict_x0", record)
    cond = module.backbone.encode_prompts(["class 0", "class 1", "class 2"])
    x_in, level = module.generator_input(cond, 3)
    assert torch.equal(level, module.student_levels()[:1].expand(3))
    with module.trainable_role("generator"):
        x0 = module.generator_x0(x_in, level, cond)
        assert levels == pytest.approx(module.student_levels().tolist())
        assert x0 is outputs[-1]  # the sample is the last step's x̂0
        x0.square().sum().backward()
        for step, out in enumerate(outputs):
            assert out.grad is not None and out.grad.abs().sum() > 0, f"no gradient reaches step {step}"
        # Backward simulation: the input comes from a no-grad prefix; the sample is one step's x̂0.
        outputs.clear()
        module.dmd = DMDConfig(guidance_scale=1.0)
        x_in, level = module.generator_input(cond, 3)
        assert not x_in.requires_grad and not any(out.requires_grad for out in outputs)
        outputs.clear()
        module.generator_x0(x_in, level, cond)
        assert len(outputs) == 1 and outputs[0].requires_grad


def test_rollout_fits_the_fake_score_to_the_rollouts_it_trains_on(monkeypatch):
    module = mixture_dmd(ROLLOUT)
    rollouts, critic_batches, dm_samples = [], [], []
    rollout_x0 = DMD.rollout_x0
    monkeypatch.setattr(DMD, "rollout_x0", lambda self, noise, cond: rollouts.append(rollout_x0(self, noise, cond)) or rollouts[-1])
    fake_score_loss = module.fake_score_loss
    module.fake_score_loss = lambda x0, state: (critic_batches.append(x0.clone()), fake_score_loss(x0, state))[1]
    generator_loss = module.generator_loss
    module.generator_loss = lambda x0, state: (dm_samples.append(x0), generator_loss(x0, state))[1]
    monkeypatch.setattr(DMD, "final_step_samples", lambda *a: pytest.fail("no extra rollout with generator_samples=rollout"))
    fit(module)
    assert module.generator_updates == 3 and len(rollouts) == len(critic_batches) == module.iterations
    for rollout, batch in zip(rollouts, critic_batches, strict=True):
        torch.testing.assert_close(rollout.detach(), batch, atol=0, rtol=0)
    assert len(dm_samples) == 3 and all(x0.requires_grad for x0 in dm_samples)


@pytest.mark.parametrize("method", ["acdmd", "rtdmd", "gndm_grpo", "gndm_is", "gdmd_grpo"])
def test_methods_that_cannot_train_on_a_rollout_refuse_it(method, tiny_digits_teacher):
    backbone = DigitsBackbone(str(tiny_digits_teacher))
    dmd = DMDConfig(generator_samples="rollout")
    reward = StrokeContrastReward()
    build, message = {
        "acdmd": (lambda: ACDMD(backbone, dmd=dmd), r"ACDMD trains with dmd.generator_samples in \(.*\), got 'rollout'"),
        "rtdmd": (lambda: RTDMD(backbone, rewards=[reward], dmd=dmd), r"RTDMD trains with dmd.generator_samples in"),
        "gndm_grpo": (lambda: GNDM(backbone, gndm=GNDMConfig(mode="grpo"), dmd=dmd), "not with gndm.mode='grpo'"),
        "gndm_is": (lambda: GNDM(backbone, importance_sampling=ImportanceSamplingConfig(enabled=True), dmd=dmd),
                    "importance_sampling.enabled=True"),
        "gdmd_grpo": (lambda: GDMD(backbone, rewards=[reward], gdmd=GDMDConfig(mode="grpo"), dmd=dmd), "not with gdmd.mode='grpo'"),
    }[method]
    with pytest.raises(ValueError, match=message):
        build()


def test_stage_two_refuses_any_generator_samples_but_the_default(tiny_digits_teacher):
    backbone = DigitsBackbone(str(tiny_digits_teacher))
    with pytest.raises(ValueError, match=r"RTDMD trains with dmd.generator_samples in \('backward_simulation',\), got 'first_step'"):
        RTDMD(backbone, rewards=[StrokeContrastReward()], dmd=DMDConfig(generator_samples="first_step"))


def test_acdmd_refuses_critic_on_final_step(tiny_digits_teacher):
    with pytest.raises(ValueError, match="ACDMD has its own critic batch: dmd.critic_on_final_step=true"):
        ACDMD(DigitsBackbone(str(tiny_digits_teacher)), dmd=DMDConfig(critic_on_final_step=True))


@pytest.mark.parametrize("method", ["dmdr", "gndm", "gdmd"])
def test_reward_methods_train_on_the_rollout_output(method, tiny_digits_teacher, monkeypatch):
    backbone = DigitsBackbone(str(tiny_digits_teacher))
    reward = StrokeContrastReward()
    settings = dict(dmd=DMDConfig(generator_samples="rollout"), student=StudentConfig(num_steps=3))
    module = {
        "dmdr": lambda: DMDR(backbone, rewards=[reward], dmdr=DMDRConfig(reward_weights={reward.name: 1.0}), **settings),
        "gndm": lambda: GNDM(backbone, **settings),
        "gdmd": lambda: GDMD(backbone, rewards=[reward], gdmd=GDMDConfig(reward_weights={reward.name: 1.0}), **settings),
    }[method]()
    calls = []
    predict = module.backbone.predict_x0
    monkeypatch.setattr(module.backbone, "predict_x0", lambda net, *a: calls.append(net is module.generator) or predict(net, *a))
    cond = module.backbone.encode_prompts(["a handwritten digit 1"] * 4)
    x_in, level = module.generator_input(cond, 4)
    with module.trainable_role("generator"):
        x0 = module.generator_x0(x_in, level, cond)
    assert calls == [True, True, True] and x0.requires_grad
