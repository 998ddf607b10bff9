"""Role layouts (docs/roles.md): full copies, own copy + LoRA, LoRA on the teacher's shared weights."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from safetensors.torch import save_file

from rdm_lightning.backbones import DigitsBackbone
from rdm_lightning.callbacks import GeneratorEMA
from rdm_lightning.data import DigitsDataModule
from rdm_lightning.methods import DMD, DMDR, DMDConfig, DMDRConfig, OptimizerConfig, RoleAwareAdamW, StudentConfig
from rdm_lightning.methods.lora import lora_layers, merged_copy
from rdm_lightning.methods.roles import RoleConfig, RolesConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore:.*LeafSpec")

PROMPTS = ["a handwritten digit 2", "a handwritten digit 5", "a handwritten digit 8"]
LAYOUTS = {
    "full/full": ({}, {}),
    "lora/lora": (dict(layout="lora", rank=4), dict(layout="lora", rank=2, alpha=4.0)),
    "full/shared_lora": ({}, dict(layout="shared_lora", rank=4)),
    "shared_lora/shared_lora": (dict(layout="shared_lora", rank=4), dict(layout="shared_lora", rank=2)),
}


def roles(generator: dict, fake_score: dict) -> RolesConfig:
    return RolesConfig(generator=RoleConfig(**generator), fake_score=RoleConfig(**fake_score))


def make_dmd(teacher: Path, layout: str = "full/full", **kwargs) -> DMD:
    optimizer = OptimizerConfig(lr=1e-2)
    settings = dict(
        dmd=DMDConfig(guidance_scale=1.5, generator_update_ratio=2), generator_optimizer=optimizer,
        fake_score_optimizer=optimizer, roles=roles(*LAYOUTS[layout]),
    )
    return DMD(DigitsBackbone(str(teacher)), **{**settings, **kwargs})


def trainer(**kwargs) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    return L.Trainer(**{**settings, **kwargs})


def network_output(module: DMD, network: torch.nn.Module) -> torch.Tensor:
    backbone = module.backbone
    x = torch.randn(len(PROMPTS), 1, 8, 8, generator=torch.Generator().manual_seed(3))
    level = backbone.schedule.levels_from_fraction(torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64))
    with torch.no_grad():
        return backbone.predict_x0(network, x, level, backbone.encode_prompts(PROMPTS))


def trained(module: DMD) -> dict[str, dict[str, torch.Tensor]]:
    """Each role's trained parameters by name (detached copies)."""
    owned = {role: {id(p) for p in params} for role, params in module.role_parameters().items()}
    return {role: {n: p.detach().clone() for n, p in getattr(module, role).named_parameters() if id(p) in owned[role]}
            for role in ("generator", "fake_score")}


def deepspeed_strategy() -> DeepSpeedStrategy:
    try:
        return DeepSpeedStrategy(stage=2)
    except MisconfigurationException:  # without deepspeed: configure_optimizers only checks the type
        return object.__new__(DeepSpeedStrategy)


# ---- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,shown", [
    (dict(layout="qlora"), "'qlora'"),
    (dict(layout="lora"), "rank=None"),
    (dict(layout="shared_lora", rank=0), "rank=0"),
    (dict(layout="lora", rank=-3), "rank=-3"),
    (dict(rank=8), "{'rank': 8}"),
    (dict(dropout=0.1), "{'dropout': 0.1}"),
    (dict(layout="lora", rank=4, alpha=0.0), "alpha"),
    (dict(layout="lora", rank=4, dropout=1.0), "dropout"),
    (dict(layout="lora", rank=4, target_modules=[]), "target_modules"),
])
def test_bad_role_settings_are_named(kwargs, shown):
    with pytest.raises(ValueError) as err:
        RoleConfig(**kwargs)
    assert shown in str(err.value)


def test_targets_that_match_nothing_are_an_error(tiny_digits_teacher):
    bad = roles(dict(layout="lora", rank=4, target_modules=["no_such_layer"]), {})
    with pytest.raises(ValueError, match=r"roles.generator.target_modules=\['no_such_layer'\] match no module"):
        make_dmd(tiny_digits_teacher, roles=bad)


def test_init_files_are_checked(tiny_digits_teacher, tmp_path):
    missing = roles({}, dict(layout="lora", rank=4, init=str(tmp_path / "nope.safetensors")))
    with pytest.raises(FileNotFoundError, match="roles.fake_score.init not found"):
        make_dmd(tiny_digits_teacher, roles=missing)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"not_a_layer.weight": torch.zeros(2)}, str(wrong))
    with pytest.raises(ValueError, match="does not hold this backbone's network weights"):
        make_dmd(tiny_digits_teacher, roles=roles(dict(init=str(wrong)), {}))
    network = tmp_path / "network.safetensors"
    save_file(DigitsBackbone(str(tiny_digits_teacher)).load_denoiser().state_dict(), str(network))
    with pytest.raises(ValueError, match="differ from the teacher's"):
        make_dmd(tiny_digits_teacher, roles=roles(dict(layout="shared_lora", rank=4, init=str(network)), {}))
    lora = tmp_path / "lora.safetensors"
    save_file({"conv1.lora_A.weight": torch.zeros(3, 3)}, str(lora))
    with pytest.raises(ValueError, match="does not fit the generator adapter"):
        make_dmd(tiny_digits_teacher, roles=roles(dict(layout="shared_lora", rank=4, init=str(lora)), {}))
    with pytest.raises(ValueError, match="a full role starts from the network's weights"):
        make_dmd(tiny_digits_teacher, roles=roles(dict(init=str(lora)), {}))


@pytest.mark.parametrize("dmdr,fake_score,shown", [
    (dict(fake_lora_scale=2.0), {}, "it would be ignored"),
    (dict(dynadg_scale=0.5, dynadg_updates=4), dict(layout="lora", rank=4), "needs roles.fake_score.layout 'shared_lora'"),
])
def test_dmdr_critic_settings_a_layout_would_ignore_are_errors(tiny_digits_teacher, dmdr, fake_score, shown):
    from reward_doubles import CountingReward

    with pytest.raises(ValueError, match=shown):
        DMDR(DigitsBackbone(str(tiny_digits_teacher)), rewards=[CountingReward()],
             dmdr=DMDRConfig(reward_weights={"counting": 0.5}, **dmdr), roles=roles({}, fake_score))


# ---- what each layout holds -------------------------------------------------------------------------
def test_two_shared_lora_roles_hold_one_copy_of_the_base(tiny_digits_teacher):
    module = make_dmd(tiny_digits_teacher, "shared_lora/shared_lora")
    module.enable_generator_ema()
    teacher = {id(p) for p in module.teacher.parameters()}
    for network in (module.generator, module.fake_score, module.generator_ema):
        base = [p for n, p in network.named_parameters() if "lora_" not in n]
        assert base and all(id(p) in teacher for p in base)
    tensors = {p.data_ptr() for m in (module.teacher, module.generator, module.fake_score) for p in m.parameters()}
    adapters = sum(1 for m in (module.generator, module.fake_score) for n, _ in m.named_parameters() if "lora_" in n)
    assert len(tensors) == len(list(module.teacher.parameters())) + adapters


@pytest.mark.parametrize("layout", LAYOUTS)
def test_optimizers_hold_only_what_each_role_owns(tiny_digits_teacher, layout):
    module = make_dmd(tiny_digits_teacher, layout)
    params = module.role_parameters()
    for role in ("generator", "fake_score"):
        network = getattr(module, role)
        expected = [p for n, p in network.named_parameters() if ("lora_" in n) == module.roles[role].adapted]
        assert [id(p) for p in params[role]] == [id(p) for p in expected]
    teacher = {id(p) for p in module.teacher.parameters()}
    for strategy in (None, deepspeed_strategy()):
        module._trainer = SimpleNamespace(strategy=strategy)
        optimizers, _ = module.configure_optimizers()
        for group in (g for o in optimizers for g in o.param_groups):
            assert [id(p) for p in group["params"]] == [id(p) for p in params[group["role"]]]
            assert not teacher & {id(p) for p in group["params"]}
    module._trainer = None


@pytest.mark.parametrize("layout", ["lora/lora", "shared_lora/shared_lora"])
def test_the_role_aware_optimizer_leaves_the_other_adapter_bit_identical(tiny_digits_teacher, layout):
    module = make_dmd(tiny_digits_teacher, layout)
    params = module.role_parameters()
    optimizer = RoleAwareAdamW([{"params": params[r], "role": r, "lr": 1e-2} for r in ("generator", "fake_score")])
    for step, role in enumerate(["generator", "fake_score", "generator", "fake_score"]):
        with torch.no_grad():  # move B off zero so every adapter weight gets a gradient
            for p in params[role]:
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
        with module.trainable_role(role):
            x = torch.randn(2, 1, 8, 8)
            level = torch.full((2,), 0.5, dtype=torch.float64)
            out = module.backbone.network_output(getattr(module, role), x, level, module.backbone.encode_prompts(PROMPTS[:2]))
            loss = out.square().mean()
            loss.backward()
        for p in (p for r, ps in params.items() if r != role for p in ps):
            p.grad = torch.zeros_like(p)  # DeepSpeed fills the inactive role's gradients with zeros
        other = {r: [p.detach().clone() for p in ps] for r, ps in params.items() if r != role}
        optimizer.active_role = role
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for r, before in other.items():
            assert all(torch.equal(a, b) for a, b in zip(before, params[r])), (role, r)


# ---- training -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_keeps_the_teacher_and_the_idle_role_and_checkpoints_only_trained_weights(
    tiny_digits_teacher, tmp_path, layout
):
    module = make_dmd(tiny_digits_teacher, layout)
    fresh_teacher = network_output(module, DigitsBackbone(str(tiny_digits_teacher)).load_denoiser())
    assert torch.equal(network_output(module, module.teacher), fresh_teacher)
    before = trained(module)
    step_role, steps = module.step_role, []

    def checked_step(role, loss):
        other = "fake_score" if role == "generator" else "generator"
        idle = trained(module)[other]
        step_role(role, loss)
        assert all(torch.equal(idle[n], p) for n, p in trained(module)[other].items()), f"{other} moved in {role}'s step"
        steps.append(role)

    module.step_role = checked_step
    fit = trainer(max_steps=6, callbacks=[GeneratorEMA(decay=0.5)])
    fit.fit(module, DigitsDataModule(batch_size=8))
    assert steps == ["generator", "fake_score", "fake_score", "generator", "fake_score", "fake_score"][: len(steps)]
    assert module.role_updates == {"generator": 2, "fake_score": 4}

    assert torch.equal(network_output(module, module.teacher), fresh_teacher)
    after = trained(module)
    for role in ("generator", "fake_score"):
        assert after[role].keys() == before[role].keys()
        moved = [n for n in after[role] if not torch.equal(before[role][n], after[role][n])]
        assert moved, f"{role} did not train"
        if module.roles[role].adapted:
            assert all("lora_" in n for n in after[role])
    # EMA covers what the generator trains (decay 0.5: it lags the live weights), and shares the rest.
    ema = dict(module.generator_ema.named_parameters())
    assert any(not torch.equal(ema[n], p) for n, p in after["generator"].items())
    if module.roles.generator.adapted:
        live = dict(module.generator.named_parameters())
        assert all(ema[n] is live[n] for n in live if "lora_" not in n)

    path = tmp_path / "run.ckpt"
    fit.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert not any(k.startswith("teacher.") for k in state)
    for role, prefix in (("generator", "generator"), ("fake_score", "fake_score"), ("generator", "generator_ema")):
        saved = {k[len(prefix) + 1:] for k in state if k.startswith(prefix + ".")}
        if module.roles[role].adapted:
            assert saved == set(after[role]), prefix
        else:
            assert saved == set(getattr(module, prefix).state_dict()), prefix
    restored = DMD.load_from_checkpoint(path, weights_only=False)
    for prefix in ("generator", "fake_score", "generator_ema"):
        ours, theirs = getattr(module, prefix).state_dict(), getattr(restored, prefix).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), prefix
    assert torch.equal(network_output(restored, restored.teacher), fresh_teacher)


def _run(teacher: Path, root: Path, layout: str, epochs: int, ckpt_path: Path | None = None) -> DMD:
    L.seed_everything(0)
    module = make_dmd(teacher, layout)
    checkpoints = ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1, every_n_epochs=1,
                                  save_on_train_epoch_end=True)
    fit = trainer(max_epochs=epochs, limit_train_batches=3, callbacks=[checkpoints, GeneratorEMA(decay=0.5)],
                  enable_checkpointing=True, default_root_dir=root)
    fit.fit(module, DigitsDataModule(batch_size=8), ckpt_path=ckpt_path, weights_only=False if ckpt_path else None)
    return module


@pytest.mark.parametrize("layout", ["lora/lora", "shared_lora/shared_lora"])
def test_resume_is_exact(tiny_digits_teacher, tmp_path, layout):
    full = _run(tiny_digits_teacher, tmp_path / "a", layout, epochs=2)
    _run(tiny_digits_teacher, tmp_path / "b", layout, epochs=1)
    resumed = _run(tiny_digits_teacher, tmp_path / "b", layout, epochs=2, ckpt_path=tmp_path / "b" / "epoch=0.ckpt")
    assert full.role_updates == resumed.role_updates
    for prefix in ("generator", "fake_score", "generator_ema", "teacher"):
        a, b = getattr(full, prefix).state_dict(), getattr(resumed, prefix).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), prefix


# ---- adapters in and out ------------------------------------------------------------------------------
def perturbed(module: DMD, role: str, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.role_parameters()[role]:
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("layout", ["lora/lora", "shared_lora/shared_lora"])
def test_export_merges_the_adapter_and_a_diffusers_lora_file_round_trips(tiny_digits_teacher, tmp_path, layout):
    module = make_dmd(tiny_digits_teacher, layout)
    perturbed(module, "generator")
    adapted = network_output(module, module.generator)
    assert not torch.equal(adapted, network_output(module, module.teacher))
    merged = merged_copy(module.generator)
    assert not lora_layers(merged)
    assert torch.allclose(network_output(module, merged), adapted, atol=1e-5)
    assert torch.equal(network_output(module, module.teacher), network_output(module, DigitsBackbone(str(tiny_digits_teacher)).load_denoiser()))

    # The adapter in diffusers' LoRA format (`unet.<module>.lora_A.weight`) starts a new run exactly there.
    lora = {f"unet.{n.replace('.generator.weight', '.weight')}": p.detach() for n, p in module.generator.named_parameters()
            if "lora_" in n}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(lora, str(path))
    generator = dict(LAYOUTS[layout][0], init=str(path))
    again = make_dmd(tiny_digits_teacher, roles=roles(generator, LAYOUTS[layout][1]))
    assert torch.equal(network_output(again, again.generator), adapted)


def test_lora_layout_starts_its_base_from_an_init_checkpoint(tiny_digits_teacher, tmp_path):
    other = DigitsBackbone(str(tiny_digits_teacher)).load_denoiser()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.9)
    path = tmp_path / "distilled.safetensors"
    save_file(other.state_dict(), str(path))
    module = make_dmd(tiny_digits_teacher, roles=roles(dict(layout="lora", rank=4, init=str(path)), {}))
    assert torch.equal(network_output(module, module.generator), network_output(module, other))
    assert not torch.equal(network_output(module, module.teacher), network_output(module, other))


def test_lora_dropout_acts_in_train_mode_only(tiny_digits_teacher):
    module = make_dmd(tiny_digits_teacher, roles=roles(dict(layout="shared_lora", rank=4, dropout=0.5), {}))
    perturbed(module, "generator")
    module.train()
    first, second = network_output(module, module.generator), network_output(module, module.generator)
    assert not torch.equal(first, second)
    module.eval()
    assert torch.equal(network_output(module, module.generator), network_output(module, module.generator))


def test_shared_lora_on_a_bfloat16_teacher_trains_a_float32_adapter(tiny_digits_teacher):
    module = make_dmd(tiny_digits_teacher, "shared_lora/shared_lora", teacher_dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in module.teacher.parameters())
    assert all(p.dtype == torch.float32 for ps in module.role_parameters().values() for p in ps)
    teacher = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    trainer(max_steps=4).fit(module, DigitsDataModule(batch_size=8))  # 3 iterations, TTUR 2
    assert module.role_updates == {"generator": 2, "fake_score": 3}
    assert all(torch.equal(teacher[k], v) for k, v in module.teacher.state_dict().items())
    assert all(p.dtype == torch.float32 for ps in module.role_parameters().values() for p in ps)


# ---- precision and gradient checkpointing ----------------------------------------------------------------
def role_gradients(module: DMD, role: str) -> dict[str, torch.Tensor]:
    """Gradients of ``role``'s trained weights from one denoising loss (fixed inputs)."""
    network = getattr(module, role)
    network.train()
    backbone = module.backbone
    x0 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    level = backbone.schedule.levels_from_fraction(torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64))
    with module.trainable_role(role):
        backbone.denoising_loss(network, x0, backbone.encode_prompts(PROMPTS), level, noise).backward()
    return {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["full/full", "shared_lora/shared_lora"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_digits_teacher, layout, monkeypatch):
    import rdm_lightning.backbones.digits as digits

    recomputed = []
    monkeypatch.setattr(digits, "checkpoint", lambda *a, **k: recomputed.append(1) or torch.utils.checkpoint.checkpoint(*a, **k))
    generator, fake_score = LAYOUTS[layout]
    plain = make_dmd(tiny_digits_teacher, layout)
    checkpointed = make_dmd(tiny_digits_teacher, roles=roles(dict(generator, gradient_checkpointing=True),
                                                           dict(fake_score, gradient_checkpointing=True)))
    assert checkpointed.generator.gradient_checkpointing and not checkpointed.teacher.gradient_checkpointing
    for role in ("generator", "fake_score"):
        perturbed(plain, role), perturbed(checkpointed, role)
        ours, theirs = role_gradients(plain, role), role_gradients(checkpointed, role)
        assert ours.keys() == theirs.keys() and ours
        assert all(torch.equal(ours[n], theirs[n]) for n in ours), role
    assert len(recomputed) == 2 * 4  # each role's 4 residual blocks, in the checkpointed module only


def test_bfloat16_roles_keep_float32_weights_and_the_teacher_its_own_dtype(tiny_digits_teacher):
    module = make_dmd(tiny_digits_teacher, roles=roles(dict(precision="bfloat16"),
                                                       dict(layout="shared_lora", rank=4, precision="bfloat16")))
    backbone, cond = module.backbone, module.backbone.encode_prompts(PROMPTS)
    x, level = torch.randn(3, 1, 8, 8), torch.full((3,), 0.5, dtype=torch.float64)
    for role in ("generator", "fake_score"):
        assert backbone.network_output(getattr(module, role), x, level, cond).dtype == torch.bfloat16
    assert backbone.network_output(module.teacher, x, level, cond).dtype == torch.float32
    teacher = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    trainer(max_steps=4).fit(module, DigitsDataModule(batch_size=8))
    assert module.role_updates == {"generator": 2, "fake_score": 3}
    assert all(p.dtype == torch.float32 for ps in module.role_parameters().values() for p in ps)
    assert all(v.dtype == torch.float32 and torch.equal(teacher[k], v) for k, v in module.teacher.state_dict().items())
    assert torch.equal(network_output(module, module.teacher),
                       network_output(module, DigitsBackbone(str(tiny_digits_teacher)).load_denoiser()))


def test_precision_and_checkpointing_errors_are_named(tiny_digits_teacher):
    with pytest.raises(ValueError, match="float16 training needs loss scaling"):
        RoleConfig(precision="float16")
    with pytest.raises(ValueError, match="gradient_checkpointing must be true or false"):
        RoleConfig(gradient_checkpointing="yes")
    with pytest.raises(ValueError, match="roles.fake_score.precision='float32', but a shared_lora role's base is the teacher's bfloat16"):
        make_dmd(tiny_digits_teacher, teacher_dtype="bfloat16",
                 roles=roles({}, dict(layout="shared_lora", rank=4, precision="float32")))
    from rdm_lightning.backbones.mixture import MixtureBackbone

    with pytest.raises(ValueError, match="ExactMixtureDenoiser has no enable_gradient_checkpointing"):
        DMD(MixtureBackbone(), roles=roles(dict(gradient_checkpointing=True), {}))


# ---- settings a method would ignore -----------------------------------------------------------------------
@pytest.mark.parametrize("method,kwargs,shown", [
    ("ACDMD", dict(dmd=DMDConfig(dm_level_range=(0.1, 0.9))), "ACDMD does not use {'dmd.dm_level_range': (0.1, 0.9)}"),
    ("ACDMD", dict(dmd=DMDConfig(fake_level_range=(0.0, 0.5))), "'dmd.fake_level_range'"),
    ("ACDMD", dict(student=StudentConfig(step_rule="ode")), "ACDMD does not use {'student.step_rule': 'ode'}"),
    ("RTDMD", dict(dmd=DMDConfig(generator_update_ratio=3)), "RTDMD does not use {'dmd.generator_update_ratio': 3}"),
])
def test_settings_a_method_would_ignore_are_errors(tiny_digits_teacher, method, kwargs, shown):
    import rdm_lightning.methods as methods
    from rdm_lightning.rewards import StrokeContrastReward

    extra = dict(rewards=[StrokeContrastReward(name="stroke")]) if method == "RTDMD" else {}
    with pytest.raises(ValueError) as err:
        getattr(methods, method)(DigitsBackbone(str(tiny_digits_teacher)), **kwargs, **extra)
    assert shown in str(err.value)


def test_a_gan_weight_without_the_gan_head_is_an_error():
    with pytest.raises(ValueError, match="gan_generator_weight=0 switches the head off"):
        DMDConfig(gan_discriminator_weight=0.1)
    DMDConfig(gan_generator_weight=0.5, gan_discriminator_weight=0.1)


def test_full_generator_starts_from_a_diffusers_model_folder(tmp_path):
    # FLUX.2-klein: the generator starts from the distilled model's transformer/ folder, the teacher is the base.
    from diffusers import SD3Transformer2DModel

    from rdm_lightning.methods.roles import read_weights

    model = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
                                  pooled_projection_dim=16, out_channels=4)
    state = model.state_dict()
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    for folder in ("single", "sharded"):
        read = read_weights(tmp_path / folder, "roles.generator.init")
        assert read.keys() == state.keys() and all(torch.equal(read[k], v) for k, v in state.items())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without diffusion_pytorch_model.safetensors"):
        read_weights(tmp_path / "empty", "roles.generator.init")
