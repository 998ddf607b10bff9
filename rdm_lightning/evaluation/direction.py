"""How well one stochastic draw of a direction agrees with its expectation.

The DM direction depends on the random re-noising (σ, ε) of its draw; a normaliser that
gives "a more robust optimization direction" (GNDM's claim for A1; measured in
``docs/methods/gndm.md``, "Group size and the direction of one update") should make a
single draw agree better with the many-draw mean, in the generator's parameter space above
all, where the per-sample directions are summed with their relative weights.
"""
from __future__ import annotations

import torch
from torch import Tensor


class DirectionConsistency:
    """Running agreement of draws ``g^(m)`` of B directions with their mean ``ḡ = (1/M)·Σ_m g^(m)``.

    One pass, memory of three sums per direction: ``Σ g``, ``Σ g/‖g‖`` and ``Σ ‖g‖²``; so it
    serves parameter-space gradients of large models too (B = 1, one flat vector a draw).
    """

    def __init__(self):
        self.count = 0
        self.sum: Tensor | None = None
        self.unit_sum: Tensor | None = None
        self.square_sum: Tensor | None = None

    def update(self, draw: Tensor) -> None:
        """Add one draw ``[B, ...]`` of the B directions (float64 sums, on the draw's device)."""
        flat = draw.detach().double().flatten(1)
        if self.sum is not None and flat.shape != self.sum.shape:
            raise ValueError(f"every draw must hold {tuple(self.sum.shape)} (flattened), got {tuple(flat.shape)}")
        norms = flat.norm(dim=1, keepdim=True)
        if self.sum is None:
            self.sum, self.unit_sum, self.square_sum = torch.zeros_like(flat), torch.zeros_like(flat), norms.new_zeros(len(flat))
        self.sum += flat
        self.unit_sum += flat / norms.clamp_min(torch.finfo(flat.dtype).tiny)
        self.square_sum += norms.squeeze(1) ** 2
        self.count += 1

    def compute(self) -> tuple[Tensor, Tensor]:
        """``(cosine, snr)``, each ``[B]``: the mean over draws of ``cos(g^(m), ḡ)``, and
        ``‖ḡ‖² / ((1/M)·Σ_m ‖g^(m) − ḡ‖²)``, the signal over the variance of one draw."""
        if self.count < 2:
            raise ValueError(f"need at least 2 draws, got {self.count}")
        mean = self.sum / self.count
        mean_norm = mean.norm(dim=1)
        cosine = (self.unit_sum / self.count * mean).sum(dim=1) / mean_norm
        variance = self.square_sum / self.count - mean_norm**2
        return cosine, mean_norm**2 / variance
