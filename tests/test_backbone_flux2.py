"""FLUX.2-dev and FLUX.2-klein adapters against the stock ``Flux2Pipeline`` / ``Flux2KleinPipeline``
on tiny random pipelines built at test time (dev, klein base, klein step-distilled)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

from rdm_lightning.backbones.flux2 import Flux2Backbone, Flux2KleinBackbone
from rdm_lightning.backbones.stable_diffusion import EXPORT_MANIFEST
from rdm_lightning.core.parameterization import Prediction
from rdm_lightning.core.sampling import few_step_sample
from rdm_lightning.methods.lora import add_lora
from rdm_lightning.methods.roles import RoleConfig, build_role_network
from tiny_flux2 import LATENT_CHANNELS, TEXT_HIDDEN, make_tiny_flux2, make_tiny_flux2_klein

# Prompts of different token lengths (the pipelines pad every prompt to max_sequence_length anyway).
PROMPTS = ["a photo of a cat", "a red car parked on a long empty road at night, rain"]
SIZE = 16  # pixels: VAE latent 8×8, patchified 4×4, 16 image tokens
ATOL = 1e-4
NAMES = ("dev", "klein", "klein_distilled")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_flux2")
    return {
        "dev": make_tiny_flux2(root / "dev"),
        "klein": make_tiny_flux2_klein(root / "klein"),
        "klein_distilled": make_tiny_flux2_klein(root / "klein_distilled", distilled=True),
    }


@pytest.fixture(scope="module")
def backbones(folders) -> dict:
    return {
        name: (Flux2Backbone if name == "dev" else Flux2KleinBackbone)(str(folder), height=SIZE, width=SIZE)
        for name, folder in folders.items()
    }


@pytest.fixture(scope="module")
def pipes(folders) -> dict:
    pipes = {name: DiffusionPipeline.from_pretrained(folder) for name, folder in folders.items()}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def _noise(backbone, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *backbone.latent_shape, generator=torch.Generator().manual_seed(seed))


def _unpack(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The pipelines' packed tokens ``(B, H·W, C)`` as ``(B, C, H, W)`` (the pipelines' own unpacking)."""
    return Flux2Pipeline._unpack_latents_with_ids(tokens, Flux2Pipeline._prepare_latent_ids(like))


def _pipeline_sigmas(pipe, num_steps: int, height: int, width: int) -> torch.Tensor:
    """The σ the pipeline sets for a ``num_steps`` call at this size (it is interrupted after its first step)."""

    def interrupt(pipeline, index, timestep, tensors):
        pipeline._interrupt = True
        return tensors

    with torch.no_grad():
        pipe(prompt="x", height=height, width=width, num_inference_steps=num_steps, output_type="latent",
             callback_on_step_end=interrupt)
    return pipe.scheduler.sigmas[:-1].double()


def test_loads_schedule_prediction_and_frozen_modules(backbones, pipes, folders):
    for name, backbone in backbones.items():
        assert backbone.prediction is Prediction.FLOW_VELOCITY
        assert backbone.latent_shape == (4 * LATENT_CHANNELS, 4, 4)
        assert (backbone.height, backbone.width) == (SIZE, SIZE)
        params = list(backbone.parameters())
        assert params and not any(p.requires_grad for p in params)
        backbone.train()
        assert not any(m.training for m in backbone.modules())
        # μ is the pipeline's empirical one (16 tokens, its default 50 steps), and so are the 50 σ it sets.
        assert backbone.mu == compute_empirical_mu(16, 50) and backbone.schedule.dynamic_shift_mu == backbone.mu
        grid = torch.linspace(1.0, 1 / 50, 50, dtype=torch.float64)
        torch.testing.assert_close(
            backbone.schedule.levels_from_fraction(grid), _pipeline_sigmas(pipes[name], 50, SIZE, SIZE),
            atol=1e-6, rtol=0,
        )
    dev, klein, distilled = (backbones[name] for name in NAMES)
    assert dev.guidance_embedding and dev.student_guidance == 4.0 and dev.text_encoder_out_layers == (10, 20, 30)
    assert not klein.guidance_embedding and not distilled.guidance_embedding
    assert not klein.is_distilled and distilled.is_distilled and klein.text_encoder_out_layers == (9, 18, 27)
    # Another size: the schedule follows it as the pipeline's μ does (32×16 px: 32 tokens).
    dev.set_image_size(32, 16)
    try:
        assert dev.latent_shape == (16, 8, 4) and dev.mu == compute_empirical_mu(32, 50)
        torch.testing.assert_close(
            dev.schedule.levels_from_fraction(torch.linspace(1.0, 1 / 50, 50, dtype=torch.float64)),
            _pipeline_sigmas(pipes["dev"], 50, 32, 16), atol=1e-6, rtol=0,
        )
    finally:
        dev.set_image_size(SIZE, SIZE)
    # The pipelines' default size: default_sample_size (128) latent cells times the VAE scale factor (2).
    default = Flux2KleinBackbone(str(folders["klein"]))
    assert (default.height, default.width) == (256, 256) and default.mu == compute_empirical_mu(64 * 64, 50)


def test_lora_targets_the_attention_projections(backbones):
    network = backbones["dev"].load_denoiser()
    add_lora(network, backbones["dev"].lora_target_modules, rank=2, alpha=2.0, adapter="test")
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in network.named_parameters() if ".lora_A." in name}
    double = [f"transformer_blocks.0.attn.{m}" for m in
              ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
    single = [f"single_transformer_blocks.0.attn.{m}" for m in ("to_qkv_mlp_proj", "to_out")]
    assert adapted == set(double + single)


@pytest.mark.parametrize("name", NAMES)
def test_prompt_encoding_matches_the_pipeline(backbones, pipes, name):
    backbone, pipe = backbones[name], pipes[name]
    with torch.no_grad():
        embeds, text_ids = pipe.encode_prompt(PROMPTS, device="cpu")
        negative, _ = pipe.encode_prompt(["", ""], device="cpu")
    ours = backbone.encode_prompts(PROMPTS)
    assert set(ours.tensors) == {"prompt_embeds"}
    assert ours.tensors["prompt_embeds"].shape == (2, 512, 3 * TEXT_HIDDEN) == embeds.shape
    torch.testing.assert_close(ours.tensors["prompt_embeds"], embeds)
    # One shape per prompt, whatever else is in the batch: a prompt encodes alone as in the batch.
    torch.testing.assert_close(backbone.encode_prompts(PROMPTS[1:]).tensors["prompt_embeds"], embeds[1:])
    # The unconditional branch is the pipeline's negative prompt "" (klein base's CFG).
    torch.testing.assert_close(backbone.empty_conditioning(2).tensors["prompt_embeds"], negative)
    assert text_ids[0, :, 3].tolist() == list(range(512)) and not text_ids[..., :3].any()


@pytest.mark.parametrize(
    "name, guidance", [("dev", 4.0), ("dev", 2.5), ("klein", 1.0), ("klein", 4.0), ("klein_distilled", None)]
)
def test_one_denoising_step_equals_the_stock_pipeline(backbones, pipes, name, guidance):
    # The stock pipeline's first Euler step (its packing, ids, timestep scaling, guidance or CFG, shift).
    backbone, pipe = backbones[name], pipes[name]
    num_steps, captured = 3, {}

    def capture(pipeline, index, timestep, tensors):
        captured.setdefault(index, tensors["latents"].clone())
        return tensors

    x_t = _noise(backbone, len(PROMPTS), seed=3)
    with torch.no_grad():
        pipe(prompt=PROMPTS, num_inference_steps=num_steps, guidance_scale=4.0 if guidance is None else guidance,
             latents=x_t.clone(), height=SIZE, width=SIZE, output_type="latent", callback_on_step_end=capture)
    sigma, sigma_next = pipe.scheduler.sigmas[:2].double()
    level = torch.full((len(PROMPTS),), float(sigma), dtype=torch.float64)
    with torch.no_grad():
        x0 = backbone.predict_x0(backbone.load_denoiser(), x_t, level, backbone.encode_prompts(PROMPTS), guidance)
    velocity = (x_t.double() - x0.double()) / sigma
    ours = (x_t.double() + (sigma_next - sigma) * velocity).float()
    torch.testing.assert_close(ours, _unpack(captured[0], x_t), atol=ATOL, rtol=1e-4)


def test_guidance_changes_the_prediction_and_distilled_klein_refuses_it(backbones):
    x_t, level = _noise(backbones["dev"], 1, seed=4), torch.tensor([0.7], dtype=torch.float64)
    for name in ("dev", "klein"):
        backbone = backbones[name]
        teacher, cond = backbone.load_denoiser(), backbone.encode_prompts(PROMPTS[:1])
        with torch.no_grad():
            low, high = (backbone.predict_x0(teacher, x_t, level, cond, g) for g in (1.5, 4.0))
        assert (low - high).abs().max() > 1e-3
    distilled = backbones["klein_distilled"]
    with pytest.raises(ValueError, match=r"guidance_scale=4\.0 .*step-distilled.*accepted: None or 1\.0"):
        distilled.predict_x0(distilled.load_denoiser(), x_t, level, distilled.encode_prompts(["x"]), 4.0)
    dev = backbones["dev"]
    with pytest.raises(ValueError, match="needs a float"):
        dev.network_output(dev.load_denoiser(), x_t, level, dev.encode_prompts(["x"]))


def _perturbed_student(backbone):
    # A student that differs from the teacher, so the export test sees which network was saved.
    student = backbone.load_denoiser()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return student


@pytest.mark.parametrize("name, num_steps", [("dev", 4), ("klein", 2)])
def test_export_samples_like_the_student(backbones, tmp_path, name, num_steps):
    backbone = backbones[name]
    levels = backbone.schedule.generator_levels(num_steps)
    student = _perturbed_student(backbone)
    out = backbone.export(student, tmp_path / "export", num_steps, levels)

    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    assert manifest["num_inference_steps"] == num_steps
    assert manifest["guidance_scale"] == (4.0 if name == "dev" else 1.0)
    assert (manifest["height"], manifest["width"], manifest["max_sequence_length"]) == (SIZE, SIZE, 512)
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe) is (Flux2Pipeline if name == "dev" else Flux2KleinPipeline)
    if name == "klein":
        assert pipe.config.is_distilled
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler and pipe.scheduler.config.stochastic_sampling
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=0.0)
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1].double(), levels, atol=1e-6, rtol=0)
    assert manifest["timesteps"] == pytest.approx(pipe.scheduler.timesteps.tolist())

    noise = _noise(backbone, 1, seed=7)
    torch.manual_seed(11)  # the scheduler re-noises from the global RNG
    with torch.no_grad():
        exported = pipe(
            prompt=PROMPTS[0], num_inference_steps=num_steps, guidance_scale=manifest["guidance_scale"],
            max_sequence_length=manifest["max_sequence_length"],
            text_encoder_out_layers=tuple(manifest["text_encoder_out_layers"]),
            latents=noise.clone(), height=SIZE, width=SIZE, output_type="latent",
        ).images

    def sample(network):
        cond = backbone.encode_prompts(PROMPTS[:1])
        torch.manual_seed(11)
        with torch.no_grad():
            x0 = few_step_sample(lambda x, t: backbone.predict_x0(network, x, t, cond), noise, levels,
                                 backbone.schedule, "sde", None, backbone.sampler_noise)
        # Flux2Pipeline returns the packed tokens, Flux2KleinPipeline the VAE latent.
        return Flux2Pipeline._pack_latents(x0) if name == "dev" else backbone.vae_latents(x0)

    torch.testing.assert_close(exported, sample(student), atol=ATOL, rtol=1e-4)
    assert (sample(backbone.load_denoiser()) - exported).abs().max() > 10 * ATOL  # it is the student that was saved


@pytest.mark.parametrize("name", ["dev", "klein"])
def test_decode_and_encode_use_the_pipelines_latent_normalisation(backbones, pipes, name):
    backbone, pipe = backbones[name], pipes[name]
    # decode: the image the pipeline decodes from the latents its one step ends on.
    x_t, captured = _noise(backbone, 1, seed=5), {}

    def capture(pipeline, index, timestep, tensors):
        captured["latents"] = tensors["latents"].clone()
        return tensors

    with torch.no_grad():
        image = pipe(prompt="x", num_inference_steps=1, latents=x_t.clone(), height=SIZE, width=SIZE,
                     output_type="pt", callback_on_step_end=capture).images
    latents = _unpack(captured["latents"], x_t).requires_grad_(True)
    decoded = backbone.decode(latents)
    assert decoded.shape == (1, 3, SIZE, SIZE) and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded.detach(), image, atol=1e-5, rtol=1e-5)
    decoded.sum().backward()  # rewards back-propagate through the decoder
    assert latents.grad is not None and latents.grad.abs().sum() > 0

    # encode_images: the pipeline's reference-image encoding (mode, 2×2 patchify, batch-norm statistics).
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    encoded = backbone.encode_images(images)
    assert encoded.shape == (2, *backbone.latent_shape) and encoded.dtype == torch.float32
    with torch.no_grad():
        expected = pipe._encode_vae_image(2 * images - 1, generator=None)
    torch.testing.assert_close(encoded, expected)
    bn = pipe.vae.bn
    assert (bn.running_mean.abs() > 0).all() and not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_distilled_klein_starts_the_generator_through_roles_init(backbones, folders):
    # Teacher and fake score from klein base; the generator from the distilled klein's transformer weights.
    base = backbones["klein"]
    weights = folders["klein_distilled"] / "transformer" / "diffusion_pytorch_model.safetensors"
    generator = build_role_network("generator", RoleConfig(init=str(weights)), base.load_denoiser, None, None, seed=0)
    distilled = backbones["klein_distilled"].load_denoiser().state_dict()
    teacher = base.load_denoiser().state_dict()
    for key, value in generator.state_dict().items():
        assert torch.equal(value, distilled[key])
    assert any(not torch.equal(distilled[key], teacher[key]) for key in teacher)


def test_bfloat16_frozen_parts_and_teacher(backbones, folders):
    # A bf16 text encoder, VAE and teacher (outside autocast): inputs follow the network's dtype.
    backbone = Flux2Backbone(str(folders["dev"]), height=SIZE, width=SIZE, frozen_dtype="bfloat16")
    assert backbone.text_encoder.dtype == backbone.vae.dtype == torch.bfloat16
    teacher = backbone.load_denoiser()
    x_t, level = _noise(backbone, 2, seed=6), torch.tensor([1.0, 0.43], dtype=torch.float64)
    with torch.no_grad():
        reference = backbones["dev"].predict_x0(teacher, x_t, level, backbones["dev"].encode_prompts(PROMPTS), 4.0)
        x0 = backbone.predict_x0(teacher.to(torch.bfloat16), x_t, level, backbone.encode_prompts(PROMPTS), 4.0)
        images = backbone.decode(x0)
    assert x0.dtype == images.dtype == torch.float32
    assert (x0 - reference).abs().max() < 0.05 * reference.abs().max()


def test_long_prompts_are_truncated_as_the_pipeline_does(backbones, pipes):
    long = "a very detailed prompt " * 40  # ~900 characters: past 512 tokens with the template
    for name in ("dev", "klein"):
        backbone, pipe = backbones[name], pipes[name]
        ours = backbone.encode_prompts([long, long + "and more words at the end"]).tensors["prompt_embeds"]
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt([long], device="cpu")
        assert ours.shape == (2, 512, 3 * TEXT_HIDDEN)
        torch.testing.assert_close(ours[:1], embeds)
        torch.testing.assert_close(ours[1], ours[0])  # the tail past 512 tokens is cut off


def test_bad_folders_and_settings_raise_clear_errors(folders, tmp_path):
    with pytest.raises(ValueError, match="Flux2KleinPipeline.*accepted: Flux2Pipeline"):
        Flux2Backbone(str(folders["klein"]))
    with pytest.raises(ValueError, match="Flux2Pipeline.*accepted: Flux2KleinPipeline"):
        Flux2KleinBackbone(str(folders["dev"]))
    for component in ("text_encoder", "vae", "transformer"):
        partial = tmp_path / f"without_{component}"
        shutil.copytree(folders["klein"], partial, ignore=shutil.ignore_patterns(component))
        with pytest.raises(FileNotFoundError, match=str(partial / component)):
            Flux2KleinBackbone(str(partial))
    with pytest.raises(ValueError, match="height must be a positive multiple of 4 pixels for this model, got 18"):
        Flux2KleinBackbone(str(folders["klein"]), height=18, width=16)
    with pytest.raises(ValueError, match=r"stack 2 × 16 = 32 channels, but the transformer takes joint_attention_dim"):
        Flux2KleinBackbone(str(folders["klein"]), text_encoder_out_layers=(1, 2))
    with pytest.raises(ValueError, match=r"hidden-state index from 0 to 30"):
        Flux2Backbone(str(folders["dev"]), text_encoder_out_layers=(10, 20, 31))
    with pytest.raises(ValueError, match="max_sequence_length must be an integer >= 1, got 0"):
        Flux2Backbone(str(folders["dev"]), max_sequence_length=0)
    with pytest.raises(TypeError, match="Flux2Transformer2DModel"):
        Flux2KleinBackbone(str(folders["klein"]), height=16, width=16).export(
            torch.nn.Linear(2, 2), tmp_path / "export", 1, torch.tensor([1.0])
        )
