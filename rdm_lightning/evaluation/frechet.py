"""Fréchet distance between Gaussians fitted to features (the math of FID and digits-FD).

``d² = ‖μ₁ − μ₂‖² + Tr(C₁ + C₂ − 2·(C₁C₂)^½)``, computed as pytorch-fid and
clean-fid do, so numbers stay comparable with theirs.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg
from torch import Tensor


def gaussian_statistics(features: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``features`` shaped ``(N, D)``, in float64.

    Raises:
        ValueError: not 2-D, fewer than 2 samples, or non-finite values.
    """
    if isinstance(features, Tensor):
        features = features.detach().cpu().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {features.shape}")
    if features.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {features.shape[0]}")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``.

    Args:
        mu1, cov1: Mean ``(D,)`` and covariance ``(D, D)`` of the first Gaussian.
        mu2, cov2: Mean and covariance of the second.
        eps: Added to both covariance diagonals when ``C₁C₂`` is singular enough
            that its square root is not finite (too few samples for ``D``).

    Raises:
        ValueError: shapes that do not match ``(D,)`` and ``(D, D)``.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    dim = mu1.shape[0]
    expected = {"mu1": (mu1, (dim,)), "mu2": (mu2, (dim,)), "cov1": (cov1, (dim, dim)), "cov2": (cov2, (dim, dim))}
    for name, (value, shape) in expected.items():
        if value.shape != shape:
            raise ValueError(f"{name} must have shape {shape} to match mu1, got {value.shape}")

    covmean = _sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"C1·C2 is singular; adding {eps} to the covariance diagonals", RuntimeWarning, stacklevel=2)
        offset = np.eye(dim) * eps
        covmean = _sqrtm((cov1 + offset) @ (cov2 + offset))
    # C₁C₂ has real non-negative eigenvalues, so an imaginary part is round-off.
    covmean = np.real(covmean)

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    # Fewer samples than feature dimensions make C₁C₂ singular, and scipy then warns on
    # every call although the root is usually fine; like pytorch-fid, the finiteness
    # check in ``frechet_distance`` decides instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(matrix)
