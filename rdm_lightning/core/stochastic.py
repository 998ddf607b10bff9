"""Stochastic few-step flow sampling with per-step Gaussian log-probabilities.

Used by GNDM's importance sampling and GRPO mode (``docs/methods/gndm.md``) and by RTDMD
(``docs/methods/rtdmd.md``).

Flow convention only: ``x_σ = (1−σ)·x0 + σ·ε``, velocity ``v = ε − x0``, and a step
goes from σ to σ′ with ``Δ = σ′ − σ ≤ 0``. Every step rule is a Gaussian policy
``π(x′|x) = N(μ, ς²·I)`` whose std ς does not depend on the network:

- ``euler``: ``x′ = x + Δ·v`` (ς = 0);
- ``flowgrpo_sde(noise_level)``: Flow-GRPO SDE step (``docs/methods/gndm.md``, "Importance sampling");
- ``cps(eta)``: coefficients-preserving step (``docs/methods/rtdmd.md``);
- ``dance(eta)``: DanceGRPO step.

Each rule is written so that zero noise gives the Euler step *bitwise*: its mean is
``x + Δ·v`` plus a correction proportional to the noise level, which is then exactly 0.

:func:`stochastic_sample` runs the few-step sampler and records a
:class:`Trajectory`; :func:`step_log_prob` recomputes the log-prob of a stored
transition under a changed policy (PPO ratios), bit-identical when nothing changed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, NamedTuple

import torch
from torch import Tensor

from rdm_lightning.core.sampling import _batch_level, _randn_like
from rdm_lightning.core.schedules import _per_sample

VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""``denoise_velocity(x_σ, σ) -> v`` with one σ per sample (shape ``(B,)``)."""

Rule = Literal["euler", "cps", "flowgrpo_sde", "dance"]
LogProbKind = Literal["exact_mean", "exact_sum", "cps_simplified"]
LOG_PROBS: tuple[str, ...] = ("exact_mean", "exact_sum", "cps_simplified")
Reduce = Literal["mean", "sum"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum")


class StepResult(NamedTuple):
    """One transition: mean μ, per-sample std ς (shape ``(B, 1, …, 1)``) and ``x′ = μ + ς·ξ``."""

    mean: Tensor
    std: Tensor
    sample: Tensor


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Steps and log-probs run in at least fp32, whatever the latent dtype.
    return torch.promote_types(x.dtype, torch.float32)


def _per_sample_value(value: Tensor | float, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A scalar or one-per-sample value as a ``(B, 1, …, 1)`` tensor (default: the compute dtype)."""
    (v,) = _per_sample((torch.as_tensor(value, dtype=torch.float64),), x)
    return v.to(dtype or _compute_dtype(x)).expand((x.shape[0],) + v.shape[1:])


def _sigmas(x: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample ``(σ, σ′, Δ = σ′ − σ)``, checked to satisfy ``0 ≤ σ′ ≤ σ ≤ 1`` and ``σ > 0``."""
    s64, s_next64 = _per_sample_value(sigma, x, torch.float64), _per_sample_value(sigma_next, x, torch.float64)
    if not ((s64 > 0) & (s64 <= 1) & (s_next64 >= 0) & (s_next64 <= s64)).all():
        raise ValueError(
            f"a step needs 0 <= sigma_next <= sigma <= 1 and sigma > 0; "
            f"got sigma={s64.flatten().tolist()}, sigma_next={s_next64.flatten().tolist()}"
        )
    # Δ is rounded once from float64 (not as a difference of rounded levels), like x + Δ·v written by hand.
    dtype = _compute_dtype(x)
    return s64.to(dtype), s_next64.to(dtype), (s_next64 - s64).to(dtype)


def _draw(mean: Tensor, std: Tensor, noise: Tensor | None, generator: torch.Generator | None) -> StepResult:
    """``x′ = μ + ς·ξ`` with the given ξ, or ξ drawn from ``generator``."""
    if noise is None:
        noise = _randn_like(mean, generator)
    elif noise.shape != mean.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match the sample shape {tuple(mean.shape)}")
    return StepResult(mean, std, mean + std * noise.to(mean.dtype))


def _check_range(name: str, value: float, low: float, high: float = math.inf) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")


# ----------------------------------------------------------------------------------------------
# Step rules: moments (μ, ς) of each rule, and the public steps that also draw x′
# ----------------------------------------------------------------------------------------------


def _euler_moments(
    x: Tensor, velocity: Tensor, sigma: Tensor | float, sigma_next: Tensor | float
) -> tuple[Tensor, Tensor]:
    s, _, delta = _sigmas(x, sigma, sigma_next)
    return x.to(s.dtype) + delta * velocity.to(s.dtype), torch.zeros_like(s)


def _flow_grpo_sde_moments(
    x: Tensor,
    velocity: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    noise_level: float,
    sigma_1: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    _check_range("noise_level", noise_level, 0.0)
    s, _, delta = _sigmas(x, sigma, sigma_next)
    x, v = x.to(s.dtype), velocity.to(s.dtype)
    one_minus = 1 - s
    at_one = s == 1
    if at_one.any():
        # γ = a·√(σ/(1−σ)) is infinite at σ = 1; Flow-GRPO uses the second grid value there.
        if sigma_1 is None:
            raise ValueError("flowgrpo_sde at sigma = 1 needs sigma_1 (the second grid value)")
        s1 = _per_sample_value(sigma_1, x)
        if not ((s1 >= 0) & (s1 < 1)).all():
            raise ValueError(f"sigma_1 must lie in [0, 1), got {s1.flatten().tolist()}")
        one_minus = torch.where(at_one, 1 - s1, one_minus)
    gamma = noise_level * torch.sqrt(s / one_minus)
    mean = x + v * delta + (gamma**2 / (2 * s)) * (x + (1 - s) * v) * delta
    return mean, gamma * torch.sqrt(-delta)


def _cps_moments(
    x: Tensor, velocity: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, eta: float
) -> tuple[Tensor, Tensor]:
    _check_range("eta", eta, 0.0, 1.0)
    s, s_next, delta = _sigmas(x, sigma, sigma_next)
    x, v = x.to(s.dtype), velocity.to(s.dtype)
    theta = eta * math.pi / 2
    eps_hat = x + (1 - s) * v
    # (1−σ′)·x̂0 + σ′·ε̂ = x + Δ·v, so μ = x + Δ·v + σ′·(cosθ − 1)·ε̂: η = 0 is Euler bitwise.
    mean = x + delta * v + s_next * (math.cos(theta) - 1) * eps_hat
    return mean, s_next * math.sin(theta)


def _dance_moments(
    x: Tensor, velocity: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, eta: float
) -> tuple[Tensor, Tensor]:
    _check_range("eta", eta, 0.0)
    s, _, delta = _sigmas(x, sigma, sigma_next)
    x, v = x.to(s.dtype), velocity.to(s.dtype)
    x0_hat = x - s * v
    score = -(x - (1 - s) * x0_hat) / s**2
    # DanceGRPO adds the score term to the Euler mean, so η_D = 0 is Euler bitwise.
    mean = x + delta * v + delta * (-0.5 * eta**2 * score)
    return mean, eta * torch.sqrt(-delta)


def euler_step(x: Tensor, velocity: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> StepResult:
    """Deterministic Euler step (README flow convention): ``x′ = μ = x + (σ′ − σ)·v``, ``ς = 0``.

    A step to ``σ′ = 0`` returns ``x̂0 = x − σ·v``.
    """
    mean, std = _euler_moments(x, velocity, sigma, sigma_next)
    return StepResult(mean, std, mean)


def flow_grpo_sde_step(
    x: Tensor,
    velocity: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    noise_level: float,
    noise: Tensor | None = None,
    sigma_1: Tensor | float | None = None,
    generator: torch.Generator | None = None,
) -> StepResult:
    """Flow-GRPO SDE step (``docs/methods/gndm.md``, "Importance sampling"), with ``a = noise_level``
    and ``Δ = σ′ − σ``::

        γ  = a·√(σ/(1−σ))            (at σ = 1: a·√(σ/(1−σ_1)), σ_1 the second grid value)
        μ  = x + v·Δ + (γ²/(2σ))·(x + (1−σ)·v)·Δ
        ς  = γ·√(−Δ)
        x′ = μ + ς·ξ,   ξ ~ N(0, I)

    ``noise`` is ξ when given (to replay a step), else ξ is drawn from ``generator``.
    σ, σ′ and σ_1 are scalars or one value per sample. ``sigma_1`` is required only
    where σ = 1. ``a = 0`` gives the Euler step exactly.
    """
    return _draw(*_flow_grpo_sde_moments(x, velocity, sigma, sigma_next, noise_level, sigma_1), noise, generator)


def cps_step(
    x: Tensor,
    velocity: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    eta: float,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepResult:
    """Coefficients-preserving (CPS) step (``docs/methods/rtdmd.md``), ``η ∈ [0, 1]``::

        x̂0 = x − σ·v,   ε̂ = x + (1−σ)·v,   θ = η·π/2
        μ  = (1−σ′)·x̂0 + σ′·cosθ·ε̂        (RTDMD form)
           = (1−σ′)·x̂0 + √(σ′² − ς²)·ε̂    (Flow-GRPO form, a ≡ η)
        ς  = σ′·sinθ
        x′ = μ + ς·ξ,   ξ ~ N(0, I)

    ``noise`` is ξ when given, else ξ is drawn from ``generator``. η = 0 gives the Euler
    step exactly; σ′ = 0 gives x̂0.
    """
    return _draw(*_cps_moments(x, velocity, sigma, sigma_next, eta), noise, generator)


def dance_grpo_step(
    x: Tensor,
    velocity: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    eta: float,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepResult:
    """DanceGRPO step with noise level ``η_D = eta`` and ``Δ = σ′ − σ``::

        x̂0 = x − σ·v,   s = −(x − (1−σ)·x̂0)/σ²
        μ  = x + Δ·(v − ½·η_D²·s)
        ς  = η_D·√(σ − σ′)
        x′ = μ + ς·ξ,   ξ ~ N(0, I)

    ``noise`` is ξ when given, else ξ is drawn from ``generator``. η_D = 0 gives the
    Euler step exactly.
    """
    return _draw(*_dance_moments(x, velocity, sigma, sigma_next, eta), noise, generator)


_Moments = Callable[..., tuple[Tensor, Tensor]]
# Per rule: its moments, its required and optional keyword arguments.
_RULES: dict[str, tuple[_Moments, tuple[str, ...], tuple[str, ...]]] = {
    "euler": (_euler_moments, (), ()),
    "cps": (_cps_moments, ("eta",), ()),
    "flowgrpo_sde": (_flow_grpo_sde_moments, ("noise_level",), ("sigma_1",)),
    "dance": (_dance_moments, ("eta",), ()),
}
RULES: tuple[str, ...] = tuple(_RULES)


def _checked_rule(rule: str, rule_kwargs: Mapping[str, Any]) -> _Moments:
    if rule not in _RULES:
        raise ValueError(f"unknown step rule {rule!r}; accepted: {RULES}")
    moments, required, optional = _RULES[rule]
    missing = [k for k in required if k not in rule_kwargs]
    unknown = [k for k in rule_kwargs if k not in required + optional]
    if missing or unknown:
        raise ValueError(
            f"step rule {rule!r} takes {required} (optional {optional}); missing {missing}, unknown {unknown}"
        )
    return moments


# ----------------------------------------------------------------------------------------------
# Log-probabilities
# ----------------------------------------------------------------------------------------------


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor, reduce: Reduce = "mean") -> Tensor:
    """Exact Gaussian log-density per sample (``docs/methods/gndm.md``, "Importance sampling"), in at least fp32::

        log π = mean_dims[ −(x′ − μ)²/(2ς²) − log ς − ½·log 2π ]     (``reduce="sum"``: sum_dims)

    Where ς = 0 the step has no density; it gets log π = 0 there,
    with finite gradients. Returns shape ``(B,)``.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce {reduce!r}; accepted: {REDUCTIONS}")
    dtype = _compute_dtype(sample)
    sample, mean, std = sample.to(dtype), mean.to(dtype), std.to(dtype)
    positive = std > 0
    # A std of 1 where ς = 0 keeps the discarded branch finite, so gradients stay finite too.
    safe_std = torch.where(positive, std, torch.ones_like(std))
    log_density = -((sample - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - 0.5 * math.log(2 * math.pi)
    log_density = torch.where(positive, log_density, torch.zeros_like(log_density))
    dims = tuple(range(1, log_density.ndim))
    return log_density.mean(dims) if reduce == "mean" else log_density.sum(dims)


def cps_simplified_log_prob(sample: Tensor, mean: Tensor) -> Tensor:
    """The CPS log-prob of Flow-GRPO and RTDMD (``docs/methods/rtdmd.md``): ``−mean_dims((x′ − μ)²)``.

    No 1/(2ς²) factor and no constants, so it is exactly 0 when ς = 0. Returns ``(B,)``
    in at least fp32.
    """
    dtype = _compute_dtype(sample)
    return -((sample.to(dtype) - mean.to(dtype)) ** 2).mean(tuple(range(1, sample.ndim)))


def transition_log_prob(sample: Tensor, mean: Tensor, std: Tensor, kind: LogProbKind) -> Tensor:
    """log π(x′|x) of the chosen form: ``exact_mean``, ``exact_sum`` or ``cps_simplified``."""
    if kind == "exact_mean":
        return gaussian_log_prob(sample, mean, std, "mean")
    if kind == "exact_sum":
        return gaussian_log_prob(sample, mean, std, "sum")
    if kind == "cps_simplified":
        return cps_simplified_log_prob(sample, mean)
    raise ValueError(f"unknown log_prob {kind!r}; accepted: {LOG_PROBS}")


# ----------------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """A recorded few-step rollout of ``T`` steps (``docs/methods/gndm.md``, ``docs/methods/rtdmd.md``).

    Step ``j`` goes from ``sigmas[j]`` to ``sigmas[j + 1]``; ``sigmas[T] = 0``. Step lists
    have ``T`` entries, ``latents`` has ``T + 1``: ``latents[0]`` is the initial noise and
    ``latents[T]`` the final sample. Deterministic steps have ``std = 0`` and log-prob 0.
    """

    latents: list[Tensor]
    sigmas: Tensor
    velocities: list[Tensor]
    x0_preds: list[Tensor]
    means: list[Tensor]
    stds: list[Tensor]
    log_probs: list[Tensor]
    stochastic: list[bool]
    rule: str
    rule_kwargs: dict[str, Any]
    log_prob: str

    @property
    def num_steps(self) -> int:
        return len(self.stochastic)

    @property
    def sample(self) -> Tensor:
        """The final sample ``x_T``; equal to :attr:`final_x0` when the last step is deterministic."""
        return self.latents[-1]

    @property
    def final_x0(self) -> Tensor:
        """x̂0 of the last executed step (RTDMD's sampler output)."""
        return self.x0_preds[-1]

    @property
    def trainable(self) -> list[bool]:
        """Steps with a policy density: stochastic with ς > 0. Only these enter the PPO loss."""
        return [self.is_trainable(j) for j in range(self.num_steps)]

    def is_trainable(self, step_index: int) -> bool:
        """Whether step ``step_index`` was stochastic with ς > 0 (ς does not depend on the policy)."""
        return self.stochastic[step_index] and bool((self.stds[step_index] > 0).all())


def _sigma_grid(levels: Tensor) -> Tensor:
    """Pre-shifted σ levels (never re-shifted), highest first, with the final 0 appended."""
    levels = torch.as_tensor(levels, dtype=torch.float64).flatten().cpu()
    if len(levels) == 0:
        raise ValueError("levels is empty")
    if not ((levels > 0).all() and (levels <= 1).all() and (levels[1:] < levels[:-1]).all()):
        raise ValueError(
            f"levels must be strictly decreasing in (0, 1] (the final 0 is implied); got {levels.tolist()}"
        )
    return torch.cat([levels, levels.new_zeros(1)])


def _default_log_prob(rule: str, log_prob: str | None) -> str:
    # CPS follows its two reference repositories; other rules use the exact density.
    if log_prob is None:
        return "cps_simplified" if rule == "cps" else "exact_mean"
    if log_prob not in LOG_PROBS:
        raise ValueError(f"unknown log_prob {log_prob!r}; accepted: {LOG_PROBS}")
    return log_prob


def stochastic_sample(
    denoise_velocity: VelocityFn,
    noise: Tensor,
    levels: Tensor,
    rule: Rule,
    rule_kwargs: Mapping[str, Any] | None = None,
    stochastic_steps: set[int] | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = True,
    log_prob: LogProbKind | None = None,
    step_noise: Mapping[int, Tensor] | None = None,
    num_steps: int | None = None,
) -> Trajectory | Tensor:
    """Run the stochastic few-step flow sampler from pure noise (``docs/methods/gndm.md``, ``docs/methods/rtdmd.md``).

    ``levels`` are the student's σ levels, highest first (e.g. ``[1, 0.9, 0.75, 0.5]``);
    step ``j`` goes from ``levels[j]`` to ``levels[j+1]``, the last step to σ = 0. Steps in
    ``stochastic_steps`` (``None``: all) use ``rule`` with ``rule_kwargs``
    (``cps: eta``, ``flowgrpo_sde: noise_level[, sigma_1]`` with σ_1 defaulting to the
    second grid value, ``dance: eta``); the others use the Euler step, so a deterministic
    last step returns x̂0. Stochastic noise ξ_j is ``step_noise[j]`` when given (shared
    per-prompt noise, SubGRPO), else drawn from ``generator``.

    ``log_prob`` selects the stored log π: ``cps_simplified`` by default for CPS,
    ``exact_mean`` for the other rules. The caller's autograd mode applies (wrap rollouts
    in ``torch.no_grad()``). ``num_steps`` runs only the first steps, a prefix ending at
    ``levels[num_steps]`` (DMD backward simulation; ``docs/methods/gndm.md``, "Importance sampling");
    ``None`` runs them all.
    Returns a :class:`Trajectory`, or only the final sample when ``return_trajectory`` is False.
    """
    kwargs = dict(rule_kwargs or {})
    moments = _checked_rule(rule, kwargs)
    kind = _default_log_prob(rule, log_prob)
    grid = _sigma_grid(levels)
    total_steps = len(grid) - 1
    if num_steps is None:
        num_steps = total_steps
    elif not 0 <= num_steps <= total_steps:
        raise ValueError(f"num_steps {num_steps} outside [0, {total_steps}] for {total_steps} levels")
    steps = set(range(num_steps)) if stochastic_steps is None else set(stochastic_steps)
    if not steps <= set(range(num_steps)):
        raise ValueError(f"stochastic_steps {sorted(steps)} must lie in [0, {num_steps - 1}]")
    step_noise = step_noise or {}
    if not set(step_noise) <= steps:
        raise ValueError(f"step_noise given for steps {sorted(step_noise)}, but stochastic steps are {sorted(steps)}")
    if rule == "flowgrpo_sde":
        kwargs.setdefault("sigma_1", grid[1])

    n = len(noise)
    trajectory = Trajectory([noise], grid, [], [], [], [], [], [], rule, kwargs, kind)
    device_grid = grid.to(noise.device)
    x = noise
    for j in range(num_steps):
        level, next_level = _batch_level(device_grid[j], n), _batch_level(device_grid[j + 1], n)
        velocity = denoise_velocity(x, level)
        stochastic = j in steps
        if stochastic:
            step = _draw(*moments(x, velocity, level, next_level, **kwargs), step_noise.get(j), generator)
        else:
            step = euler_step(x, velocity, level, next_level)
        if return_trajectory:
            # The sample is a fixed action for the policy gradient (Flow-GRPO detaches it too).
            lp = (
                transition_log_prob(step.sample.detach(), step.mean, step.std, kind)
                if stochastic
                else step.mean.new_zeros(n)
            )
            sigma = _per_sample_value(level, x)
            trajectory.velocities.append(velocity)
            trajectory.x0_preds.append(x.to(sigma.dtype) - sigma * velocity.to(sigma.dtype))
            trajectory.means.append(step.mean)
            trajectory.stds.append(step.std)
            trajectory.log_probs.append(lp)
            trajectory.stochastic.append(stochastic)
            trajectory.latents.append(step.sample)
        x = step.sample
    return trajectory if return_trajectory else x


def recompute_step(denoise_velocity: VelocityFn, trajectory: Trajectory, step_index: int) -> StepResult:
    """Mean and std of stored step ``j`` under ``denoise_velocity``, with the stored x_{j+1} as sample.

    Applies the step's own rule (Euler on deterministic steps) to the stored x_j, so the
    means of the current and reference policies can be compared (for a KL term).
    """
    if not 0 <= step_index < trajectory.num_steps:
        raise ValueError(f"step_index {step_index} outside [0, {trajectory.num_steps - 1}]")
    x = trajectory.latents[step_index]
    n = len(x)
    grid = trajectory.sigmas.to(x.device)
    level, next_level = _batch_level(grid[step_index], n), _batch_level(grid[step_index + 1], n)
    velocity = denoise_velocity(x, level)
    if trajectory.stochastic[step_index]:
        mean, std = _RULES[trajectory.rule][0](x, velocity, level, next_level, **trajectory.rule_kwargs)
    else:
        mean, std = _euler_moments(x, velocity, level, next_level)
    return StepResult(mean, std, trajectory.latents[step_index + 1])


def step_log_prob(denoise_velocity: VelocityFn, trajectory: Trajectory, step_index: int) -> Tensor:
    """log π_new(x_{j+1}|x_j) of stored step ``j``, in the trajectory's log-prob form.

    With an unchanged ``denoise_velocity`` this equals the recorded log-prob bit for bit,
    so the PPO ratio is exactly 1. Untrainable steps (deterministic, or ς = 0 as CPS into
    σ = 0) have no density: they return 0 without a forward pass.
    """
    if not 0 <= step_index < trajectory.num_steps:
        raise ValueError(f"step_index {step_index} outside [0, {trajectory.num_steps - 1}]")
    if not trajectory.is_trainable(step_index):
        return torch.zeros_like(trajectory.log_probs[step_index])
    step = recompute_step(denoise_velocity, trajectory, step_index)
    return transition_log_prob(step.sample.detach(), step.mean, step.std, trajectory.log_prob)
