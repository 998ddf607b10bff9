"""Z-Image / Z-Image-Turbo adapter (diffusers ``ZImagePipeline``: ``ZImageTransformer2DModel``, rectified flow).

The transformer takes lists of per-sample tensors (latents with a frame axis, variable-length
caption features) and predicts the *negated* flow velocity at timestep ``1 − σ``; the adapter
feeds it as ``ZImagePipeline`` does and returns the library's velocity ``v`` (x̂0 = x_σ − σ·v).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
from torch import Tensor, nn
from transformers import Qwen3ForCausalLM, Qwen3Model

from rdm_lightning.backbones.base import Conditioning, network_dtype
from rdm_lightning.backbones.flux import flux_scheduler_for
from rdm_lightning.backbones.sd3 import flow_schedule_for
from rdm_lightning.backbones.stable_diffusion import DiffusersBackbone, check_levels
from rdm_lightning.core.parameterization import Prediction
from rdm_lightning.core.schedules import FlowSchedule

DEFAULT_SIZE = 1024  # ZImagePipeline: height = height or 1024
PATCH_SIZE = 2  # the transformer's forward default, which the pipeline uses (and its μ token count assumes)
TEXT_ENCODER_CLASSES = {"Qwen3Model": Qwen3Model, "Qwen3ForCausalLM": Qwen3ForCausalLM}
NO_GUIDANCE = 0.0
"""ZImagePipeline's ``guidance_scale`` that turns CFG off (it runs CFG for any value > 0)."""


class ZImageBackbone(DiffusersBackbone):
    """Z-Image and Z-Image-Turbo pipelines: ``ZImageTransformer2DModel`` with a Qwen3 text encoder.

    Args:
        path: diffusers pipeline folder (transformer/, vae/, text_encoder/, tokenizer/,
            scheduler/) or a hub id (``Tongyi-MAI/Z-Image-Turbo``, ``Tongyi-MAI/Z-Image``).
        height, width: image size in pixels, each a multiple of twice the VAE scale factor
            (16 for the real VAE), as ``ZImagePipeline`` requires; default 1024, the pipeline's.
        variant: weight-file variant to load (e.g. ``"bf16"``); ``None`` for the default files.
        frozen_dtype: dtype of the frozen text encoder (and of the VAE unless ``vae_dtype``
            is given): ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        vae_dtype: dtype of the VAE; ``None`` means ``frozen_dtype``.
        max_sequence_length: number of Qwen tokens of the chat-templated prompt (the pipeline's
            default, 512); longer prompts are truncated there, as the pipeline does.
        local_files_only: never download; a hub id must already be in the cache.
        embedding_cache: folder of cached prompt embeddings (``docs/embedding_cache.md``); prompts
            missing from it are encoded and added, and with every prompt in it the text encoder
            never loads. ``None``: encode every batch.
        embedding_cache_refresh: re-encode into ``embedding_cache`` when other text encoders or
            settings wrote it, instead of raising.

    The schedule is the scheduler's static shift (3.0 in Z-Image-Turbo's scheduler config), or
    the FLUX dynamic shift at this image size when ``use_dynamic_shifting`` is set, with μ from
    ``(H/16)·(W/16)`` image tokens as the pipeline computes it.

    CFG: ``ZImagePipeline`` combines ``pos + g·(pos − neg)`` and runs CFG for ``g > 0``; that is
    plain CFG ``neg + w·(pos − neg)`` with ``w = g + 1``, which is what this adapter's
    ``guidance_scale`` is (as for every family). The pipeline's default ``g = 5.0`` is ``w = 6.0``;
    Z-Image-Turbo is sampled without CFG (``g = 0``, ``w = 1``). The pipeline's optional
    ``cfg_normalization`` / ``cfg_truncation`` are off at their defaults and not reproduced.
    """

    denoiser_subfolder = "transformer"
    pipeline_classes = ("ZImagePipeline",)
    # The single-stream attention of every block (noise refiner, context refiner, main layers).
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(
        self,
        path: str,
        height: int | None = None,
        width: int | None = None,
        variant: str | None = None,
        frozen_dtype: str = "float32",
        vae_dtype: str | None = None,
        max_sequence_length: int = 512,
        local_files_only: bool = True,
        embedding_cache: str | None = None,
        embedding_cache_refresh: bool = False,
    ):
        super().__init__(
            path, variant, frozen_dtype, vae_dtype, local_files_only, embedding_cache, embedding_cache_refresh
        )
        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(self.subfolder("scheduler")))
        self.transformer_config = dict(ZImageTransformer2DModel.load_config(self.subfolder("transformer")))
        self.max_sequence_length = max_sequence_length
        self.prediction = Prediction.FLOW_VELOCITY
        self.height, self.width = self.image_size(height, width, DEFAULT_SIZE, self.vae_scale_factor * PATCH_SIZE)
        self.schedule = self.schedule_for_image_size()
        self.prepare_text_encoders()

    def text_settings(self) -> dict[str, Any]:
        """The Qwen token length (of the chat-templated prompt)."""
        return {"max_sequence_length": self.max_sequence_length}

    def load_text_encoders(self) -> None:
        """The Qwen2 tokenizer and the Qwen3 text encoder (the class model_index.json names)."""
        self.tokenizer = self.load_tokenizer("tokenizer")
        self.text_encoder = self.load_text_encoder(self._text_encoder_class(), "text_encoder")

    def _text_encoder_class(self) -> type:
        name = (self.model_index.get("text_encoder") or [None, None])[1]
        if name not in TEXT_ENCODER_CLASSES:
            raise ValueError(
                f"{str(self.folder)!r} has a {name} text encoder (model_index.json); accepted: "
                f"{', '.join(TEXT_ENCODER_CLASSES)}"
            )
        return TEXT_ENCODER_CLASSES[name]

    def schedule_for_image_size(self) -> FlowSchedule:
        """The scheduler's static shift, or its dynamic shift with μ of ``(latent H / 2)·(latent W / 2)``
        image tokens, as ``ZImagePipeline`` computes it."""
        tokens = (self.latent_shape[1] // PATCH_SIZE) * (self.latent_shape[2] // PATCH_SIZE)
        return flow_schedule_for(self.scheduler_config, tokens)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (
            self.transformer_config["in_channels"], self.height // self.vae_scale_factor, self.width // self.vae_scale_factor
        )

    def load_denoiser(self) -> ZImageTransformer2DModel:
        """A fresh float32 transformer from ``path/transformer`` (a new copy on every call)."""
        return ZImageTransformer2DModel.from_pretrained(
            self.subfolder("transformer"), variant=self.variant, torch_dtype=torch.float32
        )

    def encode_text(self, prompts: Sequence[str]) -> Conditioning:
        """``prompt_embeds`` and ``prompt_mask`` as ``ZImagePipeline.encode_prompt``.

        Each prompt is wrapped in the tokenizer's chat template (a user turn plus the generation
        prompt, ``enable_thinking=True``), tokenised to exactly ``max_sequence_length`` tokens
        (longer ones truncated, template tail included, as the pipeline does) and encoded; the
        features are the text encoder's penultimate hidden states. The pipeline keeps only the
        tokens of the attention mask, a variable-length list; here they stay padded to
        ``max_sequence_length`` (padding zeroed) with the mask, and :meth:`network_output`
        selects them again.
        """
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
            for prompt in prompts
        ]
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt"
        )
        device = self.text_encoder.device
        mask = tokens.attention_mask.to(device).bool()
        hidden = self.text_encoder(
            input_ids=tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True
        ).hidden_states[-2]
        return Conditioning({"prompt_embeds": hidden.masked_fill(~mask.unsqueeze(-1), 0.0), "prompt_mask": mask})

    def network_output(self, network: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        """The flow velocity at ``x_t``: minus the transformer's output at timestep ``(1000 − 1000·σ)/1000``.

        As ``ZImagePipeline`` calls it: one ``(C, 1, H, W)`` latent (frame axis added) and the
        valid caption tokens of each prompt per sample; the pipeline then steps the scheduler
        with the negated output.
        """
        dtype = network_dtype(network)
        t = self.schedule.model_timestep(level).to(x_t.device)
        embeds = cond.tensors["prompt_embeds"].to(device=x_t.device, dtype=dtype)
        mask = cond.tensors["prompt_mask"].to(x_t.device)
        captions = [embed[keep] for embed, keep in zip(embeds, mask)]
        latents = list(x_t.to(dtype).unsqueeze(2).unbind(0))
        output = network(latents, (1000 - t) / 1000, captions, return_dict=False)[0]
        return -torch.stack(output).squeeze(2)

    def export(self, network: nn.Module, output_dir: str | Path, num_steps: int, levels: Tensor) -> Path:
        """Save a stock ``ZImagePipeline`` folder: the student transformer and a stochastic flow scheduler.

        ``pipe(prompt, num_inference_steps=num_steps, guidance_scale=0.0)`` then runs the
        student's few-step ``"sde"`` sampler at σ = ``levels``; rdm_export.json records that
        ``guidance_scale`` (the pipeline's "no CFG", not the usual 1.0) with the timesteps and sigmas.
        """
        levels = check_levels(levels, num_steps)
        scheduler = flux_scheduler_for(self.scheduler_config, levels)
        manifest = dict(
            num_steps=num_steps,
            timesteps=scheduler.timesteps.tolist(),
            sigmas=scheduler.sigmas[:-1].tolist(),
            guidance_scale=NO_GUIDANCE,
        )
        return self.export_pipeline(network, ZImageTransformer2DModel, scheduler, output_dir, manifest)
