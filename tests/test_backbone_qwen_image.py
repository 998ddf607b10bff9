"""Qwen-Image adapter against the stock ``QwenImagePipeline`` on a tiny random pipeline built at test time."""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

from rdm_lightning.backbones.flux import flux_scheduler_for
from rdm_lightning.backbones.qwen_image import (
    QwenImageBackbone,
    norm_preserving_cfg,
    pack_latents,
    unpack_latents,
)
from rdm_lightning.backbones.stable_diffusion import EXPORT_MANIFEST
from rdm_lightning.core.parameterization import Prediction
from rdm_lightning.core.sampling import few_step_sample
from rdm_lightning.core.schedules import FlowSchedule
from tiny_qwen_image import make_tiny_qwen_image

# Different token lengths, so the pipeline pads the batch (to its longest prompt) and masks.
PROMPTS = ["a photo of a cat", "a red car parked on a long empty road at night, rain"]
HEIGHT, WIDTH = 32, 48  # pixels: 16×24 latents, 8×12 = 96 image tokens (non-square: catches h/w swaps)
ATOL = 1e-4
MASK_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_tiny_qwen_image(tmp_path_factory.mktemp("tiny_qwen_image") / "qwen_image")


@pytest.fixture(scope="module")
def backbone(folder) -> QwenImageBackbone:
    return QwenImageBackbone(str(folder), height=HEIGHT, width=WIDTH)


@pytest.fixture(scope="module")
def pipe(folder) -> QwenImagePipeline:
    pipe = QwenImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _noise(backbone, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *backbone.latent_shape, generator=torch.Generator().manual_seed(seed))


def _first_step(pipe, x_t: torch.Tensor, num_steps: int, **kwargs) -> tuple[torch.Tensor, float, torch.Tensor]:
    """The stock pipeline's first step from ``x_t``: (latents after it, the μ it set, its sigmas)."""
    captured = {}
    set_timesteps = pipe.scheduler.set_timesteps

    @functools.wraps(set_timesteps)  # retrieve_timesteps inspects its signature for ``sigmas``
    def spy(*args, **kw):
        captured["mu"] = kw["mu"]
        return set_timesteps(*args, **kw)

    def stop(pipeline, index, timestep, tensors):
        captured["latents"] = tensors["latents"].clone()
        pipeline._interrupt = True  # the remaining steps are skipped
        return tensors

    height, width = (side * pipe.vae_scale_factor for side in x_t.shape[-2:])
    pipe.scheduler.set_timesteps = spy
    try:
        with torch.no_grad():
            pipe(num_inference_steps=num_steps, height=height, width=width, latents=pack_latents(x_t),
                 output_type="latent", callback_on_step_end=stop, **kwargs)
    finally:
        del pipe.scheduler.set_timesteps
    return unpack_latents(captured["latents"], *x_t.shape[-2:]), captured["mu"], pipe.scheduler.sigmas.double()


def _perturbed_student(backbone):
    # A student that differs from the teacher, so the export test sees which network was saved.
    student = backbone.load_denoiser()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return student


def _edited_copy(folder: Path, tmp_path: Path, name: str, file: str, **changes) -> Path:
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    config = copy / file
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))
    return copy


def test_loads_schedule_prediction_and_frozen_modules(backbone, pipe):
    assert backbone.prediction is Prediction.FLOW_VELOCITY
    assert backbone.latent_shape == (4, 16, 24) and (backbone.height, backbone.width) == (HEIGHT, WIDTH)
    assert backbone.vae_scale_factor == pipe.vae_scale_factor == 2
    params = list(backbone.parameters())
    assert params and not any(p.requires_grad for p in params)
    backbone.train()
    assert not any(m.training for m in backbone.modules())
    assert {"text_encoder", "vae"} <= set(dict(backbone.named_children()))
    # μ is the one the pipeline sets for this size; the schedule's σ(u = 1) is its first sigma.
    _, mu, sigmas = _first_step(pipe, _noise(backbone, 1, 0), 2, prompt=PROMPTS[0])
    assert backbone.schedule.dynamic_shift_mu == pytest.approx(mu, abs=1e-12)
    assert float(backbone.schedule.levels_from_fraction(torch.tensor(1.0))) == pytest.approx(float(sigmas[0]))
    # Without the pipeline's terminal stretch, its N-step grid is the schedule's generator levels.
    plain = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift_terminal=None)
    plain.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
    torch.testing.assert_close(plain.sigmas[:-1].double(), backbone.schedule.generator_levels(4), atol=1e-6, rtol=0)
    transformer = backbone.load_denoiser()
    names = [name for name, _ in transformer.named_modules()]
    for target in backbone.lora_target_modules:
        assert any(name.endswith(f".{target}") for name in names), target


def test_default_size_and_static_shift(folder, pipe, tmp_path):
    static = _edited_copy(folder, tmp_path, "static", "scheduler/scheduler_config.json",
                          use_dynamic_shifting=False, shift=3.0)
    backbone = QwenImageBackbone(str(static))
    # The pipeline's default size: default_sample_size latent cells (times the VAE factor) a side.
    assert backbone.height == backbone.width == pipe.default_sample_size * pipe.vae_scale_factor
    assert backbone.schedule.shift == 3.0 and backbone.schedule.dynamic_shift_mu is None


def test_set_image_size_follows_the_pipelines_mu(folder, pipe):
    backbone = QwenImageBackbone(str(folder), height=HEIGHT, width=WIDTH)
    backbone.set_image_size(64, 16)
    assert backbone.latent_shape == (4, 32, 8)
    _, mu, _ = _first_step(pipe, _noise(backbone, 1, 0), 2, prompt=PROMPTS[0])
    assert backbone.schedule.dynamic_shift_mu == pytest.approx(mu, abs=1e-12)
    with pytest.raises(ValueError, match="width must be a positive multiple of 4"):
        backbone.set_image_size(64, 18)


def test_encode_prompts_matches_the_pipeline(backbone, pipe):
    length = backbone.max_sequence_length
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=length)
        negative, negative_mask = pipe.encode_prompt(" ", device="cpu", max_sequence_length=length)
    ours, uncond = backbone.encode_prompts(PROMPTS), backbone.empty_conditioning(2)
    assert set(ours.tensors) == {"prompt_embeds", "prompt_embeds_mask"}
    longest = embeds.shape[1]
    assert mask is not None and longest < length and negative_mask is None  # batch-padded, masked; " " unmasked
    for cond in (ours, uncond):
        assert cond.tensors["prompt_embeds"].shape == (2, length, embeds.shape[-1])
        assert cond.tensors["prompt_embeds_mask"].shape == (2, length)
    torch.testing.assert_close(ours.tensors["prompt_embeds"][:, :longest], embeds, atol=0, rtol=0)
    assert torch.equal(ours.tensors["prompt_embeds_mask"][:, :longest], mask)
    assert not ours.tensors["prompt_embeds"][:, longest:].any()
    assert not ours.tensors["prompt_embeds_mask"][:, longest:].any()
    n = negative.shape[1]
    torch.testing.assert_close(uncond.tensors["prompt_embeds"][:, :n], negative.expand(2, -1, -1), atol=0, rtol=0)
    assert uncond.tensors["prompt_embeds_mask"][:, :n].all() and not uncond.tensors["prompt_embeds_mask"][:, n:].any()
    # Fixed per prompt: the same tensors whatever the rest of the batch.
    alone = backbone.encode_prompts(PROMPTS[:1])
    for key, value in alone.tensors.items():
        torch.testing.assert_close(value, ours.tensors[key][:1], atol=1e-6, rtol=1e-6)


def test_over_long_prompts_are_truncated_as_the_pipeline_does(backbone, pipe):
    # 1100 prompt tokens: the tokenizer cuts at tokenizer_max_length + 34, encode_prompt then at 512.
    long_prompt = " ".join(["a"] * 1100)
    assert len(pipe.tokenizer(long_prompt).input_ids) == 1100
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt([long_prompt, PROMPTS[0]], device="cpu", max_sequence_length=512)
    ours = backbone.encode_prompts([long_prompt, PROMPTS[0]])
    assert embeds.shape[1] == 512
    torch.testing.assert_close(ours.tensors["prompt_embeds"], embeds, atol=0, rtol=0)
    assert torch.equal(ours.tensors["prompt_embeds_mask"], mask)
    assert ours.tensors["prompt_embeds_mask"][0].all()


def test_masked_padding_leaves_the_transformer_output_unchanged(backbone, pipe):
    # Ours: every prompt padded to 512 with a 0 mask; the pipeline's: padded to the batch's longest
    # prompt (mask), or not padded at all (mask None, as for " ").
    transformer = pipe.transformer
    x_t = _noise(backbone, 2, 1)
    level = torch.tensor([1.0, 0.37], dtype=torch.float64)
    img_shapes = [[(1, x_t.shape[-2] // 2, x_t.shape[-1] // 2)]] * 2
    with torch.no_grad():
        for prompts in (PROMPTS, [" ", " "]):
            embeds, mask = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=512)
            timestep = backbone.schedule.model_timestep(level) / 1000  # the same input on both sides
            stock = transformer(hidden_states=pack_latents(x_t), timestep=timestep, encoder_hidden_states=embeds,
                                encoder_hidden_states_mask=mask, img_shapes=img_shapes, return_dict=False)[0]
            ours = backbone.network_output(transformer, x_t, level, backbone.encode_prompts(prompts))
            difference = (ours - unpack_latents(stock, *x_t.shape[-2:])).abs().max().item()
            print(f"masked padding to 512 vs the pipeline's ({embeds.shape[1]} tokens): max |Δ| = {difference:.2e}")
            assert difference <= MASK_TOLERANCE


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_one_denoising_step_equals_the_stock_pipelines(backbone, pipe, guidance):
    # The stock pipeline's first Euler step (its true CFG with norm rescaling, timestep scaling, packing,
    # dynamic shift) against ours; guidance 1 is the pipeline without a negative prompt.
    x_t = _noise(backbone, len(PROMPTS), 3)
    cfg = dict(negative_prompt=backbone.negative_prompt, true_cfg_scale=guidance) if guidance > 1 else {}
    captured, _, sigmas = _first_step(pipe, x_t, 3, prompt=PROMPTS, **cfg)
    sigma, sigma_next = sigmas[:2]
    level = torch.full((len(PROMPTS),), float(sigma), dtype=torch.float64)
    torch.testing.assert_close(level, backbone.schedule.levels_from_fraction(torch.ones_like(level)))
    with torch.no_grad():
        x0 = backbone.predict_x0(
            backbone.load_denoiser(), x_t, level, backbone.encode_prompts(PROMPTS), None if guidance == 1 else guidance
        )
    velocity = (x_t.double() - x0.double()) / sigma
    ours = (x_t.double() + (sigma_next - sigma) * velocity).float()
    torch.testing.assert_close(ours, captured, atol=ATOL, rtol=1e-4)


def test_true_cfg_rescales_each_token_to_the_conditional_norm(backbone):
    generator = torch.Generator().manual_seed(5)
    out_u, out_c = (torch.randn(2, *backbone.latent_shape, generator=generator) for _ in range(2))
    guided = norm_preserving_cfg(out_u, out_c, 4.0)
    tokens, cond_tokens = pack_latents(guided), pack_latents(out_c)
    torch.testing.assert_close(tokens.norm(dim=-1), cond_tokens.norm(dim=-1))
    direction = pack_latents(out_u + 4.0 * (out_c - out_u))
    cosine = torch.nn.functional.cosine_similarity(tokens, direction, dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))
    torch.testing.assert_close(unpack_latents(pack_latents(out_c), *out_c.shape[-2:]), out_c, atol=0, rtol=0)


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_export_samples_like_the_student(backbone, tmp_path, num_steps):
    levels = backbone.schedule.generator_levels(num_steps)
    student = _perturbed_student(backbone)
    out = backbone.export(student, tmp_path / "export", num_steps, levels)

    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    assert manifest["num_inference_steps"] == num_steps and manifest["guidance_scale"] == 1.0
    assert (manifest["height"], manifest["width"], manifest["true_cfg_scale"]) == (HEIGHT, WIDTH, 1.0)
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe) is QwenImagePipeline and isinstance(pipe.transformer, QwenImageTransformer2DModel)
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler and pipe.scheduler.config.stochastic_sampling

    noise = _noise(backbone, 1, 7)
    torch.manual_seed(11)  # the scheduler draws from the global RNG (the pipeline passes it no generator)
    with torch.no_grad():
        exported = pipe(PROMPTS[0], num_inference_steps=num_steps, guidance_scale=manifest["guidance_scale"],
                        true_cfg_scale=manifest["true_cfg_scale"], height=manifest["height"], width=manifest["width"],
                        latents=pack_latents(noise), output_type="latent").images
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1].double(), levels, atol=1e-6, rtol=0)
    assert manifest["timesteps"] == pytest.approx(pipe.scheduler.timesteps.tolist())
    assert manifest["sigmas"] == pytest.approx(levels.tolist(), abs=1e-6)
    exported = unpack_latents(exported, *noise.shape[-2:])

    cond = backbone.encode_prompts(PROMPTS[:1])

    def sample(network):
        torch.manual_seed(11)
        with torch.no_grad():
            return few_step_sample(lambda x, t: backbone.predict_x0(network, x, t, cond), noise, levels,
                                   backbone.schedule, "sde", None, backbone.sampler_noise)

    torch.testing.assert_close(exported, sample(student), atol=ATOL, rtol=1e-4)
    assert (sample(backbone.load_denoiser()) - exported).abs().max() > 10 * ATOL  # it is the student that was saved


@pytest.mark.parametrize("shift, num_steps", [(1.0, 3), (3.0, 4), (0.4, 6)])
def test_scheduler_reaches_any_shifted_grid(backbone, shift, num_steps):
    levels = FlowSchedule(shift=shift).generator_levels(num_steps)
    scheduler = flux_scheduler_for(backbone.scheduler_config, levels)
    assert scheduler.config.stochastic_sampling and not scheduler.config.use_dynamic_shifting
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=0.7)  # as the pipeline calls it
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), levels, atol=1e-6, rtol=0)


def test_scheduler_rejects_unreachable_levels(backbone, tmp_path):
    for levels in ([0.8], [1.0, 0.9, 0.2, 0.1]):
        with pytest.raises(ValueError, match="levels"):
            flux_scheduler_for(backbone.scheduler_config, torch.tensor(levels, dtype=torch.float64))
    with pytest.raises(TypeError, match="QwenImageTransformer2DModel"):
        backbone.export(torch.nn.Linear(2, 2), tmp_path, 1, torch.tensor([1.0]))


def test_bfloat16_frozen_parts_and_teacher(backbone, folder):
    # DMD2 runs the teacher in bf16 (outside autocast too): inputs must follow the network's dtype.
    bf16 = QwenImageBackbone(str(folder), height=HEIGHT, width=WIDTH, frozen_dtype="bfloat16")
    assert bf16.text_encoder.dtype == bf16.vae.dtype == torch.bfloat16
    teacher = backbone.load_denoiser()
    x_t, level = _noise(backbone, 2, 6), torch.tensor([1.0, 0.6], dtype=torch.float64)
    with torch.no_grad():
        reference = backbone.predict_x0(teacher, x_t, level, backbone.encode_prompts(PROMPTS), 4.0)
        x0 = bf16.predict_x0(teacher.to(torch.bfloat16), x_t, level, bf16.encode_prompts(PROMPTS), 4.0)
        images = bf16.decode(x0)
    assert x0.dtype == images.dtype == torch.float32
    assert (x0 - reference).abs().max() < 0.05 * reference.abs().max()


def test_decode_and_encode_follow_the_pipelines_latent_normalisation(backbone, pipe):
    # The pipeline's own decoding (output_type="pt") of the latents it returns (output_type="latent").
    x_t = _noise(backbone, 1, 4)
    # 2 steps: at 1 the stock scheduler stretches σ = [1] to shift_terminal as 0/0 (NaN).
    kwargs = dict(prompt=PROMPTS[0], num_inference_steps=2, height=HEIGHT, width=WIDTH, true_cfg_scale=1.0)
    with torch.no_grad():
        latents = pipe(latents=pack_latents(x_t), output_type="latent", **kwargs).images
        images = pipe(latents=pack_latents(x_t), output_type="pt", **kwargs).images
    latents = unpack_latents(latents, *x_t.shape[-2:]).requires_grad_(True)
    decoded = backbone.decode(latents)
    assert decoded.shape == (1, 3, HEIGHT, WIDTH) and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded.detach(), images, atol=1e-5, rtol=1e-5)
    decoded.sum().backward()  # rewards back-propagate through the decoder
    assert latents.grad is not None and latents.grad.abs().sum() > 0

    vae = backbone.vae
    encoded = backbone.encode_images(images)
    assert encoded.shape == (1, *backbone.latent_shape) and encoded.dtype == torch.float32
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        z = vae.encode(2 * images.unsqueeze(2) - 1).latent_dist.mode()
    torch.testing.assert_close(encoded, ((z - mean) / std)[:, :, 0], atol=1e-5, rtol=1e-5)


def test_embedding_cache_round_trip(backbone, folder, tmp_path):
    first = QwenImageBackbone(str(folder), height=HEIGHT, width=WIDTH, embedding_cache=str(tmp_path / "cache"))
    assert first.fill_embedding_cache(PROMPTS, batch_size=2) == len(PROMPTS) + 1  # and the negative prompt " "
    filled = first.encode_prompts(PROMPTS)
    second = QwenImageBackbone(str(folder), height=HEIGHT, width=WIDTH, embedding_cache=str(tmp_path / "cache"))
    cached = second.encode_prompts(PROMPTS)
    negative = second.empty_conditioning(2)
    assert not second.text_encoders_loaded  # CFG's " " branch was cached too
    for key, value in backbone.empty_conditioning(2).tensors.items():
        torch.testing.assert_close(negative.tensors[key], value, atol=1e-6, rtol=0)
    reference = backbone.encode_prompts(PROMPTS)
    for key, value in reference.tensors.items():
        # Filled 2 prompts at a time: the encoder's padding to the batch's longest moves the float rounding.
        torch.testing.assert_close(filled.tensors[key], value, atol=1e-6, rtol=0)
        assert torch.equal(cached.tensors[key], filled.tensors[key])


def test_bad_folders_and_settings_raise_clear_errors(folder, tmp_path):
    other = _edited_copy(folder, tmp_path, "other", "model_index.json", _class_name="StableDiffusion3Pipeline")
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline.*accepted: QwenImagePipeline"):
        QwenImageBackbone(str(other))
    for component in ("vae", "text_encoder"):
        partial = tmp_path / f"without_{component}"
        shutil.copytree(folder, partial, ignore=shutil.ignore_patterns(component))
        with pytest.raises(FileNotFoundError, match=str(partial / component)):
            QwenImageBackbone(str(partial), height=HEIGHT, width=WIDTH)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        QwenImageBackbone(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="height must be a positive multiple of 4 pixels for this model, got 34"):
        QwenImageBackbone(str(folder), height=34, width=WIDTH)
    with pytest.raises(ValueError, match=r"max_sequence_length must be an integer in \[1, 1024\], got 2000"):
        QwenImageBackbone(str(folder), height=HEIGHT, width=WIDTH, max_sequence_length=2000)
    guided = _edited_copy(folder, tmp_path, "guided", "transformer/config.json", guidance_embeds=True)
    with pytest.raises(ValueError, match="guidance_embeds=True"):
        QwenImageBackbone(str(guided), height=HEIGHT, width=WIDTH)
    linear = _edited_copy(folder, tmp_path, "linear", "scheduler/scheduler_config.json", time_shift_type="linear")
    with pytest.raises(ValueError, match="time_shift_type 'linear'"):
        QwenImageBackbone(str(linear), height=HEIGHT, width=WIDTH)
