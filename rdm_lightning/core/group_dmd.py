"""Group-normalised distribution matching and the R_dm scalars (GNDM, ``docs/methods/gndm.md``).

Every function takes a flat batch of ``B = (B/K)·K`` samples laid out as whole
groups of K consecutive samples per prompt (as :mod:`rdm_lightning.core.advantages`).
With ``d_i = x̂_f,i − x̂_r,i`` and ``n_i = mean_pix|x_i − x̂_r,i|``:

- A1 (:func:`group_dmd_gradient`): ``g_i = nan_to_num(d_i / (n̄ + ε))`` with
  ``n̄ = (1/K)·Σ_{j∈group} n_j``; K = 1 is the per-sample DMD gradient.
- :func:`weighted_dmd_loss`: ``L = (1/B)·Σ_i w_i·½·mean_pix((x_i − sg(x_i − h_i))²)``,
  so that ``∂L/∂x_i = w_i·h_i / N``.
- R_dm scalars: :func:`mismatch_scalar` and :func:`elbo_diff_scalar`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rdm_lightning.core.advantages import check_group_size
from rdm_lightning.core.dmd import dmd_normalizer, nonfinite_per_sample


def _per_sample_mean(values: Tensor) -> Tensor:
    """``mean_pix`` of ``[B, ...]``: ``[B]``."""
    return values.flatten(1).mean(dim=1)


def _group_mean(values: Tensor, group_size: int) -> Tensor:
    """``[B]`` per-sample values replaced by their group's mean (still ``[B]``)."""
    check_group_size(len(values), group_size)
    return values.view(-1, group_size).mean(dim=1).repeat_interleave(group_size)


def group_mean_normalizer(x: Tensor, x0_real: Tensor, group_size: int, eps: float = 1e-8) -> Tensor:
    """A1's normaliser ``n̄ + ε``, ``n̄ = (1/K)·Σ_{j∈group} mean_pix|x_j − x̂_r,j|``, broadcast per sample.

    Args:
        x: ``[B, ...]`` generator samples.
        x0_real: ``[B, ...]`` the real score's x0 estimates at the re-noised ``x``.
        group_size: K; must divide B.
        eps: ε_n (1e-8 in GNDM).

    Returns:
        ``[B, 1, ..., 1]``: sample i's group normaliser, shaped to broadcast against ``x``.
    """
    per_sample = dmd_normalizer(x, x0_real).flatten()
    return (_group_mean(per_sample, group_size) + eps).view(-1, *([1] * (x.ndim - 1)))


def group_dmd_gradient(
    x: Tensor, x0_real: Tensor, x0_fake: Tensor, group_size: int, eps: float = 1e-8, return_nonfinite: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """GNDM-A1 ``g_i = nan_to_num((x̂_f,i − x̂_r,i) / (n̄ + ε))``, computed without gradient.

    Unlike per-sample DMD, samples of one group keep their relative magnitudes
    (``‖g_i‖/‖g_j‖ = ‖d_i‖/‖d_j‖``); K = 1, or equal ``n_i`` within every
    group, gives the DMD gradient (``docs/methods/gndm.md``). With
    ``return_nonfinite``: ``(g, nonfinite)``, as :func:`~rdm_lightning.core.dmd.dmd_gradient`.
    """
    with torch.no_grad():
        quotient = (x0_fake - x0_real) / group_mean_normalizer(x, x0_real, group_size, eps)
        gradient = torch.nan_to_num(quotient)
        return (gradient, nonfinite_per_sample(quotient)) if return_nonfinite else gradient


def center_gradient(gradient: Tensor, group_size: int) -> Tensor:
    """A1′: ``g_i ← g_i − (1/K)·Σ_{j∈group} g_j`` (not recommended: removes the shared push)."""
    check_group_size(len(gradient), group_size)
    groups = gradient.view(-1, group_size, *gradient.shape[1:])
    return (groups - groups.mean(dim=1, keepdim=True)).view_as(gradient)


def weighted_dmd_loss(x: Tensor, direction: Tensor, weights: Tensor | None = None) -> Tensor:
    """``L = (1/B)·Σ_i w_i·½·mean_pix((x_i − sg(x_i − h_i))²)``, so ``∂L/∂x_i = w_i·h_i / N``.

    Args:
        x: ``[B, ...]`` generator samples, with gradient.
        direction: h, ``[B, ...]`` (the DM direction g, or g minus reward terms); detached here.
        weights: w, ``[B]`` per-sample weights (detached here); ``None`` for all ones,
            which is :func:`rdm_lightning.core.dmd.dmd_loss`.
    """
    per_sample = 0.5 * _per_sample_mean((x.float() - (x - direction).detach().float()) ** 2)
    if weights is None:
        return per_sample.mean()
    if weights.shape != (len(x),):
        raise ValueError(f"weights must be shaped ({len(x)},) (one per sample), got {tuple(weights.shape)}")
    return (weights.detach().float() * per_sample).mean()


def mismatch_scalar(gradients: list[Tensor]) -> Tensor:
    """R_dm ``mismatch`` scalar ``r_i = −(1/J)·Σ_j mean_pix(g_i^(j)²)`` over J draws of (σ, ε); ``[B]``.

    A sample whose real and fake estimates disagree less is closer to the
    teacher's distribution, so it gets a higher (less negative) reward.
    """
    if not gradients:
        raise ValueError("mismatch_scalar needs at least one draw of the DM gradient")
    return -torch.stack([_per_sample_mean(g.detach().float() ** 2) for g in gradients]).mean(dim=0)


def elbo_diff_scalar(x: Tensor, x0_reals: list[Tensor], x0_fakes: list[Tensor]) -> Tensor:
    """R_dm ``elbo_diff`` scalar with w(σ) ≡ 1; ``[B]``.

    ``r_i = (1/J)·Σ_j mean_pix((x̂_f^(j) − x_i)² − (x̂_r^(j) − x_i)²)``: the real
    score denoising x_i better than the fake one means higher ``log p_real −
    log p_fake`` (a weighted surrogate of it; ``docs/methods/gndm.md``).

    Args:
        x: ``[B, ...]`` generator samples.
        x0_reals: J tensors ``[B, ...]``, the real score's estimates of each draw.
        x0_fakes: J tensors ``[B, ...]``, the fake score's estimates of the same draws.
    """
    if not x0_reals or len(x0_reals) != len(x0_fakes):
        raise ValueError(
            f"need the same number (>= 1) of real and fake estimates, got {len(x0_reals)} and {len(x0_fakes)}"
        )
    x = x.detach().float()
    draws = [
        _per_sample_mean((fake.float() - x) ** 2 - (real.float() - x) ** 2) for real, fake in zip(x0_reals, x0_fakes)
    ]
    return torch.stack(draws).mean(dim=0)
