"""Tiny random FLUX.1-dev / FLUX.1-schnell pipelines in diffusers folder layout, for tests.

The real classes (``FluxTransformer2DModel``, ``AutoencoderKL`` with shift and
scaling factors, ``CLIPTextModel``, ``T5EncoderModel``) with a few channels,
assembled as a stock ``FluxPipeline`` and saved with ``save_pretrained``.
Weights are random but seeded, so two builds of the same model are identical.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import T5Config, T5EncoderModel

from tiny_models import tiny_clip_text_encoder, tiny_clip_tokenizer, tiny_t5_tokenizer, tiny_vae

T5_WIDTH = 48
CLIP_WIDTH = 32
LATENT_CHANNELS = 4  # tiny_vae's; the transformer sees 2×2 patches of them (16 channels)

# The published scheduler configs: FLUX.1-dev shifts by the image size, FLUX.1-schnell not at all.
SCHEDULERS = {
    "dev": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096),
    "schnell": dict(shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096),
}


def tiny_t5_encoder(tokenizer, seed: int = 4) -> T5EncoderModel:
    """1-layer T5 encoder of width :data:`T5_WIDTH`."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=128, d_model=T5_WIDTH, d_ff=64, d_kv=8, num_layers=1, num_heads=2,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return T5EncoderModel(config).eval()


def tiny_flux_transformer(guidance_embeds: bool) -> FluxTransformer2DModel:
    """One double-stream and one single-stream block; head dim 16 = RoPE axes 4 + 6 + 6."""
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def make_tiny_flux(path: str | Path, variant: str = "dev") -> Path:
    """FLUX.1-layout pipeline: ``variant="dev"`` (guidance embedding, dynamic shift) or ``"schnell"``
    (no guidance input, no shift); FLUX-like VAE normalisation (shift 0.1, scale 1.5)."""
    if variant not in SCHEDULERS:
        raise ValueError(f"unknown FLUX variant {variant!r}; accepted: {tuple(SCHEDULERS)}")
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS[variant]),
        vae=tiny_vae(shift_factor=0.1, scaling_factor=1.5),
        text_encoder=tiny_clip_text_encoder(tokenizer, hidden=CLIP_WIDTH, projection=None, seed=2),
        tokenizer=tokenizer,
        text_encoder_2=tiny_t5_encoder(tokenizer_2),
        tokenizer_2=tokenizer_2,
        transformer=tiny_flux_transformer(guidance_embeds=variant == "dev"),
    )
    pipe.save_pretrained(path)
    return Path(path)
