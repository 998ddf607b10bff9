"""The digits backbone: a tiny text encoder and a small conditional denoiser on 8×8 images.

It runs the same path as the SD families (prompt → text embedding → denoiser
→ decode) so every method runs end to end on a laptop CPU. The "latent" is
the image itself, scaled to ``[-1, 1]``. The teacher is trained by the library
(:mod:`rdm_lightning.methods.teacher`) and saved as a folder with
``config.json``, ``text_encoder.safetensors`` and ``denoiser.safetensors``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rdm_lightning.backbones.base import Backbone, Conditioning, network_dtype, require_path
from rdm_lightning.cache import cache_dir
from rdm_lightning.core.parameterization import Prediction
from rdm_lightning.core.schedules import FlowSchedule, NoiseSchedule, VPSchedule, vp_alphas_cumprod

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOCABULARY = ("<pad>", "<bos>", "a", "an", "handwritten", "digit", "number", "of", *map(str, range(10)), *NUMBER_WORDS)
PREDICTIONS = ("flow_velocity", "epsilon")


@dataclass
class DigitsConfig:
    """Architecture and schedule of a digits teacher (saved as ``config.json``)."""

    prediction: str = "flow_velocity"
    """``flow_velocity`` (rectified flow, default) or ``epsilon`` (VP/DDPM)."""
    channels: int = 32
    """Width of the denoiser at 8×8; the 4×4 bottleneck has twice as many."""
    text_dim: int = 64
    """Width of the text encoder."""
    max_tokens: int = 8
    """Prompt length in tokens, including the leading ``<bos>``."""

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.channels < 8 or self.channels % 8:
            raise ValueError(f"channels must be a positive multiple of 8, got {self.channels}")


def default_teacher_path(prediction: str = "flow_velocity") -> Path:
    """Where the library caches the digits teacher it trains."""
    return cache_dir() / "digits" / f"teacher-{prediction}"


def tokenize(prompts: Sequence[str], max_tokens: int) -> Tensor:
    """Word-level token ids, ``<bos>`` first, padded with ``<pad>`` (id 0)."""
    ids = torch.zeros(len(prompts), max_tokens, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        words = prompt.lower().split()
        if len(words) + 1 > max_tokens:
            raise ValueError(f"prompt {prompt!r} has {len(words)} words; at most {max_tokens - 1} fit")
        unknown = [w for w in words if w not in VOCABULARY]
        if unknown:
            raise ValueError(f"prompt {prompt!r} has words {unknown} outside the digits vocabulary {VOCABULARY[2:]}")
        ids[row, : len(words) + 1] = torch.tensor([1] + [VOCABULARY.index(w) for w in words])
    return ids


class DigitsTextEncoder(nn.Module):
    """Token embedding + one transformer layer; the ``<bos>`` output is the pooled embedding."""

    def __init__(self, dim: int = 64, max_tokens: int = 8):
        super().__init__()
        self.max_tokens = max_tokens
        self.token_embedding = nn.Embedding(len(VOCABULARY), dim)
        self.position_embedding = nn.Parameter(torch.zeros(max_tokens, dim))
        self.layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=2 * dim, batch_first=True, dropout=0.0)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: Tensor) -> Tensor:
        hidden = self.token_embedding(ids) + self.position_embedding
        hidden = self.layer(hidden, src_key_padding_mask=ids == 0)
        return self.norm(hidden[:, 0])


def timestep_embedding(timestep: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of the (0–1000) network timestep."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=timestep.device) / half)
    angles = timestep.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class FiLMResBlock(nn.Module):
    """Residual conv block whose normalised activations are scaled and shifted by the embedding."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, out_channels)
        self.film = nn.Linear(emb_dim, 2 * out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class DigitsDenoiser(nn.Module):
    """Small conditional U-Net on 8×8 with a 4×4 bottleneck, conditioned by FiLM."""

    def __init__(self, channels: int = 32, text_dim: int = 64):
        super().__init__()
        emb_dim = 2 * channels
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.text_proj = nn.Linear(text_dim, emb_dim)
        self.conv_in = nn.Conv2d(1, channels, 3, padding=1)
        self.down1 = FiLMResBlock(channels, channels, emb_dim)
        self.downsample = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        self.mid1 = FiLMResBlock(2 * channels, 2 * channels, emb_dim)
        self.mid2 = FiLMResBlock(2 * channels, 2 * channels, emb_dim)
        self.upsample = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.up1 = FiLMResBlock(2 * channels, channels, emb_dim)
        self.norm_out = nn.GroupNorm(8, channels)
        self.conv_out = nn.Conv2d(channels, 1, 3, padding=1)

    def embedding(self, timestep: Tensor, text: Tensor) -> Tensor:
        """The embedding of the timestep and text that every block's FiLM reads; in ``text``'s dtype, which the
        backbone casts to the network's."""
        return F.silu(self.time_mlp(timestep_embedding(timestep, self.emb_dim).to(text.dtype)) + self.text_proj(text))

    gradient_checkpointing = False
    """Whether each residual block recomputes its activations in the backward pass (while training)."""

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint each residual block (diffusers' method name, so roles treat every network alike)."""
        self.gradient_checkpointing = True

    def block(self, block: FiLMResBlock, x: Tensor, emb: Tensor) -> Tensor:
        """``block(x, emb)``, checkpointed while training with gradient checkpointing on."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, emb, use_reentrant=False)
        return block(x, emb)

    def bottleneck(self, x: Tensor, emb: Tensor) -> tuple[Tensor, Tensor]:
        """``(skip at 8×8, bottleneck at 4×4)``."""
        skip = self.block(self.down1, self.conv_in(x), emb)
        return skip, self.block(self.mid2, self.block(self.mid1, self.downsample(skip), emb), emb)

    def forward(self, x: Tensor, timestep: Tensor, text: Tensor) -> Tensor:
        emb = self.embedding(timestep, text)
        skip, h = self.bottleneck(x, emb)
        h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.block(self.up1, torch.cat([h, skip], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def digits_schedule(prediction: str) -> NoiseSchedule:
    """Flow with no shift, or DDPM's linear VP schedule (8×8 pixels need ᾱ_T ≈ 0)."""
    if prediction == "flow_velocity":
        return FlowSchedule(shift=1.0)
    return VPSchedule(vp_alphas_cumprod("linear", beta_start=1e-4, beta_end=0.02))


def save_digits_model(path: str | Path, config: DigitsConfig, text_encoder: nn.Module, denoiser: nn.Module) -> Path:
    """Write a digits model folder (``config.json`` + two safetensors files)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(asdict(config), indent=2))
    save_file({k: v.contiguous() for k, v in text_encoder.state_dict().items()}, path / "text_encoder.safetensors")
    save_file({k: v.contiguous() for k, v in denoiser.state_dict().items()}, path / "denoiser.safetensors")
    return path


class DigitsBackbone(Backbone):
    """Adapter of the digits teacher folder.

    Args:
        path: folder of a digits model (``config.json``, ``text_encoder.safetensors``,
            ``denoiser.safetensors``); ``None`` uses the library's cached teacher for
            ``prediction`` (``rdm fit`` trains it first when it is missing).
        prediction: which cached teacher ``path=None`` selects: ``flow_velocity`` or ``epsilon``.
    """

    # The convolutions and FiLM projections of every residual block (the denoiser has no attention).
    lora_target_modules = ("conv1", "conv2", "film")

    def __init__(self, path: str | None = None, prediction: str = "flow_velocity"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.path = require_path(
            default_teacher_path(prediction) if path is None else path,
            "digits teacher folder (train one with `rdm fit --config configs/digits/teacher.yaml`)",
        )
        self.config = DigitsConfig(**json.loads(require_path(self.path / "config.json", "digits config").read_text()))
        self.schedule = digits_schedule(self.config.prediction)
        self.prediction = Prediction(self.config.prediction)
        self.text_encoder = DigitsTextEncoder(self.config.text_dim, self.config.max_tokens)
        self.text_encoder.load_state_dict(load_file(require_path(self.path / "text_encoder.safetensors", "text encoder")))
        self.text_encoder.requires_grad_(False).eval()

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (1, 8, 8)

    def load_denoiser(self) -> nn.Module:
        network = DigitsDenoiser(self.config.channels, self.config.text_dim)
        network.load_state_dict(load_file(require_path(self.path / "denoiser.safetensors", "digits denoiser")))
        return network

    def shard_units(self, network: nn.Module) -> list[nn.Module]:
        """The residual blocks, and every module with weights that :meth:`features` (the GAN head's input)
        calls outside the network's forward: the embedding MLPs, ``conv_in`` and the downsampling conv."""
        return [network.time_mlp, network.text_proj, network.conv_in, network.down1, network.downsample,
                network.mid1, network.mid2, network.up1]

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        device = self.text_encoder.position_embedding.device
        with torch.no_grad():
            text = self.text_encoder(tokenize(prompts, self.config.max_tokens).to(device))
        return Conditioning({"text": text})

    def network_output(self, network: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        dtype = network_dtype(network)  # bfloat16 where DeepSpeed casts the networks under bf16-mixed
        return network(x_t.to(dtype), self.schedule.model_timestep(level).to(x_t.device), cond.tensors["text"].to(dtype))

    def features(self, network: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        dtype = network_dtype(network)
        emb = network.embedding(self.schedule.model_timestep(level).to(x_t.device), cond.tensors["text"].to(dtype))
        return network.bottleneck(x_t.to(dtype), emb)[1]

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return (2 * self.config.channels, 4, 4)

    def decode(self, latents: Tensor) -> Tensor:
        return ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def encode_images(self, images: Tensor) -> Tensor:
        return images.float() * 2.0 - 1.0

    def export(self, network: nn.Module, output_dir: str | Path, num_steps: int, levels: Tensor) -> Path:
        """A digits model folder with the student as denoiser, plus its sampling settings."""
        output_dir = save_digits_model(output_dir, self.config, self.text_encoder, network)
        settings = {"num_inference_steps": num_steps, "guidance_scale": 1.0, "levels": levels.tolist()}
        (output_dir / "rdm_export.json").write_text(json.dumps(settings, indent=2))
        return output_dir
