"""FLUX.2 adapters (diffusers ``Flux2Pipeline`` and ``Flux2KleinPipeline``: ``Flux2Transformer2DModel``).

Both pipelines share the transformer, the VAE (``AutoencoderKLFlux2``) and its latent
normalisation: the VAE latent is patchified 2×2 (32 → 128 channels) and normalised by the
VAE's batch-norm running statistics; the generator works on that normalised latent
``(C, H/16, W/16)``, the ``latents`` the pipelines take, and the transformer sees it as one
token per cell. They differ in the text encoder and in guidance:

- FLUX.2-dev (:class:`Flux2Backbone`): Mistral Small 3.1 (``Mistral3ForConditionalGeneration``)
  with a system message, hidden states of layers (10, 20, 30); guidance-distilled (the
  transformer's guidance embedding, no true CFG).
- FLUX.2-klein (:class:`Flux2KleinBackbone`): Qwen3 (``Qwen3ForCausalLM``), layers (9, 18, 27);
  the base model runs true CFG against the empty prompt, the step-distilled one
  (``is_distilled`` in model_index.json) runs without guidance.

The pipelines compute μ of the dynamic shift with their own ``compute_empirical_mu``, which
depends on the number of inference steps as well as on the image token count: the schedule
uses μ at ``mu_num_steps`` steps (the pipelines' default 50).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from torch import Tensor, nn
from transformers import AutoConfig, AutoProcessor, Mistral3ForConditionalGeneration, Qwen3ForCausalLM

from rdm_lightning.backbones.base import Conditioning, network_dtype
from rdm_lightning.backbones.flux import flux_scheduler_for
from rdm_lightning.backbones.stable_diffusion import DiffusersBackbone, check_levels
from rdm_lightning.core.parameterization import Prediction
from rdm_lightning.core.schedules import FlowSchedule

DEFAULT_SAMPLE_SIZE = 128
"""``Flux2Pipeline.default_sample_size`` (klein's too): the default image side in VAE latent cells (1024 px)."""
PATCH = 2
"""The pipelines patchify the VAE latent 2×2 before normalising it (``_patchify_latents``)."""
DEFAULT_MAX_SEQUENCE_LENGTH = 512
"""The pipelines' default (and the processor's padded) text length."""
PIPELINE_STEPS = 50
"""The pipelines' default ``num_inference_steps``, at which the schedule's empirical μ is taken."""
DEV_GUIDANCE = 4.0
"""``Flux2Pipeline.__call__``'s default ``guidance_scale`` (FLUX.2-dev's embedded guidance)."""
DEV_OUT_LAYERS = (10, 20, 30)
"""``Flux2Pipeline``'s default ``text_encoder_out_layers`` (Mistral hidden states it stacks)."""
KLEIN_OUT_LAYERS = (9, 18, 27)
"""``Flux2KleinPipeline``'s default ``text_encoder_out_layers`` (Qwen3 hidden states it stacks)."""
# Double-stream blocks: image and text attention projections; single-stream blocks: the fused
# q/k/v + MLP-in projection and the fused attention + MLP-out projection. One regex, because a
# single block's ``attn.to_out`` is a Linear while a double block's is a ModuleList (whose
# ``to_out.0`` is the Linear), so the suffix ``to_out`` cannot be named for one kind alone.
LORA_TARGETS = (
    r"(.*\.)?(transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out))"
)


def unpack_tokens(tokens: Tensor, shape: torch.Size) -> Tensor:
    """The inverse of the pipelines' ``_pack_latents``: tokens ``(B, H·W, C)`` back to ``shape`` ``(B, C, H, W)``."""
    return tokens.transpose(1, 2).reshape(shape)


class Flux2BackboneBase(DiffusersBackbone):
    """What the FLUX.2 adapters share: transformer, VAE normalisation, token packing and ids, schedule, export.

    Not used on its own: :class:`Flux2Backbone` and :class:`Flux2KleinBackbone` add their text
    encoder, guidance and pipeline class.
    """

    denoiser_subfolder = "transformer"
    vae_class = AutoencoderKLFlux2
    lora_target_modules = LORA_TARGETS
    pipeline_cls: type
    """The stock pipeline whose static helpers (prompt embedding, packing, ids) this adapter calls."""

    def __init__(
        self,
        path: str,
        height: int | None,
        width: int | None,
        variant: str | None,
        frozen_dtype: str,
        vae_dtype: str | None,
        max_sequence_length: int,
        text_encoder_out_layers: Sequence[int],
        mu_num_steps: int,
        local_files_only: bool,
        embedding_cache: str | None,
        embedding_cache_refresh: bool,
    ):
        for name, value in (("max_sequence_length", max_sequence_length), ("mu_num_steps", mu_num_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        super().__init__(
            path, variant, frozen_dtype, vae_dtype, local_files_only, embedding_cache, embedding_cache_refresh
        )
        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(self.subfolder("scheduler")))
        self.transformer_config = dict(Flux2Transformer2DModel.load_config(self.subfolder("transformer")))
        latent_channels = PATCH**2 * self.vae.config.latent_channels
        if self.transformer_config["in_channels"] != latent_channels:
            raise ValueError(
                f"{str(self.subfolder('transformer'))!r} takes {self.transformer_config['in_channels']} input "
                f"channels, but the VAE's 2×2-patchified latent has {latent_channels}"
            )
        self.max_sequence_length = max_sequence_length
        self.text_encoder_out_layers = self._check_out_layers(text_encoder_out_layers)
        self.mu_num_steps = mu_num_steps
        self.prediction = Prediction.FLOW_VELOCITY
        self.height, self.width = self.image_size(
            height, width, DEFAULT_SAMPLE_SIZE * self.vae_scale_factor, PATCH * self.vae_scale_factor
        )
        self.schedule = self.schedule_for_image_size()

    def _check_out_layers(self, layers: Sequence[int]) -> tuple[int, ...]:
        """``layers`` as a tuple, if each is a hidden state of the text encoder and together they are as
        wide as the transformer's text input; read from the configs, so no weights load."""
        config = AutoConfig.from_pretrained(self.subfolder("text_encoder")).get_text_config()
        layers = tuple(layers)
        depth = config.num_hidden_layers  # hidden_states holds the embeddings and each layer's output
        if not layers or any(isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= depth for k in layers):
            raise ValueError(
                f"text_encoder_out_layers {list(layers)!r}: each must be a hidden-state index from 0 to "
                f"{depth} (the text encoder's layers), and at least one is needed"
            )
        width, expected = len(layers) * config.hidden_size, self.transformer_config["joint_attention_dim"]
        if width != expected:
            raise ValueError(
                f"text_encoder_out_layers {list(layers)!r} stack {len(layers)} × {config.hidden_size} = {width} "
                f"channels, but the transformer takes joint_attention_dim={expected}"
            )
        return layers

    def text_settings(self) -> dict[str, Any]:
        """The text length and the hidden-state layers stacked."""
        return {
            "max_sequence_length": self.max_sequence_length,
            "text_encoder_out_layers": list(self.text_encoder_out_layers),
        }

    @property
    def image_tokens(self) -> int:
        """Transformer tokens of one image: the cells of the patchified latent."""
        _, height, width = self.latent_shape
        return height * width

    def schedule_for_image_size(self) -> FlowSchedule:
        """The scheduler's static shift, or its exponential dynamic shift at the pipelines' empirical μ
        (:attr:`mu`) for this image size and ``mu_num_steps`` steps."""
        config = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config).config
        if not config.use_dynamic_shifting:
            self.mu = None
            return FlowSchedule(shift=config.shift)
        if config.time_shift_type != "exponential":
            raise ValueError(
                f"unsupported time_shift_type {config.time_shift_type!r} for dynamic shifting; accepted: 'exponential'"
            )
        self.mu = compute_empirical_mu(self.image_tokens, self.mu_num_steps)
        return FlowSchedule(dynamic_shift_mu=self.mu)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The patchified, batch-norm-normalised VAE latent (the pipelines' ``latents``)."""
        cell = PATCH * self.vae_scale_factor
        return self.transformer_config["in_channels"], self.height // cell, self.width // cell

    def load_denoiser(self) -> Flux2Transformer2DModel:
        """A fresh float32 transformer from ``path/transformer`` (a new copy on every call)."""
        return Flux2Transformer2DModel.from_pretrained(
            self.subfolder("transformer"), variant=self.variant, torch_dtype=torch.float32
        )

    def network_output(
        self, network: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning, guidance: float | None = None
    ) -> Tensor:
        """The transformer's velocity at ``x_t``, unpacked to ``x_t``'s shape.

        As the pipelines' call: ``x_t`` packed one token per cell with (0, row, column, 0) ids,
        text ids (0, 0, 0, position), timestep ``1000·σ / 1000`` in the network's dtype, and
        ``guidance`` (required with a guidance embedding, else ``None``) as a float32 value per sample.
        """
        if self.guidance_embedding != (guidance is not None):
            expected = "a float (the embedded guidance)" if self.guidance_embedding else "None (no guidance embedding)"
            raise ValueError(f"network_output got guidance={guidance!r}; this transformer needs {expected}")
        dtype = network_dtype(network)
        batch, channels, height, width = x_t.shape
        device = x_t.device
        latents = x_t.to(dtype)
        embeds = cond.tensors["prompt_embeds"].to(dtype)
        output = network(
            hidden_states=self.pipeline_cls._pack_latents(latents),
            # The pipeline's timestep is the scheduler's 1000·σ divided by 1000; the model multiplies it back.
            timestep=self.schedule.model_timestep(level).to(device).to(dtype) / 1000,
            guidance=None if guidance is None else torch.full((batch,), guidance, dtype=torch.float32, device=device),
            encoder_hidden_states=embeds,
            txt_ids=self.pipeline_cls._prepare_text_ids(embeds).to(device),
            img_ids=self.pipeline_cls._prepare_latent_ids(latents).to(device),
            return_dict=False,
        )[0]
        return unpack_tokens(output, x_t.shape)

    def sampler_noise(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        """Fresh noise drawn in the pipelines' packed ``(B, H·W, C)`` token order (as their stochastic
        scheduler draws it) and unpacked: the export then samples as the library does."""
        batch, channels, height, width = like.shape
        tokens = torch.randn((batch, height * width, channels), generator=generator, dtype=like.dtype)
        return unpack_tokens(tokens, like.shape).to(like.device)

    def _bn_statistics(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation (float32, ``(1, C, 1, 1)``) the pipelines normalise latents by."""
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).float()
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1).float() + self.vae.config.batch_norm_eps)
        return mean.to(like.device), std.to(like.device)

    def vae_latents(self, latents: Tensor) -> Tensor:
        """Normalised latents back to the VAE's ``(B, 32, H/8, W/8)`` latent (float32), as the pipelines
        do before ``vae.decode`` (and what Flux2KleinPipeline returns with ``output_type="latent"``)."""
        mean, std = self._bn_statistics(latents)
        return self.pipeline_cls._unpatchify_latents(latents.float() * std + mean)

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents to images in ``[0, 1]`` (float32); differentiable."""
        images = self.vae.decode(self.vae_latents(latents).to(self.vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in ``[0, 1]`` to normalised latents, as the pipelines encode reference images:
        ``mode(z)`` patchified 2×2, minus the batch-norm mean, over its standard deviation (float32)."""
        z = self.vae.encode((2 * images - 1).to(self.vae.dtype)).latent_dist.mode()
        z = self.pipeline_cls._patchify_latents(z.float())
        mean, std = self._bn_statistics(z)
        return (z - mean) / std

    def export_load_kwargs(self) -> dict[str, Any]:
        """Pipeline settings to save with the export (none by default)."""
        return {}

    def export(self, network: nn.Module, output_dir: str | Path, num_steps: int, levels: Tensor) -> Path:
        """Save a stock pipeline: the student transformer and a stochastic flow scheduler.

        ``pipe(prompt=prompt, num_inference_steps=num_steps, guidance_scale=<manifest>,
        max_sequence_length=<manifest>, text_encoder_out_layers=<manifest>)`` (``prompt`` by
        keyword: the pipelines' first argument is ``image``) then runs the student's few-step
        ``"sde"`` sampler at σ = ``levels``: the pipelines step through
        ``set_timesteps(sigmas=linspace(1, 1/N, N), mu=…)``, and the scheduler's static shift
        (and terminal stretch) is fitted to ``levels`` (:func:`~rdm_lightning.backbones.flux.flux_scheduler_for`),
        so ``mu`` no longer moves them. rdm_export.json records these arguments and the image
        size trained on. The scheduler draws the re-noising from the global torch RNG, in the
        packed token layout ``(B, H·W, C)``.
        """
        levels = check_levels(levels, num_steps)
        scheduler = flux_scheduler_for(self.scheduler_config, levels)
        manifest: dict[str, Any] = dict(
            num_steps=num_steps,
            timesteps=scheduler.timesteps.tolist(),
            sigmas=scheduler.sigmas[:-1].tolist(),
            max_sequence_length=self.max_sequence_length,
            text_encoder_out_layers=list(self.text_encoder_out_layers),
            height=self.height,
            width=self.width,
        )
        if self.guidance_embedding:
            manifest["guidance_scale"] = self.student_guidance
        return self.export_pipeline(
            network, Flux2Transformer2DModel, scheduler, output_dir, manifest, **self.export_load_kwargs()
        )


class Flux2Backbone(Flux2BackboneBase):
    """FLUX.2-dev pipelines (``Flux2Pipeline``): Mistral3 text encoder, guidance-embedding transformer.

    Args:
        path: diffusers pipeline folder (transformer/, vae/, text_encoder/, tokenizer/,
            scheduler/) or a hub id.
        height, width: image size in pixels, each a multiple of twice the VAE scale factor
            (16 for FLUX.2); default: the pipeline's ``default_sample_size`` (128) times the
            VAE scale factor, 1024.
        variant: weight-file variant to load (e.g. ``"fp16"``); ``None`` for the default files.
        frozen_dtype: dtype of the frozen text encoder (and of the VAE unless ``vae_dtype`` is
            given): ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        vae_dtype: dtype of the VAE; ``None`` means ``frozen_dtype``.
        max_sequence_length: text tokens (system message, chat template and prompt), padded to
            this length and unmasked in the transformer, as the pipeline runs them; longer
            prompts are truncated to it (the end of the chat template too), as the pipeline's
            processor does. Default 512, the pipeline's.
        text_encoder_out_layers: Mistral hidden states stacked on channels (the pipeline's
            ``text_encoder_out_layers``, default (10, 20, 30)).
        guidance: embedded guidance of the student and fake score (:attr:`student_guidance`);
            default: the pipeline's default ``guidance_scale``, 4.0. A transformer without
            ``guidance_embeds`` takes none: giving one raises a ValueError.
        mu_num_steps: the number of steps whose empirical μ (``compute_empirical_mu``) the
            dynamic-shift schedule uses; default 50, the pipeline's default step count.
        local_files_only: never download; a hub id must already be in the cache.
        embedding_cache: folder of cached prompt embeddings (``docs/embedding_cache.md``); prompts
            missing from it are encoded and added, and with every prompt in it the text encoder
            never loads. ``None``: encode every batch.
        embedding_cache_refresh: re-encode into ``embedding_cache`` when other text encoders or
            settings wrote it, instead of raising.

    The tokenizer/ component is loaded with ``AutoProcessor`` (FLUX.2-dev's ``PixtralProcessor``,
    which needs torchvision; a folder holding the bare Mistral tokenizer gives that tokenizer,
    whose chat template the processor applies to text-only prompts). The teacher's guidance
    (``guidance_scale`` of :meth:`predict_x0`) goes through the guidance embedding.
    """

    pipeline_classes = ("Flux2Pipeline",)
    pipeline_cls = Flux2Pipeline

    def __init__(
        self,
        path: str,
        height: int | None = None,
        width: int | None = None,
        variant: str | None = None,
        frozen_dtype: str = "float32",
        vae_dtype: str | None = None,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        text_encoder_out_layers: Sequence[int] = DEV_OUT_LAYERS,
        guidance: float | None = None,
        mu_num_steps: int = PIPELINE_STEPS,
        local_files_only: bool = True,
        embedding_cache: str | None = None,
        embedding_cache_refresh: bool = False,
    ):
        super().__init__(
            path, height, width, variant, frozen_dtype, vae_dtype, max_sequence_length, text_encoder_out_layers,
            mu_num_steps, local_files_only, embedding_cache, embedding_cache_refresh,
        )
        self.guidance_embedding = bool(self.transformer_config.get("guidance_embeds", True))
        if self.guidance_embedding:
            self.student_guidance = DEV_GUIDANCE if guidance is None else float(guidance)
        elif guidance is not None:
            raise ValueError(
                f"guidance={guidance!r} given, but {str(self.subfolder('transformer'))!r} has no guidance embedding "
                "(guidance_embeds: false); accepted: None"
            )
        self.prepare_text_encoders()

    def text_settings(self) -> dict[str, Any]:
        """The text length, the layers stacked and the system message (fixed by diffusers' FLUX.2 pipeline)."""
        return {**super().text_settings(), "system_message": SYSTEM_MESSAGE}

    def load_text_encoders(self) -> None:
        """The processor (or bare tokenizer) and the Mistral3 text encoder."""
        self.tokenizer = AutoProcessor.from_pretrained(self.subfolder("tokenizer"))
        self.text_encoder = self.load_text_encoder(Mistral3ForConditionalGeneration, "text_encoder")

    def encode_text(self, prompts: Sequence[str]) -> Conditioning:
        """``prompt_embeds`` as ``Flux2Pipeline.encode_prompt`` (its own helper, called as it calls it).

        Each prompt (``[IMG]`` removed) follows the FLUX.2 system message in Mistral's chat
        template, padded (or truncated) to ``max_sequence_length`` tokens; the hidden states of
        ``text_encoder_out_layers`` (with the attention mask) are stacked on channels:
        ``(B, max_sequence_length, 3·hidden)``, one shape per prompt.
        """
        embeds = self.pipeline_cls._get_mistral_3_small_prompt_embeds(
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            prompt=list(prompts),
            max_sequence_length=self.max_sequence_length,
            system_message=SYSTEM_MESSAGE,
            hidden_states_layers=self.text_encoder_out_layers,
        )
        return Conditioning({"prompt_embeds": embeds})


class Flux2KleinBackbone(Flux2BackboneBase):
    """FLUX.2-klein pipelines (``Flux2KleinPipeline``): Qwen3 text encoder, no guidance embedding.

    Args:
        path: diffusers pipeline folder (transformer/, vae/, text_encoder/, tokenizer/,
            scheduler/) or a hub id: klein base (true CFG) or the step-distilled klein
            (``is_distilled: true`` in model_index.json).
        height, width: image size in pixels, each a multiple of twice the VAE scale factor
            (16); default: the pipeline's ``default_sample_size`` (128) times the VAE scale
            factor, 1024.
        variant: weight-file variant to load (e.g. ``"fp16"``); ``None`` for the default files.
        frozen_dtype: dtype of the frozen text encoder (and of the VAE unless ``vae_dtype`` is
            given): ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        vae_dtype: dtype of the VAE; ``None`` means ``frozen_dtype``.
        max_sequence_length: text tokens (Qwen3 chat template with an empty thinking block,
            and the prompt), padded to this length and unmasked in the transformer, as the
            pipeline runs them; longer prompts are truncated to it (the end of the template
            too), as the pipeline's tokenizer call does. Default 512, the pipeline's.
        text_encoder_out_layers: Qwen3 hidden states stacked on channels (the pipeline's
            ``text_encoder_out_layers``, default (9, 18, 27)).
        mu_num_steps: the number of steps whose empirical μ (``compute_empirical_mu``) the
            dynamic-shift schedule uses; default 50, the pipeline's default step count.
        local_files_only: never download; a hub id must already be in the cache.
        embedding_cache: folder of cached prompt embeddings (``docs/embedding_cache.md``); prompts
            missing from it are encoded and added, and with every prompt in it the text encoder
            never loads. ``None``: encode every batch.
        embedding_cache_refresh: re-encode into ``embedding_cache`` when other text encoders or
            settings wrote it, instead of raising.

    The base model's teacher guidance is true CFG against the empty prompt, the pipeline's
    negative prompt (``guidance_scale`` of :meth:`predict_x0`). The step-distilled model
    runs without guidance: a ``guidance_scale`` other than 1 raises a ValueError (the
    pipeline ignores it). To distil klein base into a generator that starts from the
    distilled klein, build this adapter on the base folder (teacher and fake score) and give
    the generator the distilled transformer's weights with ``roles.generator.init`` (docs/roles.md).
    Exported students are saved with ``is_distilled: true``: the pipeline then runs them
    without CFG whatever ``guidance_scale`` it is given.
    """

    pipeline_classes = ("Flux2KleinPipeline",)
    pipeline_cls = Flux2KleinPipeline

    def __init__(
        self,
        path: str,
        height: int | None = None,
        width: int | None = None,
        variant: str | None = None,
        frozen_dtype: str = "float32",
        vae_dtype: str | None = None,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        text_encoder_out_layers: Sequence[int] = KLEIN_OUT_LAYERS,
        mu_num_steps: int = PIPELINE_STEPS,
        local_files_only: bool = True,
        embedding_cache: str | None = None,
        embedding_cache_refresh: bool = False,
    ):
        super().__init__(
            path, height, width, variant, frozen_dtype, vae_dtype, max_sequence_length, text_encoder_out_layers,
            mu_num_steps, local_files_only, embedding_cache, embedding_cache_refresh,
        )
        self.is_distilled = bool(self.model_index.get("is_distilled", False))
        self.prepare_text_encoders()

    def load_text_encoders(self) -> None:
        """The Qwen2 tokenizer and the Qwen3 text encoder."""
        self.tokenizer = self.load_tokenizer("tokenizer")
        self.text_encoder = self.load_text_encoder(Qwen3ForCausalLM, "text_encoder")

    def encode_text(self, prompts: Sequence[str]) -> Conditioning:
        """``prompt_embeds`` as ``Flux2KleinPipeline.encode_prompt`` (its own helper, called as it calls it).

        Each prompt as a user message in Qwen3's chat template (generation prompt, thinking
        disabled), padded (or truncated) to ``max_sequence_length`` tokens; the hidden states of
        ``text_encoder_out_layers`` (with the attention mask) are stacked on channels.
        """
        embeds = self.pipeline_cls._get_qwen3_prompt_embeds(
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            prompt=list(prompts),
            max_sequence_length=self.max_sequence_length,
            hidden_states_layers=self.text_encoder_out_layers,
        )
        return Conditioning({"prompt_embeds": embeds})

    def predict_x0(
        self,
        network: nn.Module,
        x_t: Tensor,
        level: Tensor,
        cond: Conditioning,
        guidance_scale: float | None = None,
        uncond: Conditioning | None = None,
    ) -> Tensor:
        """x̂0 of ``network``; true CFG at ``guidance_scale`` for klein base, none for the distilled klein."""
        if self.is_distilled and guidance_scale not in (None, 1.0):
            raise ValueError(
                f"guidance_scale={guidance_scale!r} for the step-distilled FLUX.2 klein at {str(self.folder)!r}, "
                "which runs without guidance (Flux2KleinPipeline ignores it); accepted: None or 1.0"
            )
        return super().predict_x0(network, x_t, level, cond, guidance_scale, uncond)

    def export_load_kwargs(self) -> dict[str, Any]:
        """The student is step-distilled: ``is_distilled`` makes the pipeline skip CFG."""
        return {"is_distilled": True}
