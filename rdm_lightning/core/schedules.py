"""Noise schedules of the two families, behind one interface.

Every schedule writes a noisy sample as ``x_t = alpha(t)·x0 + sigma(t)·eps``:

- VP/DDPM (SD1.5, SDXL): ``t`` is an integer timestep in ``{0, …, T−1}``,
  ``alpha = √ᾱ_t`` and ``sigma = √(1−ᾱ_t)``.
- Rectified flow (SD3, FLUX, the digits teacher): ``t`` is ``σ ∈ [0, 1]``,
  ``alpha = 1−σ`` and ``sigma = σ``.

A *level* is a value of ``t`` in the schedule's own units. Methods only handle
levels through this interface, so they never branch on the model family.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


BETA_SCHEDULES = ("scaled_linear", "linear")


def vp_alphas_cumprod(
    beta_schedule: str = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_train_timesteps: int = 1000,
) -> Tensor:
    """ᾱ_t of a DDPM beta schedule (diffusers' names), in float64.

    ``scaled_linear`` is Stable Diffusion's (β linear in √β); ``linear`` is DDPM's.
    """
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; accepted: {BETA_SCHEDULES}")
    return torch.cumprod(1.0 - betas, dim=0)


def shift_sigmas(u: Tensor, shift: float) -> Tensor:
    """Static shift of SD3: ``σ = s·u / (1 + (s−1)·u)``."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def dynamic_shift_sigmas(u: Tensor, mu: float) -> Tensor:
    """FLUX dynamic shift: ``σ = e^μ / (e^μ + 1/u − 1)`` (σ = 0 at u = 0)."""
    u = u.to(torch.float64)
    out = math.exp(mu) / (math.exp(mu) + (1.0 / u.clamp_min(1e-12) - 1.0))
    return torch.where(u > 0, out, torch.zeros_like(out))


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """μ of the FLUX dynamic shift, linear in the number of image tokens."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


class NoiseSchedule(ABC):
    """``x_t = alpha(t)·x0 + sigma(t)·eps`` with levels ``t`` in native units."""

    @abstractmethod
    def alpha_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, sigma)`` at each level, float64, same shape as ``level``."""

    @abstractmethod
    def model_timestep(self, level: Tensor) -> Tensor:
        """The timestep the network is conditioned on (VP: t; flow: 1000·σ)."""

    @abstractmethod
    def levels_from_fraction(self, u: Tensor) -> Tensor:
        """Map ``u ∈ [0, 1]`` (0 = clean, 1 = pure noise) to levels."""

    @abstractmethod
    def sample_levels(
        self, n: int, low: float, high: float, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw ``n`` training levels with ``u`` uniform in ``[low, high]``."""

    def add_noise(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        """``alpha·x0 + sigma·noise``, broadcasting one level per sample."""
        alpha, sigma = (v.to(x0.dtype) for v in _per_sample(self.alpha_sigma(level), x0))
        return alpha * x0 + sigma * noise

    def generator_levels(self, num_steps: int) -> Tensor:
        """Levels a ``num_steps`` student is conditioned on, highest first."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        return self.levels_from_fraction(1.0 - torch.arange(num_steps, dtype=torch.float64) / num_steps)


def _per_sample(values: tuple[Tensor, ...], like: Tensor) -> tuple[Tensor, ...]:
    shape = (-1,) + (1,) * (like.ndim - 1)
    return tuple(v.to(like.device).reshape(shape) for v in values)


class VPSchedule(NoiseSchedule):
    """Discrete VP/DDPM schedule given by ᾱ_t (SD1.5/SDXL: ``scaled_linear``)."""

    def __init__(self, alphas_cumprod: Tensor | None = None):
        self.alphas_cumprod = vp_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.to(torch.float64)
        self.num_train_timesteps = len(self.alphas_cumprod)

    def alpha_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        abar = self.alphas_cumprod.to(level.device)[level.long()]
        return abar.sqrt(), (1.0 - abar).sqrt()

    def model_timestep(self, level: Tensor) -> Tensor:
        return level.long()

    def levels_from_fraction(self, u: Tensor) -> Tensor:
        # u = 1 maps to T−1 (999), u = 0.75 to 749, … as in DMD2's [999, 749, 499, 249].
        u = torch.as_tensor(u, dtype=torch.float64)
        return (u * self.num_train_timesteps).round().long().sub(1).clamp(0, self.num_train_timesteps - 1)

    def timestep_bounds(self, low: float, high: float) -> tuple[int, int]:
        """Inclusive integer range of ``u ∈ [low, high]``: (0.02, 0.98) → (20, 980)."""
        t_max = self.num_train_timesteps - 1
        return min(round(low * self.num_train_timesteps), t_max), min(round(high * self.num_train_timesteps), t_max)

    def sample_levels(self, n, low, high, generator=None):
        lo, hi = self.timestep_bounds(low, high)
        return torch.randint(lo, hi + 1, (n,), generator=generator)


class FlowSchedule(NoiseSchedule):
    """Rectified-flow schedule ``x_σ = (1−σ)·x0 + σ·ε`` with an optional σ shift.

    ``shift`` is the static SD3 shift (1 = none); ``dynamic_shift_mu`` selects the
    FLUX dynamic shift with that μ instead.
    """

    def __init__(self, shift: float = 1.0, dynamic_shift_mu: float | None = None):
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.shift = shift
        self.dynamic_shift_mu = dynamic_shift_mu

    def alpha_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        sigma = level.to(torch.float64)
        return 1.0 - sigma, sigma

    def model_timestep(self, level: Tensor) -> Tensor:
        return level.to(torch.float32) * 1000.0

    def levels_from_fraction(self, u: Tensor) -> Tensor:
        u = torch.as_tensor(u, dtype=torch.float64)
        if self.dynamic_shift_mu is not None:
            return dynamic_shift_sigmas(u, self.dynamic_shift_mu)
        return shift_sigmas(u, self.shift)

    def sample_levels(self, n, low, high, generator=None):
        u = low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)
        return self.levels_from_fraction(u).float()
