"""Metrics of samples from the Gaussian-mixture domain whose optimum is known.

- NLL under the true class mixture: true samples score the mixture's entropy (estimated by
  Monte Carlo, :func:`mixture_entropy`). Samples packed tighter than the data score *below*
  it, so read it beside the sliced-W1, whose optimum is 0.
- Sliced Wasserstein-1 to true samples, over fixed seeded projections.
- Mode coverage and the share of samples near a mode of their own class.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from rdm_lightning.backbones.mixture import GaussianMixture


def negative_log_likelihood(samples: Tensor, classes: Tensor, mixture: GaussianMixture) -> float:
    """Mean ``−log p(x | c)`` of ``samples`` (``[N, 2]``) under their classes' true mixtures."""
    return -mixture.log_prob(samples, classes).mean().item()


def mixture_entropy(mixture: GaussianMixture, classes: Tensor, generator: torch.Generator | None = None) -> float:
    """Monte-Carlo entropy ``E[−log p(x|c)]`` over ``classes``: the NLL of true samples."""
    return negative_log_likelihood(mixture.sample(classes, generator), classes, mixture)


def unit_projections(num_projections: int, dim: int, seed: int) -> Tensor:
    """``[P, dim]`` seeded random unit directions (float64)."""
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1, got {num_projections}")
    directions = torch.randn(num_projections, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return directions / directions.norm(dim=1, keepdim=True)


def sliced_wasserstein1(a: Tensor, b: Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Mean over seeded directions θ of W1 between the projections ``⟨θ, a⟩`` and ``⟨θ, b⟩``.

    ``a`` and ``b`` hold the same number of points, so each 1-D W1 is the mean gap of the sorted projections.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"a and b must be [N, D] of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    theta = unit_projections(num_projections, a.shape[1], seed)
    proj_a = (a.double().cpu() @ theta.T).sort(dim=0).values
    proj_b = (b.double().cpu() @ theta.T).sort(dim=0).values
    return (proj_a - proj_b).abs().mean().item()


def nearest_own_mode(samples: Tensor, classes: Tensor, mixture: GaussianMixture) -> tuple[Tensor, Tensor]:
    """``(mode, distance)``: each sample's nearest mode among its class's modes, and the distance to it."""
    distances = torch.cdist(samples.double().cpu(), mixture.means)
    distances = distances.masked_fill(mixture.weights(classes) == 0, math.inf)
    distance, mode = distances.min(dim=1)
    return mode, distance


def mode_coverage(samples: Tensor, classes: Tensor, mixture: GaussianMixture, min_share: float = 0.1) -> float:
    """Share of modes that receive at least ``min_share`` of their fair share of their class's samples.

    A mode's fair share is ``n_c / M_c``: the class's samples over its number of modes. Each
    sample counts for its nearest own-class mode; modes of classes without samples are left out.
    """
    if not 0 < min_share <= 1:
        raise ValueError(f"min_share must lie in (0, 1], got {min_share}")
    mode, _ = nearest_own_mode(samples, classes, mixture)
    counts = torch.bincount(mode, minlength=len(mixture.means)).double()
    class_counts = torch.bincount(classes.long().cpu(), minlength=mixture.num_classes).double()
    modes_per_class = torch.bincount(mixture.mode_class, minlength=mixture.num_classes).double()
    fair = (class_counts / modes_per_class)[mixture.mode_class]
    sampled = fair > 0
    return ((counts >= min_share * fair) & sampled).double().sum().item() / sampled.sum().item()


def share_near_modes(samples: Tensor, classes: Tensor, mixture: GaussianMixture, k_std: float = 3.0) -> float:
    """Share of samples within ``k_std`` mode stds of a mode of their own class."""
    _, distance = nearest_own_mode(samples, classes, mixture)
    return (distance <= k_std * mixture.std).double().mean().item()


def mixture_metrics(samples: Tensor, classes: Tensor, reference: Tensor, mixture: GaussianMixture) -> dict[str, float]:
    """NLL, sliced-W1 to ``reference`` (true samples of the same ``classes``), coverage and near-mode share."""
    return {
        "nll": negative_log_likelihood(samples, classes, mixture),
        "sliced_w1": sliced_wasserstein1(samples, reference),
        "coverage": mode_coverage(samples, classes, mixture),
        "near_modes": share_near_modes(samples, classes, mixture),
    }
