"""Tiny random SD1.5 / SDXL / SD3 / SD3.5 pipelines in diffusers folder layout, for tests.

Every builder uses the real diffusers/transformers classes with a few channels,
saves the whole pipeline with ``save_pretrained`` (so ``model_index.json`` and
each component's config are the stock ones) and returns the folder. Weights are
random but seeded, so two builds of the same model are identical.
"""
from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

MAX_TOKENS = 77
CLIP_SPECIAL = ("<|startoftext|>", "<|endoftext|>")
# 256 byte characters, their end-of-word forms and the two special tokens.
CLIP_VOCAB_SIZE = 2 * 256 + len(CLIP_SPECIAL)
PROBE_PROMPT = "a photo of a cat"


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """Byte-level CLIP tokenizer without merges: one token per character.

    Built from vocab.json/merges.txt in a folder because the constructor with
    ``vocab_file``/``merges_file`` silently yields a 2-token vocabulary under
    transformers 5.
    """
    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + list(CLIP_SPECIAL)
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        Path(folder, "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_TOKENS)
    assert len(tokenizer) == CLIP_VOCAB_SIZE, len(tokenizer)
    _check_tokenizes(tokenizer)
    return tokenizer


def tiny_t5_tokenizer() -> T5Tokenizer:
    """Unigram T5 tokenizer over single printable characters (no sentencepiece file needed)."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces = [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    tokenizer = T5Tokenizer(vocab=specials + pieces, extra_ids=0, model_max_length=512)
    assert len(tokenizer) == len(specials) + len(pieces), len(tokenizer)
    _check_tokenizes(tokenizer)
    return tokenizer


def _check_tokenizes(tokenizer) -> None:
    ids = tokenizer(PROBE_PROMPT).input_ids
    assert len(set(ids)) > 2, f"tokenizer maps {PROBE_PROMPT!r} to {ids}"


def tiny_clip_text_encoder(tokenizer: CLIPTokenizer, hidden: int, projection: int | None, seed: int) -> torch.nn.Module:
    """2-layer CLIP text encoder; with ``projection`` it is ``CLIPTextModelWithProjection``."""
    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=projection or hidden,
        # CLIP pools at the first end-of-text token, so the ids must be the tokenizer's.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = CLIPTextModel(config) if projection is None else CLIPTextModelWithProjection(config)
    return model.eval()


def make_tiny_clip(
    path: str | Path, image_size: int = 32, projection_dim: int = 16, logit_scale: float | None = None, seed: int = 0
) -> Path:
    """A random 2-layer ``CLIPModel`` (patch 8, width 32) and :func:`tiny_clip_tokenizer` saved together in
    ``path``, the layout of a hub CLIP snapshot with its tokenizer; ``logit_scale`` is the initial
    ``log`` temperature (``None``: CLIPConfig's default, log(1/0.07))."""
    tokenizer = tiny_clip_tokenizer()
    tokenizer.save_pretrained(path)
    extra = {} if logit_scale is None else {"logit_scale_init_value": logit_scale}
    config = CLIPConfig(
        text_config=dict(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=MAX_TOKENS,
            # CLIP pools at the first end-of-text token, so the ids must be the tokenizer's.
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            image_size=image_size,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=projection_dim,
        **extra,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(path)
    return Path(path)


def tiny_vae(shift_factor: float | None = None, scaling_factor: float = 0.18215) -> AutoencoderKL:
    """Two-level AutoencoderKL: a VAE scale factor of 2."""
    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


def tiny_unet(cross_attention_dim: int, sdxl: bool = False, pooled_dim: int = 0) -> UNet2DConditionModel:
    """(32, 64)-channel UNet on 8×8 latents; ``sdxl`` adds the text-time embedding."""
    extra = {}
    if sdxl:
        # add_time_ids has 6 entries, each embedded to addition_time_embed_dim, plus the pooled text embedding.
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + pooled_dim)
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
        **extra,
    ).eval()


def make_tiny_sd15(path: str | Path, prediction_type: str = "epsilon") -> Path:
    """SD1.5-layout pipeline (PNDM scheduler config as in the real checkpoint)."""
    tokenizer = tiny_clip_tokenizer()
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
        skip_prk_steps=True, steps_offset=1, prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        unet=tiny_unet(cross_attention_dim=32),
        vae=tiny_vae(),
        text_encoder=tiny_clip_text_encoder(tokenizer, hidden=32, projection=None, seed=2),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return Path(path)


def make_tiny_sdxl(path: str | Path) -> Path:
    """SDXL-layout pipeline: two CLIP encoders (32 + 32 channels), pooled embeds of width 32."""
    tokenizer = tiny_clip_tokenizer()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        unet=tiny_unet(cross_attention_dim=64, sdxl=True, pooled_dim=32),
        vae=tiny_vae(scaling_factor=0.13025),
        text_encoder=tiny_clip_text_encoder(tokenizer, hidden=32, projection=None, seed=2),
        text_encoder_2=tiny_clip_text_encoder(tokenizer, hidden=32, projection=32, seed=3),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=scheduler,
    )
    pipe.save_pretrained(path)
    return Path(path)


def make_tiny_sd3(path: str | Path, with_t5: bool = False, sd35: str | None = None) -> Path:
    """SD3-layout pipeline (shift 3); without ``with_t5`` the T5 encoder/tokenizer are absent.

    ``sd35="medium"``: SD3.5-M's transformer (MMDiT-X: the first block adds a dual self-attention,
    RMS qk-norm); ``sd35="large"``: SD3.5-L's (RMS qk-norm, shift 5 as its scheduler config has).
    """
    variants = {None: ({}, 3.0), "medium": (dict(dual_attention_layers=(0,), qk_norm="rms_norm"), 3.0),
                "large": (dict(qk_norm="rms_norm"), 5.0)}
    if sd35 not in variants:
        raise ValueError(f"unknown sd35 variant {sd35!r}; accepted: {tuple(variants)}")
    architecture, shift = variants[sd35]
    joint_dim = 48  # T5 width: wider than the concatenated CLIP channels (16 + 16), as in SD3.
    tokenizer = tiny_clip_tokenizer()
    text_encoder_3 = tokenizer_3 = None
    if with_t5:
        tokenizer_3 = tiny_t5_tokenizer()
        torch.manual_seed(4)
        text_encoder_3 = T5EncoderModel(
            T5Config(vocab_size=128, d_model=joint_dim, d_ff=64, d_kv=8, num_layers=1, num_heads=2,
                     pad_token_id=tokenizer_3.pad_token_id, eos_token_id=tokenizer_3.eos_token_id)
        ).eval()
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=2 if sd35 else 1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=joint_dim,
        pooled_projection_dim=32,
        out_channels=4,
        **architecture,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=tiny_vae(shift_factor=0.1, scaling_factor=1.5),
        text_encoder=tiny_clip_text_encoder(tokenizer, hidden=16, projection=16, seed=2),
        text_encoder_2=tiny_clip_text_encoder(tokenizer, hidden=16, projection=16, seed=3),
        text_encoder_3=text_encoder_3,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(path)
    return Path(path)
