"""examples/custom_method.py: a reward-based method in one file, trained for a few steps."""
from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from examples.custom_method import SoftReward, SoftRewardDMD, SoftRewardGNDM, SoftRewardRTDMD  # noqa: E402
from rdm_lightning.backbones import DigitsBackbone  # noqa: E402
from rdm_lightning.cli import main  # noqa: E402
from rdm_lightning.data import DigitsDataModule  # noqa: E402
from rdm_lightning.methods import DMDConfig, DMDRConfig, GNDMConfig, OptimizerConfig, RTDMDConfig  # noqa: E402
from rdm_lightning.rewards import StrokeContrastReward  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def make(teacher, temperature=0.05) -> SoftRewardDMD:
    reward = StrokeContrastReward(name="stroke")
    return SoftRewardDMD(
        DigitsBackbone(str(teacher)), rewards=[reward], temperature=temperature,
        dmdr=DMDRConfig(cold_start_updates=1, reward_weights={"stroke": 1.0}), dmd=DMDConfig(generator_update_ratio=1),
    )


def test_soft_reward_term_keeps_a_gradient_above_the_margin(tiny_digits_teacher):
    module = make(tiny_digits_teacher)
    scores = torch.tensor([0.2, 0.9], requires_grad=True)
    module.reward_loss(scores, 1.0, module.dmdr.reward_hinge).backward()
    assert scores.grad[0] == pytest.approx(-0.5, abs=1e-4)  # far below the margin: the hinge's −w/B
    assert -0.5 < scores.grad[1] < 0  # above the margin the hinge gives 0; the softplus still pushes
    with pytest.raises(ValueError, match="temperature"):
        make(tiny_digits_teacher, temperature=0)


def test_custom_method_trains_past_the_cold_start(tiny_digits_teacher, tmp_path):
    module = make(tiny_digits_teacher)
    module.max_generator_updates = 3
    before = module.generator.conv_out.weight.clone()
    L.Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path).fit(module, DigitsDataModule(batch_size=8))
    assert module.generator_updates == 3
    assert not torch.equal(before, module.generator.conv_out.weight)


def test_custom_method_is_configurable_from_the_cli(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/digits/dmdr.yaml", "--model.class_path=examples.custom_method.SoftRewardDMD",
              "--model.init_args.temperature=0.1", "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["class_path"] == "examples.custom_method.SoftRewardDMD"
    assert model["init_args"]["temperature"] == 0.1 and model["init_args"]["dmdr"]["reward_hinge"] == 0.7


def soft_method(name: str, teacher):
    """Each reward-driven method with a differentiable reward term, the softplus mixed in, past its cold start."""
    backbone, reward = DigitsBackbone(str(teacher)), StrokeContrastReward(name="stroke")
    dmdr = DMDRConfig(cold_start_updates=1, reward_weights={"stroke": 1.0})
    if name == "dmdr":
        return SoftRewardDMD(backbone, rewards=[reward], dmdr=dmdr, dmd=DMDConfig(generator_update_ratio=1)), 1
    if name == "gndmr":
        return SoftRewardGNDM(backbone, rewards=[reward], dmdr=dmdr, gndm=GNDMConfig(reward_combination="refl_sum"),
                              dmd=DMDConfig(generator_update_ratio=1, norm_eps=1e-8)), 4
    return SoftRewardRTDMD(backbone, rewards=[reward], rtdmd=RTDMDConfig(group_size=4, reward_weights={"stroke": 1.0}),
                           dmd=DMDConfig(guidance_scale=1.5), generator_optimizer=OptimizerConfig(lr=1e-3)), 4


@pytest.mark.parametrize("name", ["dmdr", "gndmr", "rtdmd"])
def test_the_reward_hook_override_takes_effect_in_every_reward_method(tiny_digits_teacher, tmp_path, monkeypatch, name):
    module, group_size = soft_method(name, tiny_digits_teacher)
    module.max_generator_updates = 2
    calls, soft = [], SoftReward.reward_loss

    def recorded(self, scores, weight, hinge):
        loss = soft(self, scores, weight, hinge)
        calls.append((scores.requires_grad, loss.requires_grad))
        return loss

    monkeypatch.setattr(SoftReward, "reward_loss", recorded)
    L.Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path).fit(
        module, DigitsDataModule(batch_size=8, group_size=group_size))
    assert module.generator_updates == 2
    # The override ran in the generator's loss, on scores that carry the gradient back to the generator.
    assert calls and all(with_grad for pair in calls for with_grad in pair)
