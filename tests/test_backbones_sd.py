"""SD1.5 / SDXL / SD3 / SD3.5 adapters on tiny random pipelines built at test time."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from rdm_lightning.backbones.sd3 import SD3Backbone, flow_scheduler_for
from rdm_lightning.backbones.stable_diffusion import EXPORT_MANIFEST, StableDiffusionBackbone, lcm_scheduler_for
from rdm_lightning.core.parameterization import Prediction
from rdm_lightning.core.sampling import few_step_sample
from rdm_lightning.core.schedules import FlowSchedule, VPSchedule
from tiny_models import make_tiny_sd3, make_tiny_sd15, make_tiny_sdxl

PROMPTS = ["a photo of a cat", "a red car"]
DMD2_LEVELS = torch.tensor([999, 749, 499, 249])
ATOL = 1e-4




@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "sd15": make_tiny_sd15(root / "sd15"),
        "sd15_v": make_tiny_sd15(root / "sd15_v", prediction_type="v_prediction"),
        "sdxl": make_tiny_sdxl(root / "sdxl"),
        "sd3": make_tiny_sd3(root / "sd3"),
        "sd3_t5": make_tiny_sd3(root / "sd3_t5", with_t5=True),
        "sd35_medium": make_tiny_sd3(root / "sd35_medium", with_t5=True, sd35="medium"),
        "sd35_large": make_tiny_sd3(root / "sd35_large", sd35="large"),
    }


@pytest.fixture(scope="module")
def backbones(folders) -> dict:
    return {
        name: (SD3Backbone if name.startswith("sd3") else StableDiffusionBackbone)(str(folder))
        for name, folder in folders.items()
    }


def _levels(backbone, n: int = 2) -> torch.Tensor:
    if isinstance(backbone.schedule, VPSchedule):
        return torch.tensor([999, 321])[:n]
    return torch.tensor([1.0, 0.43], dtype=torch.float64)[:n]


def _inputs(backbone, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(len(PROMPTS), *backbone.latent_shape, generator=generator)
    return x_t, _levels(backbone), backbone.encode_prompts(PROMPTS)


def _spec_x0(backbone, output: torch.Tensor, x_t: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """x̂0 by the formulas of the methods README, written out independently of the library."""
    output, x_t = output.double(), x_t.double()
    if backbone.prediction is Prediction.FLOW_VELOCITY:
        sigma = level.double().view(-1, 1, 1, 1)
        return (x_t - sigma * output).float()
    abar = backbone.schedule.alphas_cumprod[level].view(-1, 1, 1, 1)
    if backbone.prediction is Prediction.EPSILON:
        return ((x_t - (1 - abar).sqrt() * output) / abar.sqrt()).float()
    return (abar.sqrt() * x_t - (1 - abar).sqrt() * output).float()


def _perturbed_student(backbone):
    # A student that differs from the teacher, so the export test sees which network was saved.
    student = backbone.load_denoiser()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return student


ALL = ["sd15", "sd15_v", "sdxl", "sd3", "sd3_t5", "sd35_medium", "sd35_large"]
FLOW = ["sd3", "sd3_t5", "sd35_medium", "sd35_large"]


def test_loads_schedule_prediction_and_frozen_modules(backbones, folders):
    expected = {"sd15": Prediction.EPSILON, "sd15_v": Prediction.V_PREDICTION, "sdxl": Prediction.EPSILON,
                **{name: Prediction.FLOW_VELOCITY for name in FLOW}}
    for name, backbone in backbones.items():
        assert backbone.prediction is expected[name]
        assert backbone.latent_shape == (4, 8, 8) and (backbone.height, backbone.width) == (16, 16)
        params = list(backbone.parameters())
        assert params and not any(p.requires_grad for p in params)
        backbone.train()
        assert not any(m.training for m in backbone.modules())
    ddpm = DDPMScheduler.from_pretrained(folders["sd15"], subfolder="scheduler")
    assert torch.equal(backbones["sd15"].schedule.alphas_cumprod, ddpm.alphas_cumprod.double())
    assert backbones["sd3"].schedule.shift == backbones["sd35_medium"].schedule.shift == 3.0
    assert backbones["sd35_large"].schedule.shift == 5.0
    medium = backbones["sd35_medium"].load_denoiser()
    assert medium.transformer_blocks[0].use_dual_attention and not medium.transformer_blocks[1].use_dual_attention
    assert medium.config.qk_norm == backbones["sd35_large"].load_denoiser().config.qk_norm == "rms_norm"
    assert {"text_encoder", "vae"} <= set(dict(backbones["sd15"].named_children()))
    assert {"text_encoder_2", "text_encoder_3"} <= set(dict(backbones["sd3_t5"].named_children()))


@pytest.mark.parametrize("name", ALL)
def test_predict_x0_is_spec_conversion_of_raw_output(backbones, name):
    backbone = backbones[name]
    student = backbone.load_denoiser()
    x_t, level, cond = _inputs(backbone)
    with torch.no_grad():
        raw = backbone.network_output(student, x_t, level, cond)
        x0 = backbone.predict_x0(student, x_t, level, cond)
    assert x0.dtype == torch.float32 and x0.shape == x_t.shape
    torch.testing.assert_close(x0, _spec_x0(backbone, raw, x_t, level), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd3"])
def test_cfg_equals_separate_calls(backbones, name):
    backbone, w = backbones[name], 4.5
    student = backbone.load_denoiser()
    x_t, level, cond = _inputs(backbone)
    with torch.no_grad():
        out_u = backbone.network_output(student, x_t, level, backbone.empty_conditioning(len(x_t)))
        out_c = backbone.network_output(student, x_t, level, cond)
        guided = backbone.predict_x0(student, x_t, level, cond, guidance_scale=w)
    expected = _spec_x0(backbone, out_u + w * (out_c - out_u), x_t, level)
    torch.testing.assert_close(guided, expected, atol=ATOL, rtol=1e-5)


def test_unconditional_branch(backbones):
    sd15 = backbones["sd15"].empty_conditioning(3)
    empty = backbones["sd15"].encode_prompts([""] * 3)
    torch.testing.assert_close(sd15.tensors["prompt_embeds"], empty.tensors["prompt_embeds"])
    assert sd15.tensors["prompt_embeds"].abs().sum() > 0

    sdxl, cond = backbones["sdxl"].empty_conditioning(3), backbones["sdxl"].encode_prompts(["x"] * 3)
    assert set(sdxl.tensors) == {"prompt_embeds", "pooled_prompt_embeds"}
    for key, value in sdxl.tensors.items():
        assert value.shape == cond.tensors[key].shape and not value.any()

    sd3 = backbones["sd3"].empty_conditioning(2)
    empty = backbones["sd3"].encode_prompts(["", ""])
    for key, value in sd3.tensors.items():
        torch.testing.assert_close(value, empty.tensors[key])


def test_prompt_encoding_matches_diffusers_pipelines(backbones, folders):
    with torch.no_grad():
        pipe = StableDiffusionPipeline.from_pretrained(folders["sd15"])
        embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
        torch.testing.assert_close(backbones["sd15"].encode_prompts(PROMPTS).tensors["prompt_embeds"], embeds)
        torch.testing.assert_close(backbones["sd15"].empty_conditioning(2).tensors["prompt_embeds"], negative)

        pipe = StableDiffusionXLPipeline.from_pretrained(folders["sdxl"])
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
        ours, uncond = backbones["sdxl"].encode_prompts(PROMPTS), backbones["sdxl"].empty_conditioning(2)
        torch.testing.assert_close(ours.tensors["prompt_embeds"], embeds)
        torch.testing.assert_close(ours.tensors["pooled_prompt_embeds"], pooled)
        torch.testing.assert_close(uncond.tensors["prompt_embeds"], negative)
        torch.testing.assert_close(uncond.tensors["pooled_prompt_embeds"], negative_pooled)

        for name in FLOW:
            kwargs = {} if backbones[name].has_t5 else {"text_encoder_3": None, "tokenizer_3": None}
            pipe = StableDiffusion3Pipeline.from_pretrained(folders[name], **kwargs)
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu")
            ours, uncond = backbones[name].encode_prompts(PROMPTS), backbones[name].empty_conditioning(2)
            torch.testing.assert_close(ours.tensors["prompt_embeds"], embeds)
            torch.testing.assert_close(ours.tensors["pooled_prompt_embeds"], pooled)
            torch.testing.assert_close(uncond.tensors["prompt_embeds"], negative)
            torch.testing.assert_close(uncond.tensors["pooled_prompt_embeds"], negative_pooled)
    # Without T5 the T5 tokens are exactly zero; with it they are not.
    clip_tokens = 77
    assert not backbones["sd3"].encode_prompts(PROMPTS).tensors["prompt_embeds"][:, clip_tokens:].any()
    assert backbones["sd3_t5"].encode_prompts(PROMPTS).tensors["prompt_embeds"][:, clip_tokens:].any()


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_bfloat16_frozen_parts_and_teacher(backbones, folders, name):
    # DMD2 runs the teacher in bf16 (outside autocast too): inputs must follow the network's dtype.
    backbone = type(backbones[name])(str(folders[name]), frozen_dtype="bfloat16")
    assert backbone.text_encoder.dtype == backbone.vae.dtype == torch.bfloat16
    teacher = backbone.load_denoiser()
    x_t, level, _ = _inputs(backbone)
    with torch.no_grad():
        reference = backbones[name].predict_x0(teacher, x_t, level, backbones[name].encode_prompts(PROMPTS), 2.0)
        x0 = backbone.predict_x0(teacher.to(torch.bfloat16), x_t, level, backbone.encode_prompts(PROMPTS), 2.0)
        images = backbone.decode(x0)
    assert x0.dtype == images.dtype == torch.float32
    assert (x0 - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd3"])
def test_vae_encode_decode(backbones, name):
    backbone = backbones[name]
    images = torch.rand(2, 3, backbone.height, backbone.width, generator=torch.Generator().manual_seed(0))
    latents = backbone.encode_images(images)
    assert latents.shape == (2, *backbone.latent_shape) and latents.dtype == torch.float32
    vae = backbone.vae
    shift = vae.config.shift_factor or 0.0
    with torch.no_grad():
        z = vae.encode(2 * images - 1).latent_dist.mode()
    torch.testing.assert_close(latents, (z - shift) * vae.config.scaling_factor)

    latents.requires_grad_(True)
    decoded = backbone.decode(latents)
    assert decoded.shape == images.shape and decoded.dtype == torch.float32
    assert 0.0 <= decoded.min() and decoded.max() <= 1.0
    decoded.sum().backward()  # rewards back-propagate through the decoder
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    with torch.no_grad():
        expected = (vae.decode(latents / vae.config.scaling_factor + shift).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(decoded.detach(), expected)


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_features_are_the_mid_block_output(backbones, name):
    backbone = backbones[name]
    student = backbone.load_denoiser()
    x_t, level, cond = _inputs(backbone)
    captured = []
    handle = student.mid_block.register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        backbone.network_output(student, x_t, level, cond)
        features = backbone.features(student, x_t, level, cond)
    handle.remove()
    assert features.shape == (len(x_t), *backbone.feature_shape)
    torch.testing.assert_close(features, captured[0])


def test_sd3_has_no_features(backbones):
    backbone = backbones["sd3"]
    with pytest.raises(NotImplementedError):
        backbone.feature_shape


@pytest.mark.parametrize("name", ["sd15", "sd3"])
def test_load_denoiser_gives_independent_float32_copies(backbones, name):
    first, second = backbones[name].load_denoiser(), backbones[name].load_denoiser()
    p1, p2 = next(first.parameters()), next(second.parameters())
    assert p1.dtype == torch.float32 and p1.requires_grad
    assert torch.equal(p1, p2)
    with torch.no_grad():
        p1.add_(1.0)
    assert not torch.equal(p1, p2)
    assert torch.equal(p2, next(backbones[name].load_denoiser().parameters()))


def test_missing_folder_or_component_names_the_path(folders, tmp_path):
    missing = tmp_path / "no_such_model"
    for cls in (StableDiffusionBackbone, SD3Backbone):
        with pytest.raises(FileNotFoundError, match=str(missing)):
            cls(str(missing))
    for name, cls, component in (("sd15", StableDiffusionBackbone, "vae"), ("sd3", SD3Backbone, "text_encoder_2")):
        partial = tmp_path / f"{name}_without_{component}"
        shutil.copytree(folders[name], partial, ignore=shutil.ignore_patterns(component))
        with pytest.raises(FileNotFoundError, match=str(partial / component)):
            cls(str(partial))


def test_bad_settings_raise_clear_errors(folders, tmp_path):
    folder = tmp_path / "sd15_sample"
    shutil.copytree(folders["sd15"], folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "prediction_type": "sample"}))
    with pytest.raises(ValueError, match="'sample'"):
        StableDiffusionBackbone(str(folder))
    with pytest.raises(ValueError, match="empty_prompt_mode 'none'"):
        StableDiffusionBackbone(str(folders["sd15"]), empty_prompt_mode="none")
    with pytest.raises(ValueError, match="float8"):
        StableDiffusionBackbone(str(folders["sd15"]), frozen_dtype="float8")
    with pytest.raises(ValueError, match="height must be a positive multiple of 4 pixels for this model, got 18"):
        StableDiffusionBackbone(str(folders["sd15"]), height=18)


def test_lcm_scheduler_reaches_student_timesteps(backbones):
    backbone = backbones["sd15"]
    dmd2 = lcm_scheduler_for(backbone.scheduler_config, DMD2_LEVELS, backbone.schedule)
    assert dmd2.config.original_inference_steps == 4 and dmd2.config.num_train_timesteps == 1000
    assert dmd2.config.trained_betas is None
    # A 1-step student at 399 (DMD2 SDXL): same ᾱ, with the LCM grid spacing set to 400.
    one = lcm_scheduler_for(backbone.scheduler_config, torch.tensor([399]), backbone.schedule)
    one.set_timesteps(1)
    assert one.timesteps.tolist() == [399]
    torch.testing.assert_close(one.alphas_cumprod.double(), backbone.schedule.alphas_cumprod)
    for levels in ([999, 749], [999, 500, 250]):
        with pytest.raises(ValueError, match="LCMScheduler"):
            lcm_scheduler_for(backbone.scheduler_config, torch.tensor(levels), backbone.schedule)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 2, 4, 6])
def test_flow_scheduler_reaches_student_sigmas(backbones, shift, num_steps):
    levels = FlowSchedule(shift=shift).generator_levels(num_steps)
    scheduler = flow_scheduler_for(backbones["sd3"].scheduler_config, levels)
    scheduler.set_timesteps(num_steps)
    assert scheduler.config.stochastic_sampling
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), levels, atol=1e-6, rtol=0)
    torch.testing.assert_close(scheduler.timesteps.double(), 1000 * levels, atol=1e-3, rtol=0)


def test_flow_scheduler_rejects_unreachable_sigmas(backbones):
    for levels in ([0.8], [1.0, 0.9, 0.2, 0.1]):
        with pytest.raises(ValueError, match="levels"):
            flow_scheduler_for(backbones["sd3"].scheduler_config, torch.tensor(levels, dtype=torch.float64))


def _exported_latents(pipe, prompt: str, noise: torch.Tensor, num_steps: int, seed: int) -> torch.Tensor:
    kwargs = dict(num_inference_steps=num_steps, guidance_scale=1.0, latents=noise.clone(), output_type="latent")
    if isinstance(pipe, StableDiffusion3Pipeline):
        torch.manual_seed(seed)  # the SD3 pipeline's scheduler draws its re-noising from the global RNG
        return pipe(prompt, **kwargs).images
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


def _student_latents(backbone, student, prompt: str, noise: torch.Tensor, levels: torch.Tensor, seed: int):
    cond = backbone.encode_prompts([prompt])
    generator = None
    if isinstance(backbone, SD3Backbone):
        torch.manual_seed(seed)
    else:
        generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return few_step_sample(
            lambda x, t: backbone.predict_x0(student, x, t, cond), noise, levels, backbone.schedule, "sde", generator
        )


@pytest.mark.parametrize(
    "name, num_steps, pipeline_cls",
    [
        ("sd15", 4, StableDiffusionPipeline),
        ("sdxl", 4, StableDiffusionXLPipeline),
        ("sdxl", 1, StableDiffusionXLPipeline),
        ("sd3", 4, StableDiffusion3Pipeline),
        ("sd3_t5", 2, StableDiffusion3Pipeline),
        ("sd35_medium", 4, StableDiffusion3Pipeline),
        ("sd35_large", 4, StableDiffusion3Pipeline),
    ],
)
def test_export_samples_like_the_student(backbones, tmp_path, name, num_steps, pipeline_cls):
    backbone = backbones[name]
    if isinstance(backbone, SD3Backbone):
        levels = backbone.schedule.generator_levels(num_steps)
    else:
        levels = DMD2_LEVELS if num_steps == 4 else torch.tensor([399])
    student = _perturbed_student(backbone)
    out = backbone.export(student, tmp_path / "export", num_steps, levels)

    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    assert manifest["num_inference_steps"] == num_steps and manifest["guidance_scale"] == 1.0
    pipe = DiffusionPipeline.from_pretrained(out, **manifest.get("from_pretrained_kwargs", {}))
    assert type(pipe) is pipeline_cls
    pipe.scheduler.set_timesteps(num_steps)
    if isinstance(backbone, SD3Backbone):
        assert isinstance(pipe.transformer, SD3Transformer2DModel)
        assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler and pipe.scheduler.config.stochastic_sampling
        torch.testing.assert_close(pipe.scheduler.sigmas[:-1].double(), levels, atol=1e-6, rtol=0)
    else:
        assert isinstance(pipe.unet, UNet2DConditionModel) and type(pipe.scheduler) is LCMScheduler
        assert pipe.scheduler.timesteps.tolist() == levels.tolist()
    assert manifest["timesteps"] == pytest.approx(pipe.scheduler.timesteps.tolist())

    noise = torch.randn(1, *backbone.latent_shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        exported = _exported_latents(pipe, PROMPTS[0], noise, num_steps, seed=11)
    ours = _student_latents(backbone, student, PROMPTS[0], noise, levels, seed=11)
    torch.testing.assert_close(exported, ours, atol=ATOL, rtol=1e-4)
    teacher = _student_latents(backbone, backbone.load_denoiser(), PROMPTS[0], noise, levels, seed=11)
    assert (teacher - exported).abs().max() > 10 * ATOL  # it is the student that was saved


@pytest.mark.parametrize("name", FLOW)
@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_one_denoising_step_equals_the_stock_pipelines(backbones, folders, name, guidance):
    # The stock pipeline's first Euler step (its own CFG, timestep scaling and shift) against ours.
    backbone = backbones[name]
    kwargs = {} if backbone.has_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(folders[name], **kwargs)
    num_steps, captured = 3, {}

    def capture(pipeline, index, timestep, tensors):
        captured.setdefault(index, tensors["latents"].clone())
        return tensors

    x_t = torch.randn(len(PROMPTS), *backbone.latent_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        pipe(PROMPTS, num_inference_steps=num_steps, guidance_scale=guidance, latents=x_t.clone(),
             output_type="latent", callback_on_step_end=capture)
    pipe.scheduler.set_timesteps(num_steps)
    sigma, sigma_next = pipe.scheduler.sigmas[:2].double()
    level = torch.full((len(PROMPTS),), float(sigma), dtype=torch.float64)
    torch.testing.assert_close(level, backbone.schedule.levels_from_fraction(torch.full_like(level, 1.0)))
    with torch.no_grad():
        x0 = backbone.predict_x0(backbone.load_denoiser(), x_t, level, backbone.encode_prompts(PROMPTS), guidance)
    velocity = (x_t.double() - x0.double()) / sigma
    ours = (x_t.double() + (sigma_next - sigma) * velocity).float()
    torch.testing.assert_close(ours, captured[0], atol=ATOL, rtol=1e-4)


def test_export_rejects_other_networks(backbones, tmp_path):
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        backbones["sd15"].export(torch.nn.Linear(2, 2), tmp_path, 4, DMD2_LEVELS)
    with pytest.raises(ValueError, match="levels"):
        backbones["sd15"].export(backbones["sd15"].load_denoiser(), tmp_path, 3, DMD2_LEVELS)
