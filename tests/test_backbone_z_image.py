"""Z-Image adapter against the stock ``ZImagePipeline`` on tiny random pipelines built at test time."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

from rdm_lightning.backbones.stable_diffusion import EXPORT_MANIFEST
from rdm_lightning.backbones.flux import flux_scheduler_for
from rdm_lightning.backbones.z_image import ZImageBackbone
from rdm_lightning.core.parameterization import Prediction
from rdm_lightning.core.sampling import few_step_sample
from rdm_lightning.core.schedules import FlowSchedule
from tiny_z_image import TEXT_HIDDEN, make_tiny_z_image

# Prompts of different token lengths, so the pipeline's per-prompt caption lists differ in length.
PROMPTS = ["a photo of a cat", "a red car parked on a long empty road at night, rain"]
SIZE = 16  # pixels: 8×8 latents, 16 image tokens
ATOL = 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_z_image")
    return {
        "static": make_tiny_z_image(root / "static"),
        "dynamic": make_tiny_z_image(root / "dynamic", dynamic_shift=True),
    }


@pytest.fixture(scope="module")
def backbones(folders) -> dict[str, ZImageBackbone]:
    return {name: ZImageBackbone(str(folder), height=SIZE, width=SIZE) for name, folder in folders.items()}


@pytest.fixture(scope="module")
def pipes(folders) -> dict[str, ZImagePipeline]:
    pipes = {name: ZImagePipeline.from_pretrained(folder) for name, folder in folders.items()}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def _pipeline_sigmas(pipe: ZImagePipeline, num_steps: int, height: int, width: int) -> torch.Tensor:
    """The sigmas ``ZImagePipeline.__call__`` sets at this size (its μ, its default sigma grid)."""
    config = pipe.scheduler.config
    latent_h, latent_w = (2 * (side // (pipe.vae_scale_factor * 2)) for side in (height, width))
    mu = calculate_shift(
        (latent_h // 2) * (latent_w // 2),
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(num_steps), mu=mu)
    return scheduler.sigmas[:-1].double()


def _perturbed_student(backbone: ZImageBackbone) -> ZImageTransformer2DModel:
    # A student that differs from the teacher, so the export test sees which network was saved.
    student = backbone.load_denoiser()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return student


def test_loads_schedule_prediction_size_and_frozen_modules(backbones, folders, pipes):
    static, dynamic = backbones["static"], backbones["dynamic"]
    for backbone in backbones.values():
        assert backbone.prediction is Prediction.FLOW_VELOCITY
        assert backbone.latent_shape == (4, 8, 8) and (backbone.height, backbone.width) == (SIZE, SIZE)
        assert backbone.lora_file_prefix == "transformer." and not backbone.guidance_embedding
        params = list(backbone.parameters())
        assert params and not any(p.requires_grad for p in params)
        backbone.train()
        assert not any(m.training for m in backbone.modules())
        assert {"text_encoder", "vae"} <= set(dict(backbone.named_children()))
    assert static.schedule.shift == 3.0 and static.schedule.dynamic_shift_mu is None
    # Dynamic shift: μ as the pipeline computes it from the image tokens at this size (4×4 patches of 2×2).
    pipe = pipes["dynamic"]
    config = pipe.scheduler.config
    expected_mu = calculate_shift(16, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                                  config.max_shift)
    assert dynamic.schedule.dynamic_shift_mu == pytest.approx(expected_mu, abs=1e-12)
    # The student's levels are the pipeline's own sigmas for N steps, static and dynamic alike.
    for name, backbone in backbones.items():
        for num_steps in (1, 4, 8):
            torch.testing.assert_close(
                backbone.schedule.generator_levels(num_steps), _pipeline_sigmas(pipes[name], num_steps, SIZE, SIZE),
                atol=1e-6, rtol=0,
            )
    # Default size: the pipeline's 1024 (only the shapes are computed).
    default = ZImageBackbone(str(folders["dynamic"]))
    assert (default.height, default.width) == (1024, 1024) and default.latent_shape == (4, 512, 512)
    assert default.schedule.dynamic_shift_mu == pytest.approx(
        calculate_shift(256 * 256, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                        config.max_shift)
    )


def test_prompt_encoding_matches_the_pipeline(backbones, pipes):
    backbone, pipe = backbones["static"], pipes["static"]
    with torch.no_grad():
        positive, negative = pipe.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=True)
    cond, uncond = backbone.encode_prompts(PROMPTS), backbone.empty_conditioning(len(PROMPTS))
    assert set(cond.tensors) == {"prompt_embeds", "prompt_mask"}
    assert cond.tensors["prompt_embeds"].shape == (2, 512, TEXT_HIDDEN)
    assert cond.tensors["prompt_mask"].dtype == torch.bool
    lengths = cond.tensors["prompt_mask"].sum(dim=1).tolist()
    assert lengths == [len(p) for p in positive] and lengths[0] != lengths[1]
    for ours, theirs in ((cond, positive), (uncond, negative)):
        embeds, mask = ours.tensors["prompt_embeds"], ours.tensors["prompt_mask"]
        for i, expected in enumerate(theirs):
            torch.testing.assert_close(embeds[i][mask[i]], expected)
            assert mask[i, : len(expected)].all() and not embeds[i][~mask[i]].any()
    # Fixed shape per prompt: a prompt's conditioning does not depend on the rest of the batch.
    alone = backbone.encode_prompts(PROMPTS[:1])
    for key, value in alone.tensors.items():
        torch.testing.assert_close(value[0], cond.tensors[key][0])


def test_over_long_prompt_is_truncated_as_the_pipeline_does(folders, pipes):
    backbone = ZImageBackbone(str(folders["static"]), height=SIZE, width=SIZE, max_sequence_length=24)
    long_prompt = "a very long prompt about a cat " * 4
    with torch.no_grad():
        positive, _ = pipes["static"].encode_prompt([long_prompt], device="cpu", max_sequence_length=24)
    cond = backbone.encode_prompts([long_prompt])
    assert cond.tensors["prompt_embeds"].shape == (1, 24, TEXT_HIDDEN)
    assert cond.tensors["prompt_mask"].all() and len(positive[0]) == 24
    torch.testing.assert_close(cond.tensors["prompt_embeds"][0], positive[0])


def test_padding_does_not_change_the_output(backbones):
    backbone = backbones["static"]
    network = backbone.load_denoiser()
    x_t = torch.randn(2, *backbone.latent_shape, generator=torch.Generator().manual_seed(0))
    level = torch.tensor([0.9, 0.4], dtype=torch.float64)
    cond = backbone.encode_prompts(PROMPTS)
    with torch.no_grad():
        batched = backbone.network_output(network, x_t, level, cond)
        single = [backbone.network_output(network, x_t[i : i + 1], level[i : i + 1], cond[i : i + 1]) for i in range(2)]
    torch.testing.assert_close(batched, torch.cat(single), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["static", "dynamic"])
@pytest.mark.parametrize("pipeline_guidance", [0.0, 2.5])
def test_denoising_steps_match_the_pipeline(backbones, pipes, name, pipeline_guidance):
    """Each step of the stock pipeline (transformer call, CFG, negation, Euler step) equals
    x_σ + (σ_next − σ)·v from our predict_x0, with our CFG w = the pipeline's g + 1."""
    backbone, pipe = backbones[name], pipes[name]
    num_steps = 3
    noise = torch.randn(len(PROMPTS), *backbone.latent_shape, generator=torch.Generator().manual_seed(3))
    steps: list[torch.Tensor] = []

    def record(pipeline, i, t, kwargs):
        steps.append(kwargs["latents"].clone())
        return {}

    with torch.no_grad():
        pipe(list(PROMPTS), height=SIZE, width=SIZE, num_inference_steps=num_steps, guidance_scale=pipeline_guidance,
             latents=noise.clone(), output_type="latent", callback_on_step_end=record)
    sigmas = pipe.scheduler.sigmas.double()
    torch.testing.assert_close(sigmas[:-1], backbone.schedule.generator_levels(num_steps), atol=1e-6, rtol=0)

    network = backbone.load_denoiser()
    cond = backbone.encode_prompts(PROMPTS)
    w = None if pipeline_guidance == 0.0 else pipeline_guidance + 1.0
    x_t = noise
    for i, expected in enumerate(steps):
        sigma = sigmas[i].expand(len(PROMPTS))
        with torch.no_grad():
            x0 = backbone.predict_x0(network, x_t, sigma, cond, guidance_scale=w)
        velocity = (x_t.double() - x0.double()) / sigma.view(-1, 1, 1, 1)
        ours = (x_t.double() + (sigmas[i + 1] - sigmas[i]) * velocity).float()
        torch.testing.assert_close(ours, expected, atol=ATOL, rtol=1e-4)
        x_t = expected
    if w is not None:  # CFG is really applied
        with torch.no_grad():
            plain = backbone.predict_x0(network, noise, sigmas[0].expand(2), cond)
            guided = backbone.predict_x0(network, noise, sigmas[0].expand(2), cond, guidance_scale=w)
        assert (plain - guided).abs().max() > 10 * ATOL


def test_predict_x0_is_x_minus_sigma_v_and_differentiable(backbones):
    backbone = backbones["static"]
    network = backbone.load_denoiser()
    x_t = torch.randn(2, *backbone.latent_shape, generator=torch.Generator().manual_seed(1))
    level = torch.tensor([1.0, 0.43], dtype=torch.float64)
    cond = backbone.encode_prompts(PROMPTS)
    output = backbone.network_output(network, x_t, level, cond)
    x0 = backbone.predict_x0(network, x_t, level, cond)
    assert output.shape == x_t.shape and x0.dtype == torch.float32
    torch.testing.assert_close(x0, (x_t - level.float().view(-1, 1, 1, 1) * output).detach(), atol=ATOL, rtol=1e-5)
    x0.sum().backward()  # the student trains through network_output's per-sample lists
    assert all(p.grad is not None for p in network.all_x_embedder.parameters())


def test_bfloat16_text_encoder_with_float32_transformer(folders, backbones):
    backbone = ZImageBackbone(str(folders["static"]), height=SIZE, width=SIZE, frozen_dtype="bfloat16")
    assert backbone.text_encoder.dtype == backbone.vae.dtype == torch.bfloat16
    network = backbone.load_denoiser()
    x_t = torch.randn(2, *backbone.latent_shape, generator=torch.Generator().manual_seed(2))
    level = torch.tensor([0.8, 0.3], dtype=torch.float64)
    with torch.no_grad():
        x0 = backbone.predict_x0(network, x_t, level, backbone.encode_prompts(PROMPTS), 3.0)
        float32 = backbones["static"]
        reference = float32.predict_x0(network, x_t, level, float32.encode_prompts(PROMPTS), 3.0)
        images = backbone.decode(x0)
    assert x0.dtype == images.dtype == torch.float32
    assert (x0 - reference).abs().max() < 0.05 * reference.abs().max()


def test_vae_encode_decode_use_the_pipeline_normalisation(backbones, pipes):
    backbone, vae = backbones["static"], pipes["static"].vae
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    assert (scale, shift) == (0.3611, 0.1159)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    latents = backbone.encode_images(images)
    assert latents.shape == (2, *backbone.latent_shape) and latents.dtype == torch.float32
    with torch.no_grad():
        z = vae.encode(2 * images - 1).latent_dist.mode()
    torch.testing.assert_close(latents, (z - shift) * scale)

    latents.requires_grad_(True)
    decoded = backbone.decode(latents)
    assert decoded.shape == images.shape and decoded.dtype == torch.float32
    decoded.sum().backward()  # rewards back-propagate through the decoder
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    with torch.no_grad():
        # What ZImagePipeline does before VaeImageProcessor.postprocess (which maps [-1, 1] to [0, 1]).
        expected = (vae.decode(latents / scale + shift).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(decoded.detach(), expected)


def test_load_denoiser_gives_independent_float32_copies(backbones):
    first, second = backbones["static"].load_denoiser(), backbones["static"].load_denoiser()
    assert isinstance(first, ZImageTransformer2DModel)
    p1, p2 = next(first.parameters()), next(second.parameters())
    assert p1.dtype == torch.float32 and p1.requires_grad and torch.equal(p1, p2)
    with torch.no_grad():
        p1.add_(1.0)
    assert not torch.equal(p1, p2)


def test_lora_targets_are_the_attention_projections(backbones):
    names = [name for name, _ in backbones["static"].load_denoiser().named_modules()]
    for target in backbones["static"].lora_target_modules:
        matched = [n for n in names if n.endswith(f".{target}")]
        # noise refiner + context refiner + main layers: one attention each in the tiny model.
        assert len(matched) == 3 and all(".attention." in n for n in matched), (target, matched)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 2, 4, 6])
def test_scheduler_reaches_student_sigmas(backbones, shift, num_steps):
    levels = FlowSchedule(shift=shift).generator_levels(num_steps)
    scheduler = flux_scheduler_for(backbones["static"].scheduler_config, levels)
    assert scheduler.config.stochastic_sampling and not scheduler.config.use_dynamic_shifting
    scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(num_steps), mu=0.7)  # as the pipeline calls it
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), levels, atol=1e-6, rtol=0)
    torch.testing.assert_close(scheduler.timesteps.double(), 1000 * levels, atol=1e-3, rtol=0)


def test_scheduler_reaches_a_grid_stretched_to_a_terminal_sigma(backbones):
    shifted = FlowSchedule(shift=2.0).generator_levels(4)
    # The scheduler's shift_terminal stretch of 1 − σ, to end at σ = 0.1.
    levels = 1 - (1 - shifted) * (1 - 0.1) / (1 - shifted[-1])
    scheduler = flux_scheduler_for(backbones["static"].scheduler_config, levels)
    assert scheduler.config.shift == pytest.approx(2.0) and scheduler.config.shift_terminal == pytest.approx(0.1)
    scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(4))
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), levels, atol=1e-6, rtol=0)


def test_scheduler_rejects_unreachable_sigmas(backbones):
    for levels in ([0.8], [1.0, 0.9, 0.2, 0.1]):
        with pytest.raises(ValueError, match="levels"):
            flux_scheduler_for(backbones["static"].scheduler_config, torch.tensor(levels, dtype=torch.float64))


def _student_latents(backbone, student, prompt: str, noise: torch.Tensor, levels: torch.Tensor, seed: int):
    cond = backbone.encode_prompts([prompt])
    torch.manual_seed(seed)  # the pipeline's scheduler draws its re-noising from the global RNG
    with torch.no_grad():
        return few_step_sample(
            lambda x, t: backbone.predict_x0(student, x, t, cond), noise, levels, backbone.schedule, "sde"
        )


@pytest.mark.parametrize("name, num_steps", [("static", 4), ("static", 1), ("dynamic", 3)])
def test_export_samples_like_the_student(backbones, tmp_path, name, num_steps):
    backbone = backbones[name]
    levels = backbone.schedule.generator_levels(num_steps)
    student = _perturbed_student(backbone)
    out = backbone.export(student, tmp_path / "export", num_steps, levels)

    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    assert manifest["num_inference_steps"] == num_steps and manifest["guidance_scale"] == 0.0
    assert manifest["sigmas"] == pytest.approx(levels.tolist(), abs=1e-6)
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe) is ZImagePipeline and isinstance(pipe.transformer, ZImageTransformer2DModel)
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler and pipe.scheduler.config.stochastic_sampling

    noise = torch.randn(1, *backbone.latent_shape, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(11)
    with torch.no_grad():
        exported = pipe(PROMPTS[0], height=SIZE, width=SIZE, num_inference_steps=num_steps,
                        guidance_scale=manifest["guidance_scale"], latents=noise.clone(), output_type="latent").images
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1].double(), levels, atol=1e-6, rtol=0)
    assert manifest["timesteps"] == pytest.approx(pipe.scheduler.timesteps.tolist())
    ours = _student_latents(backbone, student, PROMPTS[0], noise, levels, seed=11)
    torch.testing.assert_close(exported, ours, atol=ATOL, rtol=1e-4)
    teacher = _student_latents(backbone, backbone.load_denoiser(), PROMPTS[0], noise, levels, seed=11)
    assert (teacher - exported).abs().max() > 10 * ATOL  # it is the student that was saved


def test_export_rejects_other_networks_and_levels(backbones, tmp_path):
    backbone = backbones["static"]
    with pytest.raises(TypeError, match="ZImageTransformer2DModel"):
        backbone.export(torch.nn.Linear(2, 2), tmp_path, 2, backbone.schedule.generator_levels(2))
    with pytest.raises(ValueError, match="levels"):
        backbone.export(backbone.load_denoiser(), tmp_path, 3, backbone.schedule.generator_levels(2))


def test_bad_folders_and_sizes_raise_clear_errors(folders, tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ZImageBackbone(str(missing))
    partial = tmp_path / "without_text_encoder"
    shutil.copytree(folders["static"], partial, ignore=shutil.ignore_patterns("text_encoder"))
    with pytest.raises(FileNotFoundError, match=str(partial / "text_encoder")):
        ZImageBackbone(str(partial))

    other = tmp_path / "other_folder"
    shutil.copytree(folders["static"], other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="FluxPipeline.*accepted: ZImagePipeline"):
        ZImageBackbone(str(other))
    (other / "model_index.json").write_text(json.dumps({**index, "text_encoder": ["transformers", "T5EncoderModel"]}))
    with pytest.raises(ValueError, match="T5EncoderModel.*accepted: Qwen3Model, Qwen3ForCausalLM"):
        ZImageBackbone(str(other))

    # ZImagePipeline needs sides divisible by twice the VAE scale factor (4 here, 16 for the real VAE).
    with pytest.raises(ValueError, match="height must be a positive multiple of 4 pixels for this model, got 18"):
        ZImageBackbone(str(folders["static"]), height=18)
    with pytest.raises(ValueError, match="width must be a positive multiple of 4 pixels"):
        ZImageBackbone(str(folders["static"]), width=6)
