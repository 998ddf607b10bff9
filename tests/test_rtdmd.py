"""RTDMD stage 2 (docs/methods/rtdmd.md, "Stage 2, ``RTDMD``").

On the tiny random digits teacher: loading a stage-1 ACDMD checkpoint, SubGRPO step selection and
per-prompt shared noise across simulated ranks (check 4), log-prob recomputation (check 5), the
masked advantages (check 6), one fake-score and one generator step per RL iteration, a short fit,
and a resumed run reproducing the uninterrupted one.
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
from rdm_lightning.core.rtdmd import shared_step_noise, subgrpo_steps
from rdm_lightning.core.stochastic import step_log_prob
from rdm_lightning.data.digits import DigitsDataModule
from rdm_lightning.methods import ACDMD, ACDMDConfig, DMDConfig, OptimizerConfig, StudentConfig
from rdm_lightning.methods.grpo import flow_velocity
from rdm_lightning.methods.roles import RoleConfig, RolesConfig
from rdm_lightning.methods.rtdmd import (
    RTDMD,
    RTDMDConfig,
    masked_rtdmd_advantages,
)
from rdm_lightning.rewards import RewardModel, StrokeContrastReward


K = 4
PROMPTS = ["a handwritten digit 3"] * K + ["a handwritten digit 7"] * K


class BrightnessGold(RewardModel):
    """Mean brightness: a non-differentiable reward (stands in for a gold reward)."""

    def _score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def rewards():
    return [StrokeContrastReward(name="stroke"), StrokeContrastReward(ink_fraction=0.5, name="stroke_half")]


def make_rtdmd(teacher: Path, stage1: Path | None = None, *, lr: float = 1e-3, seed: int = 0, reward_list=None,
               gold=None, max_generator_updates=None, num_steps: int = 4, acdmd: ACDMDConfig = ACDMDConfig(),
               roles: RolesConfig = RolesConfig(), **config) -> RTDMD:
    optimizer = OptimizerConfig(lr=lr)
    return RTDMD(
        DigitsBackbone(path=str(teacher)),
        rewards=rewards() if reward_list is None else reward_list,
        gold_rewards=gold,
        stage1_checkpoint=None if stage1 is None else str(stage1),
        rtdmd=RTDMDConfig(group_size=K, **config),
        acdmd=acdmd,
        dmd=DMDConfig(guidance_scale=1.5),
        generator_optimizer=optimizer,
        fake_score_optimizer=optimizer,
        student=StudentConfig(num_steps=num_steps),
        seed=seed,
        max_generator_updates=max_generator_updates,
        roles=roles,
    )


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def stage1_checkpoint(tiny_digits_teacher, tmp_path_factory) -> Path:
    """A stage-1 ACDMD checkpoint after one iteration (one generator and one fake-score update, EMA 0.99):
    its generator, EMA and fake score all differ from the pretrained network and from each other."""
    torch.manual_seed(0)
    module = ACDMD(
        DigitsBackbone(path=str(tiny_digits_teacher)), acdmd=ACDMDConfig(),
        dmd=DMDConfig(guidance_scale=1.5, generator_update_ratio=1),
        generator_optimizer=OptimizerConfig(lr=1e-2), fake_score_optimizer=OptimizerConfig(lr=1e-2),
        student=StudentConfig(num_steps=4),
    )
    fit = trainer(max_steps=2, callbacks=[GeneratorEMA(decay=0.99)])
    fit.fit(module, DigitsDataModule(batch_size=8))
    assert module.generator_updates == 1 and module.role_updates["fake_score"] == 1
    path = tmp_path_factory.mktemp("stage1") / "last.ckpt"
    fit.save_checkpoint(path)
    return path


def stage1_state(path: Path, prefix: str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def equal_states(module: torch.nn.Module, state: dict) -> bool:
    mine = module.state_dict()
    return mine.keys() == state.keys() and all(torch.equal(mine[k], state[k]) for k in mine)


# ---- configuration and construction ------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [({"group_size": 1}, "group_size"), ({"num_selected_steps": 0}, "num_selected_steps"),
     ({"clip_range": 1.0}, "clip_range"), ({"advantage_clip": 0.0}, "advantage_clip"),
     ({"acdmd_weight": -1.0}, "acdmd_weight"), ({"backprop_weight": math.nan}, "backprop_weight"),
     ({"reward_weights": {"stroke": math.inf}}, "reward_weights")],
)
def test_config_names_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RTDMDConfig(**kwargs)


def test_defaults_follow_the_spec():
    config = RTDMDConfig()
    assert (config.num_selected_steps, config.clip_range, config.advantage_clip) == (2, 1e-5, 5.0)
    assert (config.acdmd_weight, config.backprop_weight, config.backprop_hinge) == (1e-3, 1e-4, 3.0)
    assert ACDMDConfig().eta == 0.9 and ACDMDConfig().consistency_weight == 0.01


def test_stage1_generator_ema_and_fake_score_are_loaded(tiny_digits_teacher, stage1_checkpoint, tmp_path):
    module = make_rtdmd(tiny_digits_teacher, stage1_checkpoint)
    ema, generator = stage1_state(stage1_checkpoint, "generator_ema."), stage1_state(stage1_checkpoint, "generator.")
    assert module.stage1_source == "generator_ema"
    assert equal_states(module.generator, ema) and not equal_states(module.generator, generator)
    assert equal_states(module.fake_score, stage1_state(stage1_checkpoint, "fake_score."))
    assert not equal_states(module.generator, module.teacher.state_dict())
    # Only weights come over: stage 2 starts at iteration 0, with its own stream.
    assert module.rl_iterations == module.iterations == module.generator_updates == 0
    # Without an EMA in the checkpoint, the stage-1 generator itself.
    checkpoint = torch.load(stage1_checkpoint, map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("generator_ema.")}
    torch.save(checkpoint, tmp_path / "no_ema.ckpt")
    module = make_rtdmd(tiny_digits_teacher, tmp_path / "no_ema.ckpt")
    assert module.stage1_source == "generator" and equal_states(module.generator, generator)


def test_other_student_levels_than_stage1_warn(tiny_digits_teacher, stage1_checkpoint):
    with pytest.warns(UserWarning, match=r"trained student levels \[1\.0, 0\.75, 0\.5, 0\.25\], stage 2 uses \[1\.0, 0\.5\]"):
        module = make_rtdmd(tiny_digits_teacher, stage1_checkpoint, num_steps=2, num_selected_steps=1)
    assert module.selected_steps(0) == [0]


def test_bad_stage1_checkpoints_are_refused_clearly(tiny_digits_teacher, tmp_path):
    missing = tmp_path / "runs" / "nothing.ckpt"
    with pytest.raises(FileNotFoundError, match=f"stage1_checkpoint.*not found at '{missing}'"):
        make_rtdmd(tiny_digits_teacher, missing)
    torch.save({"epoch": 0}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        make_rtdmd(tiny_digits_teacher, tmp_path / "plain.pt")
    torch.save({"state_dict": {"generator.conv1.base_layer.weight": torch.zeros(1),
                               "generator.conv1.lora_A.default.weight": torch.zeros(1),
                               "fake_score.conv1.weight": torch.zeros(1)}}, tmp_path / "lora.ckpt")
    with pytest.raises(ValueError, match="LoRA weights for the generator, but its hyperparameters give roles.generator no LoRA"):
        make_rtdmd(tiny_digits_teacher, tmp_path / "lora.ckpt")
    shared = RoleConfig(layout="shared_lora", rank=2)
    with pytest.raises(ValueError, match="continues stage 1's adapter on the teacher's weights, but .* trained the generator as 'full'"):
        make_rtdmd(tiny_digits_teacher, tmp_path / "lora.ckpt", roles=RolesConfig(generator=shared, fake_score=shared))


def test_non_differentiable_optimized_reward_is_refused(tiny_digits_teacher):
    with pytest.raises(ValueError, match=r"reward backprop.*\['gold'\] are not differentiable"):
        make_rtdmd(tiny_digits_teacher, reward_list=[BrightnessGold(name="gold")])
    with pytest.raises(ValueError, match="at least one reward"):
        make_rtdmd(tiny_digits_teacher, reward_list=[])
    # Through the advantages only, any reward is fine.
    make_rtdmd(tiny_digits_teacher, reward_list=[BrightnessGold(name="gold")], backprop_weight=0.0)
    with pytest.raises(ValueError, match="exceeds the 3 stochastic steps"):
        make_rtdmd(tiny_digits_teacher, num_selected_steps=4)


def test_eps_vp_backbone_is_refused(tmp_path):
    config = DigitsConfig(prediction="epsilon", channels=8)
    folder = save_digits_model(
        tmp_path / "eps", config, DigitsTextEncoder(config.text_dim, config.max_tokens), DigitsDenoiser(8, config.text_dim)
    )
    with pytest.raises(ValueError, match="rolls out flow steps .*has a VPSchedule, not a FlowSchedule"):
        RTDMD(DigitsBackbone(path=str(folder)), rewards=rewards())


# ---- SubGRPO steps and shared noise ------------------------------------------------------------------
def step_noise_used(rollout, j: int) -> torch.Tensor:
    """ξ_j recovered from the recorded transition: (x_{j+1} − μ_j)/ς_j."""
    t = rollout.trajectory
    return (t.latents[j + 1] - t.means[j]) / t.stds[j]


@pytest.mark.parametrize("iteration", [0, 1, 7])
def test_subgrpo_steps_and_shared_noise_agree_across_ranks_check_4(tiny_digits_teacher, iteration):
    ranks = [make_rtdmd(tiny_digits_teacher) for _ in range(2)]
    for rank, module in enumerate(ranks):
        module.rng.manual_seed(module.seed + rank)  # on_fit_start: each rank offsets its stream by its rank
    prompts = [PROMPTS, PROMPTS[K:] + ["a handwritten digit 0"] * K]  # "7" on both ranks
    rollouts = [m.rollout(p, m.backbone.encode_prompts(p), iteration) for m, p in zip(ranks, prompts)]
    selected = subgrpo_steps(0, iteration, [0, 1, 2], 2)
    assert rollouts[0].selected_steps == rollouts[1].selected_steps == selected
    (unselected,) = [j for j in range(3) if j not in selected]
    assert set(rollouts[0].step_noise) == {unselected}
    for rollout, p in zip(rollouts, prompts):
        traj = rollout.trajectory
        assert traj.stochastic == [True, True, True, False] and traj.trainable == [True, True, True, False]
        shared = step_noise_used(rollout, unselected)
        torch.testing.assert_close(shared, shared_step_noise(p, unselected, iteration, (1, 8, 8)), atol=2e-5, rtol=0)
        for g in range(2):
            group = shared[g * K:(g + 1) * K]
            torch.testing.assert_close(group, group[:1].expand_as(group), atol=2e-5, rtol=0)  # all K images
            for j in selected:  # the trained steps draw independent noise per image
                fresh = step_noise_used(rollout, j)[g * K:(g + 1) * K]
                assert not torch.allclose(fresh[0], fresh[1], atol=1e-3)
            initial = traj.latents[0][g * K:(g + 1) * K]
            assert not torch.allclose(initial[0], initial[1])  # initial latents stay independent
    # The prompt shared by both ranks got the same noise on both; its initial latents differ.
    torch.testing.assert_close(step_noise_used(rollouts[0], unselected)[K:], step_noise_used(rollouts[1], unselected)[:K],
                               atol=2e-5, rtol=0)
    assert torch.equal(rollouts[0].step_noise[unselected][K:], rollouts[1].step_noise[unselected][:K])
    assert not torch.allclose(rollouts[0].trajectory.latents[0][K:], rollouts[1].trajectory.latents[0][:K])
    # Another iteration selects by its own seed and draws other shared noise.
    other = ranks[0].rollout(PROMPTS, ranks[0].backbone.encode_prompts(PROMPTS), iteration + 1)
    assert other.selected_steps == subgrpo_steps(0, iteration + 1, [0, 1, 2], 2)
    assert all(not torch.equal(z, rollouts[0].step_noise.get(j, z + 1)) for j, z in other.step_noise.items())


# ---- log-probs ----------------------------------------------------------------------------------------
def test_recomputed_log_probs_give_ratio_one_and_final_step_zero_check_5(tiny_digits_teacher, stage1_checkpoint):
    module = make_rtdmd(tiny_digits_teacher, stage1_checkpoint)
    cond = module.backbone.encode_prompts(PROMPTS)
    rollout = module.rollout(PROMPTS, cond)
    traj = rollout.trajectory
    assert traj.log_prob == "cps_simplified"
    velocity = flow_velocity(module.backbone, module.generator, cond)
    for j in range(3):
        new = step_log_prob(velocity, traj, j)
        assert new.requires_grad and torch.equal(new.detach(), traj.log_probs[j])
        assert torch.equal(torch.exp(new.detach() - traj.log_probs[j]), torch.ones(len(PROMPTS)))
        by_hand = -((traj.latents[j + 1] - traj.means[j]) ** 2).mean(dim=(1, 2, 3))  # −mean_pix((x′ − μ)²)
        torch.testing.assert_close(traj.log_probs[j], by_hand)
        assert (traj.log_probs[j] < 0).all()
    assert torch.equal(traj.log_probs[3], torch.zeros(len(PROMPTS))) and not traj.is_trainable(3)
    assert torch.equal(step_log_prob(velocity, traj, 3), torch.zeros(len(PROMPTS)))
    # The final x̂0 recomputed with grad at the stored x_{σ3} is the rollout's.
    torch.testing.assert_close(module.final_step_x0(rollout, cond), rollout.final_x0, rtol=1e-5, atol=1e-6)
    # Through the loss: every |log ρ| is 0 and the PPO term reaches the generator.
    advantages = torch.linspace(-1, 1, len(PROMPTS))
    loss, logs = module.rl_generator_loss(rollout, advantages, cond, module.backbone.empty_conditioning(len(PROMPTS)))
    assert logs["train/policy_log_ratio_abs"] == 0 and logs["train/policy_kept"] == 1
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.generator.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())


def test_generator_loss_is_ppo_sum_plus_weighted_auxiliaries(tiny_digits_teacher):
    module = make_rtdmd(tiny_digits_teacher)
    cond, uncond = module.backbone.encode_prompts(PROMPTS), module.backbone.empty_conditioning(len(PROMPTS))
    rollout = module.rollout(PROMPTS, cond)
    advantages = torch.linspace(-1, 1, len(PROMPTS))
    module.rng.manual_seed(3)
    loss, logs = module.rl_generator_loss(rollout, advantages, cond, uncond)
    expected = (logs["train/loss_ppo"] + 1e-3 * logs["train/loss_dm"] + logs["train/loss_backprop"]) / 3
    torch.testing.assert_close(loss.detach(), expected.float(), rtol=1e-6, atol=0)
    # ReLU(3 − R) is active (R = sum of two stroke contrasts ≤ 2): L_BP = 1e-4·(3 − mean R).
    torch.testing.assert_close(logs["train/loss_backprop"], 1e-4 * (3 - logs["train/reward_sum"]))
    # Without the auxiliaries and the averaging the loss is Σ_{j∈S} PPO_j.
    plain = make_rtdmd(tiny_digits_teacher, acdmd_weight=0.0, backprop_weight=0.0, average_over_steps=False)
    loss, logs = plain.rl_generator_loss(rollout, advantages, cond, uncond)
    assert "train/loss_dm" not in logs and "train/loss_backprop" not in logs
    torch.testing.assert_close(loss.detach(), logs["train/loss_ppo"])


# ---- advantages ---------------------------------------------------------------------------------------
def test_advantages_are_normalised_masked_and_clipped_check_6():
    gen = torch.Generator().manual_seed(0)
    scores = {"a": torch.randn(64, generator=gen), "b": torch.rand(64, generator=gen)}
    scores["a"][:4], scores["b"][:4] = 0.3, 0.7  # group 0 is constant in every reward
    raw, advantages, keep = masked_rtdmd_advantages(scores, K, None, clip=5.0)
    assert abs(raw.mean().item()) < 1e-6 and raw.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    # The caveat: after the global renormalisation the constant group is ~1e-8, not 0; masked, it is exactly 0.
    assert raw[:4].abs().max() < 1e-6 and not keep[:4].any() and keep[4:].all()
    assert torch.equal(advantages[:4], torch.zeros(4)) and torch.equal(advantages[4:], raw[4:].clamp(-5, 5))
    # An outlier is clipped to ±5 (its renormalised value is above 5).
    outlier = {"a": torch.randn(64, generator=gen)}
    outlier["a"][5] = 1000.0
    raw, advantages, keep = masked_rtdmd_advantages(outlier, K, clip=5.0)
    assert raw[5] > 5 and advantages[5] == 5.0 and advantages.abs().max() <= 5.0
    assert abs(raw.mean().item()) < 1e-6 and raw.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)


def test_module_advantages_use_the_gathered_batch_and_this_ranks_slice(tiny_digits_teacher):
    module = make_rtdmd(tiny_digits_teacher)
    gen = torch.Generator().manual_seed(1)
    mine = {"stroke": torch.rand(8, generator=gen), "stroke_half": torch.rand(8, generator=gen)}
    theirs = {"stroke": torch.rand(8, generator=gen), "stroke_half": torch.rand(8, generator=gen)}
    gathered = {name: torch.cat([theirs[name], mine[name]]) for name in mine}  # rank 0 first; this is rank 1

    def all_gather(values):
        name = next(n for n in mine if torch.equal(mine[n], values))
        return torch.stack([theirs[name], mine[name]])

    module._trainer = SimpleNamespace(global_rank=1, world_size=2)
    module.all_gather = all_gather
    try:
        advantages, logs = module.rollout_advantages(mine)
    finally:
        module._trainer = None
    _, expected, _ = masked_rtdmd_advantages(gathered, K, {"stroke": 1.0, "stroke_half": 1.0})
    assert torch.equal(advantages, expected[8:])
    assert abs(logs["train/advantage_mean"].item()) < 1e-6
    assert logs["train/advantage_std"].item() == pytest.approx(1.0, abs=1e-3)


# ---- the RL iteration and fit -------------------------------------------------------------------------
def record_steps(module: RTDMD) -> list[str]:
    roles = []
    step_role = module.step_role
    module.step_role = lambda role, loss: roles.append(role) or step_role(role, loss)
    return roles


def test_short_fit_one_step_per_role_per_iteration(tiny_digits_teacher, stage1_checkpoint):
    module = make_rtdmd(tiny_digits_teacher, stage1_checkpoint, gold=[BrightnessGold(name="bright")],
                        max_generator_updates=2)
    roles = record_steps(module)
    generator = [p.detach().clone() for p in module.generator.parameters()]
    fake = [p.detach().clone() for p in module.fake_score.parameters()]
    teacher = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    fit = trainer(max_epochs=-1, callbacks=[GeneratorEMA(decay=0.987)])
    fit.fit(module, DigitsDataModule(batch_size=8, group_size=K))
    assert roles == ["fake_score", "generator"] * 2  # one fake-score step, then one generator step
    assert module.rl_iterations == module.iterations == 2 and fit.global_step == 4
    assert module.role_updates == {"generator": 2, "fake_score": 2}
    assert any(not torch.equal(a, b) for a, b in zip(generator, module.generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(fake, module.fake_score.parameters()))
    assert all(torch.equal(teacher[k], v) for k, v in module.teacher.state_dict().items())
    metrics = fit.callback_metrics
    for key in ("reward/stroke", "reward/stroke_half", "reward/gold/bright", "train/loss_ppo", "train/loss_dm",
                "train/loss_backprop", "train/loss_adsm", "train/loss_consistency", "train/loss_generator",
                "train/advantage_abs", "train/policy_log_ratio_abs"):
        assert torch.isfinite(metrics[key]), key
    assert metrics["train/policy_log_ratio_abs"] == 0  # one generator step per iteration: ρ = 1
    assert abs(metrics["train/advantage_mean"]) < 1e-5 and metrics["train/advantage_std"] == pytest.approx(1, abs=1e-2)
    assert set(module.reward_models()) == {"stroke", "stroke_half", "gold/bright"}


def record_rollouts(module: RTDMD) -> list:
    seen = []
    rollout = module.rollout
    module.rollout = lambda prompts, cond, iteration=None: seen.append(rollout(prompts, cond, iteration)) or seen[-1]
    return seen


@pytest.mark.parametrize("batches_per_epoch", [1, 2])  # resume at an epoch boundary, and mid-epoch
def test_resumed_run_reproduces_the_next_iteration(tiny_digits_teacher, tmp_path, batches_per_epoch):
    data = lambda: DigitsDataModule(batch_size=8, group_size=K)  # noqa: E731
    full = make_rtdmd(tiny_digits_teacher, max_generator_updates=2)
    uninterrupted = record_rollouts(full)
    trainer(max_epochs=-1, limit_train_batches=batches_per_epoch).fit(full, data())

    first = make_rtdmd(tiny_digits_teacher, max_generator_updates=1)
    fit = trainer(max_epochs=-1, limit_train_batches=batches_per_epoch)
    fit.fit(first, data())
    assert first.rl_iterations == 1
    fit.save_checkpoint(tmp_path / "after_1.ckpt")

    resumed = make_rtdmd(tiny_digits_teacher, max_generator_updates=2)
    again = record_rollouts(resumed)
    trainer(max_epochs=-1, limit_train_batches=batches_per_epoch).fit(
        resumed, data(), ckpt_path=tmp_path / "after_1.ckpt", weights_only=False  # hparams hold the backbone
    )
    assert resumed.rl_iterations == 2 and len(again) == 1 and len(uninterrupted) == 2
    expected, got = uninterrupted[1], again[0]
    assert got.iteration == expected.iteration == 1
    assert got.selected_steps == expected.selected_steps == subgrpo_steps(0, 1, [0, 1, 2], 2)
    # The shared noise is a function of (prompt, iteration) alone.
    for rollout in (got, expected):
        assert all(torch.equal(z, shared_step_noise(rollout.prompts, j, 1, (1, 8, 8))) for j, z in rollout.step_noise.items())
    if batches_per_epoch == 2:
        # Mid-epoch, Lightning does not fast-forward the (non-stateful) loader, so the resumed iteration
        # may see other prompts than the uninterrupted one; its steps and per-prompt noise still match.
        return
    assert got.prompts == expected.prompts
    assert got.step_noise.keys() == expected.step_noise.keys()
    assert all(torch.equal(got.step_noise[j], expected.step_noise[j]) for j in got.step_noise)
    # Weights, optimizer states and the stream were restored too: the whole rollout repeats bit for bit.
    assert all(torch.equal(a, b) for a, b in zip(got.trajectory.latents, expected.trajectory.latents))
    assert all(torch.equal(a, b) for a, b in zip(full.generator.parameters(), resumed.generator.parameters()))


def test_stage2_checkpoint_loads_without_the_stage1_file(tiny_digits_teacher, stage1_checkpoint, tmp_path):
    copy = tmp_path / "stage1.ckpt"
    copy.write_bytes(stage1_checkpoint.read_bytes())
    module = make_rtdmd(tiny_digits_teacher, copy, max_generator_updates=1)
    fit = trainer(max_epochs=-1, callbacks=[GeneratorEMA(decay=0.987)])
    fit.fit(module, DigitsDataModule(batch_size=8, group_size=K))
    fit.save_checkpoint(tmp_path / "stage2.ckpt")
    copy.unlink()
    restored = RTDMD.load_from_checkpoint(tmp_path / "stage2.ckpt", weights_only=False)
    assert restored.rl_iterations == 1 and restored.stage1_source == "generator_ema"
    for name in ("generator", "generator_ema", "fake_score"):
        assert equal_states(getattr(restored, name), getattr(module, name).state_dict()), name
    checkpoint = torch.load(tmp_path / "stage2.ckpt", map_location="cpu", weights_only=False)
    assert not any(k.startswith(("teacher.", "backbone.", "rewards.", "gold_rewards.")) for k in checkpoint["state_dict"])


# ---- LoRA roles (docs/methods/rtdmd.md, "LoRA roles"): stage-1 adapters merged, fresh ones trained -----
LORA = RolesConfig(generator=RoleConfig(layout="lora", rank=4, alpha=8.0),
                   fake_score=RoleConfig(layout="lora", rank=4, alpha=8.0))


def network_output(network: torch.nn.Module, teacher: Path) -> torch.Tensor:
    """The network's x̂0-side output on fixed inputs (its raw forward through the digits backbone)."""
    backbone = DigitsBackbone(path=str(teacher))
    cond = backbone.encode_prompts(PROMPTS[:2])
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    return flow_velocity(backbone, network, cond)(x, torch.full((2,), 0.6, dtype=torch.float64))


def train_stage1(teacher: Path, roles: RolesConfig, path: Path) -> ACDMD:
    """A stage-1 ACDMD with the role layouts ``roles`` after four optimizer steps (EMA 0.5), saved at ``path``."""
    torch.manual_seed(0)
    module = ACDMD(
        DigitsBackbone(path=str(teacher)), roles=roles,
        dmd=DMDConfig(guidance_scale=1.5, generator_update_ratio=1),
        generator_optimizer=OptimizerConfig(lr=1e-2), fake_score_optimizer=OptimizerConfig(lr=1e-2),
        student=StudentConfig(num_steps=4),
    )
    fit = trainer(max_steps=4, callbacks=[GeneratorEMA(decay=0.5)])
    fit.fit(module, DigitsDataModule(batch_size=8))
    fit.save_checkpoint(path)
    return module


@pytest.fixture(scope="module")
def lora_stage1_checkpoint(tiny_digits_teacher, tmp_path_factory) -> Path:
    """A stage-1 ACDMD checkpoint with role LoRAs (rank 4, α 8) after two iterations."""
    path = tmp_path_factory.mktemp("lora_stage1") / "last.ckpt"
    train_stage1(tiny_digits_teacher, LORA, path)
    return path


def test_acdmd_lora_trains_only_the_adapters(tiny_digits_teacher, lora_stage1_checkpoint):
    state = stage1_state(lora_stage1_checkpoint, "generator.")
    fake = stage1_state(lora_stage1_checkpoint, "fake_score.")
    teacher = DigitsBackbone(path=str(tiny_digits_teacher)).load_denoiser().state_dict()
    module = ACDMD(DigitsBackbone(path=str(tiny_digits_teacher)), roles=LORA)
    for role_state, adapter in ((state, "generator"), (fake, "fake_score")):
        # The checkpoint holds the adapters only (the frozen base is rebuilt), and their B moved off 0.
        lora_keys = [k for k in role_state if "lora_" in k]
        assert lora_keys and all(f".{adapter}." in k for k in lora_keys) and set(lora_keys) == set(role_state)
        assert any(role_state[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)
        # The base stays bit-identical to the pretrained network.
        base = {k: v for k, v in getattr(module, adapter).state_dict().items() if "lora_" not in k}
        assert all(torch.equal(v, teacher[k.replace(".base_layer", "")]) for k, v in base.items())
    owned = module.role_parameters()
    names = {id(p): n for n, p in module.named_parameters()}
    assert all("lora_" in names[id(p)] for params in owned.values() for p in params)
    assert {names[id(p)].split(".")[0] for p in owned["generator"]} == {"generator"}


def test_merge_lora_computes_what_the_adapter_did(tiny_digits_teacher):
    from rdm_lightning.methods.lora import add_lora, merge_lora

    backbone = DigitsBackbone(path=str(tiny_digits_teacher))
    network = add_lora(backbone.load_denoiser(), backbone.lora_target_modules, 4, 8.0, "generator")
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    adapted = network_output(network, tiny_digits_teacher)
    merged = merge_lora(network)
    assert not any("lora_" in k or "base_layer" in k for k in merged.state_dict())
    assert merged.state_dict().keys() == backbone.load_denoiser().state_dict().keys()
    torch.testing.assert_close(network_output(merged, tiny_digits_teacher), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stage2_lora", [False, True])
def test_stage2_merges_stage1_adapters_and_starts_from_stage1_networks(
    tiny_digits_teacher, lora_stage1_checkpoint, stage2_lora
):
    from rdm_lightning.methods.lora import add_lora

    backbone = DigitsBackbone(path=str(tiny_digits_teacher))
    stage1 = {}
    for role, prefix in (("generator", "generator_ema."), ("fake_score", "fake_score.")):
        network = add_lora(backbone.load_denoiser(), backbone.lora_target_modules, 4, 8.0, role)
        network.load_state_dict(stage1_state(lora_stage1_checkpoint, prefix), strict=False)
        stage1[role] = network_output(network, tiny_digits_teacher)
    lora = RoleConfig(layout="lora", rank=2, alpha=4.0)
    module = make_rtdmd(tiny_digits_teacher, lora_stage1_checkpoint,
                        roles=RolesConfig(generator=lora, fake_score=lora) if stage2_lora else RolesConfig())
    assert module.stage1_source == "generator_ema"
    for role in ("generator", "fake_score"):
        # Fresh adapters have B = 0: stage 2 starts from exactly stage 1's (merged) networks.
        torch.testing.assert_close(network_output(getattr(module, role), tiny_digits_teacher), stage1[role],
                                   atol=1e-5, rtol=1e-5)
    names = {id(p): n for n, p in module.named_parameters()}
    owned = module.role_parameters()["generator"]
    if stage2_lora:
        assert owned and all("lora_" in names[id(p)] for p in owned)
        assert all(p.abs().sum() == 0 for n, p in module.generator.named_parameters() if "lora_B" in n)
    else:
        assert not any("lora_" in names[id(p)] for p in owned)


def test_export_merges_the_generator_lora(tiny_digits_teacher, lora_stage1_checkpoint, tmp_path, monkeypatch):
    import rdm_lightning.tools as tools

    module = ACDMD.load_from_checkpoint(lora_stage1_checkpoint, weights_only=False)
    # This checkpoint holds the backbone object (built here, not by `rdm fit`): load it as above.
    monkeypatch.setattr(tools, "load_module", lambda path: module)
    args = tools.build_parser().parse_args(["export", "--checkpoint", "unused.ckpt", "--output", str(tmp_path / "out")])
    exported = DigitsBackbone(path=str(tools.export(args))).load_denoiser()
    assert not any("lora_" in k for k in exported.state_dict())
    torch.testing.assert_close(network_output(exported, tiny_digits_teacher),
                               network_output(module.sampling_generator, tiny_digits_teacher), atol=1e-5, rtol=1e-5)


def test_shared_lora_stage2_continues_the_shared_lora_stage1_adapters(tiny_digits_teacher, stage1_checkpoint, tmp_path):
    shared = RolesConfig(generator=RoleConfig(layout="shared_lora", rank=4), fake_score=RoleConfig(layout="shared_lora", rank=4))
    stage1 = train_stage1(tiny_digits_teacher, shared, tmp_path / "stage1.ckpt")
    module = make_rtdmd(tiny_digits_teacher, tmp_path / "stage1.ckpt", roles=shared)
    assert module.stage1_source == "generator_ema"
    for role, source in (("generator", stage1.generator_ema), ("fake_score", stage1.fake_score)):
        assert torch.equal(network_output(getattr(module, role), tiny_digits_teacher),
                           network_output(source, tiny_digits_teacher))
    teacher = DigitsBackbone(path=str(tiny_digits_teacher)).load_denoiser()
    assert not torch.equal(network_output(module.generator, tiny_digits_teacher), network_output(teacher, tiny_digits_teacher))
    # A full stage 1 has no adapter on the teacher to continue.
    with pytest.raises(ValueError, match="trained the generator as 'full'"):
        make_rtdmd(tiny_digits_teacher, stage1_checkpoint, roles=shared)
