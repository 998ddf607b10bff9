"""Stable Diffusion 3 / 3.5 adapter (diffusers ``SD3Transformer2DModel``, rectified flow)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import Tensor, nn
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from rdm_lightning.backbones.base import Conditioning, network_dtype
from rdm_lightning.backbones.stable_diffusion import DiffusersBackbone, check_levels, config_for
from rdm_lightning.core.parameterization import Prediction
from rdm_lightning.core.schedules import FlowSchedule, flux_mu, shift_sigmas

SIGMA_TOLERANCE = 1e-5
SHIFT_FIT_ITERATIONS = 20


def flow_scheduler_for(scheduler_config: dict[str, Any], levels: Tensor) -> FlowMatchEulerDiscreteScheduler:
    """A stochastic FlowMatchEulerDiscreteScheduler whose ``set_timesteps(len(levels))`` gives σ = ``levels``.

    ``stochastic_sampling=True`` makes each step re-noise x̂0 = x − σ·v to the next σ
    with fresh noise: core.sampling's ``"sde"`` rule. The scheduler's grid is
    ``shift_s`` of an evenly spaced grid, stretched so that it ends at
    ``shift_terminal``; both are fitted to ``levels`` (exact for any shifted grid
    ``shift(1 − i/N)``, static or FLUX-dynamic). Other level sets raise a ValueError.
    """
    sigmas = levels.to(torch.float64)
    if abs(float(sigmas[0]) - 1.0) > SIGMA_TOLERANCE:
        raise ValueError(f"FlowMatchEulerDiscreteScheduler always starts at σ = 1; got levels {sigmas.tolist()}")
    overrides: dict[str, Any] = dict(
        use_dynamic_shifting=False,
        stochastic_sampling=True,
        invert_sigmas=False,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        shift_terminal=None,
    )
    if len(sigmas) > 1:
        num_train = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config).config.num_train_timesteps
        overrides.update(shift=_fit_shift(sigmas, num_train), shift_terminal=float(sigmas[-1]))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        config_for(FlowMatchEulerDiscreteScheduler, scheduler_config), **overrides
    )
    scheduler.set_timesteps(len(sigmas))
    got = scheduler.sigmas[:-1].double()
    if not torch.allclose(got, sigmas, atol=SIGMA_TOLERANCE, rtol=0):
        raise ValueError(
            f"no FlowMatchEulerDiscreteScheduler shift reproduces levels {sigmas.tolist()} "
            f"(best fit gives {got.tolist()})"
        )
    return scheduler


def _fit_shift(sigmas: Tensor, num_train_timesteps: int) -> float:
    """Static shift ``s`` for which shift_s of the scheduler's grid, stretched to ``sigmas[-1]``, is ``sigmas``.

    The scheduler's base grid is ``u_i = 1 − i·(1 − δ)/(N − 1)`` with
    ``δ = shift_s(1/T)``; with ``v = 1 − u`` and ``ρ = 1 − σ``, shift_s then the
    terminal stretch by ``k`` give ``1/ρ = a/v + b`` with ``a = s/k`` and
    ``b = −(s − 1)/k``, so ``s = a/(a + b)``: a line fit, iterated for δ(s).
    """
    num_steps = len(sigmas)
    if num_steps < 3:
        return 1.0  # σ_0 = 1 and the terminal stretch fix two levels already
    index = torch.arange(1, num_steps, dtype=torch.float64)
    inv_rho = 1.0 / (1.0 - sigmas[1:])
    shift = 1.0
    for _ in range(SHIFT_FIT_ITERATIONS):
        delta = shift_sigmas(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64), shift)
        inv_v = (num_steps - 1) / (index * (1.0 - delta))
        design = torch.stack([inv_v, torch.ones_like(inv_v)], dim=1)
        a, b = torch.linalg.lstsq(design, inv_rho.unsqueeze(1)).solution.flatten().tolist()
        if a + b <= 0 or a / (a + b) <= 0:
            raise ValueError(f"levels {sigmas.tolist()} are not a shifted flow grid (fit a={a}, b={b})")
        shift = a / (a + b)
    return shift


def flow_schedule_for(scheduler_config: dict[str, Any], image_tokens: int) -> FlowSchedule:
    """The schedule of a FlowMatchEulerDiscreteScheduler config: its static shift, or with
    ``use_dynamic_shifting`` the FLUX dynamic shift at μ of ``image_tokens`` (the number of
    transformer tokens of the image, as the pipelines compute μ from)."""
    config = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config).config
    if not config.use_dynamic_shifting:
        return FlowSchedule(shift=config.shift)
    if config.time_shift_type != "exponential":
        raise ValueError(
            f"unsupported time_shift_type {config.time_shift_type!r} for dynamic shifting; accepted: 'exponential'"
        )
    mu = flux_mu(image_tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    return FlowSchedule(dynamic_shift_mu=mu)


class SD3Backbone(DiffusersBackbone):
    """SD3 / SD3.5 pipelines: ``SD3Transformer2DModel`` predicting the flow velocity.

    Args:
        path: diffusers pipeline folder (transformer/, vae/, text_encoder/,
            text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/, and optionally
            text_encoder_3/ + tokenizer_3/ for T5) or a hub id.
        height, width: image size in pixels, each a multiple of the VAE scale factor times the
            patch size; default: the transformer's ``sample_size`` times the VAE scale factor
            (1024 for SD3-M and SD3.5).
        variant: weight-file variant to load (e.g. ``"fp16"``); ``None`` for the default files.
        frozen_dtype: dtype of the frozen text encoders (and of the VAE unless
            ``vae_dtype`` is given): ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        vae_dtype: dtype of the VAE; ``None`` means ``frozen_dtype``.
        max_sequence_length: number of T5 tokens (the pipeline's default, 256).
        local_files_only: never download; a hub id must already be in the cache.
        embedding_cache: folder of cached prompt embeddings (``docs/embedding_cache.md``); prompts
            missing from it are encoded and added, and with every prompt in it the text encoders
            never load. ``None``: encode every batch.
        embedding_cache_refresh: re-encode into ``embedding_cache`` when other text encoders or
            settings wrote it, instead of raising.

    Without text_encoder_3/ the T5 tokens are zeros, as in diffusers'
    ``StableDiffusion3Pipeline`` with ``text_encoder_3=None``. The schedule is
    the scheduler's static shift, or the FLUX dynamic shift at this image size
    when ``use_dynamic_shifting`` is set.
    """

    denoiser_subfolder = "transformer"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    # Joint attention, image and text streams (docs/methods/dmdr.md; the DMDR SD3 critic LoRA).
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
        max_sequence_length: int = 256,
        local_files_only: bool = True,
        embedding_cache: str | None = None,
        embedding_cache_refresh: bool = False,
    ):
        super().__init__(
            path, variant, frozen_dtype, vae_dtype, local_files_only, embedding_cache, embedding_cache_refresh
        )
        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(self.subfolder("scheduler")))
        self.transformer_config = dict(SD3Transformer2DModel.load_config(self.subfolder("transformer")))
        self.max_sequence_length = max_sequence_length
        self.prediction = Prediction.FLOW_VELOCITY

        self.has_t5 = self.has_subfolder("text_encoder_3")

        patch = self.transformer_config.get("patch_size", 2)
        self.height, self.width = self.image_size(
            height, width, self.transformer_config["sample_size"] * self.vae_scale_factor, self.vae_scale_factor * patch
        )
        self.schedule = self.schedule_for_image_size()
        self.prepare_text_encoders()

    def text_settings(self) -> dict[str, Any]:
        """The T5 length (and whether T5 is there: its zeros otherwise)."""
        return {"max_sequence_length": self.max_sequence_length, "t5": self.has_t5}

    def load_text_encoders(self) -> None:
        """CLIP-L and CLIP-G with their projections, and T5 when the folder has text_encoder_3/."""
        self.tokenizer = self.load_tokenizer("tokenizer")
        self.tokenizer_2 = self.load_tokenizer("tokenizer_2")
        self.text_encoder = self.load_text_encoder(CLIPTextModelWithProjection, "text_encoder")
        self.text_encoder_2 = self.load_text_encoder(CLIPTextModelWithProjection, "text_encoder_2")
        if self.has_t5:
            self.tokenizer_3 = self.load_tokenizer("tokenizer_3")
            self.text_encoder_3 = self.load_text_encoder(T5EncoderModel, "text_encoder_3")

    def schedule_for_image_size(self) -> FlowSchedule:
        """The scheduler's static shift, or its dynamic shift at the current image size."""
        patch = self.transformer_config.get("patch_size", 2)
        return flow_schedule_for(self.scheduler_config, (self.latent_shape[1] // patch) * (self.latent_shape[2] // patch))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (
            self.transformer_config["in_channels"], self.height // self.vae_scale_factor, self.width // self.vae_scale_factor
        )

    def load_denoiser(self) -> SD3Transformer2DModel:
        """A fresh float32 transformer from ``path/transformer`` (a new copy on every call)."""
        return SD3Transformer2DModel.from_pretrained(
            self.subfolder("transformer"), variant=self.variant, torch_dtype=torch.float32
        )

    def _t5_embeds(self, prompts: Sequence[str]) -> Tensor:
        if not self.has_t5:
            shape = (len(prompts), self.max_sequence_length, self.transformer_config["joint_attention_dim"])
            return torch.zeros(shape, dtype=self.text_encoder.dtype, device=self.text_encoder.device)
        ids = self.token_ids(self.tokenizer_3, prompts, self.max_sequence_length, self.text_encoder_3.device)
        return self.text_encoder_3(ids)[0]

    def encode_text(self, prompts: Sequence[str]) -> Conditioning:
        """``prompt_embeds`` and ``pooled_prompt_embeds`` as ``StableDiffusion3Pipeline.encode_prompt``.

        CLIP-L and CLIP-G penultimate hidden states are concatenated on channels
        and zero-padded to the T5 width, then joined with the T5 tokens on the
        sequence axis; the pooled embedding is both CLIP projections concatenated.
        """
        hidden, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            # The pipeline pads both CLIP tokenisations to the first tokenizer's length.
            ids = self.token_ids(tokenizer, prompts, self.tokenizer.model_max_length, encoder.device)
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled.append(output[0])
        t5 = self._t5_embeds(prompts)
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        prompt_embeds = torch.cat([clip, t5.to(clip.dtype)], dim=-2)
        return Conditioning({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": torch.cat(pooled, dim=-1)})

    def network_output(self, network: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        """The transformer's velocity at ``x_t`` (timestep input 1000·σ)."""
        dtype = network_dtype(network)
        return network(
            hidden_states=x_t.to(dtype),
            timestep=self.schedule.model_timestep(level).to(x_t.device),
            encoder_hidden_states=cond.tensors["prompt_embeds"].to(dtype),
            pooled_projections=cond.tensors["pooled_prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]

    def export(self, network: nn.Module, output_dir: str | Path, num_steps: int, levels: Tensor) -> Path:
        """Save a stock diffusers pipeline: the student transformer and a stochastic flow scheduler.

        ``pipe(prompt, num_inference_steps=num_steps, guidance_scale=1.0)`` then runs
        the student's few-step ``"sde"`` sampler at σ = ``levels``. Without T5 in the
        source folder, load it with ``text_encoder_3=None, tokenizer_3=None`` (recorded
        in rdm_export.json), as diffusers requires for SD3 without T5.
        """
        levels = check_levels(levels, num_steps)
        scheduler = flow_scheduler_for(self.scheduler_config, levels)
        manifest: dict[str, Any] = dict(
            num_steps=num_steps, timesteps=scheduler.timesteps.tolist(), sigmas=scheduler.sigmas[:-1].tolist()
        )
        load_kwargs: dict[str, Any] = {}
        if not self.has_t5:
            load_kwargs = {"text_encoder_3": None, "tokenizer_3": None}
            manifest["from_pretrained_kwargs"] = load_kwargs
        return self.export_pipeline(network, SD3Transformer2DModel, scheduler, output_dir, manifest, **load_kwargs)
