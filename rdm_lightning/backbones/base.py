"""The one interface every model family is used through.

A :class:`Backbone` owns the frozen conditioning parts of a model (tokenizers,
text encoders, VAE) and its noise schedule, and builds copies of the denoising
network for the roles (teacher, generator, fake score). Methods call
:meth:`Backbone.predict_x0` with whichever role's network they need; the
adapter hides timestep scaling, prediction type, pooled embeddings, latent
packing and VAE scaling.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdm_lightning.core.dmd import classifier_free_guidance
from rdm_lightning.core.parameterization import Prediction, prediction_to_x0, training_target
from rdm_lightning.core.schedules import NoiseSchedule, _per_sample


@dataclass
class Conditioning:
    """Encoded prompts: named tensors, each with the batch as first dimension."""

    tensors: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index) -> "Conditioning":
        return Conditioning({k: v[index] for k, v in self.tensors.items()})

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        keys = items[0].tensors.keys()
        return Conditioning({k: torch.cat([c.tensors[k] for c in items]) for k in keys})


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named ``"float32"``, ``"float16"`` or ``"bfloat16"``."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; accepted: {tuple(DTYPES)}")
    return DTYPES[name]


def network_dtype(network: nn.Module) -> torch.dtype:
    """dtype of the network's weights, which its inputs must match outside autocast (the first parameter's: read
    through ``parameters()``, which under DeepSpeed ZeRO-3 neither gathers nor claims a partitioned weight)."""
    return next(network.parameters()).dtype


def require_path(path: str | Path, what: str) -> Path:
    """``path`` as a Path, or a FileNotFoundError naming it and what it should hold."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} not found at {str(path)!r}")
    return path


def repeated_blocks(network: nn.Module) -> list[nn.Module]:
    """The elements of every ``nn.ModuleList`` of ``network`` that lies inside no other ``nn.ModuleList``
    (a transformer's blocks, a UNet's down and up blocks), in module order; a list's elements are not searched further."""
    blocks: list[nn.Module] = []
    for child in network.children():
        blocks.extend(child if isinstance(child, nn.ModuleList) else repeated_blocks(child))
    return blocks


class Backbone(nn.Module, ABC):
    """Adapter of one model family. Its own modules are frozen."""

    schedule: NoiseSchedule
    prediction: Prediction
    guidance_embedding: bool = False
    """The denoiser takes the guidance value as an input (guidance-distilled FLUX.1-dev, FLUX.2-dev)
    instead of running true CFG: :meth:`predict_x0` then passes the teacher's ``guidance_scale`` (or,
    for the student and fake score, :attr:`student_guidance`) to :meth:`network_output` as ``guidance``."""
    student_guidance: float | None = None
    """Embedded guidance of the student and fake score (guidance-embedding families only)."""
    lora_target_modules: tuple[str, ...] | str | None = None
    """Modules of the denoiser a LoRA adapts (DMDR's LoRA-on-teacher critic), in peft's
    ``target_modules`` form: module names matched as suffixes of the full name, or one regex
    matched against it. ``None``: the family declares none, and no LoRA critic can be built."""

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Shape ``(C, H, W)`` of one latent the generator produces."""

    @abstractmethod
    def load_denoiser(self) -> nn.Module:
        """A fresh copy of the pretrained denoising network (float32, trainable)."""

    def shard_units(self, network: nn.Module) -> list[nn.Module]:
        """The submodules of ``network`` (a copy of the denoiser: teacher, role or EMA) that FSDP2 shards as
        units of their own before the network's root unit takes the rest (``DistillationModule.configure_model``).

        Default: the elements of the network's outermost module lists (:func:`repeated_blocks`), such
        as a diffusers transformer's ``transformer_blocks`` and ``single_transformer_blocks``. A family whose
        :meth:`features` runs parts of the network outside its ``forward`` must make every submodule with
        parameters that :meth:`features` calls a unit: FSDP2 gathers a unit's weights only in that unit's own forward.
        """
        return repeated_blocks(network)

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Text conditioning for a batch of prompts."""

    def sampler_noise(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        """Fresh noise of a stochastic sampler step, shaped like ``like``: i.i.d. normal, drawn on the
        generator's device (CPU) and moved. A family whose stock pipeline draws it in a packed token
        layout draws it in that order and unpacks it, so that the exported pipeline and the library's
        sampler put the same draws on the same latent cells."""
        return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)

    def flush_embedding_cache(self) -> None:
        """Write the prompt embeddings encoded since the last flush to the adapter's embedding
        cache; adapters without one (the default) have nothing to write."""

    def empty_conditioning(self, n: int) -> Conditioning:
        """Unconditional branch for CFG: the empty prompt ``""`` by default."""
        return self.encode_prompts([""] * n)

    @abstractmethod
    def network_output(self, network: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        """The network's raw prediction (ε, v or velocity) at ``x_t``.

        A :attr:`guidance_embedding` family takes a keyword ``guidance`` (float) too.
        """

    def _output(
        self, network: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning, guidance: float | None
    ) -> Tensor:
        if self.guidance_embedding:
            return self.network_output(
                network, x_t, level, cond, guidance=self.student_guidance if guidance is None else guidance
            )
        return self.network_output(network, x_t, level, cond)

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Latents to images in ``[0, 1]``, shape ``(B, C, H, W)``, float32."""

    @abstractmethod
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in ``[0, 1]`` to latents (the inverse of :meth:`decode`)."""

    def features(self, network: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        """Bottleneck features of ``network`` at ``x_t`` (for a GAN head)."""
        raise NotImplementedError(f"{type(self).__name__} exposes no bottleneck features for a GAN head")

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of :meth:`features`."""
        raise NotImplementedError(f"{type(self).__name__} exposes no bottleneck features for a GAN head")

    def export(self, network: nn.Module, output_dir: str | Path, num_steps: int, levels: Tensor) -> Path:
        """Write the student ``network`` as a loadable model folder."""
        raise NotImplementedError(f"{type(self).__name__} has no export")

    lora_file_prefix: str = ""
    """Prefix of the denoiser's module names in an exported LoRA file (diffusers: ``unet.`` / ``transformer.``)."""

    def export_lora(self, state: dict[str, Tensor], output_dir: str | Path) -> Path:
        """Write LoRA weights (diffusers' format, :func:`~rdm_lightning.methods.roles.diffusers_lora_state`) as
        ``output_dir/pytorch_lora_weights.safetensors``, the file a diffusers pipeline's ``load_lora_weights`` reads."""
        from safetensors.torch import save_file

        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / "pytorch_lora_weights.safetensors"
        save_file(state, str(path))
        return path

    def _alpha_sigma(self, level: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        return _per_sample(self.schedule.alpha_sigma(level), like)

    def guide(self, uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
        """Combine the CFG branches' raw outputs: ``uncond + scale·(cond − uncond)`` (a family whose
        pipeline guides otherwise, e.g. Qwen-Image's norm-preserving CFG, overrides this)."""
        return classifier_free_guidance(uncond, cond, scale)

    def predict_x0(
        self,
        network: nn.Module,
        x_t: Tensor,
        level: Tensor,
        cond: Conditioning,
        guidance_scale: float | None = None,
        uncond: Conditioning | None = None,
    ) -> Tensor:
        """x̂0 (float32) of ``network`` at ``x_t``; ``guidance_scale`` is the teacher's guidance.

        ``None`` (the student and the fake score) runs the network on ``cond`` alone. A
        :attr:`guidance_embedding` family passes the guidance to the network (``None``:
        :attr:`student_guidance`); any other runs CFG when ``guidance_scale != 1``, the
        unconditional and conditional branches as one batch.
        """
        if self.guidance_embedding:
            output = self._output(network, x_t, level, cond, guidance_scale)
        elif guidance_scale is None or guidance_scale == 1.0:
            output = self.network_output(network, x_t, level, cond)
        else:
            uncond = self.empty_conditioning(len(x_t)) if uncond is None else uncond
            both = self.network_output(
                network, torch.cat([x_t, x_t]), torch.cat([level, level]), Conditioning.cat([uncond, cond])
            )
            out_u, out_c = both.float().chunk(2)
            output = self.guide(out_u, out_c, guidance_scale)
        alpha, sigma = self._alpha_sigma(level, x_t)
        return prediction_to_x0(self.prediction, output.float(), x_t.float(), alpha, sigma)

    def denoising_loss(
        self,
        network: nn.Module,
        x0: Tensor,
        cond: Conditioning,
        level: Tensor,
        noise: Tensor,
        weights: Tensor | None = None,
    ) -> Tensor:
        """MSE of the network's prediction against its target (ε, v or velocity).

        ``weights`` (``[B]``, detached) weight each sample's MSE: ``(1/B)·Σ_i w_i·mse_i``.
        """
        x_t = self.schedule.add_noise(x0, noise, level)
        alpha, sigma = self._alpha_sigma(level, x0)
        target = training_target(self.prediction, x0, noise, alpha, sigma)
        output = self._output(network, x_t, level, cond, None).float()
        if weights is None:
            return F.mse_loss(output, target)
        if weights.shape != (len(x0),):
            raise ValueError(f"weights must be shaped ({len(x0)},) (one per sample), got {tuple(weights.shape)}")
        return (weights.detach().float() * ((output - target) ** 2).flatten(1).mean(dim=1)).mean()
