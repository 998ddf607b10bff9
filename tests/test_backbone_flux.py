"""FLUX.1-dev / FLUX.1-schnell adapter against the stock FluxPipeline on tiny random pipelines."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from rdm_lightning.backbones.flux import FluxBackbone, flux_pipeline_sigmas, flux_scheduler_for
from rdm_lightning.backbones.stable_diffusion import EXPORT_MANIFEST
from rdm_lightning.core.parameterization import Prediction
from rdm_lightning.core.sampling import few_step_sample
from rdm_lightning.core.schedules import FlowSchedule
from tiny_flux import T5_WIDTH, make_tiny_flux

# Prompts of different lengths; a non-square size catches rows and columns swapped in the packing.
PROMPTS = ["a photo of a cat", "a red car"]
HEIGHT, WIDTH = 16, 24
T5_LENGTHS = {"dev": 512, "schnell": 256}
ATOL = 1e-4
VARIANTS = ("dev", "schnell")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_flux")
    return {variant: make_tiny_flux(root / variant, variant) for variant in VARIANTS}


@pytest.fixture(scope="module")
def backbones(folders) -> dict[str, FluxBackbone]:
    return {
        variant: FluxBackbone(str(folders[variant]), height=HEIGHT, width=WIDTH,
                              max_sequence_length=T5_LENGTHS[variant])
        for variant in VARIANTS
    }


@pytest.fixture(scope="module")
def pipes(folders) -> dict[str, FluxPipeline]:
    return {variant: FluxPipeline.from_pretrained(folders[variant]) for variant in VARIANTS}


def _pack(latents: torch.Tensor) -> torch.Tensor:
    return FluxPipeline._pack_latents(latents, *latents.shape)


def _unpack(tokens: torch.Tensor, backbone: FluxBackbone) -> torch.Tensor:
    return FluxPipeline._unpack_latents(tokens, backbone.height, backbone.width, backbone.vae_scale_factor)


def _call(pipe: FluxPipeline, variant: str, prompt, latents: torch.Tensor, num_steps: int,
          height: int = HEIGHT, width: int = WIDTH, **kwargs):
    with torch.no_grad():
        return pipe(prompt, height=height, width=width, num_inference_steps=num_steps, latents=latents.clone(),
                    max_sequence_length=T5_LENGTHS[variant], **kwargs).images


def _perturbed_student(backbone: FluxBackbone) -> FluxTransformer2DModel:
    # A student that differs from the teacher, so the export test sees which network was saved.
    student = backbone.load_denoiser()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return student


def test_loads_schedule_prediction_guidance_and_frozen_modules(backbones, pipes, folders):
    for variant, backbone in backbones.items():
        assert backbone.prediction is Prediction.FLOW_VELOCITY
        assert backbone.latent_shape == (4, 8, 12) and (backbone.height, backbone.width) == (HEIGHT, WIDTH)
        params = list(backbone.parameters())
        assert params and not any(p.requires_grad for p in params)
        backbone.train()
        assert not any(m.training for m in backbone.modules())
        assert {"text_encoder", "text_encoder_2", "vae"} <= set(dict(backbone.named_children()))
    dev, schnell = backbones["dev"], backbones["schnell"]
    # μ as the pipeline computes it: its calculate_shift of the packed token count (4 × 6).
    config = pipes["dev"].scheduler.config
    mu = calculate_shift(24, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)
    assert dev.schedule.dynamic_shift_mu == mu
    assert dev.guidance_embedding and dev.student_guidance == 3.5
    assert schnell.schedule.dynamic_shift_mu is None and schnell.schedule.shift == 1.0
    assert not schnell.guidance_embedding and schnell.student_guidance is None
    # The pipeline's own default size: default_sample_size (128) latent cells times the VAE factor.
    default = FluxBackbone(str(folders["schnell"]))
    assert (default.height, default.width) == (128 * 2, 128 * 2) and default.latent_shape == (4, 128, 128)
    assert FluxBackbone(str(folders["dev"]), height=HEIGHT, width=WIDTH, guidance=2.0).student_guidance == 2.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_schedule_levels_are_the_pipelines_sigmas(backbones, pipes, variant):
    # The teacher's pipeline sigmas at this size (its dynamic shift or none) are our schedule's levels.
    backbone, num_steps = backbones[variant], 28
    _call(pipes[variant], variant, PROMPTS[0], _pack(torch.zeros(1, *backbone.latent_shape)), num_steps,
          output_type="latent")
    torch.testing.assert_close(pipes[variant].scheduler.sigmas[:-1].double(),
                               backbone.schedule.generator_levels(num_steps), atol=1e-6, rtol=0)


def test_set_image_size_follows_the_pipelines_shift(folders, pipes):
    # rdm sample --height/--width: the dynamic shift follows the new size as the pipeline's does.
    backbone = FluxBackbone(str(folders["dev"]), height=HEIGHT, width=WIDTH)
    backbone.set_image_size(32, 16)
    assert backbone.latent_shape == (4, 16, 8) and (backbone.height, backbone.width) == (32, 16)
    _call(pipes["dev"], "dev", PROMPTS[0], _pack(torch.zeros(1, *backbone.latent_shape)), 28, height=32, width=16,
          output_type="latent")
    torch.testing.assert_close(pipes["dev"].scheduler.sigmas[:-1].double(), backbone.schedule.generator_levels(28),
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="multiple of 4 pixels"):
        backbone.set_image_size(30, 16)


@pytest.mark.parametrize("variant", VARIANTS)
def test_prompt_encoding_matches_the_pipeline(backbones, pipes, variant):
    backbone, pipe, length = backbones[variant], pipes[variant], T5_LENGTHS[variant]
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, device="cpu", max_sequence_length=length)
        negative, negative_pooled, _ = pipe.encode_prompt([""] * 2, None, device="cpu", max_sequence_length=length)
    ours, empty = backbone.encode_prompts(PROMPTS), backbone.empty_conditioning(2)
    assert ours.tensors["prompt_embeds"].shape == (2, length, T5_WIDTH)
    assert text_ids.shape == (length, 3) and not text_ids.any()  # what network_output builds
    torch.testing.assert_close(ours.tensors["prompt_embeds"], embeds, atol=0, rtol=0)
    torch.testing.assert_close(ours.tensors["pooled_prompt_embeds"], pooled, atol=0, rtol=0)
    torch.testing.assert_close(empty.tensors["prompt_embeds"], negative, atol=0, rtol=0)
    torch.testing.assert_close(empty.tensors["pooled_prompt_embeds"], negative_pooled, atol=0, rtol=0)
    # One fixed shape per prompt, whatever else is in the batch (cacheable per prompt).
    alone = backbone.encode_prompts(PROMPTS[1:])
    for key, value in alone.tensors.items():
        torch.testing.assert_close(value, ours.tensors[key][1:])


def test_over_long_prompts_are_truncated_as_the_pipeline(backbones, pipes):
    # Longer than CLIP's 77 tokens and T5's 512 (about one token per character in the tiny tokenizers).
    long = " ".join(["a photo of a red cat"] * 40)
    for variant in VARIANTS:
        backbone, length = backbones[variant], T5_LENGTHS[variant]
        with torch.no_grad():
            embeds, pooled, _ = pipes[variant].encode_prompt(long, None, device="cpu", max_sequence_length=length)
        ours = backbone.encode_prompts([long, long + " on a mat"])
        assert ours.tensors["prompt_embeds"].shape == (2, length, T5_WIDTH)
        torch.testing.assert_close(ours.tensors["prompt_embeds"][:1], embeds, atol=0, rtol=0)
        torch.testing.assert_close(ours.tensors["pooled_prompt_embeds"][:1], pooled, atol=0, rtol=0)
        # What lies beyond both limits changes nothing.
        for value in ours.tensors.values():
            torch.testing.assert_close(value[0], value[1], atol=0, rtol=0)


@pytest.mark.parametrize(
    "variant, guidance, pipeline_kwargs",
    [
        ("dev", 3.5, dict(guidance_scale=3.5)),  # the teacher's guidance through the embedding
        ("dev", 5.0, dict(guidance_scale=5.0)),
        ("schnell", 1.0, {}),  # no guidance input
        ("schnell", 2.0, dict(true_cfg_scale=2.0, negative_prompt=[""] * 2)),  # true CFG on the empty prompt
    ],
)
def test_one_denoising_step_equals_the_pipelines(backbones, pipes, variant, guidance, pipeline_kwargs):
    backbone, pipe, num_steps, captured = backbones[variant], pipes[variant], 3, {}

    def capture(pipeline, index, timestep, tensors):
        captured.setdefault(index, tensors["latents"].clone())
        return tensors

    x_t = torch.randn(len(PROMPTS), *backbone.latent_shape, generator=torch.Generator().manual_seed(3))
    _call(pipe, variant, PROMPTS, _pack(x_t), num_steps, output_type="latent", callback_on_step_end=capture,
          **pipeline_kwargs)
    sigma, sigma_next = pipe.scheduler.sigmas[:2].double()
    level = torch.full((len(PROMPTS),), float(sigma), dtype=torch.float64)
    torch.testing.assert_close(level, backbone.schedule.generator_levels(num_steps)[:1].expand(2))
    with torch.no_grad():
        x0 = backbone.predict_x0(backbone.load_denoiser(), x_t, level, backbone.encode_prompts(PROMPTS), guidance)
    velocity = (x_t.double() - x0.double()) / sigma
    ours = (x_t.double() + (sigma_next - sigma) * velocity).float()
    torch.testing.assert_close(_pack(ours), captured[0], atol=ATOL, rtol=1e-4)


def test_student_guidance_and_network_output_arguments(backbones):
    dev, schnell = backbones["dev"], backbones["schnell"]
    x_t = torch.randn(2, *dev.latent_shape, generator=torch.Generator().manual_seed(0))
    level = torch.tensor([0.9, 0.4], dtype=torch.float64)
    teacher, cond = dev.load_denoiser(), dev.encode_prompts(PROMPTS)
    with torch.no_grad():
        student = dev.predict_x0(teacher, x_t, level, cond)  # the student's embedded guidance, 3.5
        explicit = dev.predict_x0(teacher, x_t, level, cond, 3.5)
        other = dev.predict_x0(teacher, x_t, level, cond, 1.0)
        raw = dev.network_output(teacher, x_t, level, cond, guidance=3.5)
    torch.testing.assert_close(student, explicit, atol=0, rtol=0)
    assert (student - other).abs().max() > 1e-3 and raw.shape == x_t.shape
    torch.testing.assert_close(student, (x_t.double() - level.view(-1, 1, 1, 1) * raw.double()).float())
    with pytest.raises(ValueError, match="guidance=None"):
        dev.network_output(teacher, x_t, level, cond)
    with pytest.raises(ValueError, match="guidance=2.0"):
        schnell.network_output(schnell.load_denoiser(), x_t, level, schnell.encode_prompts(PROMPTS), guidance=2.0)


def test_bfloat16_frozen_parts_and_teacher(backbones, folders):
    backbone = FluxBackbone(str(folders["dev"]), height=HEIGHT, width=WIDTH, frozen_dtype="bfloat16")
    assert backbone.text_encoder.dtype == backbone.text_encoder_2.dtype == backbone.vae.dtype == torch.bfloat16
    teacher = backbone.load_denoiser()
    x_t = torch.randn(2, *backbone.latent_shape, generator=torch.Generator().manual_seed(0))
    level = torch.tensor([1.0, 0.5], dtype=torch.float64)
    with torch.no_grad():
        reference = backbones["dev"].predict_x0(teacher, x_t, level, backbones["dev"].encode_prompts(PROMPTS), 3.5)
        x0 = backbone.predict_x0(teacher.to(torch.bfloat16), x_t, level, backbone.encode_prompts(PROMPTS), 3.5)
        images = backbone.decode(x0)
    assert x0.dtype == images.dtype == torch.float32
    assert (x0 - reference).abs().max() < 0.05 * reference.abs().max()


def test_vae_decode_and_encode_match_the_pipeline(backbones, pipes):
    backbone, pipe = backbones["dev"], pipes["dev"]
    x_t = torch.randn(1, *backbone.latent_shape, generator=torch.Generator().manual_seed(5))
    # The pipeline's own decoding of its one-step result against ours of the same latents.
    latents = _call(pipe, "dev", PROMPTS[0], _pack(x_t), 1, output_type="latent")
    images = _call(pipe, "dev", PROMPTS[0], _pack(x_t), 1, output_type="pt")
    unpacked = _unpack(latents, backbone).requires_grad_(True)
    decoded = backbone.decode(unpacked)
    assert decoded.dtype == torch.float32 and decoded.shape == (1, 3, HEIGHT, WIDTH)
    torch.testing.assert_close(decoded.detach(), images, atol=1e-5, rtol=1e-5)
    decoded.sum().backward()  # rewards back-propagate through the decoder
    assert unpacked.grad is not None and unpacked.grad.abs().sum() > 0

    vae = backbone.vae
    pixels = torch.rand(2, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))
    encoded = backbone.encode_images(pixels)
    assert encoded.shape == (2, *backbone.latent_shape) and encoded.dtype == torch.float32
    with torch.no_grad():
        z = vae.encode(2 * pixels - 1).latent_dist.mode()
    # The FLUX img2img pipelines' normalisation: (z − shift_factor)·scaling_factor.
    torch.testing.assert_close(encoded, (z - vae.config.shift_factor) * vae.config.scaling_factor)


@pytest.mark.parametrize("levels", [
    FlowSchedule(dynamic_shift_mu=0.46).generator_levels(4),
    FlowSchedule(dynamic_shift_mu=1.15).generator_levels(2),
    FlowSchedule(shift=3.0).generator_levels(6),
    FlowSchedule().generator_levels(3),
    FlowSchedule().generator_levels(1),
    torch.tensor([1.0, 0.7], dtype=torch.float64),
])
def test_flux_scheduler_reaches_student_levels(backbones, levels):
    backbone = backbones["dev"]
    scheduler = flux_scheduler_for(backbone.scheduler_config, levels)
    assert scheduler.config.stochastic_sampling and not scheduler.config.use_dynamic_shifting
    # As the pipeline sets it (at any μ: the shift is static).
    for mu in (backbone.schedule.dynamic_shift_mu, 2.0):
        scheduler.set_timesteps(sigmas=flux_pipeline_sigmas(len(levels)), mu=mu)
        torch.testing.assert_close(scheduler.sigmas[:-1].double(), levels, atol=1e-6, rtol=0)


def test_flux_scheduler_reaches_terminal_stretched_grids_and_rejects_others(backbones):
    config = backbones["dev"].scheduler_config
    stretched = FlowMatchEulerDiscreteScheduler(shift=2.5, shift_terminal=0.3)
    stretched.set_timesteps(sigmas=flux_pipeline_sigmas(5))
    levels = stretched.sigmas[:-1].double()
    scheduler = flux_scheduler_for(config, levels)
    assert scheduler.config.shift == pytest.approx(2.5, rel=1e-4) and scheduler.config.shift_terminal is not None
    for levels in ([0.8], [1.0, 0.9, 0.2, 0.1]):
        with pytest.raises(ValueError, match="levels"):
            flux_scheduler_for(config, torch.tensor(levels, dtype=torch.float64))


def _student_latents(backbone, student, prompt: str, noise: torch.Tensor, levels: torch.Tensor, seed: int):
    """few_step_sample ("sde") of ``student`` as ``generate`` runs it: fresh noise from the backbone's
    sampler_noise (the pipeline's packed order), from the global RNG the exported scheduler draws from too."""
    cond = backbone.encode_prompts([prompt])
    torch.manual_seed(seed)
    with torch.no_grad():
        return _pack(few_step_sample(lambda x, t: backbone.predict_x0(student, x, t, cond), noise, levels,
                                     backbone.schedule, "sde", None, backbone.sampler_noise))


@pytest.mark.parametrize("variant, num_steps", [("dev", 4), ("dev", 1), ("schnell", 2), ("schnell", 4)])
def test_export_samples_like_the_student(backbones, tmp_path, variant, num_steps):
    backbone = backbones[variant]
    levels = backbone.schedule.generator_levels(num_steps)
    student = _perturbed_student(backbone)
    out = backbone.export(student, tmp_path / "export", num_steps, levels)

    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    assert manifest["num_inference_steps"] == num_steps
    assert manifest["guidance_scale"] == (3.5 if variant == "dev" else 1.0)
    assert manifest["max_sequence_length"] == T5_LENGTHS[variant]
    assert (manifest["height"], manifest["width"]) == (HEIGHT, WIDTH)
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe) is FluxPipeline and isinstance(pipe.transformer, FluxTransformer2DModel)
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler and pipe.scheduler.config.stochastic_sampling
    pipe.scheduler.set_timesteps(sigmas=flux_pipeline_sigmas(num_steps), mu=backbone.schedule.dynamic_shift_mu)
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1].double(), levels, atol=1e-6, rtol=0)
    assert manifest["timesteps"] == pytest.approx(pipe.scheduler.timesteps.tolist())
    assert manifest["sigmas"] == pytest.approx(levels.tolist(), abs=1e-6)

    noise = torch.randn(1, *backbone.latent_shape, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(11)  # the scheduler's re-noising comes from the global RNG
    with torch.no_grad():
        exported = pipe(PROMPTS[0], height=manifest["height"], width=manifest["width"],
                        num_inference_steps=num_steps, guidance_scale=manifest["guidance_scale"],
                        max_sequence_length=manifest["max_sequence_length"], latents=_pack(noise),
                        output_type="latent").images
    ours = _student_latents(backbone, student, PROMPTS[0], noise, levels, seed=11)
    torch.testing.assert_close(exported, ours, atol=ATOL, rtol=1e-4)
    teacher = _student_latents(backbone, backbone.load_denoiser(), PROMPTS[0], noise, levels, seed=11)
    assert (teacher - exported).abs().max() > 10 * ATOL  # it is the student that was saved


def test_export_rejects_other_networks_and_levels(backbones, tmp_path):
    backbone = backbones["dev"]
    with pytest.raises(TypeError, match="FluxTransformer2DModel"):
        backbone.export(torch.nn.Linear(2, 2), tmp_path, 2, backbone.schedule.generator_levels(2))
    with pytest.raises(ValueError, match="levels"):
        backbone.export(backbone.load_denoiser(), tmp_path, 3, backbone.schedule.generator_levels(2))


def test_lora_targets_are_the_attention_projections(backbones):
    names = [name for name, _ in backbones["dev"].load_denoiser().named_modules()]
    for target in backbones["dev"].lora_target_modules:
        assert any(name.endswith(f".{target}") for name in names), target
    # The single-stream blocks' attention is covered too.
    assert any(name.startswith("single_transformer_blocks.") and name.endswith(".attn.to_q") for name in names)


def test_embedding_cache_round_trip(folders, tmp_path):
    cache = tmp_path / "cache"
    first = FluxBackbone(str(folders["schnell"]), height=HEIGHT, width=WIDTH, embedding_cache=str(cache))
    encoded = first.encode_prompts(PROMPTS)
    first.flush_embedding_cache()
    second = FluxBackbone(str(folders["schnell"]), height=HEIGHT, width=WIDTH, embedding_cache=str(cache))
    cached = second.encode_prompts(PROMPTS)
    assert not second.text_encoders_loaded
    for key, value in encoded.tensors.items():
        torch.testing.assert_close(cached.tensors[key], value, atol=0, rtol=0)
    with pytest.raises(ValueError, match="max_sequence_length"):
        FluxBackbone(str(folders["schnell"]), height=HEIGHT, width=WIDTH, embedding_cache=str(cache),
                     max_sequence_length=256)


def test_bad_folders_and_settings_raise_clear_errors(folders, tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        FluxBackbone(str(missing))
    for component in ("text_encoder_2", "transformer"):
        partial = tmp_path / f"without_{component}"
        shutil.copytree(folders["dev"], partial, ignore=shutil.ignore_patterns(component))
        with pytest.raises(FileNotFoundError, match=str(partial / component)):
            FluxBackbone(str(partial), height=HEIGHT, width=WIDTH)
    other = tmp_path / "sd3_named"
    shutil.copytree(folders["dev"], other)
    index = other / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline.*accepted: FluxPipeline"):
        FluxBackbone(str(other))
    with pytest.raises(ValueError, match="height must be a positive multiple of 4 pixels for this model, got 18"):
        FluxBackbone(str(folders["dev"]), height=18, width=WIDTH)
    with pytest.raises(ValueError, match="max_sequence_length .* 512 .* got 513"):
        FluxBackbone(str(folders["dev"]), max_sequence_length=513)
    with pytest.raises(ValueError, match="guidance=3.5 given.*guidance_embeds: false"):
        FluxBackbone(str(folders["schnell"]), height=HEIGHT, width=WIDTH, guidance=3.5)
