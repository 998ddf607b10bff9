"""Distribution-matching gradient and losses (DMD, DMD2).

``d = x̂_fake − x̂_real``, ``n = mean_pix|x − x̂_real| + ε_n``,
``g = nan_to_num(d / n)`` and ``L_DM = ½·mean((x − sg(x − g))²)`` so that
``∂L_DM/∂x = g / N``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def classifier_free_guidance(uncond: Tensor, cond: Tensor, scale: float | Tensor) -> Tensor:
    """``pred_u + w·(pred_c − pred_u)``; ``w = 1`` returns ``cond``."""
    return uncond + scale * (cond - uncond)


def dmd_normalizer(x: Tensor, x0_real: Tensor, eps: float = 0.0) -> Tensor:
    """Per-sample DMD normaliser ``mean_pix|x − x̂_real| + ε``, shaped to broadcast."""
    dims = tuple(range(1, x.ndim))
    return (x - x0_real).abs().mean(dim=dims, keepdim=True) + eps


def nonfinite_per_sample(values: Tensor) -> Tensor:
    """``[B]``: how many entries of each sample of ``values`` (``[B, ...]``) are NaN or ±inf."""
    return (~torch.isfinite(values)).reshape(len(values), -1).sum(dim=1)


def dmd_gradient(
    x: Tensor, x0_real: Tensor, x0_fake: Tensor, norm_eps: float = 0.0, return_nonfinite: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """``g = nan_to_num((x̂_fake − x̂_real) / n)``, computed without gradient.

    ``nan_to_num`` turns NaN into 0 and ±inf into the dtype's extremes. With ``return_nonfinite``:
    ``(g, nonfinite)``, ``nonfinite`` the ``[B]`` count of each sample's entries it replaced.
    """
    with torch.no_grad():
        quotient = (x0_fake - x0_real) / dmd_normalizer(x, x0_real, norm_eps)
        gradient = torch.nan_to_num(quotient)
        return (gradient, nonfinite_per_sample(quotient)) if return_nonfinite else gradient


def dmd_loss(x: Tensor, gradient: Tensor) -> Tensor:
    """``½·mean((x − sg(x − g))²)``: its gradient with respect to ``x`` is ``g / numel``."""
    return 0.5 * F.mse_loss(x.float(), (x - gradient).detach().float())


def gan_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Non-saturating discriminator loss ``softplus(D(fake)) + softplus(−D(real))``."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss ``softplus(−D(G(z)))``."""
    return F.softplus(-fake_logits).mean()
