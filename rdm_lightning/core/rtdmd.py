"""Pure math of RTDMD: ambient renoising, AC-DMD, the consistency term and SubGRPO (``docs/methods/rtdmd.md``).

Flow convention only: ``x_σ = (1−σ)·x0 + σ·ε``, velocity ``v = ε − x0``; ``t = 1000·σ`` is the
model timestep. σ_s is the boundary level of the trained step, σ_r > σ_s the renoise level.

What this module adds, and what it reuses instead (so each formula lives in one place):

- CPS steps, rollouts and log-probs: :mod:`rdm_lightning.core.stochastic` (``cps_step``,
  ``stochastic_sample`` with ``stochastic_steps``/``step_noise``/``num_steps``).
- AC-DMD direction ``g = nan_to_num((xs_fake − xs_real)/mean_pix|x_s − xs_real|)``:
  exactly :func:`rdm_lightning.core.dmd.dmd_gradient` with ``(x, x0_real, x0_fake) =
  (x_s, xs_real, xs_fake)`` and ``norm_eps = 0``; the generator loss is :func:`acdmd_generator_loss`
  (float64, unlike ``core.dmd.dmd_loss`` which is fp32).
- Advantages: :func:`rtdmd_advantages` composes ``normalize_per_reward(std="global")`` and
  ``combine_weighted(renormalize=True)`` of :mod:`rdm_lightning.core.advantages`; the PPO loss is
  ``ppo_clipped_loss`` / :func:`rdm_lightning.core.policy.trajectory_policy_loss`.
- Reward backprop ``L_BP = 1e-4·mean(ReLU(3 − R))``: exactly
  ``rdm_lightning.core.schedules_training.hinge_reward_loss(R, weight=1e-4, hinge=3.0)``.

Per-sample σ tensors have shape ``(B,)``. σ coefficients are computed in float64 (they are a few
scalars, and ``σ_r² − a²σ_s²`` cancels as σ_r → σ_s); latent arithmetic runs in at least fp32
(``promote_types(x.dtype, float32)``), as the stochastic sampler does.
"""
from __future__ import annotations

import hashlib
import random
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rdm_lightning.core.advantages import ADVANTAGE_EPS, combine_weighted, normalize_per_reward
from rdm_lightning.core.dmd import nonfinite_per_sample
from rdm_lightning.core.schedules import _per_sample
from rdm_lightning.core.stochastic import StepResult, cps_step

NUM_TRAIN_TIMESTEPS = 1000
"""t = 1000·σ: the model timestep of a flow level (``docs/methods/rtdmd.md`` convention)."""

SIGMA_RS_SQ_MIN = 1e-12
"""Floor of σ_rs² (the reference clamps the square, so σ_rs ≥ 1e-6)."""

RENOISE_OFFSET = 10.0
"""t_r starts 10 timesteps above the boundary: t_r ~ U[1000·σ_s + 10, 1000]."""

RENOISE_CLAMP = (20.0, 980.0)
"""Clamp of t_r (``min_step``/``max_step`` of the released configs)."""

CONSISTENCY_MAX_DELTA = 200
"""Δ ~ UniformInt[1, 200] timesteps between x_r and x′ (``consistency_epsilon_timestep``)."""

SUBGRPO_SEED_OFFSET = 104729
SUBGRPO_EPOCH_STRIDE = 100000
SUBGRPO_STEP_STRIDE = 10007


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _sigma_vector(name: str, sigma: Tensor | float, batch: int) -> Tensor:
    """``sigma`` as a float64 ``(B,)`` tensor (a scalar is broadcast), checked to lie in [0, 1]."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if s.ndim == 0:
        s = s.expand(batch)
    if s.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(s.shape)}")
    if not ((s >= 0) & (s <= 1)).all():
        raise ValueError(f"{name} must lie in [0, 1], got {s.flatten().tolist()}")
    return s


def _broadcast(value: Tensor, like: Tensor) -> Tensor:
    """A ``(B,)`` value as ``(B, 1, …, 1)`` on ``like``'s device."""
    (v,) = _per_sample((value,), like)
    return v


# ----------------------------------------------------------------------------------------------
# Ambient renoising and the fake-score target
# ----------------------------------------------------------------------------------------------


def ambient_coefficients(sigma_s: Tensor | float, sigma_r: Tensor | float, batch: int) -> tuple[Tensor, Tensor]:
    """``(a, σ_rs)`` of the forward kernel from σ_s to σ_r (``docs/methods/rtdmd.md``, "Stage 1, ``ACDMD``"),
    float64 ``(B,)``::

        a = (1 − σ_r)/(1 − σ_s),   σ_rs = √max(σ_r² − a²·σ_s², 1e-12)

    so that ``a²σ_s² + σ_rs² = σ_r²`` (up to the floor): renoising ``x_s ~ p_σs`` gives ``p_σr``.
    Needs ``0 ≤ σ_s ≤ σ_r ≤ 1`` and ``σ_s < 1``.
    """
    s = _sigma_vector("sigma_s", sigma_s, batch)
    r = _sigma_vector("sigma_r", sigma_r, batch)
    if not ((s < 1) & (s <= r)).all():
        raise ValueError(
            f"ambient renoising needs sigma_s < 1 and sigma_s <= sigma_r; "
            f"got sigma_s={s.tolist()}, sigma_r={r.tolist()}"
        )
    a = (1 - r) / (1 - s)
    # The square is floored (as the reference does), not σ_rs itself: σ_rs >= 1e-6.
    sigma_rs = torch.sqrt(torch.clamp(r**2 - a**2 * s**2, min=SIGMA_RS_SQ_MIN))
    return a, sigma_rs


def ambient_renoise(
    x_s: Tensor, sigma_s: Tensor | float, sigma_r: Tensor | float, noise: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Renoise the boundary sample: ``x_r = a·x_s + σ_rs·n`` (``docs/methods/rtdmd.md``, "Stage 1, ``ACDMD``").

    ``a`` and ``σ_rs`` come from :func:`ambient_coefficients` (float64, per sample); ``x_r`` is in
    ``promote_types(x_s.dtype, float32)``. With σ_s = 0 this is the flow forward process
    ``x_r = (1−σ_r)·x_s + σ_r·n``. Returns ``(x_r, a, σ_rs)`` with ``a, σ_rs`` of shape ``(B,)``.
    """
    if noise.shape != x_s.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match x_s shape {tuple(x_s.shape)}")
    a, sigma_rs = ambient_coefficients(sigma_s, sigma_r, x_s.shape[0])
    dtype = _compute_dtype(x_s)
    x_r = _broadcast(a, x_s).to(dtype) * x_s.to(dtype) + _broadcast(sigma_rs, x_s).to(dtype) * noise.to(dtype)
    return x_r, a, sigma_rs


def ambient_velocity_target(
    x_s: Tensor, sigma_s: Tensor | float, sigma_r: Tensor | float, sigma_rs: Tensor, noise: Tensor
) -> Tensor:
    """Ambient DSM target of the fake score at ``(x_r, t_r)`` (``docs/methods/rtdmd.md``, "Stage 1, ``ACDMD``")::

        v* = −x_s/(1 − σ_s) + [(σ_r + (1 − σ_r)·σ_s²/(1 − σ_s)²)/σ_rs]·n

    ``sigma_rs`` is the one returned by :func:`ambient_renoise` (floored). With σ_s = 0,
    ``v* = n − x_s``, the ordinary flow-matching target. Coefficients in float64, the result in
    ``promote_types(x_s.dtype, float32)``.
    """
    if noise.shape != x_s.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match x_s shape {tuple(x_s.shape)}")
    batch = x_s.shape[0]
    s = _sigma_vector("sigma_s", sigma_s, batch)
    r = _sigma_vector("sigma_r", sigma_r, batch)
    sigma_rs = torch.as_tensor(sigma_rs, dtype=torch.float64)
    if sigma_rs.shape != (batch,) or not (sigma_rs > 0).all():
        raise ValueError(f"sigma_rs must be positive with shape ({batch},), got {sigma_rs.tolist()}")
    if not (s < 1).all():
        raise ValueError(f"sigma_s must be < 1, got {s.tolist()}")
    x_coef = -1 / (1 - s)
    n_coef = (r + (1 - r) * s**2 / (1 - s) ** 2) / sigma_rs
    dtype = _compute_dtype(x_s)
    return _broadcast(x_coef, x_s).to(dtype) * x_s.to(dtype) + _broadcast(n_coef, x_s).to(dtype) * noise.to(dtype)


def ambient_target_weight(sigma_rs: Tensor, weight_cap: float = 10.0) -> Tensor:
    """Per-sample ADSM weight ``min(1, 10·σ_rs²)`` (``docs/methods/rtdmd.md``, "Stage 1, ``ACDMD``";
    ``move_scale_out: true``).

    The reference regresses ``σ_rs·v_φ`` on ``σ_rs·v*`` with weight ``clamp(1/σ_rs², max=10)``;
    that is ``min(1/σ_rs², 10)·σ_rs²·(v_φ − v*)² = min(1, 10σ_rs²)·(v_φ − v*)²``: the cap damps
    the huge target of tiny σ_rs (renoising barely above σ_s). float64 ``(B,)``.
    """
    if weight_cap <= 0:
        raise ValueError(f"weight_cap must be > 0, got {weight_cap}")
    sigma_rs = torch.as_tensor(sigma_rs, dtype=torch.float64)
    return torch.clamp(weight_cap * sigma_rs**2, max=1.0)


def ambient_dsm_loss(v_pred: Tensor, v_target: Tensor, weight: Tensor) -> Tensor:
    """``L_ADSM = mean(w·(v_φ(x_r, t_r) − v*)²)`` with one weight per sample
    (``docs/methods/rtdmd.md``, "Stage 1, ``ACDMD``").

    The mean runs over every element; computed in at least fp32 (``v_pred`` may be bf16).
    """
    if v_pred.shape != v_target.shape:
        raise ValueError(f"v_pred {tuple(v_pred.shape)} and v_target {tuple(v_target.shape)} differ in shape")
    dtype = _compute_dtype(v_pred)
    weight = torch.as_tensor(weight)
    if weight.shape != (v_pred.shape[0],):
        raise ValueError(f"weight must have shape ({v_pred.shape[0]},), got {tuple(weight.shape)}")
    sq = (v_pred.to(dtype) - v_target.detach().to(dtype)) ** 2
    return (_broadcast(weight, v_pred).to(dtype) * sq).mean()


# ----------------------------------------------------------------------------------------------
# Renoise timestep (stage 1; stage 2's final step)
# ----------------------------------------------------------------------------------------------


def renoise_timestep_range(
    sigma_s: Tensor | float, offset: float = RENOISE_OFFSET, t_end: float = NUM_TRAIN_TIMESTEPS
) -> tuple[Tensor, Tensor]:
    """Bounds ``(low, high)`` of the uniform renoise timestep, before the clamp
    (``docs/methods/rtdmd.md``, "Stage 1, ``ACDMD``")::

        low = 1000·σ_s + 10,   high = max(1000, low + 1)

    (``high`` guards an empty interval, as the reference does.) float64, shaped like ``sigma_s``.
    """
    s = torch.as_tensor(sigma_s, dtype=torch.float64)
    if not ((s >= 0) & (s < 1)).all():
        raise ValueError(f"sigma_s must lie in [0, 1), got {s.flatten().tolist()}")
    low = NUM_TRAIN_TIMESTEPS * s + offset
    return low, torch.maximum(torch.full_like(low, float(t_end)), low + 1)


def sample_renoise_sigma(
    sigma_s: Tensor,
    generator: torch.Generator | None = None,
    clamp: tuple[float, float] = RENOISE_CLAMP,
    integer: bool = False,
) -> Tensor:
    """Draw ``σ_r = t_r/1000`` per sample with ``t_r ~ U[1000σ_s + 10, 1000]`` clamped to [20, 980].

    ``docs/methods/rtdmd.md``: stage 1, and stage 2's final step (σ_s = 0: ``t_r ~ U[10, 1000]``).
    ``sigma_s`` has shape ``(B,)``; the result is float64 ``(B,)``. The reference draws t_r
    *continuously* (``torch.rand`` scaled, float timesteps are fed to the transformer), so that is
    the default; ``integer=True`` rounds t_r up to an integer instead, which keeps ``t_r ≥ low``.

    Stage 1 shares t_r across ranks: pass a generator seeded identically on every rank (no
    collective needed). Stage 2 keeps it rank-local: seed per rank. Because ``low ≤ 980`` is
    required (σ_s ≤ 0.97), the clamp never pushes t_r below ``low``, so ``σ_r ≥ σ_s + 0.01``.
    """
    sigma_s = torch.as_tensor(sigma_s, dtype=torch.float64)
    if sigma_s.ndim != 1:
        raise ValueError(f"sigma_s must have shape (B,), got {tuple(sigma_s.shape)}")
    t_min, t_max = clamp
    if not 0 <= t_min <= t_max <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"clamp must satisfy 0 <= min <= max <= {NUM_TRAIN_TIMESTEPS}, got {clamp}")
    low, high = renoise_timestep_range(sigma_s)
    if (low > t_max).any():
        raise ValueError(
            f"sigma_s={sigma_s.tolist()} puts the renoise interval start 1000*sigma_s + {RENOISE_OFFSET} above "
            f"the clamp max {t_max}: the clamp would renoise to sigma_r < sigma_s + 0.01"
        )
    # Drawn on the generator's device (CPU), then moved: the same seed gives the same t_r anywhere.
    u = torch.rand(sigma_s.shape, generator=generator, dtype=torch.float64).to(sigma_s.device)
    t_r = low + u * (high - low)
    if integer:
        t_r = torch.ceil(t_r)
    return t_r.clamp(t_min, t_max) / NUM_TRAIN_TIMESTEPS


# ----------------------------------------------------------------------------------------------
# AC-DMD generator loss
# ----------------------------------------------------------------------------------------------


def project_to_boundary(
    x_r: Tensor, velocity: Tensor, sigma_r: Tensor | float, sigma_s: Tensor | float, eta: float, z: Tensor
) -> StepResult:
    """One CPS step from σ_r back to σ_s with the given noise ``z`` (``docs/methods/rtdmd.md``, "Stage 1, ``ACDMD``").

    Call it twice with the **same** ``z``: with the teacher's velocity (CFG w) for ``xs_real`` and
    the fake score's (guidance 1) for ``xs_fake``; the shared z cancels in ``xs_fake − xs_real``,
    leaving ``(1 − σ_s)·(x̂0_fake − x̂0_real) + σ_s·cosθ·(ε̂_fake − ε̂_real)``. With σ_s = 0 the step
    returns x̂0 (DMD2 in x0 space). ``.sample`` of the result is the projection.
    """
    return cps_step(x_r, velocity, sigma_r, sigma_s, eta, noise=z)


def acdmd_generator_loss(x_s: Tensor, gradient: Tensor) -> Tensor:
    """``L_G = ½·mean((x_s − sg(x_s − g))²)`` in float64, so ``∂L_G/∂x_s = g/N``
    (``docs/methods/rtdmd.md``, "Stage 1, ``ACDMD``").

    ``g`` is :func:`rdm_lightning.core.dmd.dmd_gradient` ``(x_s, xs_real, xs_fake)``. Unlike
    ``core.dmd.dmd_loss`` (fp32, target rounded as ``x − g`` in the latent dtype), the target is
    formed in float64, where ``x_s − (x_s − g)`` recovers ``g`` exactly, as the reference's
    ``.double()`` loss intends. Returns a float64 scalar.
    """
    if gradient.shape != x_s.shape:
        raise ValueError(f"gradient {tuple(gradient.shape)} and x_s {tuple(x_s.shape)} differ in shape")
    x64 = x_s.to(torch.float64)
    target = (x64 - gradient.to(torch.float64)).detach()
    return 0.5 * F.mse_loss(x64, target)


# ----------------------------------------------------------------------------------------------
# Consistency term of the fake score
# ----------------------------------------------------------------------------------------------


def denoised_estimate(x: Tensor, sigma: Tensor | float, velocity: Tensor) -> Tensor:
    """``h(x, σ) = x − σ·v_φ(x, σ)``, the fake score's x̂0 (``docs/methods/rtdmd.md``, "Stage 1, ``ACDMD``":
    consistency).

    Gradients flow through ``velocity``; computed in at least fp32.
    """
    dtype = _compute_dtype(x)
    s = _broadcast(_sigma_vector("sigma", sigma, x.shape[0]), x).to(dtype)
    return x.to(dtype) - s * velocity.to(dtype)


def consistency_sigma(
    sigma_r: Tensor, generator: torch.Generator | None = None, max_delta: int = CONSISTENCY_MAX_DELTA
) -> Tensor:
    """``σ′ = max(t_r − Δ, 0)/1000`` with ``Δ ~ UniformInt[1, 200]`` per sample
    (``docs/methods/rtdmd.md``, "Stage 1, ``ACDMD``").

    ``t_r = 1000·σ_r`` (continuous, as drawn by :func:`sample_renoise_sigma`); float64 ``(B,)``.
    Always ``σ′ < σ_r``. Stage 1 shares Δ across ranks (same-seeded generator), stage 2 keeps it local.
    """
    sigma_r = torch.as_tensor(sigma_r, dtype=torch.float64)
    if sigma_r.ndim != 1 or not ((sigma_r > 0) & (sigma_r <= 1)).all():
        raise ValueError(f"sigma_r must have shape (B,) with values in (0, 1], got {sigma_r.tolist()}")
    if max_delta < 1:
        raise ValueError(f"max_delta must be >= 1, got {max_delta}")
    delta = torch.randint(1, max_delta + 1, sigma_r.shape, generator=generator).to(sigma_r.device, torch.float64)
    return torch.clamp(NUM_TRAIN_TIMESTEPS * sigma_r - delta, min=0.0) / NUM_TRAIN_TIMESTEPS


@torch.no_grad()
def consistency_transitions(
    x_r: Tensor,
    velocity: Tensor,
    sigma_r: Tensor | float,
    sigma_prime: Tensor | float,
    eta: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Two independent no-grad CPS transitions ``x_r → x′_1, x′_2`` at σ′
    (``docs/methods/rtdmd.md``, "Stage 1, ``ACDMD``").

    Both use ``sg(v_φ(x_r))`` and fresh noise each, so that, given x_r, x′_1 and x′_2 are i.i.d.:
    that independence is what makes :func:`consistency_loss` unbiased.
    """
    velocity = velocity.detach()
    first = cps_step(x_r, velocity, sigma_r, sigma_prime, eta, generator=generator).sample
    second = cps_step(x_r, velocity, sigma_r, sigma_prime, eta, generator=generator).sample
    return first, second


def consistency_loss(h0: Tensor, h1: Tensor, h2: Tensor, return_nonfinite: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``L_cons = mean[(h1 − h0)⊙(h2 − h0)]`` (``docs/methods/rtdmd.md``, "Stage 1, ``ACDMD``"), γ = 0.01
    in ``L_F``.

    The caller makes three fake-score forward passes, all with gradient:

    1. ``v_r = v_φ(x_r, t_r)`` (the pass of ``L_ADSM``) and ``h0 = x_r − σ_r·v_r``
       (:func:`denoised_estimate`);
    2. ``x′_1, x′_2 = consistency_transitions(x_r, sg(v_r), σ_r, σ′, η = 0.9)``, σ′ from
       :func:`consistency_sigma` (no grad, no network call);
    3. ``h_i = x′_i − σ′·v_φ(x′_i, t′)`` for i = 1, 2 (two passes).

    With x′_1, x′_2 i.i.d. given x_r, ``E[(h1 − h0)(h2 − h0)] = (E[h(x′)|x_r] − h0)²``
    elementwise: an unbiased estimate of ``‖E[h(x′)|x_r] − h(x_r)‖²/N``, where ``mean((h1 − h0)²)``
    would add Var(h(x′)). A non-finite mean gives 0, as in the reference. With ``return_nonfinite``:
    ``(L_cons, nonfinite)``, ``nonfinite`` the ``[B]`` count of each sample's non-finite products
    (any one of which zeroes the whole term).
    """
    if not h0.shape == h1.shape == h2.shape:
        raise ValueError(f"h0, h1, h2 shapes differ: {tuple(h0.shape)}, {tuple(h1.shape)}, {tuple(h2.shape)}")
    dtype = _compute_dtype(h0)
    h0, h1, h2 = h0.to(dtype), h1.to(dtype), h2.to(dtype)
    product = (h1 - h0) * (h2 - h0)
    loss = torch.nan_to_num(product.mean(), nan=0.0, posinf=0.0, neginf=0.0)
    return (loss, nonfinite_per_sample(product.detach())) if return_nonfinite else loss


# ----------------------------------------------------------------------------------------------
# SubGRPO
# ----------------------------------------------------------------------------------------------


def subgrpo_steps(seed: int, epoch: int, candidates: Sequence[int] = (0, 1, 2), num_selected: int = 2) -> list[int]:
    """The steps trained this epoch: ``sorted(Random(seed + 100000·epoch + 104729).sample(candidates, k))``.

    ``docs/methods/rtdmd.md``, "Stage 2, ``RTDMD``" (SubGRPO). A local RNG seeded only by (seed, epoch)
    gives the same steps on every rank without a collective. It is Python's ``random.Random``, as in
    the reference, so the selection matches it step for step.
    """
    candidates = list(candidates)
    if len(set(candidates)) != len(candidates) or any(c < 0 for c in candidates):
        raise ValueError(f"candidates must be distinct non-negative step indices, got {candidates}")
    if not 1 <= num_selected <= len(candidates):
        raise ValueError(f"num_selected must lie in [1, {len(candidates)}], got {num_selected}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    rng = random.Random(seed + SUBGRPO_EPOCH_STRIDE * epoch + SUBGRPO_SEED_OFFSET)
    return sorted(rng.sample(candidates, num_selected))


def prompt_noise_seed(prompt: str, step: int, epoch: int) -> int:
    """Seed of a prompt's shared noise on an unselected step (``docs/methods/rtdmd.md``, "Stage 2, ``RTDMD``")::

        (big-endian int of SHA256(prompt.encode('utf-8'))[:4] + 10007·step + 100000·epoch) mod 2³¹

    A content hash (not Python's salted ``hash``) so that every rank computes the same seed.
    """
    if step < 0 or epoch < 0:
        raise ValueError(f"step and epoch must be >= 0, got step={step}, epoch={epoch}")
    prompt_hash = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:4], "big")
    return (prompt_hash + SUBGRPO_STEP_STRIDE * step + SUBGRPO_EPOCH_STRIDE * epoch) % 2**31


def shared_step_noise(
    prompts: Sequence[str], step: int, epoch: int, shape: Sequence[int], dtype: torch.dtype = torch.float32
) -> Tensor:
    """Per-prompt deterministic noise ``(B, *shape)`` of one step (``docs/methods/rtdmd.md``,
    "Stage 2, ``RTDMD``": SubGRPO).

    Row i is ``randn(shape)`` from a CPU generator seeded with :func:`prompt_noise_seed`, so the K
    images of a prompt get the same noise on every rank (CPU generators are device-independent).
    ``dtype`` changes the drawn values: float32 matches the reference. Returned on CPU; move it.
    """
    if not prompts:
        raise ValueError("prompts is empty")
    generators = [torch.Generator().manual_seed(prompt_noise_seed(p, step, epoch)) for p in prompts]
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=dtype) for g in generators])


def subgrpo_step_noise(
    prompts: Sequence[str],
    selected_steps: Sequence[int],
    epoch: int,
    num_steps: int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> dict[int, Tensor]:
    """``{step: shared_step_noise(...)}`` for the stochastic steps that are not trained this epoch.

    The stochastic steps are ``0 … num_steps − 2``; the last step into σ = 0 is deterministic
    (CPS with σ′ = 0 has ς = 0) and takes no noise. Pass the result as ``step_noise`` to
    :func:`rdm_lightning.core.stochastic.stochastic_sample` with
    ``stochastic_steps=set(range(num_steps − 1))``: selected steps then draw independent noise
    from its generator, unselected ones share the per-prompt noise, and initial latents stay
    independent (``docs/methods/rtdmd.md``, "Stage 2, ``RTDMD``").
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    stochastic = range(num_steps - 1)
    unknown = sorted(set(selected_steps) - set(stochastic))
    if unknown:
        raise ValueError(
            f"selected_steps {unknown} are not stochastic steps of a {num_steps}-step sampler "
            f"(stochastic: {list(stochastic)})"
        )
    return {j: shared_step_noise(prompts, j, epoch, shape, dtype) for j in stochastic if j not in set(selected_steps)}


def rtdmd_advantages(
    scores: Mapping[str, Tensor],
    group_size: int,
    weights: Mapping[str, float] | None = None,
    eps: float = ADVANTAGE_EPS,
    clip: float | None = None,
) -> Tensor:
    """RTDMD advantages of a gathered batch (``docs/methods/rtdmd.md``, "Stage 2, ``RTDMD``")::

        A_m = (r_m − group mean)/(std of r_m over the batch + 1e-4)     normalize_per_reward(std="global")
        A   = Σ_m ω_m·A_m,  A ← (A − mean A)/(std A + 1e-4)            combine_weighted(renormalize=True)

    then, if ``clip`` is given (RTDMD: 5), ``A ← clip(A, ±clip)``. ``weights`` default to ω_m = 1.
    Population stds. ``scores`` are ``[B]`` over the batch gathered across ranks
    (:func:`~rdm_lightning.core.advantages.gather_batch`), laid out in whole groups of
    ``group_size`` consecutive samples; the reference groups by prompt string, which is the same
    partition. Slice this rank's rows afterwards.
    """
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    scores = dict(scores)
    weights = {name: 1.0 for name in scores} if weights is None else dict(weights)
    per_reward = normalize_per_reward(scores, group_size, std="global", eps=eps)
    advantages = combine_weighted(per_reward, weights, renormalize=True, eps=eps)
    return advantages if clip is None else advantages.clamp(-clip, clip)


__all__ = [
    "CONSISTENCY_MAX_DELTA",
    "NUM_TRAIN_TIMESTEPS",
    "RENOISE_CLAMP",
    "RENOISE_OFFSET",
    "SIGMA_RS_SQ_MIN",
    "acdmd_generator_loss",
    "ambient_coefficients",
    "ambient_dsm_loss",
    "ambient_renoise",
    "ambient_target_weight",
    "ambient_velocity_target",
    "consistency_loss",
    "consistency_sigma",
    "consistency_transitions",
    "denoised_estimate",
    "project_to_boundary",
    "prompt_noise_seed",
    "renoise_timestep_range",
    "rtdmd_advantages",
    "sample_renoise_sigma",
    "shared_step_noise",
    "subgrpo_step_noise",
    "subgrpo_steps",
]
