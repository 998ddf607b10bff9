"""Few-step sampling and backward simulation (DMD2 style), family-agnostic.

A sampler only needs ``denoise(x_t, level) -> x̂0`` and the schedule. Two step
rules between consecutive levels ``t → t'``:

- ``"sde"`` (DMD2/LCM): re-noise x̂0 to ``t'`` with fresh noise;
- ``"ode"`` (DDIM η = 0, the Euler step on a flow schedule): keep the implied ε̂.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from rdm_lightning.core.parameterization import eps_from_x0
from rdm_lightning.core.schedules import NoiseSchedule, _per_sample

Denoise = Callable[[Tensor, Tensor], Tensor]
StepRule = Literal["sde", "ode"]
NoiseDraw = Callable[[Tensor, "torch.Generator | None"], Tensor]
STEP_RULES = ("sde", "ode")


def renoise(x0: Tensor, noise: Tensor, level: Tensor, schedule: NoiseSchedule) -> Tensor:
    """LCM-style re-noising of x̂0 to ``level`` with the given noise."""
    return schedule.add_noise(x0, noise, level)


def next_sample(
    x_t: Tensor,
    x0: Tensor,
    level: Tensor,
    next_level: Tensor,
    schedule: NoiseSchedule,
    rule: StepRule,
    generator: torch.Generator | None = None,
    draw_noise: NoiseDraw | None = None,
) -> Tensor:
    """Move from ``level`` to ``next_level`` given x̂0, by the step rule.

    ``draw_noise(like, generator)`` draws the ``"sde"`` rule's fresh noise (default: i.i.d.
    normal shaped like ``like``; a backbone's ``sampler_noise`` draws it in its pipeline's order).
    """
    if rule == "sde":
        noise = (draw_noise or _randn_like)(x0, generator)
    elif rule == "ode":
        alpha, sigma = _per_sample(schedule.alpha_sigma(level), x_t)
        noise = eps_from_x0(x_t, x0, alpha, sigma).to(x0.dtype)
    else:
        raise ValueError(f"unknown step rule {rule!r}; accepted: {STEP_RULES}")
    return renoise(x0, noise, next_level, schedule)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device (CPU) and moved."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def _batch_level(level: Tensor, n: int) -> Tensor:
    return level.reshape(1).expand(n)


def few_step_sample(
    denoise: Denoise,
    noise: Tensor,
    levels: Tensor,
    schedule: NoiseSchedule,
    rule: StepRule = "sde",
    generator: torch.Generator | None = None,
    draw_noise: NoiseDraw | None = None,
) -> Tensor:
    """Run the few-step sampler from pure noise through ``levels``; returns x̂0 (``draw_noise``: see
    :func:`next_sample`)."""
    x_t = noise
    for i, level in enumerate(levels):
        level_b = _batch_level(level, len(noise))
        x0 = denoise(x_t, level_b)
        if i + 1 == len(levels):
            return x0
        x_t = next_sample(
            x_t, x0, level_b, _batch_level(levels[i + 1], len(noise)), schedule, rule, generator, draw_noise
        )
    raise ValueError("levels is empty")


@torch.no_grad()
def backward_simulation_input(
    denoise: Denoise,
    noise: Tensor,
    levels: Tensor,
    step: int,
    schedule: NoiseSchedule,
    rule: StepRule = "sde",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """DMD2 backward simulation: the generator input at ``levels[step]``.

    Runs ``step`` sampler steps (by ``rule``) without gradient from ``noise``,
    then re-noises the last x̂0 to ``levels[step]`` with fresh noise.
    ``step = 0`` returns the pure noise itself. Returns ``(x_in, level)`` with
    one level per sample. Fresh noise comes from ``generator`` (CPU) when given.
    """
    if not 0 <= step < len(levels):
        raise ValueError(f"backward-simulation step {step} outside [0, {len(levels) - 1}]")
    n = len(noise)
    target_level = _batch_level(levels[step], n)
    if step == 0:
        return noise, target_level
    x_t = noise
    for i in range(step):
        level_b = _batch_level(levels[i], n)
        x0 = denoise(x_t, level_b)
        if i + 1 < step:
            x_t = next_sample(x_t, x0, level_b, _batch_level(levels[i + 1], n), schedule, rule, generator)
    # The trained input is always a fresh re-noising of the last x̂0 (DMD2; DMDR's ODE mode too).
    return renoise(x0, _randn_like(x0, generator), target_level, schedule), target_level
