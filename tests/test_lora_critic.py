"""DMDR's LoRA-on-teacher critic and DynaDG (docs/methods/dmdr.md).

The critic is the frozen teacher's own weights plus one peft LoRA: the fake score runs it at
scale 2.0, the real score at DynaDG's s_r(u), which is the plain teacher once s_r reaches 0.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from rdm_lightning.backbones import DigitsBackbone
from rdm_lightning.data import DigitsDataModule
from rdm_lightning.methods import DMDR, DMDConfig, DMDRConfig, OptimizerConfig, RoleAwareAdamW
from rdm_lightning.methods.roles import RoleConfig, RolesConfig
from rdm_lightning.methods.lora import add_lora, lora_layers, lora_scale, shared_copy
from iterations import loss_state
from reward_doubles import CountingReward

# Lightning's notes on a tiny CPU run (hyperparameters holding modules, few workers…) are expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore:.*LeafSpec")

PROMPTS = ["a handwritten digit 2", "a handwritten digit 5", "a handwritten digit 8"]
CRITIC_ADAPTER = "fake_score"
"""The critic is the fake score's role adapter, named after the role."""
S_R0, K_DG = 0.5, 8


def make_lora_dmdr(teacher: Path, *, teacher_dtype: str = "float32", ratio: int = 1, **overrides) -> DMDR:
    config = dict(
        cold_start_updates=100, reward_weights={"counting": 0.5}, dynadg_scale=S_R0, dynadg_updates=K_DG,
    )
    config.update(overrides)
    optimizer = OptimizerConfig(lr=1e-3)
    return DMDR(
        DigitsBackbone(str(teacher)), rewards=[CountingReward()], dmdr=DMDRConfig(**config),
        dmd=DMDConfig(guidance_scale=1.5, generator_update_ratio=ratio, norm_eps=1e-8),
        generator_optimizer=optimizer, fake_score_optimizer=optimizer, teacher_dtype=teacher_dtype,
        roles=RolesConfig(fake_score=RoleConfig(layout="shared_lora", rank=4, alpha=4)),
    )


def lora_params(module: DMDR) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.fake_score.named_parameters() if "lora_" in n}


def inputs(module: DMDR):
    backbone = module.backbone
    cond, uncond = backbone.encode_prompts(PROMPTS), backbone.empty_conditioning(len(PROMPTS))
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(len(PROMPTS), 1, 8, 8, generator=generator)
    level = backbone.schedule.levels_from_fraction(torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64))
    return x, level, cond, uncond


def perturb_lora(module: DMDR, seed: int = 1) -> None:
    """Move B (and A) away from their initialisation, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_params(module).values():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def trainer(**kwargs) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    return L.Trainer(**{**settings, **kwargs})


# ---- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,shown",
    [
        (dict(dynadg_scale=0.5, dynadg_updates=0), "dynadg_updates > 0 (got 0)"),
        (dict(fake_lora_scale=0.0), "fake_lora_scale"),
        (dict(dynadg_scale=-0.1), "-0.1"),
    ],
)
def test_config_rejects_bad_critic_settings(kwargs, shown):
    with pytest.raises(ValueError) as info:
        DMDRConfig(**kwargs)
    assert shown in str(info.value)


def test_default_critic_is_the_full_copy(tiny_digits_teacher):
    config = DMDRConfig()
    assert (config.fake_lora_scale, config.dynadg_scale, config.dynadg_updates) == (None, 0.0, 0)
    module = DMDR(DigitsBackbone(str(tiny_digits_teacher)), rewards=[CountingReward()],
                  dmdr=DMDRConfig(reward_weights={"counting": 1.0}))
    assert not lora_layers(module.fake_score) and module.real_lora_scale() == 0.0
    assert module.roles.fake_score.layout == "full"
    assert make_lora_dmdr(tiny_digits_teacher).fake_lora_scale == 2.0  # the paper's, when the critic is a LoRA
    assert all(p.requires_grad for p in module.fake_score.parameters())


# ---- initialisation -----------------------------------------------------------------------------
def test_lora_is_gaussian_a_zero_b_at_the_fake_scale(tiny_digits_teacher):
    module = make_lora_dmdr(tiny_digits_teacher)
    layers = lora_layers(module.fake_score)
    targets = module.backbone.lora_target_modules
    assert len(layers) == 12 and not lora_layers(module.teacher)  # conv1, conv2, film of 4 blocks; teacher adapter-free
    for layer in layers:
        a, b = layer.lora_A[CRITIC_ADAPTER].weight, layer.lora_B[CRITIC_ADAPTER].weight
        assert torch.equal(b, torch.zeros_like(b)) and a.abs().sum() > 0
        assert layer.r[CRITIC_ADAPTER] == 4 and layer.scaling[CRITIC_ADAPTER] == 2.0 * 4 / 4  # fake scale·α/r
    names = [n for n, m in module.fake_score.named_modules() if m in layers]
    assert all(any(n.endswith("." + t) for t in targets) for n in names)
    # The initialisation is seeded by the module's seed, not the global RNG.
    torch.manual_seed(123)
    again = make_lora_dmdr(tiny_digits_teacher)
    assert all(torch.equal(p, again_p) for p, again_p in zip(lora_params(module).values(), lora_params(again).values()))


def test_at_init_real_and_fake_are_the_teacher_and_g_is_zero_check_3(tiny_digits_teacher):
    module = make_lora_dmdr(tiny_digits_teacher)
    x, level, cond, uncond = inputs(module)
    assert module.real_lora_scale() == S_R0  # generator update 0: the real score goes through the LoRA
    calls = []
    teacher_x0 = module.teacher_x0
    module.teacher_x0 = lambda *a, **k: calls.append(k.get("network")) or teacher_x0(*a, **k)
    with torch.no_grad():
        for w in (1.0, 1.5):
            assert torch.equal(module.real_x0(x, level, cond, w, uncond), teacher_x0(x, level, cond, w, uncond))
        assert calls == [module.fake_score] * 2  # the real score ran through the LoRA'd copy at s_r0
        del module.teacher_x0
        critic_runs = []
        hook = module.fake_score.register_forward_hook(lambda *_: critic_runs.append(True))
        assert torch.equal(module.fake_x0(x, level, cond), teacher_x0(x, level, cond, 1.0))
        hook.remove()
    assert len(critic_runs) == 1  # ... and the fake score is the LoRA'd copy at 2.0
    x0_real, x0_fake, scale = module.dm_estimates(x, cond, uncond, guidance_scale=1.0)
    gradient, _ = module.dm_gradient(x, x0_real, x0_fake)
    assert scale == 1.0 and torch.equal(gradient, torch.zeros_like(gradient))


def _deepspeed_strategy() -> DeepSpeedStrategy:
    try:
        return DeepSpeedStrategy(stage=2)
    except MisconfigurationException:  # without deepspeed: configure_optimizers only checks the type
        return object.__new__(DeepSpeedStrategy)


def test_only_lora_parameters_train_in_the_critic_check_3(tiny_digits_teacher):
    module = make_lora_dmdr(tiny_digits_teacher)
    lora_ids = {id(p) for p in lora_params(module).values()}
    teacher_ids = {id(p) for p in module.teacher.parameters()}
    assert {n for n, p in module.fake_score.named_parameters() if p.requires_grad} == set(lora_params(module))
    assert {id(p) for p in module.role_parameters()["fake_score"]} == lora_ids
    for strategy in (SingleDeviceStrategy(device=torch.device("cpu")), _deepspeed_strategy()):
        module._trainer = SimpleNamespace(strategy=strategy)
        optimizers, _ = module.configure_optimizers()
        groups = [g for o in optimizers for g in o.param_groups]
        critic = [g for g in groups if g["role"] == "fake_score"]
        assert len(critic) == 1 and {id(p) for p in critic[0]["params"]} == lora_ids
        assert not teacher_ids & {id(p) for g in groups for p in g["params"]}
        assert isinstance(optimizers[0], RoleAwareAdamW) == isinstance(strategy, DeepSpeedStrategy)
    module._trainer = None
    for role in ("generator", "fake_score"):
        with module.trainable_role(role):
            assert all(p.requires_grad == (role == "fake_score") for p in lora_params(module).values())
            assert not any(p.requires_grad for p in module.teacher.parameters())
    assert not any(p.requires_grad for p in module.teacher.parameters())


# ---- DynaDG -------------------------------------------------------------------------------------
def test_dynadg_scale_and_scale_zero_is_the_adapter_free_teacher_check_1(tiny_digits_teacher):
    module = make_lora_dmdr(tiny_digits_teacher)
    perturb_lora(module)  # a trained LoRA: at s_r > 0 the real score is no longer the teacher
    x, level, cond, uncond = inputs(module)
    reference = module.backbone.load_denoiser()  # the adapter-free teacher, loaded on its own
    scales = {}
    for u in (0, K_DG // 2, K_DG, 3 * K_DG):
        module.role_updates["generator"] = u
        scales[u] = module.real_lora_scale()
        with torch.no_grad():
            real = module.real_x0(x, level, cond, 1.5, uncond)
            plain = module.backbone.predict_x0(reference, x, level, cond, 1.5, uncond)
            if scales[u] > 0:
                with lora_scale(module.fake_score, CRITIC_ADAPTER, scales[u]):
                    lora = module.backbone.predict_x0(module.fake_score, x, level, cond, 1.5, uncond)
                assert torch.equal(real, lora) and not torch.allclose(real, plain)
            else:
                assert torch.equal(real, plain)
        # The fake scale is restored after every real-score call.
        assert all(layer.scaling[CRITIC_ADAPTER] == 2.0 for layer in lora_layers(module.fake_score))
    assert scales[0] == S_R0 and scales[K_DG // 2] == pytest.approx(S_R0 / 2)
    assert scales[K_DG] == 0.0 and scales[3 * K_DG] == 0.0
    # The fake score runs at 2.0, away from the real score's s_r.
    module.role_updates["generator"] = 0
    with torch.no_grad():
        fake = module.fake_x0(x, level, cond)
        with lora_scale(module.fake_score, CRITIC_ADAPTER, 2.0):
            assert torch.equal(fake, module.backbone.predict_x0(module.fake_score, x, level, cond))
        assert not torch.allclose(fake, module.real_x0(x, level, cond, 1.0, uncond))


def test_real_lora_scale_is_logged_and_dynadg_off_is_the_teacher(tiny_digits_teacher):
    module = make_lora_dmdr(tiny_digits_teacher, dynadg_scale=0.0, dynadg_updates=0)
    perturb_lora(module)
    x, level, cond, uncond = inputs(module)
    assert module.real_lora_scale() == 0.0
    with torch.no_grad():
        assert torch.equal(module.real_x0(x, level, cond, 1.5, uncond), module.teacher_x0(x, level, cond, 1.5, uncond))
    on = make_lora_dmdr(tiny_digits_teacher)
    on.role_updates["generator"] = K_DG // 2
    _, logs = on.generator_loss(x.clone().requires_grad_(), loss_state(x, cond, uncond, {"prompts": PROMPTS}))
    assert logs["train/real_lora_scale"] == pytest.approx(S_R0 / 2)


# ---- training, checkpoints, sharing -------------------------------------------------------------
def test_training_moves_only_the_lora_and_checkpoints_hold_no_teacher_copy(tiny_digits_teacher, tmp_path):
    module = make_lora_dmdr(tiny_digits_teacher, ratio=2)
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    lora_before = {k: v.detach().clone() for k, v in lora_params(module).items()}
    fit = trainer(max_steps=6)  # 4 iterations: 2 generator and 4 critic updates
    fit.fit(module, DigitsDataModule(batch_size=16))
    assert module.role_updates == {"generator": 2, "fake_score": 4}

    assert all(torch.equal(teacher_before[k], v) for k, v in module.teacher.state_dict().items())
    assert all(not torch.equal(lora_before[k], p) for k, p in lora_params(module).items() if ".lora_B." in k)
    assert not any(p.requires_grad for p in module.teacher.parameters())

    path = tmp_path / "dmdr.ckpt"
    fit.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    critic_keys = {k for k in state if k.startswith("fake_score.")}
    assert critic_keys == {f"fake_score.{n}" for n in lora_params(module)}
    assert not any(k.startswith("teacher.") for k in state)

    restored = DMDR.load_from_checkpoint(path, weights_only=False)
    assert all(torch.equal(p, lora_params(restored)[n]) for n, p in lora_params(module).items())
    assert all(torch.equal(teacher_before[k], v) for k, v in restored.teacher.state_dict().items())
    assert restored.role_updates == module.role_updates
    shared = dict(restored.fake_score.named_parameters())
    assert shared["conv_in.weight"] is restored.teacher.conv_in.weight


def _resume_run(teacher: Path, root: Path, epochs: int, ckpt_path: Path | None = None) -> DMDR:
    L.seed_everything(0)
    module = make_lora_dmdr(teacher, ratio=2)
    checkpoints = ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1, every_n_epochs=1,
                                  save_on_train_epoch_end=True)
    fit = trainer(max_epochs=epochs, limit_train_batches=3, callbacks=[checkpoints], enable_checkpointing=True,
                  default_root_dir=root)
    fit.fit(module, DigitsDataModule(batch_size=16), ckpt_path=ckpt_path, weights_only=False if ckpt_path else None)
    return module


def test_resume_from_a_lora_checkpoint_is_exact(tiny_digits_teacher, tmp_path):
    full = _resume_run(tiny_digits_teacher, tmp_path / "a", epochs=2)
    _resume_run(tiny_digits_teacher, tmp_path / "b", epochs=1)
    resumed = _resume_run(tiny_digits_teacher, tmp_path / "b", epochs=2, ckpt_path=tmp_path / "b" / "epoch=0.ckpt")
    assert full.role_updates == resumed.role_updates == {"generator": 3, "fake_score": 6}
    assert all(torch.equal(p, lora_params(resumed)[n]) for n, p in lora_params(full).items())
    a, b = full.generator.state_dict(), resumed.generator.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_critic_shares_the_teachers_tensors(tiny_digits_teacher):
    module = make_lora_dmdr(tiny_digits_teacher)

    def check_shared() -> None:
        teacher = module.teacher.state_dict()
        critic = module.fake_score.state_dict()
        base = {k: v for k, v in critic.items() if "lora_" not in k}
        assert len(base) == len(teacher)
        for key, value in base.items():
            twin = teacher[key.replace(".base_layer.", ".")]
            assert value.data_ptr() == twin.data_ptr()

    check_shared()
    assert {id(p) for p in module.teacher.parameters()} <= {id(p) for p in module.fake_score.parameters()}
    # The whole module holds one teacher's weights, plus the LoRA: no second copy.
    full = DMDR(DigitsBackbone(str(tiny_digits_teacher)), rewards=[CountingReward()],
                dmdr=DMDRConfig(reward_weights={"counting": 0.5}))
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731 (parameters() counts a shared tensor once)
    lora = sum(p.numel() for p in lora_params(module).values())
    assert numel(module) == numel(full) - numel(full.fake_score) + lora
    module.to(torch.float64)  # a device/dtype move keeps the sharing
    check_shared()
    assert module.teacher.conv_in.weight.dtype == torch.float64


def test_reduced_precision_teacher_keeps_a_float32_lora(tiny_digits_teacher):
    module = make_lora_dmdr(tiny_digits_teacher, teacher_dtype="bfloat16")
    assert {p.dtype for p in module.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in lora_params(module).values()} == {torch.float32}
    x, level, cond, uncond = inputs(module)
    with torch.no_grad():
        fake = module.fake_x0(x, level, cond)
        assert fake.dtype == torch.float32 and torch.equal(fake, module.teacher_x0(x, level, cond, 1.0))
    with module.trainable_role("fake_score"):
        loss, _ = module.fake_score_loss(x, loss_state(x, cond, uncond, {"prompts": PROMPTS}))
        loss.backward()
    grads = [p.grad for n, p in lora_params(module).items() if ".lora_B." in n]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in module.teacher.parameters())


def test_missing_peft_is_a_clear_import_error(tiny_digits_teacher, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"pip install peft.*`lora` extra"):
        make_lora_dmdr(tiny_digits_teacher)
    # The full-copy critic does not need peft.
    DMDR(DigitsBackbone(str(tiny_digits_teacher)), rewards=[CountingReward()],
         dmdr=DMDRConfig(reward_weights={"counting": 0.5}))


def test_a_backbone_without_lora_targets_is_refused(tiny_digits_teacher, monkeypatch):
    monkeypatch.setattr(DigitsBackbone, "lora_target_modules", None)
    with pytest.raises(ValueError, match="the backbone declares no lora_target_modules"):
        make_lora_dmdr(tiny_digits_teacher)


# ---- the diffusers families' targets -------------------------------------------------------------
def _matched_targets(network: torch.nn.Module, targets) -> set[str]:
    critic = add_lora(shared_copy(network), targets, rank=2, alpha=2, adapter=CRITIC_ADAPTER)
    names = [n for n, m in critic.named_modules() if m in lora_layers(critic)]
    return {t for t in targets for n in names if n.endswith("." + t)}


def test_sd3_and_unet_targets_exist_in_their_networks():
    from diffusers import SD3Transformer2DModel

    from rdm_lightning.backbones import SD3Backbone, StableDiffusionBackbone
    from tiny_models import tiny_unet

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=48, pooled_projection_dim=32, out_channels=4,
    )
    assert _matched_targets(transformer, SD3Backbone.lora_target_modules) == set(SD3Backbone.lora_target_modules)
    unet = tiny_unet(cross_attention_dim=32)
    assert _matched_targets(unet, StableDiffusionBackbone.lora_target_modules) == {"to_q", "to_k", "to_v", "to_out.0"}
