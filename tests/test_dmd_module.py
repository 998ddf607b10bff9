"""The DMD LightningModule end to end on a tiny random digits teacher (docs/methods/dmd.md).

Covers TTUR and gradient isolation between roles, the zero DMD gradient of a
fresh module, backward simulation, frozen roles and checkpoints, NaN and
config errors, the GAN head, the generator EMA, exact resume, and the
optimizer set-up under DeepSpeed (simulated: Lightning runs DeepSpeed on CUDA only).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from safetensors.torch import load_file
from torch import nn

from rdm_lightning.backbones.digits import DigitsBackbone
from rdm_lightning.callbacks import ema as ema_module
from rdm_lightning.callbacks.ema import GeneratorEMA
from rdm_lightning.data.digits import DigitsDataModule
from rdm_lightning.methods import (
    ACDMD,
    ACDMDConfig,
    DMD,
    DMDConfig,
    DMDRConfig,
    GDMD,
    GDMDConfig,
    GNDM,
    GNDMConfig,
    GRPOConfig,
    ImportanceSamplingConfig,
    OptimizerConfig,
    RoleAwareAdamW,
    RTDMDConfig,
    StudentConfig,
    TeacherSamplingConfig,
)
from rdm_lightning.methods.base import TRAINABLE_ROLES
from rdm_lightning.rewards import StrokeContrastReward
from iterations import loss_state


pytestmark = pytest.mark.filterwarnings(
    "ignore:Checkpoint directory .* exists and is not empty",
)

PROMPTS = ["a handwritten digit 3", "a handwritten digit 7", "a handwritten digit 0", "a handwritten digit 9"]


# ---- helpers ------------------------------------------------------------------------------------
def make_module(
    teacher: Path,
    *,
    ratio: int = 5,
    gan: float = 0.0,
    guidance: float = 1.75,
    num_steps: int = 4,
    lr: float = 1e-3,
    warmup: int = 0,
) -> DMD:
    optimizer = OptimizerConfig(lr=lr, warmup_updates=warmup)
    return DMD(
        DigitsBackbone(path=str(teacher)),
        dmd=DMDConfig(guidance_scale=guidance, generator_update_ratio=ratio, gan_generator_weight=gan),
        generator_optimizer=optimizer,
        fake_score_optimizer=optimizer,
        student=StudentConfig(num_steps=num_steps),
    )


def make_trainer(**kwargs) -> L.Trainer:
    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    settings.update(kwargs)
    return L.Trainer(**settings)


def clone_params(*modules: nn.Module | None) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules if m is not None for p in m.parameters()]


def all_equal(before: list[torch.Tensor], *modules: nn.Module | None) -> bool:
    after = clone_params(*modules)
    assert len(before) == len(after)
    return all(torch.equal(a, b) for a, b in zip(before, after))


def none_equal(before: list[torch.Tensor], *modules: nn.Module | None) -> bool:
    """Every parameter tensor changed (used to show an update really happened)."""
    return not any(torch.equal(a, b) for a, b in zip(before, clone_params(*modules)))


def states_equal(a: dict, b: dict) -> bool:
    """Optimizer ``state_dict``s equal bit for bit (state tensors and param-group hyperparameters)."""
    if a["state"].keys() != b["state"].keys():
        return False
    for key in a["state"]:
        sa, sb = a["state"][key], b["state"][key]
        if sa.keys() != sb.keys() or not all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa):
            return False
    return a["param_groups"] == b["param_groups"]


class StepRecorder(L.Callback):
    """Records ``(role, iteration)`` at every optimizer step (a step pre-hook on the real optimizers)."""

    def __init__(self):
        self.steps: list[tuple[str, int]] = []

    def on_train_start(self, trainer, module):
        for role, optimizer in zip(TRAINABLE_ROLES, trainer.optimizers):
            optimizer.register_step_pre_hook(
                lambda _opt, _args, _kwargs, role=role: self.steps.append((role, module.iterations))
            )

    def iterations_of(self, role: str) -> list[int]:
        return [iteration for r, iteration in self.steps if r == role]


def snapshot_step_role(monkeypatch, module: DMD) -> list[dict]:
    """Wrap ``module.step_role`` to snapshot every role's parameters right before and after each call."""
    records: list[dict] = []
    original = module.step_role

    def step_role(role, loss):
        critic = clone_params(module.fake_score, module.discriminator_head)
        generator = clone_params(module.generator)
        original(role, loss)
        records.append(
            {
                "role": role,
                "iteration": module.iterations,
                "critic_unchanged": all_equal(critic, module.fake_score, module.discriminator_head),
                "generator_unchanged": all_equal(generator, module.generator),
            }
        )

    monkeypatch.setattr(module, "step_role", step_role)
    return records


# ---- 1 + 7: TTUR, gradient isolation, GAN head --------------------------------------------------
def test_ttur_steps_and_role_isolation(tiny_digits_teacher, monkeypatch):
    """Acceptance check 3: with r = 5 over 20 iterations the generator steps at 0, 5, 10, 15 only."""
    module = make_module(tiny_digits_teacher, ratio=5, gan=1e-2)
    recorder = StepRecorder()
    records = snapshot_step_role(monkeypatch, module)
    trainer = make_trainer(max_steps=24, callbacks=[recorder])  # 20 critic steps + 4 generator steps
    trainer.fit(module, DigitsDataModule(batch_size=16))

    assert module.iterations == 20
    assert recorder.iterations_of("generator") == [0, 5, 10, 15]
    assert recorder.iterations_of("fake_score") == list(range(20))
    assert module.generator_updates == 4
    assert module.role_updates == {"generator": 4, "fake_score": 20}
    assert trainer.global_step == 24  # Lightning counts every role's optimizer steps
    # Within an iteration the generator updates first, then the critic (docs/methods/dmd.md).
    assert recorder.steps[:3] == [("generator", 0), ("fake_score", 0), ("fake_score", 1)]

    generator_steps = [r for r in records if r["role"] == "generator"]
    critic_steps = [r for r in records if r["role"] == "fake_score"]
    assert len(generator_steps) == 4 and len(critic_steps) == 20
    # Across a generator update the fake score and the GAN head are bit-identical, and vice versa.
    assert all(r["critic_unchanged"] and not r["generator_unchanged"] for r in generator_steps)
    assert all(r["generator_unchanged"] and not r["critic_unchanged"] for r in critic_steps)


def test_gan_head_trains_with_the_fake_score(tiny_digits_teacher, monkeypatch):
    module = make_module(tiny_digits_teacher, ratio=2, gan=1e-2)
    head = module.discriminator_head
    assert head is not None
    assert make_module(tiny_digits_teacher, gan=0.0).discriminator_head is None  # w_G = 0 disables it
    head_before = clone_params(head)
    recorder = StepRecorder()
    records = snapshot_step_role(monkeypatch, module)
    trainer = make_trainer(max_steps=6, callbacks=[recorder])  # iterations 0..3, generator at 0 and 2
    trainer.fit(module, DigitsDataModule(batch_size=16))

    # The head is in the fake score's optimizer (its only param group), never in the generator's.
    generator_optimizer, fake_optimizer = trainer.optimizers
    head_ids = {id(p) for p in head.parameters()}
    fake_ids = {id(p) for g in fake_optimizer.param_groups for p in g["params"]}
    generator_ids = {id(p) for g in generator_optimizer.param_groups for p in g["params"]}
    assert head_ids <= fake_ids
    assert fake_ids == {id(p) for p in module.fake_score.parameters()} | head_ids
    assert not head_ids & generator_ids
    assert generator_ids == {id(p) for p in module.generator.parameters()}

    assert recorder.iterations_of("generator") == [0, 2]
    assert none_equal(head_before, head)  # the head trained
    assert [r["critic_unchanged"] for r in records if r["role"] == "generator"] == [True, True]


def test_gan_losses_with_zero_logits(tiny_digits_teacher):
    """With all logits 0 the module's GAN terms are gan_G = ln 2 and gan_D = 2 ln 2."""
    module = make_module(tiny_digits_teacher, gan=1e-2)
    final = module.discriminator_head.net[-1]
    nn.init.zeros_(final.weight)
    nn.init.zeros_(final.bias)
    backbone = module.backbone
    cond, uncond = backbone.encode_prompts(PROMPTS), backbone.empty_conditioning(len(PROMPTS))
    x0 = torch.randn(len(PROMPTS), 1, 8, 8)
    batch = {"images": torch.rand(len(PROMPTS), 1, 8, 8), "prompts": PROMPTS}
    _, logs = module.generator_loss(x0, loss_state(x0, cond, uncond, batch))
    assert logs["train/loss_gan_g"].item() == pytest.approx(math.log(2.0), abs=1e-6)
    _, logs = module.fake_score_loss(x0, loss_state(x0, cond, uncond, batch))
    assert logs["train/loss_gan_d"].item() == pytest.approx(2.0 * math.log(2.0), abs=1e-6)
    with pytest.raises(KeyError, match="images"):
        module.fake_score_loss(x0, loss_state(x0, cond, uncond, {"prompts": PROMPTS}))


# ---- 2: zero DMD gradient when the fake score is the teacher -------------------------------------
def test_fresh_module_has_zero_dmd_gradient(tiny_digits_teacher):
    """Acceptance check 2: fake score = teacher and w = 1 give g = 0 and no generator gradient from L_DM."""
    module = make_module(tiny_digits_teacher, guidance=1.0)
    backbone = module.backbone
    cond, uncond = backbone.encode_prompts(PROMPTS), backbone.empty_conditioning(len(PROMPTS))
    noise = module.randn((len(PROMPTS), *backbone.latent_shape))
    level = module.student_levels()[0].reshape(1).expand(len(PROMPTS))
    with module.trainable_role("generator"):
        x0 = backbone.predict_x0(module.generator, noise, level, cond)
        loss, gradient, _ = module.distribution_matching_loss(x0, cond, uncond)
        loss.backward()
    assert gradient.abs().max().item() <= 1e-6
    grads = [p.grad for p in module.generator.parameters()]
    assert all(g is not None for g in grads)  # the loss is connected to the generator...
    assert max(g.abs().max().item() for g in grads) <= 1e-6  # ...but carries (numerically) no gradient
    assert all(p.grad is None for p in module.fake_score.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())

    # Control: with CFG on the real score the same set-up gives a non-zero g.
    module.dmd.guidance_scale = 3.0
    _, gradient, _ = module.distribution_matching_loss(x0.detach(), cond, uncond)
    assert gradient.abs().max().item() > 1e-3


# ---- 3: backward simulation -----------------------------------------------------------------------
def test_shared_randint_takes_rank_zero_value(tiny_digits_teacher):
    module = make_module(tiny_digits_teacher)
    calls = []

    def broadcast(value, src=0):
        calls.append((value, src))
        return 2  # what rank 0 drew

    module._trainer = SimpleNamespace(strategy=SimpleNamespace(broadcast=broadcast))
    try:
        assert [module.shared_randint(4) for _ in range(5)] == [2] * 5
    finally:
        module._trainer = None
    assert all(src == 0 and 0 <= value < 4 for value, src in calls) and len(calls) == 5


def test_backward_simulation_step_zero_is_pure_noise(tiny_digits_teacher, monkeypatch):
    module = make_module(tiny_digits_teacher, num_steps=4)
    highs = []

    def forced(high):
        highs.append(high)
        return 0

    monkeypatch.setattr(module, "shared_randint", forced)
    calls = []
    module.generator.register_forward_hook(lambda *_: calls.append(1))
    cond = module.backbone.encode_prompts(PROMPTS)
    expected_rng = torch.Generator()
    expected_rng.set_state(module.rng.get_state())
    x_in, level = module.generator_input(cond, len(PROMPTS))

    assert highs == [4]  # k is drawn through the broadcast helper over the 4 student steps
    assert calls == []  # k = 0 runs no simulation step
    assert torch.equal(x_in, torch.randn((len(PROMPTS), 1, 8, 8), generator=expected_rng))
    assert torch.equal(level, torch.ones(len(PROMPTS), dtype=level.dtype))  # flow: σ = 1 (t = 999 on VP)
    assert module.student_levels()[0].item() == 1.0


@pytest.mark.parametrize("k", [0, 2, 3])
def test_only_the_final_generator_forward_has_grad(tiny_digits_teacher, monkeypatch, k):
    """Acceptance check 6: k simulation steps run without grad; only the trained forward records a graph."""
    module = make_module(tiny_digits_teacher, num_steps=4, ratio=1)
    monkeypatch.setattr(module, "shared_randint", lambda high: k)
    forwards = []  # (grad enabled, input requires grad, level) of every generator forward

    def hook(_module, args):
        forwards.append((torch.is_grad_enabled(), args[0].requires_grad, args[1][0].item()))

    module.generator.register_forward_pre_hook(hook)
    trainer = make_trainer(max_steps=2)  # one iteration: generator step, then critic step
    trainer.fit(module, DigitsDataModule(batch_size=16))

    assert module.generator_updates == 1 and module.iterations == 1
    assert [grad for grad, _, _ in forwards] == [False] * k + [True]
    assert not any(requires_grad for _, requires_grad, _ in forwards)  # the trained input is a leaf
    timesteps = module.backbone.schedule.model_timestep(module.student_levels()).tolist()
    assert [t for _, _, t in forwards] == pytest.approx(timesteps[: k + 1])


# ---- 4: frozen roles and checkpoints --------------------------------------------------------------
def test_frozen_roles_and_checkpoint_round_trip(tiny_digits_teacher, tmp_path):
    module = make_module(tiny_digits_teacher, ratio=2, gan=1e-2)
    frozen = clone_params(module.teacher, module.backbone)
    trainer = make_trainer(max_steps=6)
    trainer.fit(module, DigitsDataModule(batch_size=16))

    assert all_equal(frozen, module.teacher, module.backbone)
    assert not any(p.requires_grad for p in [*module.teacher.parameters(), *module.backbone.parameters()])
    assert all(p.requires_grad for p in [*module.generator.parameters(), *module.fake_score.parameters()])

    path = tmp_path / "dmd.ckpt"
    trainer.save_checkpoint(path)
    # Python-API modules pickle their config objects in the hyperparameters (LightningCLI runs store
    # plain dicts), so loading them needs weights_only=False, as Lightning documents.
    checkpoint = torch.load(path, weights_only=False)
    keys = list(checkpoint["state_dict"])
    assert not [k for k in keys if k.startswith(("teacher.", "backbone."))]
    assert any(k.startswith("generator.") for k in keys) and any(k.startswith("discriminator_head.") for k in keys)
    assert checkpoint["rdm"]["role_updates"] == {"generator": 2, "fake_score": 4}

    restored = DMD.load_from_checkpoint(path, weights_only=False)
    assert all_equal(clone_params(module.generator), restored.generator)
    assert all_equal(clone_params(module.fake_score, module.discriminator_head), restored.fake_score, restored.discriminator_head)
    assert restored.role_updates == module.role_updates and restored.iterations == module.iterations == 4
    assert torch.equal(restored.rng.get_state(), module.rng.get_state())
    # The teacher comes back from its folder, frozen.
    teacher_weights = load_file(tiny_digits_teacher / "denoiser.safetensors")
    assert all(torch.equal(teacher_weights[k], v) for k, v in restored.teacher.state_dict().items())
    assert not any(p.requires_grad for p in restored.teacher.parameters())


# ---- 5: non-finite losses -------------------------------------------------------------------------
def test_nan_generator_loss_names_role_and_iteration(tiny_digits_teacher, monkeypatch):
    module = make_module(tiny_digits_teacher, ratio=2)

    def nan_loss(x0, state):
        return x0.mean() * float("nan"), {}

    monkeypatch.setattr(module, "generator_loss", nan_loss)
    with pytest.raises(FloatingPointError, match=r"generator loss is nan at iteration 0 \(generator update 0\)"):
        make_trainer(max_steps=4).fit(module, DigitsDataModule(batch_size=16))


def test_inf_fake_score_loss_names_role_and_iteration(tiny_digits_teacher, monkeypatch):
    module = make_module(tiny_digits_teacher, ratio=2)
    original = module.fake_score_loss

    def loss_inf_at_3(x0, state):
        loss, logs = original(x0, state)
        return (loss * float("inf") if module.iterations == 3 else loss), logs

    monkeypatch.setattr(module, "fake_score_loss", loss_inf_at_3)
    with pytest.raises(FloatingPointError, match=r"fake_score loss is inf at iteration 3 \(generator update 2\)"):
        make_trainer(max_steps=20).fit(module, DigitsDataModule(batch_size=16))


def nan_real_score(module: DMD, samples: slice):
    """``module.real_x0`` with NaN in ``samples`` of every estimate, as an overflowing CFG scale gives."""
    real_x0 = module.real_x0

    def patched(*args, **kwargs):
        x0 = real_x0(*args, **kwargs).clone()
        x0[samples] = float("nan")
        return x0

    return patched


def test_partly_nonfinite_dmd_gradient_is_counted_and_trains_on(tiny_digits_teacher, monkeypatch):
    """NaN estimates of 1 sample of 4: its 64 entries are replaced (counted in the log), the others train."""
    module = make_module(tiny_digits_teacher)
    cond, uncond = module.backbone.encode_prompts(PROMPTS), module.backbone.empty_conditioning(len(PROMPTS))
    x0 = torch.rand(len(PROMPTS), *module.backbone.latent_shape) * 2 - 1
    state = loss_state(x0, cond, uncond, {"prompts": PROMPTS})
    _, logs = module.generator_loss(x0, state)
    assert logs["train/dmd_grad_nonfinite"].item() == 0.0
    monkeypatch.setattr(module, "real_x0", nan_real_score(module, slice(0, 1)))
    loss, logs = module.generator_loss(x0, state)
    assert logs["train/dmd_grad_nonfinite"].item() == x0[0].numel() and torch.isfinite(loss)


def test_all_nonfinite_dmd_gradient_stops_the_run(tiny_digits_teacher, monkeypatch):
    """A batch whose every sample has a non-finite DMD gradient would train on nothing: FloatingPointError."""
    module = make_module(tiny_digits_teacher, ratio=2)
    monkeypatch.setattr(module, "real_x0", nan_real_score(module, slice(None)))
    entries = 16 * math.prod(module.backbone.latent_shape)
    with pytest.raises(
        FloatingPointError,
        match=rf"the DMD gradient is non-finite in every sample of the batch \({entries} entries replaced\) "
        r"at iteration 0 \(generator update 0\); stopping the run",
    ):
        make_trainer(max_steps=4).fit(module, DigitsDataModule(batch_size=16))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    "config, field",
    [
        (DMDConfig, "guidance_scale"), (DMDConfig, "norm_eps"), (DMDConfig, "gan_generator_weight"),
        (DMDConfig, "gan_discriminator_weight"), (TeacherSamplingConfig, "guidance_scale"),
        (OptimizerConfig, "lr"), (OptimizerConfig, "weight_decay"), (OptimizerConfig, "grad_clip"),
        (DMDRConfig, "reward_hinge"), (DMDRConfig, "guidance_jitter"), (DMDRConfig, "fake_lora_scale"),
        (DMDRConfig, "dynadg_scale"), (GNDMConfig, "adv_kappa"), (GNDMConfig, "lambda_path"),
        (ImportanceSamplingConfig, "noise_level"), (GDMDConfig, "eta"), (GDMDConfig, "kappa"),
        (GDMDConfig, "w_max"), (GDMDConfig, "b2_weight"), (GRPOConfig, "advantage_clip"),
        (ACDMDConfig, "consistency_weight"), (RTDMDConfig, "advantage_clip"),
        (RTDMDConfig, "backprop_hinge"),
    ],
)
def test_nonfinite_settings_are_rejected_naming_the_field(config, field, value):
    with pytest.raises(ValueError, match=rf"{field} must be a finite number.*got {value}"):
        config(**{field: value})


@pytest.mark.parametrize("config", [DMDRConfig, GDMDConfig])
def test_nonfinite_reward_weights_are_rejected(config):
    with pytest.raises(ValueError, match=r"reward_weights\['pick'\] must be a finite number, got nan"):
        config(reward_weights={"pick": math.nan})


def test_cfg_scales_beyond_float32_are_rejected():
    """1e39 is a finite float64 but inf in float32, where predict_x0 combines the CFG branches."""
    for config in (DMDConfig, TeacherSamplingConfig):
        with pytest.raises(ValueError, match=r"guidance_scale must be a finite number of magnitude <= 3.403e\+38 .*1e\+39"):
            config(guidance_scale=1e39)
        config(guidance_scale=-3e38)
    with pytest.raises(ValueError, match="levels must be a finite number, got nan"):
        StudentConfig(num_steps=1, levels=[math.nan])


# ---- 6: bad configuration -------------------------------------------------------------------------
def test_bad_configs_raise(tiny_digits_teacher):
    with pytest.raises(ValueError, match="fake_guidance_scale=2"):
        DMDConfig(fake_guidance_scale=2)
    with pytest.raises(ValueError, match="generator_update_ratio must be >= 1, got 0"):
        DMDConfig(generator_update_ratio=0)
    with pytest.raises(ValueError, match="num_steps must be >= 1, got 0"):
        StudentConfig(num_steps=0)
    with pytest.raises(ValueError, match=r"levels \[999\] must have num_steps=4"):
        StudentConfig(levels=[999], num_steps=4)
    with pytest.raises(ValueError, match="'float64'"):
        DMD(DigitsBackbone(path=str(tiny_digits_teacher)), teacher_dtype="float64")
    with pytest.raises(FileNotFoundError, match="/nonexistent"):
        DigitsBackbone(path="/nonexistent")


# ---- 8: EMA of the generator ----------------------------------------------------------------------
class GeneratorSnapshots(L.Callback):
    """The generator's weights at the start and after every generator update."""

    def on_train_start(self, trainer, module):
        self.snapshots = [copy.deepcopy(module.generator.state_dict())]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if module.generator_updates == len(self.snapshots):
            self.snapshots.append(copy.deepcopy(module.generator.state_dict()))


def test_generator_ema_closed_form_and_checkpoint(tiny_digits_teacher, monkeypatch, tmp_path):
    updates = []
    original_update = ema_module.ema_update

    def counting_update(ema, live, decay):
        updates.append(decay)
        original_update(ema, live, decay)

    monkeypatch.setattr(ema_module, "ema_update", counting_update)
    module = make_module(tiny_digits_teacher, ratio=2)
    snapshots = GeneratorSnapshots()
    trainer = make_trainer(max_steps=9, callbacks=[GeneratorEMA(decay=0.5), snapshots])
    trainer.fit(module, DigitsDataModule(batch_size=16))

    n = module.generator_updates
    assert n == 3 and trainer.global_step == 9 and len(snapshots.snapshots) == n + 1
    assert updates == [0.5] * n  # once per generator update, not per optimizer step
    assert module.sampling_generator is module.generator_ema is not None
    assert not any(p.requires_grad for p in module.generator_ema.parameters())
    # EMA_n = 0.5^n·G_0 + Σ_u 0.5^(n−u+1)·G_u, G_u the generator after update u.
    ema_state = module.generator_ema.state_dict()
    for key, value in ema_state.items():
        expected = 0.5**n * snapshots.snapshots[0][key]
        for u in range(1, n + 1):
            expected = expected + 0.5 ** (n - u + 1) * snapshots.snapshots[u][key]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    assert not all(torch.equal(ema_state[k], v) for k, v in module.generator.state_dict().items())

    path = tmp_path / "ema.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert any(k.startswith("generator_ema.") for k in checkpoint["state_dict"])
    assert {"updates_seen": n} in checkpoint["callbacks"].values()
    restored = DMD.load_from_checkpoint(path, weights_only=False)
    assert restored.sampling_generator is restored.generator_ema is not None
    assert all(torch.equal(ema_state[k], v) for k, v in restored.generator_ema.state_dict().items())


# ---- 9: resume ------------------------------------------------------------------------------------
def _resume_run(teacher: Path, root: Path, epochs: int, ckpt_path: Path | None = None):
    L.seed_everything(0)
    module = make_module(teacher, ratio=2, gan=1e-2, num_steps=4, warmup=3)
    ema = GeneratorEMA(decay=0.5)
    checkpoints = ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    trainer = make_trainer(max_epochs=epochs, callbacks=[ema, checkpoints], enable_checkpointing=True, default_root_dir=root)
    # weights_only=False: see test_frozen_roles_and_checkpoint_round_trip.
    trainer.fit(module, DigitsDataModule(batch_size=256), ckpt_path=ckpt_path, weights_only=False if ckpt_path else None)
    return module, trainer, ema


def test_resumed_run_matches_uninterrupted(tiny_digits_teacher, tmp_path):
    """A run stopped after epoch 1 and resumed from its checkpoint equals the uninterrupted run."""
    full, full_trainer, full_ema = _resume_run(tiny_digits_teacher, tmp_path / "a", epochs=2)
    _resume_run(tiny_digits_teacher, tmp_path / "b", epochs=1)
    resumed, resumed_trainer, resumed_ema = _resume_run(
        tiny_digits_teacher, tmp_path / "b", epochs=2, ckpt_path=tmp_path / "b" / "epoch=0.ckpt"
    )

    assert full.iterations == resumed.iterations == 10  # 1437 // 256 = 5 batches per epoch
    assert full.role_updates == resumed.role_updates == {"generator": 5, "fake_score": 10}
    assert full_trainer.global_step == resumed_trainer.global_step == 15
    assert full_ema.updates_seen == resumed_ema.updates_seen == 5
    for name in ("generator", "fake_score", "discriminator_head", "generator_ema"):
        a, b = getattr(full, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    for a, b in zip(full_trainer.optimizers, resumed_trainer.optimizers):
        assert states_equal(a.state_dict(), b.state_dict())
    assert torch.equal(full.rng.get_state(), resumed.rng.get_state())
    # The resumed run really started from epoch 1 and not from scratch.
    assert (tmp_path / "b" / "epoch=1.ckpt").exists()


# ---- 10: optimizers under DeepSpeed ---------------------------------------------------------------
def _deepspeed_strategy() -> DeepSpeedStrategy:
    """A DeepSpeedStrategy instance; without the optional ``deepspeed`` extra an uninitialised one
    (configure_optimizers only checks the strategy's type)."""
    try:
        return DeepSpeedStrategy(stage=2)
    except MisconfigurationException:  # "you must have DeepSpeed installed"
        return object.__new__(DeepSpeedStrategy)


def _attach_strategy(module: DMD, strategy) -> None:
    module._trainer = SimpleNamespace(strategy=strategy)


def _param_ids(params) -> set[int]:
    return {id(p) for p in params}


def test_configure_optimizers_per_strategy(tiny_digits_teacher):
    module = make_module(tiny_digits_teacher, gan=1e-2)
    generator_ids = _param_ids(module.generator.parameters())
    critic_ids = _param_ids([*module.fake_score.parameters(), *module.discriminator_head.parameters()])

    _attach_strategy(module, _deepspeed_strategy())
    (optimizer,), (scheduler,) = module.configure_optimizers()
    assert isinstance(optimizer, RoleAwareAdamW)
    assert optimizer.roles == ["generator", "fake_score"]
    assert _param_ids(optimizer.param_groups[0]["params"]) == generator_ids
    assert _param_ids(optimizer.param_groups[1]["params"]) == critic_ids
    assert len(scheduler.lr_lambdas) == 2

    _attach_strategy(module, SingleDeviceStrategy(device=torch.device("cpu")))
    optimizers, schedulers = module.configure_optimizers()
    assert [type(o) for o in optimizers] == [torch.optim.AdamW, torch.optim.AdamW] and len(schedulers) == 2
    assert [len(o.param_groups) for o in optimizers] == [1, 1]
    assert _param_ids(optimizers[0].param_groups[0]["params"]) == generator_ids
    assert _param_ids(optimizers[1].param_groups[0]["params"]) == critic_ids
    module._trainer = None


class _WrappedOptimizer:
    """Stands in for DeepSpeed's ZeRO / BF16 optimizer, which keeps the client optimizer in ``.optimizer``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


def test_single_optimizer_generator_step_leaves_critic_bit_identical(tiny_digits_teacher, monkeypatch):
    """The DeepSpeed flow on CPU: one RoleAwareAdamW, zero-filled critic grads on a generator update."""
    module = make_module(tiny_digits_teacher, gan=1e-2)
    _attach_strategy(module, _deepspeed_strategy())
    (optimizer,), _ = module.configure_optimizers()
    module._trainer = None
    # step_role finds the RoleAwareAdamW through DeepSpeed's wrapper to set the active role.
    wrapped = LightningOptimizer(_WrappedOptimizer(optimizer))
    monkeypatch.setattr(module, "optimizers", lambda use_pl_optimizer=True: wrapped)
    assert module._optimizer_of("fake_score") is wrapped and optimizer.active_role == "fake_score"

    backbone = module.backbone
    cond, uncond = backbone.encode_prompts(PROMPTS), backbone.empty_conditioning(len(PROMPTS))
    batch = {"images": torch.rand(len(PROMPTS), 1, 8, 8), "prompts": PROMPTS}
    critic = [*module.fake_score.parameters(), *module.discriminator_head.parameters()]

    def step(role: str) -> None:
        with module.trainable_role(role):
            noise = module.randn((len(PROMPTS), *backbone.latent_shape))
            level = module.student_levels()[0].reshape(1).expand(len(PROMPTS))
            x0 = backbone.predict_x0(module.generator, noise, level, cond)
            if role == "generator":
                loss, _ = module.generator_loss(x0, loss_state(x0, cond, uncond, batch))
            else:
                loss, _ = module.fake_score_loss(x0.detach(), loss_state(x0, cond, uncond, batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        for p in [*module.generator.parameters(), *critic]:  # DeepSpeed zero-fills missing gradients
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # DeepSpeedStrategy.optimizer_step runs the engine's step, i.e. the wrapper's step.
        assert module._optimizer_of(role) is wrapped and optimizer.active_role == role
        wrapped.optimizer.step()

    step("fake_score")  # the critic now has optimizer state that must survive a generator step
    assert all(p in optimizer.state for p in critic)
    critic_before = clone_params(module.fake_score, module.discriminator_head)
    state_before = {id(p): copy.deepcopy(optimizer.state[p]) for p in critic}
    generator_before = clone_params(module.generator)
    for _ in range(2):
        step("generator")

    assert all_equal(critic_before, module.fake_score, module.discriminator_head)
    for p in critic:
        after = optimizer.state[p]
        assert after.keys() == state_before[id(p)].keys()
        assert all(torch.equal(after[k], state_before[id(p)][k]) for k in after)
    assert none_equal(generator_before, module.generator)
    assert all(int(optimizer.state[p]["step"]) == 2 for p in module.generator.parameters())


def test_ema_every_n_updates_with_warmup_decay():
    """RTDMD stage 2's EMA: decay min((1+n)/(10+n), d) applied after every 8th generator update."""
    from types import SimpleNamespace

    from torch import nn

    live, ema = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    module = SimpleNamespace(generator=live, generator_ema=ema, generator_updates=0)
    callback = GeneratorEMA(decay=0.9, every_n_updates=8, warmup=True)
    expected = ema.weight.detach().clone()
    for update in range(1, 25):
        module.generator_updates = update
        with torch.no_grad():
            live.weight.fill_(float(update))
        callback.on_train_batch_end(None, module, None, None, 0)
        if update % 8 == 0:
            decay = min(update / (9 + update), 0.9)  # n = update − 1 updates before this one
            expected = decay * expected + (1 - decay) * float(update)
        assert torch.allclose(ema.weight, expected), update
    with pytest.raises(ValueError, match="every_n_updates must be >= 1"):
        GeneratorEMA(every_n_updates=0)


# ---- 11: the batch carries data only ---------------------------------------------------------------
class BatchUnchanged(L.Callback):
    """Checks that every training step hands its loss hooks the very batch it was given, and leaves that
    batch as it was: the same keys and values."""

    def __init__(self, module: DMD):
        self.steps = self.losses = 0
        for hook in ("generator_loss", "fake_score_loss"):
            setattr(module, hook, self.checked(getattr(module, hook)))

    def checked(self, hook):
        def loss(x0, state):
            assert state.batch is self.batch
            self.losses += 1
            return hook(x0, state)

        return loss

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch, self.given = batch, dict(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        assert batch is self.batch and batch.keys() == self.given.keys()
        assert all(batch[k] is v for k, v in self.given.items())
        self.steps += 1


@pytest.mark.filterwarnings("ignore:GDMD group_size=4 < 8")
@pytest.mark.parametrize("method", ["dmd_gan", "gndm_is", "gndm_is_fake_score", "gndm_grpo", "gdmd_grpo", "acdmd"])
def test_a_training_step_never_adds_keys_to_its_batch(tiny_digits_teacher, method):
    """Per-iteration state (rollouts, importance ratios, boundary samples) rides on the typed ``Iteration``."""
    backbone = DigitsBackbone(path=str(tiny_digits_teacher))
    dmd = DMDConfig(generator_update_ratio=2, norm_eps=1e-8)
    reward = StrokeContrastReward()
    module = {
        "dmd_gan": lambda: make_module(tiny_digits_teacher, ratio=2, gan=1e-2),
        "gndm_is": lambda: GNDM(backbone, importance_sampling=ImportanceSamplingConfig(enabled=True), dmd=dmd),
        "gndm_is_fake_score": lambda: GNDM(
            backbone, importance_sampling=ImportanceSamplingConfig(enabled=True, target="fake_score"), dmd=dmd
        ),
        "gndm_grpo": lambda: GNDM(backbone, gndm=GNDMConfig(mode="grpo"), dmd=dmd),
        "gdmd_grpo": lambda: GDMD(
            backbone, rewards=[reward], dmd=dmd,
            gdmd=GDMDConfig(mode="grpo", group_size=4, cold_start_updates=1, reward_weights={reward.name: 1.0}),
        ),
        "acdmd": lambda: ACDMD(backbone, dmd=DMDConfig(guidance_scale=1.5, generator_update_ratio=2)),
    }[method]()
    check = BatchUnchanged(module)
    make_trainer(max_steps=12, callbacks=[check]).fit(module, DigitsDataModule(batch_size=8, group_size=4))
    assert module.iterations == check.steps == 8 and module.generator_updates == 4
    assert check.losses == 8 + 4  # every fake-score and generator loss saw the loader's batch
    if method.startswith("gndm_is"):
        assert module.rollouts["generator"] == 2  # two of the four generator updates reused a stored rollout
