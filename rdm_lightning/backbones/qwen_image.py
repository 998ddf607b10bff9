"""Qwen-Image adapter (diffusers ``QwenImagePipeline``: ``QwenImageTransformer2DModel``, rectified flow).

The generator's latents are the unpacked VAE latents ``(C, H/8, W/8)``; the adapter adds the
video VAE's frame axis around the VAE, and packs 2×2 latent patches into tokens around the
transformer, as the pipeline does. Prompts are encoded by the pipeline's own ``encode_prompt``
(Qwen2.5-VL with its chat template) and zero-padded, with their mask, to a fixed length.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from torch import Tensor, nn
from transformers import Qwen2_5_VLForConditionalGeneration

from rdm_lightning.backbones.base import Conditioning, network_dtype
from rdm_lightning.backbones.sd3 import flow_schedule_for
from rdm_lightning.backbones.stable_diffusion import DiffusersBackbone, check_levels
from rdm_lightning.backbones.flux import flux_scheduler_for
from rdm_lightning.core.dmd import classifier_free_guidance
from rdm_lightning.core.parameterization import Prediction
from rdm_lightning.core.schedules import FlowSchedule

PATCH_SIZE = 2  # QwenImagePipeline packs 2×2 latent patches into one token
NEGATIVE_PROMPT = " "
"""The Qwen-Image model card's negative prompt when there is no concept to remove (the pipeline
itself runs CFG only when given one)."""


def pack_latents(latents: Tensor) -> Tensor:
    """``(B, C, H, W)`` latents as the pipeline's ``(B, H/2·W/2, 4·C)`` tokens."""
    b, c, h, w = latents.shape
    return QwenImagePipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """The pipeline's tokens back to ``(B, C, height, width)`` latents (the inverse of :func:`pack_latents`)."""
    # _unpack_latents takes the size in pixels and a VAE factor; factor 1 makes pixels = latent cells.
    return QwenImagePipeline._unpack_latents(tokens, height, width, 1)[:, :, 0]


def norm_preserving_cfg(uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
    """``QwenImagePipeline``'s true CFG: ``u + w·(c − u)``, rescaled per token (2×2 patch, all channels)
    to the norm of the conditional prediction. ``(B, C, H, W)`` velocities in and out."""
    height, width = cond.shape[-2:]
    guided = pack_latents(classifier_free_guidance(uncond, cond, scale))
    cond_norm = torch.norm(pack_latents(cond), dim=-1, keepdim=True)
    guided_norm = torch.norm(guided, dim=-1, keepdim=True)
    return unpack_latents(guided * (cond_norm / guided_norm), height, width)


class QwenImageBackbone(DiffusersBackbone):
    """Qwen-Image pipelines: ``QwenImageTransformer2DModel`` predicting the flow velocity.

    Args:
        path: diffusers pipeline folder (transformer/, vae/, text_encoder/, tokenizer/,
            scheduler/) or a hub id.
        height, width: image size in pixels, each a multiple of 2× the VAE scale factor (16 for
            Qwen-Image); default: the pipeline's ``default_sample_size`` (128) times the VAE scale
            factor, 1024.
        variant: weight-file variant to load (e.g. ``"fp16"``); ``None`` for the default files.
        frozen_dtype: dtype of the frozen text encoder (and of the VAE unless ``vae_dtype`` is
            given): ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        vae_dtype: dtype of the VAE; ``None`` means ``frozen_dtype``.
        max_sequence_length: text tokens kept after the template's dropped prefix (the pipeline's
            ``max_sequence_length``, default 512, at most its ``tokenizer_max_length`` 1024);
            every prompt's embeddings are zero-padded, with a mask, to this length.
        negative_prompt: the prompt of CFG's unconditional branch (the pipeline's ``negative_prompt``);
            default ``" "``, the Qwen-Image model card's.
        local_files_only: never download; a hub id must already be in the cache.
        embedding_cache: folder of cached prompt embeddings (``docs/embedding_cache.md``); prompts
            missing from it are encoded and added, and with every prompt in it the text encoder
            never loads. ``None``: encode every batch.
        embedding_cache_refresh: re-encode into ``embedding_cache`` when another text encoder or
            other settings wrote it, instead of raising.

    Guidance is the pipeline's true CFG (``true_cfg_scale``) with its per-token norm rescaling
    (:func:`norm_preserving_cfg`), which :meth:`predict_x0` applies. The schedule is the
    scheduler's dynamic shift with μ of this image size, as the pipeline computes it (or its
    static shift when dynamic shifting is off); the scheduler's ``shift_terminal`` only stretches
    the pipeline's N-step grid and is not part of it.
    """

    denoiser_subfolder = "transformer"
    pipeline_classes = ("QwenImagePipeline",)
    vae_class = AutoencoderKLQwenImage
    # Joint attention, image and text streams (as for SD3).
    lora_target_modules = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    )

    def __init__(
        self,
        path: str,
        height: int | None = None,
        width: int | None = None,
        variant: str | None = None,
        frozen_dtype: str = "float32",
        vae_dtype: str | None = None,
        max_sequence_length: int = 512,
        negative_prompt: str = NEGATIVE_PROMPT,
        local_files_only: bool = True,
        embedding_cache: str | None = None,
        embedding_cache_refresh: bool = False,
    ):
        super().__init__(
            path, variant, frozen_dtype, vae_dtype, local_files_only, embedding_cache, embedding_cache_refresh
        )
        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(self.subfolder("scheduler")))
        self.transformer_config = dict(QwenImageTransformer2DModel.load_config(self.subfolder("transformer")))
        if self.transformer_config.get("guidance_embeds"):
            # diffusers' QwenTimestepProjEmbeddings takes no guidance: such a transformer cannot run.
            raise ValueError(
                f"{str(self.folder)!r} has a guidance-embedding transformer (guidance_embeds=True), which "
                "QwenImageTransformer2DModel cannot run; accepted: guidance_embeds=False (true CFG)"
            )
        self.prediction = Prediction.FLOW_VELOCITY
        # The template and its limits are set in the pipeline's __init__: read them off a bare one.
        self.prompt_pipeline = QwenImagePipeline(
            scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None
        )
        limit = self.prompt_pipeline.tokenizer_max_length
        if not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= limit:
            raise ValueError(f"max_sequence_length must be an integer in [1, {limit}], got {max_sequence_length!r}")
        self.max_sequence_length = max_sequence_length
        self.negative_prompt = negative_prompt
        self.height, self.width = self.image_size(
            height, width, self.prompt_pipeline.default_sample_size * self.vae_scale_factor,
            self.vae_scale_factor * PATCH_SIZE,
        )
        self.schedule = self.schedule_for_image_size()
        self.prepare_text_encoders()

    def _vae_scale_factor(self) -> int:
        """Pixels per latent cell, as the pipeline derives it: the VAE halves the image once per downsampling block."""
        return 2 ** len(self.vae.config.temperal_downsample)

    def text_settings(self) -> dict[str, Any]:
        """The kept length and the pipeline's template (which the installed diffusers decides)."""
        return {
            "max_sequence_length": self.max_sequence_length,
            "prompt_template_encode": self.prompt_pipeline.prompt_template_encode,
            "prompt_template_encode_start_idx": self.prompt_pipeline.prompt_template_encode_start_idx,
            "tokenizer_max_length": self.prompt_pipeline.tokenizer_max_length,
        }

    def load_text_encoders(self) -> None:
        """The Qwen2 tokenizer and Qwen2.5-VL, registered on the bare pipeline whose ``encode_prompt`` runs them."""
        self.tokenizer = self.load_tokenizer("tokenizer")
        self.text_encoder = self.load_text_encoder(Qwen2_5_VLForConditionalGeneration, "text_encoder")
        self.prompt_pipeline.register_modules(text_encoder=self.text_encoder, tokenizer=self.tokenizer)

    def schedule_for_image_size(self) -> FlowSchedule:
        """The scheduler's static shift, or its dynamic shift with μ of the ``(latent H / 2)·(latent W / 2)``
        packed image tokens, as ``QwenImagePipeline`` computes it (``calculate_shift(latents.shape[1])``)."""
        _, height, width = self.latent_shape
        return flow_schedule_for(self.scheduler_config, (height // PATCH_SIZE) * (width // PATCH_SIZE))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (
            self.transformer_config["in_channels"] // PATCH_SIZE**2,
            self.height // self.vae_scale_factor,
            self.width // self.vae_scale_factor,
        )

    def load_denoiser(self) -> QwenImageTransformer2DModel:
        """A fresh float32 transformer from ``path/transformer`` (a new copy on every call)."""
        return QwenImageTransformer2DModel.from_pretrained(
            self.subfolder("transformer"), variant=self.variant, torch_dtype=torch.float32
        )

    def encode_text(self, prompts: Sequence[str]) -> Conditioning:
        """``prompt_embeds`` and ``prompt_embeds_mask`` from ``QwenImagePipeline.encode_prompt``.

        The pipeline formats each prompt into its chat template, tokenises it (truncating at
        ``tokenizer_max_length`` + the dropped prefix), takes Qwen2.5-VL's last hidden state,
        drops the template's system prefix and keeps the first ``max_sequence_length`` tokens, so
        a longer prompt is truncated there. It pads to the batch's longest prompt; here every
        prompt is zero-padded to ``max_sequence_length`` with a 0 mask, which the transformer's
        attention honours.
        """
        embeds, mask = self.prompt_pipeline.encode_prompt(
            list(prompts), device=self.text_encoder.device, max_sequence_length=self.max_sequence_length
        )
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        pad = self.max_sequence_length - embeds.shape[1]
        return Conditioning(
            {"prompt_embeds": F.pad(embeds, (0, 0, 0, pad)), "prompt_embeds_mask": F.pad(mask, (0, pad))}
        )

    def network_output(self, network: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        """The transformer's velocity at ``x_t``: 2×2-packed latents, timestep σ (the pipeline's
        ``(1000·σ)/1000``), the text mask and the image's token grid as ``img_shapes``."""
        dtype = network_dtype(network)
        _, _, height, width = x_t.shape
        output = network(
            hidden_states=pack_latents(x_t.to(dtype)),
            timestep=self.schedule.model_timestep(level).to(x_t.device, dtype) / 1000,
            encoder_hidden_states=cond.tensors["prompt_embeds"].to(dtype),
            encoder_hidden_states_mask=cond.tensors["prompt_embeds_mask"],
            img_shapes=[[(1, height // PATCH_SIZE, width // PATCH_SIZE)]] * len(x_t),
            return_dict=False,
        )[0]
        return unpack_latents(output, height, width)

    def guide(self, uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
        """The pipeline's norm-preserving true CFG (:func:`norm_preserving_cfg`); ``guidance_scale`` is
        the teacher's ``true_cfg_scale`` (the pipeline guides only above 1, the library at any scale but 1)."""
        return norm_preserving_cfg(uncond, cond, scale)

    def _latent_statistics(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE's per-channel ``latents_mean`` and ``1/latents_std`` (as the pipeline writes it), 5-D."""
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, inv_std

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``(z − mean)/std`` to images in ``[0, 1]`` (float32), as one-frame videos; differentiable."""
        z = latents.unsqueeze(2).to(self.vae.dtype)
        mean, inv_std = self._latent_statistics(z)
        images = self.vae.decode(z / inv_std + mean).sample[:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in ``[0, 1]`` to latents ``(mode(z) − mean)/std`` (float32), as one-frame videos."""
        z = self.vae.encode((2 * images - 1).unsqueeze(2).to(self.vae.dtype)).latent_dist.mode()
        mean, inv_std = self._latent_statistics(z)
        return ((z - mean) * inv_std)[:, :, 0].float()

    def sampler_noise(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        """Fresh noise drawn in the pipeline's packed ``(B, H/2·W/2, 4·C)`` token order (as its
        stochastic scheduler draws it) and unpacked: the export then samples as the library does."""
        batch, channels, height, width = like.shape
        tokens = torch.randn((batch, (height // 2) * (width // 2), 4 * channels), generator=generator, dtype=like.dtype)
        return unpack_latents(tokens, height, width).to(like.device)

    def export(self, network: nn.Module, output_dir: str | Path, num_steps: int, levels: Tensor) -> Path:
        """Save a stock ``QwenImagePipeline`` folder: the student transformer and a stochastic flow scheduler.

        ``pipe(prompt, height=..., width=..., num_inference_steps=num_steps)`` (no negative prompt,
        so no CFG) then runs the student's few-step ``"sde"`` sampler at σ = ``levels``; the
        pipeline's default size is 1024², so rdm_export.json records the student's ``height`` and
        ``width`` (and ``true_cfg_scale`` 1).
        """
        levels = check_levels(levels, num_steps)
        scheduler = flux_scheduler_for(self.scheduler_config, levels)
        manifest: dict[str, Any] = dict(
            num_steps=num_steps,
            timesteps=scheduler.timesteps.tolist(),
            sigmas=scheduler.sigmas[:-1].tolist(),
            true_cfg_scale=1.0,
            height=self.height,
            width=self.width,
        )
        return self.export_pipeline(network, QwenImageTransformer2DModel, scheduler, output_dir, manifest)
