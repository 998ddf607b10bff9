"""Conversions between x0, ε, v (VP) and flow velocity, as small pure functions.

All take the noisy sample ``x_t`` and its ``(alpha, sigma)`` with
``x_t = alpha·x0 + sigma·ε`` (per-sample tensors broadcastable to ``x_t``),
and compute in float64 as the reference implementations do.
"""
from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor


class Prediction(str, Enum):
    """What a denoising network outputs."""

    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"
    FLOW_VELOCITY = "flow_velocity"


def _f64(*tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.to(torch.float64) for t in tensors)


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``x̂0 = (x_t − σ·ε̂) / α``."""
    x_t, eps, alpha, sigma = _f64(x_t, eps, alpha, sigma)
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``ε̂ = (x_t − α·x̂0) / σ``."""
    x_t, x0, alpha, sigma = _f64(x_t, x0, alpha, sigma)
    return (x_t - alpha * x0) / sigma


def v_target(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """VP v-prediction target ``v = α·ε − σ·x0``."""
    x0, eps, alpha, sigma = _f64(x0, eps, alpha, sigma)
    return alpha * eps - sigma * x0


def x0_from_v(x_t: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``x̂0 = (α·x_t − σ·v̂) / (α² + σ²)``; ``α·x_t − σ·v̂`` on a VP schedule."""
    x_t, v, alpha, sigma = _f64(x_t, v, alpha, sigma)
    return (alpha * x_t - sigma * v) / (alpha**2 + sigma**2)


def eps_from_v(x_t: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``ε̂ = (σ·x_t + α·v̂) / (α² + σ²)``; ``σ·x_t + α·v̂`` on a VP schedule."""
    x_t, v, alpha, sigma = _f64(x_t, v, alpha, sigma)
    return (sigma * x_t + alpha * v) / (alpha**2 + sigma**2)


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """Flow velocity ``v = ε − x0``."""
    x0, eps = _f64(x0, eps)
    return eps - x0


def x0_from_velocity(x_t: Tensor, velocity: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``x̂0 = (x_t − σ·v̂) / (α + σ)``; ``x_σ − σ·v̂`` on a flow schedule."""
    x_t, velocity, alpha, sigma = _f64(x_t, velocity, alpha, sigma)
    return (x_t - sigma * velocity) / (alpha + sigma)


def eps_from_velocity(x_t: Tensor, velocity: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``ε̂ = (x_t + α·v̂) / (α + σ)``; ``x_σ + (1−σ)·v̂`` on a flow schedule."""
    x_t, velocity, alpha, sigma = _f64(x_t, velocity, alpha, sigma)
    return (x_t + alpha * velocity) / (alpha + sigma)


def vp_to_flow(x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Bridge a VP point to the flow convention: ``(x_t/(α+σ), σ/(α+σ))``."""
    x_t, alpha, sigma = _f64(x_t, alpha, sigma)
    return x_t / (alpha + sigma), sigma / (alpha + sigma)


def prediction_to_x0(prediction: Prediction, output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x̂0 (float32) from a network output of the given kind."""
    convert = {
        Prediction.EPSILON: x0_from_eps,
        Prediction.V_PREDICTION: x0_from_v,
        Prediction.FLOW_VELOCITY: x0_from_velocity,
    }[Prediction(prediction)]
    return convert(x_t, output, alpha, sigma).float()


def training_target(prediction: Prediction, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Denoising-regression target: ε, v or flow velocity (float32)."""
    prediction = Prediction(prediction)
    if prediction is Prediction.EPSILON:
        return eps.float()
    if prediction is Prediction.V_PREDICTION:
        return v_target(x0, eps, alpha, sigma).float()
    return velocity_target(x0, eps).float()
