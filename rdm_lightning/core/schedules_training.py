"""Training-time schedules in generator updates ``u`` (DMDR's DynaDG/DynaRS, reward ramps), and the ReFL hinge."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def cosine_decay(u: int, period: int) -> float:
    """``½·(1 + cos(π·min(u/period, 1)))``: 1 at u = 0, 0 from ``period`` on (0 when ``period`` is 0)."""
    if period < 0 or u < 0:
        raise ValueError(f"u and period must be >= 0, got u={u}, period={period}")
    if period == 0:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * min(u / period, 1.0)))


def dynamic_guidance_scale(u: int, initial_scale: float, period: int) -> float:
    """DynaDG (docs/methods/dmdr.md): ``s_r(u) = s_r0·cosine_decay(u, K_dg)``, 0 for ``u >= K_dg``."""
    return initial_scale * cosine_decay(u, period)


def dynamic_renoise_beta(u: int, period: int) -> tuple[float, float]:
    """DynaRS (docs/methods/dmdr.md): Beta ``(1 + 3c, 1 + 0.5c)`` with ``c = cosine_decay(u, K_rs)``.

    Beta(4, 1.5) at u = 0 (high noise, mean ≈ 0.727), Uniform(0, 1) from ``K_rs`` on.
    """
    c = cosine_decay(u, period)
    return 1.0 + 3.0 * c, 1.0 + 0.5 * c


def cosine_ramp(u: int, start: int, length: int, maximum: float) -> float:
    """``0`` before ``start``, then ``maximum·½·(1 − cos(π·min((u − start)/length, 1)))``
    (W3 of docs/methods/gndm.md)."""
    if u < start:
        return 0.0
    return maximum * (1.0 - cosine_decay(u - start, length)) if length > 0 else maximum


def hinge_reward_loss(rewards: Tensor, weight: float, hinge: float = 0.7) -> Tensor:
    """DMDR's ReFL term ``w·mean(ReLU(hinge − r))``: gradient ``−w/B`` per sample below the hinge, 0 above."""
    return weight * F.relu(hinge - rewards).mean()


def sample_beta(n: int, a: float, b: float, generator: torch.Generator) -> Tensor:
    """``n`` Beta(a, b) draws (float64) from ``generator``: Beta is X/(X+Y) with X~Γ(a), Y~Γ(b).

    torch's Gamma sampler takes no generator, so the global RNG is forked and seeded
    from ``generator``: draws stay reproducible and checkpointable with it.
    """
    seed = int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.distributions.Beta(torch.tensor(float(a)), torch.tensor(float(b))).sample((n,)).double()
