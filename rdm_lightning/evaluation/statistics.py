"""Summaries of per-image scores: mean, standard deviation and a 95% confidence interval of the mean."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats
from torch import Tensor

CONFIDENCE = 0.95


def score_summary(scores: Tensor | np.ndarray | Sequence[float]) -> dict[str, float | int]:
    """``{"mean", "std", "ci95", "n"}`` of per-image ``scores``.

    ``std`` is the sample standard deviation (``ddof=1``) and ``ci95`` the half-width of the
    Student-t 95% interval of the mean, ``t_{0.975, n-1} · std / √n``, so a table reads
    ``mean ± ci95``. With one score both are NaN (there is no spread to estimate).

    Raises:
        ValueError: ``scores`` is empty, not one-dimensional, or holds NaN or infinite values.
    """
    if isinstance(scores, Tensor):
        scores = scores.detach().float().cpu().numpy()
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"scores must be a non-empty 1-d sequence, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"scores hold {int((~np.isfinite(values)).sum())} NaN or infinite values")
    n = int(values.size)
    if n == 1:
        return {"mean": float(values[0]), "std": math.nan, "ci95": math.nan, "n": 1}
    std = float(values.std(ddof=1))
    half_width = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)
    return {"mean": float(values.mean()), "std": std, "ci95": half_width, "n": n}
