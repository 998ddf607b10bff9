"""Modes follow the roles: the trainable roles train in train mode, every frozen part stays in
eval mode, and sampling runs the generator in eval mode (CONTRIBUTING.md, "Writing a new method")."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from rdm_lightning.backbones import DigitsBackbone
from rdm_lightning.backbones.mixture import MixtureBackbone, MixtureDataModule
from rdm_lightning.callbacks.ema import GeneratorEMA
from rdm_lightning.methods import DMD, DMDR, DMDConfig, DMDRConfig, OptimizerConfig
from rdm_lightning.methods.base import StudentConfig, eval_mode
from rdm_lightning.methods.roles import RoleConfig, RolesConfig
from reward_doubles import CountingReward

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore:.*LeafSpec")


class DropoutDenoiser(nn.Module):
    """The exact mixture denoiser with dropout on its output: train mode shows in every call."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.dropout = nn.Dropout(0.5)

    def forward(self, x_t, sigma, weights):
        return self.dropout(self.network(x_t, sigma, weights))


class DropoutMixtureBackbone(MixtureBackbone):
    def load_denoiser(self) -> nn.Module:
        # Loaded in eval mode, as diffusers' from_pretrained hands a network over.
        return DropoutDenoiser(super().load_denoiser()).eval()


def modes(module: nn.Module) -> set[bool]:
    return {sub.training for sub in module.modules()}


def fit(module: DMD, callbacks=()) -> None:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=list(callbacks),
    )
    trainer.fit(module, datamodule=MixtureDataModule(batch_size=16, seed=0))


def test_roles_train_in_train_mode_and_frozen_parts_stay_in_eval_mode(monkeypatch):
    module = DMD(DropoutMixtureBackbone(), dmd=DMDConfig(generator_update_ratio=2), max_generator_updates=2,
                 student=StudentConfig(num_steps=2), seed=0)
    assert modes(module.generator) == {False}  # as loaded: before fit nothing has changed it
    seen = []

    def record(hook):
        def wrapped(*args, **kwargs):
            seen.append({
                "generator": modes(module.generator), "fake_score": modes(module.fake_score),
                "teacher": modes(module.teacher), "backbone": modes(module.backbone),
                "ema": modes(module.generator_ema),
            })
            return hook(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(module, "generator_loss", record(module.generator_loss))
    monkeypatch.setattr(module, "fake_score_loss", record(module.fake_score_loss))
    fit(module, [GeneratorEMA(0.9)])
    # One fake-score step per iteration, one generator loss per generator update.
    assert module.generator_updates == 2 and len(seen) == module.iterations + 2
    for step in seen:
        assert step == {"generator": {True}, "fake_score": {True}, "teacher": {False}, "backbone": {False},
                        "ema": {False}}


def test_generate_samples_in_eval_mode_and_restores_the_modes():
    module = DMD(DropoutMixtureBackbone(), student=StudentConfig(num_steps=2), seed=0)
    module.generator_ema = None
    module.train()
    assert modes(module.generator) == {True} and modes(module.teacher) == {False}
    prompts = ["class 0", "class 1", "class 2"]
    noise = torch.randn(3, 2)

    def sample():
        return module.generate(prompts, noise, generator=torch.Generator().manual_seed(1))

    # Dropout off in the sampler: the same noise gives the same samples, and they equal an
    # explicit eval-mode run of the generator's own sampler.
    first, second = sample(), sample()
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert modes(module.generator) == {True}
    module.generator.eval()
    torch.testing.assert_close(sample(), first, rtol=0, atol=0)
    module.generator.train()
    # The dropout acts in train mode (so the equality above is not vacuous).
    x = noise.clone()
    cond = module.backbone.encode_prompts(prompts)
    level = torch.full((3,), 0.5)
    outputs = [module.backbone.predict_x0(module.generator, x, level, cond) for _ in range(2)]
    assert not torch.equal(*outputs)


def test_eval_mode_restores_each_submodule_mode():
    network = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1), nn.Sequential(nn.Dropout(0.2)))
    network[1].eval()  # a mixed state: the block must restore it, not set one mode everywhere
    with eval_mode(network) as inside:
        assert inside is network and modes(network) == {False}
    assert [sub.training for sub in network.modules()] == [True, True, False, True, True]


def test_lightning_eval_mode_and_back_keep_the_frozen_parts_in_eval_mode():
    module = DMD(DropoutMixtureBackbone(), seed=0)
    module.eval()
    assert modes(module) == {False}
    module.train()
    assert module.training and modes(module.generator) == {True} and modes(module.fake_score) == {True}
    assert modes(module.teacher) == {False} and modes(module.backbone) == {False}


def test_lora_critic_trains_in_train_mode_while_the_teacher_it_shares_weights_with_stays_in_eval(tiny_digits_teacher):
    pytest.importorskip("peft")
    module = DMDR(
        DigitsBackbone(str(tiny_digits_teacher)), rewards=[CountingReward()],
        dmdr=DMDRConfig(reward_weights={"counting": 0.5}),
        roles=RolesConfig(fake_score=RoleConfig(layout="shared_lora", rank=4, alpha=4)),
        dmd=DMDConfig(norm_eps=1e-8), generator_optimizer=OptimizerConfig(lr=1e-3),
        fake_score_optimizer=OptimizerConfig(lr=1e-3),
    )
    module.train()
    assert modes(module.fake_score) == {True}
    assert modes(module.teacher) == {False}
    shared = {id(p) for p in module.teacher.parameters()}
    assert any(id(p) in shared for p in module.fake_score.parameters())  # the weights are the teacher's
