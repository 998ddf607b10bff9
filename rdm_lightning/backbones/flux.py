"""FLUX.1 adapter (diffusers ``FluxPipeline``: ``FluxTransformer2DModel``, rectified flow).

FLUX.1-dev is guidance-distilled: the guidance value goes into the transformer
through its guidance embedding (no true CFG). FLUX.1-schnell has no guidance
input and no schedule shift. The transformer works on 2×2 patches of the VAE
latent packed into tokens; this adapter packs and unpacks inside
:meth:`FluxBackbone.network_output`, so the rest of the library sees the
unpacked latent ``(C, H/8, W/8)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from torch import Tensor, nn
from transformers import CLIPTextModel, T5EncoderModel

from rdm_lightning.backbones.base import Conditioning, network_dtype
from rdm_lightning.backbones.sd3 import SIGMA_TOLERANCE, SD3Backbone, flow_schedule_for
from rdm_lightning.backbones.stable_diffusion import DiffusersBackbone, check_levels, config_for
from rdm_lightning.core.parameterization import Prediction
from rdm_lightning.core.schedules import FlowSchedule

PIPELINE_GUIDANCE = 3.5
"""``FluxPipeline.__call__``'s default ``guidance_scale`` (the embedded guidance of FLUX.1-dev)."""
DEFAULT_SAMPLE_SIZE = 128
"""``FluxPipeline.default_sample_size``: the default image side in latent cells (1024 px for FLUX.1)."""
MAX_T5_TOKENS = 512
"""The longest T5 sequence ``FluxPipeline.check_inputs`` accepts."""
PACKING = 2
"""The pipeline packs 2×2 latent cells into one transformer token."""
# The scheduler's stretch is the identity when the fitted scale is 1 to within this.
STRETCH_TOLERANCE = 1e-6


def flux_pipeline_sigmas(num_steps: int) -> np.ndarray:
    """The unshifted sigmas ``FluxPipeline`` (and the FLUX.2, Qwen-Image and Z-Image pipelines) pass to
    ``set_timesteps``: ``linspace(1, 1/N, N)``, i.e. ``1 − i/N``."""
    return np.linspace(1.0, 1 / num_steps, num_steps)


def flux_scheduler_for(scheduler_config: dict[str, Any], levels: Tensor) -> FlowMatchEulerDiscreteScheduler:
    """A stochastic FlowMatchEulerDiscreteScheduler on which ``FluxPipeline`` steps through σ = ``levels``.

    The pipeline calls ``set_timesteps(sigmas=linspace(1, 1/N, N), mu=μ)``, as do the FLUX.2,
    Qwen-Image and Z-Image pipelines, which export through this function too. The
    scheduler returned has a static shift ``s`` (μ is then ignored, so the
    exported pipeline samples the student's levels at any image size, not levels
    re-shifted for the size asked for) and, where needed, a ``shift_terminal``
    stretch: with ``v = i/N`` and ``ρ = 1 − σ`` these give ``1/ρ = a/v + b`` with
    ``s = a/(a + b)`` and stretch ``a + b``, fitted to ``levels``. This is exact
    for any shifted grid, e.g. the FLUX dynamic shift at μ (``s = e^μ``), which is
    the student's ``generator_levels``. ``stochastic_sampling`` makes each step
    re-noise x̂0 = x − σ·v to the next σ with fresh noise: core.sampling's
    ``"sde"`` rule. Other level sets raise a ValueError.
    """
    sigmas = levels.to(torch.float64)
    num_steps = len(sigmas)
    if abs(float(sigmas[0]) - 1.0) > SIGMA_TOLERANCE:
        raise ValueError(f"the FLUX-style pipelines always start at σ = 1; got levels {sigmas.tolist()}")
    shift, stretch = _fit_shift_and_stretch(sigmas)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        config_for(FlowMatchEulerDiscreteScheduler, scheduler_config),
        use_dynamic_shifting=False,
        shift=shift,
        shift_terminal=None if abs(stretch - 1.0) < STRETCH_TOLERANCE else float(sigmas[-1]),
        stochastic_sampling=True,
        invert_sigmas=False,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
    )
    scheduler.set_timesteps(sigmas=flux_pipeline_sigmas(num_steps))  # the pipeline's μ changes nothing here
    got = scheduler.sigmas[:-1].double()
    if not torch.allclose(got, sigmas, atol=SIGMA_TOLERANCE, rtol=0):
        raise ValueError(
            f"no FlowMatchEulerDiscreteScheduler shift (with a terminal stretch) reproduces levels "
            f"{sigmas.tolist()} on the pipeline's grid linspace(1, 1/{num_steps}, {num_steps}) "
            f"(best fit gives {got.tolist()})"
        )
    return scheduler


def _fit_shift_and_stretch(sigmas: Tensor) -> tuple[float, float]:
    """``(s, a + b)`` of the line ``1/(1 − σ_i) = a·N/i + b`` through ``sigmas[1:]``; ``s = a/(a + b)``."""
    num_steps = len(sigmas)
    if num_steps == 1:
        return 1.0, 1.0  # σ = 1 whatever the shift
    inv_v = num_steps / torch.arange(1, num_steps, dtype=torch.float64)
    inv_rho = 1.0 / (1.0 - sigmas[1:])
    if num_steps == 2:
        # One level: the shift alone reaches it (b = 1 − a, no stretch).
        a = float((inv_rho[0] - 1.0) / (inv_v[0] - 1.0))
        b = 1.0 - a
    else:
        design = torch.stack([inv_v, torch.ones_like(inv_v)], dim=1)
        a, b = torch.linalg.lstsq(design, inv_rho.unsqueeze(1)).solution.flatten().tolist()
    if a <= 0 or a + b <= 0:
        raise ValueError(f"levels {sigmas.tolist()} are not a shifted flow grid (fit a={a}, b={b})")
    return a / (a + b), a + b


class FluxBackbone(DiffusersBackbone):
    """FLUX.1-dev / FLUX.1-schnell pipelines: ``FluxTransformer2DModel`` predicting the flow velocity.

    Args:
        path: diffusers pipeline folder (transformer/, vae/, text_encoder/ (CLIP-L),
            text_encoder_2/ (T5), tokenizer/, tokenizer_2/, scheduler/) or a hub id.
        height, width: image size in pixels, each a multiple of twice the VAE scale factor
            (the 2×2 packing; 16 for FLUX.1); default: the pipeline's
            ``default_sample_size`` (128) times the VAE scale factor, 1024.
        variant: weight-file variant to load (e.g. ``"fp16"``); ``None`` for the default files.
        frozen_dtype: dtype of the frozen text encoders (and of the VAE unless
            ``vae_dtype`` is given): ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        vae_dtype: dtype of the VAE; ``None`` means ``frozen_dtype``.
        max_sequence_length: number of T5 tokens, 1 to 512 (the pipeline's default 512;
            FLUX.1-schnell's documentation uses 256). Longer prompts are truncated to
            it, as the pipeline does (and to CLIP's 77 tokens for the pooled embedding).
        guidance: embedded guidance of the student and fake score (:attr:`student_guidance`)
            for a transformer with ``guidance_embeds`` (FLUX.1-dev); default: the
            pipeline's default ``guidance_scale``, 3.5. A transformer without a guidance
            input (FLUX.1-schnell) takes none: giving one raises a ValueError.
        local_files_only: never download; a hub id must already be in the cache.
        embedding_cache: folder of cached prompt embeddings (``docs/embedding_cache.md``); prompts
            missing from it are encoded and added, and with every prompt in it the text encoders
            never load. ``None``: encode every batch.
        embedding_cache_refresh: re-encode into ``embedding_cache`` when other text encoders or
            settings wrote it, instead of raising.

    The schedule is the scheduler's: FLUX.1-dev's dynamic shift at μ of this image
    size (``calculate_shift`` of the number of image tokens, as the pipeline), or
    FLUX.1-schnell's static shift 1. The teacher's guidance (``guidance_scale`` of
    :meth:`predict_x0`) goes through the guidance embedding for FLUX.1-dev; for
    FLUX.1-schnell a ``guidance_scale`` other than 1 runs true CFG against the empty
    prompt, as the pipeline's ``true_cfg_scale`` with ``negative_prompt=""``.
    """

    denoiser_subfolder = "transformer"
    pipeline_classes = ("FluxPipeline",)
    # Joint attention of the double-stream blocks (image and text streams) and the
    # single-stream blocks' q/k/v: the module names of SD3's joint attention.
    lora_target_modules = SD3Backbone.lora_target_modules

    def __init__(
        self,
        path: str,
        height: int | None = None,
        width: int | None = None,
        variant: str | None = None,
        frozen_dtype: str = "float32",
        vae_dtype: str | None = None,
        max_sequence_length: int = MAX_T5_TOKENS,
        guidance: float | None = None,
        local_files_only: bool = True,
        embedding_cache: str | None = None,
        embedding_cache_refresh: bool = False,
    ):
        if not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= MAX_T5_TOKENS:
            raise ValueError(
                f"max_sequence_length must be an integer from 1 to {MAX_T5_TOKENS} (FluxPipeline's limit), "
                f"got {max_sequence_length!r}"
            )
        super().__init__(
            path, variant, frozen_dtype, vae_dtype, local_files_only, embedding_cache, embedding_cache_refresh
        )
        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(self.subfolder("scheduler")))
        self.transformer_config = dict(FluxTransformer2DModel.load_config(self.subfolder("transformer")))
        self.max_sequence_length = max_sequence_length
        self.prediction = Prediction.FLOW_VELOCITY

        self.guidance_embedding = bool(self.transformer_config.get("guidance_embeds", False))
        if self.guidance_embedding:
            self.student_guidance = PIPELINE_GUIDANCE if guidance is None else float(guidance)
        elif guidance is not None:
            raise ValueError(
                f"guidance={guidance!r} given, but {str(self.subfolder('transformer'))!r} has no guidance embedding "
                "(guidance_embeds: false, e.g. FLUX.1-schnell); accepted: None"
            )

        self.height, self.width = self.image_size(
            height, width, DEFAULT_SAMPLE_SIZE * self.vae_scale_factor, self.vae_scale_factor * PACKING
        )
        self.schedule = self.schedule_for_image_size()
        self.prepare_text_encoders()

    def text_settings(self) -> dict[str, Any]:
        """The T5 length."""
        return {"max_sequence_length": self.max_sequence_length}

    def load_text_encoders(self) -> None:
        """CLIP-L (its pooled output only) and T5."""
        self.tokenizer = self.load_tokenizer("tokenizer")
        self.text_encoder = self.load_text_encoder(CLIPTextModel, "text_encoder")
        self.tokenizer_2 = self.load_tokenizer("tokenizer_2")
        self.text_encoder_2 = self.load_text_encoder(T5EncoderModel, "text_encoder_2")

    def schedule_for_image_size(self) -> FlowSchedule:
        """The scheduler's static shift, or its dynamic shift with μ of the ``(latent H / 2)·(latent W / 2)``
        packed image tokens, as ``FluxPipeline`` computes it (``calculate_shift``)."""
        _, latent_height, latent_width = self.latent_shape
        return flow_schedule_for(self.scheduler_config, (latent_height // PACKING) * (latent_width // PACKING))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The unpacked VAE latent: the transformer's ``in_channels`` are 2×2 cells of it."""
        channels = self.transformer_config["in_channels"] // PACKING**2
        return channels, self.height // self.vae_scale_factor, self.width // self.vae_scale_factor

    def load_denoiser(self) -> FluxTransformer2DModel:
        """A fresh float32 transformer from ``path/transformer`` (a new copy on every call)."""
        return FluxTransformer2DModel.from_pretrained(
            self.subfolder("transformer"), variant=self.variant, torch_dtype=torch.float32
        )

    def encode_text(self, prompts: Sequence[str]) -> Conditioning:
        """``prompt_embeds`` (T5) and ``pooled_prompt_embeds`` (CLIP) as ``FluxPipeline.encode_prompt``.

        T5's last hidden state over ``max_sequence_length`` tokens, padded and
        unmasked as the pipeline runs it (so one shape per prompt); CLIP's pooled
        output over 77 tokens. Longer prompts are truncated to those lengths.
        """
        ids = self.token_ids(self.tokenizer, prompts, self.tokenizer.model_max_length, self.text_encoder.device)
        pooled = self.text_encoder(ids, output_hidden_states=False).pooler_output
        ids = self.token_ids(self.tokenizer_2, prompts, self.max_sequence_length, self.text_encoder_2.device)
        embeds = self.text_encoder_2(ids, output_hidden_states=False)[0]
        return Conditioning({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled.to(embeds.device)})

    def network_output(
        self, network: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning, guidance: float | None = None
    ) -> Tensor:
        """The transformer's velocity at ``x_t``, unpacked to ``x_t``'s shape.

        As ``FluxPipeline``'s call: ``x_t`` packed into 2×2-cell tokens with their
        (0, row, column) ids, text ids all zero, timestep ``1000·σ / 1000`` in the
        network's dtype, and ``guidance`` (required with a guidance embedding, else
        ``None``) as a float32 value per sample.
        """
        if self.guidance_embedding != (guidance is not None):
            expected = "a float (the embedded guidance)" if self.guidance_embedding else "None (no guidance embedding)"
            raise ValueError(f"network_output got guidance={guidance!r}; this transformer needs {expected}")
        dtype = network_dtype(network)
        batch, channels, height, width = x_t.shape
        device = x_t.device
        embeds = cond.tensors["prompt_embeds"].to(dtype)
        # The pipeline's timestep is the scheduler's 1000·σ cast to the latents' dtype, divided by 1000.
        timestep = self.schedule.model_timestep(level).to(device).to(dtype) / 1000
        output = network(
            hidden_states=FluxPipeline._pack_latents(x_t.to(dtype).contiguous(), batch, channels, height, width),
            timestep=timestep,
            guidance=None if guidance is None else torch.full((batch,), guidance, dtype=torch.float32, device=device),
            pooled_projections=cond.tensors["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(
                batch, height // PACKING, width // PACKING, device, dtype
            ),
            return_dict=False,
        )[0]
        factor = self.vae_scale_factor
        return FluxPipeline._unpack_latents(output, height * factor, width * factor, factor)

    def sampler_noise(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        """Fresh noise drawn in ``FluxPipeline``'s packed ``(B, H/2·W/2, 4·C)`` token order (as its
        stochastic scheduler draws it) and unpacked: the export then samples as the library does."""
        batch, channels, height, width = like.shape
        shape = (batch, (height // PACKING) * (width // PACKING), channels * PACKING**2)
        tokens = torch.randn(shape, generator=generator, dtype=like.dtype)
        factor = self.vae_scale_factor
        return FluxPipeline._unpack_latents(tokens, height * factor, width * factor, factor).to(like.device)

    def export(self, network: nn.Module, output_dir: str | Path, num_steps: int, levels: Tensor) -> Path:
        """Save a stock ``FluxPipeline``: the student transformer and a stochastic flow scheduler.

        ``pipe(prompt, num_inference_steps=num_steps, guidance_scale=<student guidance>,
        max_sequence_length=<this T5 length>)`` then runs the student's few-step ``"sde"``
        sampler at σ = ``levels`` (see :func:`flux_scheduler_for`); rdm_export.json records
        these arguments and the image size trained on. The scheduler draws the re-noising
        from the global torch RNG, in the packed token layout.
        """
        levels = check_levels(levels, num_steps)
        scheduler = flux_scheduler_for(self.scheduler_config, levels)
        manifest: dict[str, Any] = dict(
            num_steps=num_steps,
            timesteps=scheduler.timesteps.tolist(),
            sigmas=scheduler.sigmas[:-1].tolist(),
            max_sequence_length=self.max_sequence_length,
            height=self.height,
            width=self.width,
        )
        if self.guidance_embedding:
            manifest["guidance_scale"] = self.student_guidance
        return self.export_pipeline(network, FluxTransformer2DModel, scheduler, output_dir, manifest)
