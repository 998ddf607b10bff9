"""Group-relative advantages, reward weights, gradient-scale matching and PPO ratios.

Every function takes a flat batch of ``B = (B/K)·K`` samples laid out as whole
groups of K consecutive samples per prompt (what
:class:`rdm_lightning.data.groups.GroupBatchSampler` yields), already gathered
across ranks where a statistic must span them (:func:`gather_batch`).

Standard deviations are population ones (``unbiased=False``), as Flow-GRPO's
``np.std`` (``docs/methods/rtdmd.md``, "Stage 2, ``RTDMD``"), and the advantage ε is ``1e-4``
(``docs/methods/gndm.md``, ``docs/methods/gdmd.md``, ``docs/methods/rtdmd.md``).
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

StdMode = Literal["group", "global", "none"]
STD_MODES = ("group", "global", "none")
ADVANTAGE_EPS = 1e-4


def check_group_size(batch_size: int, group_size: int) -> None:
    """Raise unless ``group_size >= 1`` divides ``batch_size``.

    Raises:
        ValueError: naming both numbers.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if batch_size % group_size:
        raise ValueError(
            f"batch_size={batch_size} is not a multiple of group_size={group_size}; "
            "a batch must hold whole groups of group_size samples per prompt"
        )


def _grouped(values: Tensor, group_size: int) -> Tensor:
    """``values`` ``[B]`` viewed as ``[B/K, K]``, one row per prompt."""
    if values.ndim != 1:
        raise ValueError(f"expected a 1-D batch of per-sample values, got shape {tuple(values.shape)}")
    check_group_size(values.numel(), group_size)
    return values.view(-1, group_size)


def group_advantages(
    rewards: Tensor,
    group_size: int,
    std: StdMode = "group",
    eps: float = ADVANTAGE_EPS,
    clip: float | None = None,
) -> Tensor:
    """Group-relative advantages ``Â_i = (r_i − mean_K r) / (s + ε)``, optionally clipped to ``±clip``.

    ``mean_K`` is the mean over sample i's group (prompt). The scale ``s`` is
    (population std, ``unbiased=False``, as Flow-GRPO's ``np.std``):

    - ``"group"``: std over the group (Flow-GRPO ``global_std=False``; ``docs/methods/gndm.md``);
    - ``"global"``: std over the whole (gathered) batch (Flow-GRPO's default, RTDMD);
    - ``"none"``: no division, ``Â_i = r_i − mean_K r`` (``eps`` unused).

    A constant group gives ``Â = 0`` exactly under every mode. The result is
    detached: an advantage is a weight on a loss, never a path for gradients.

    Args:
        rewards: ``[B]`` per-sample rewards, groups of ``group_size`` consecutive samples.
        group_size: K, samples per prompt; must divide B.
        std: Scale of the normalisation, one of :data:`STD_MODES`.
        eps: Added to the std (the specs' ``1e-4``).
        clip: If given, clamp advantages to ``[−clip, clip]`` (Flow-GRPO uses 5).
    """
    if std not in STD_MODES:
        raise ValueError(f"std must be one of {STD_MODES}, got {std!r}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    rewards = rewards.detach()
    if not rewards.is_floating_point():
        rewards = rewards.float()
    groups = _grouped(rewards, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if std == "group":
        centered = centered / (groups.std(dim=1, unbiased=False, keepdim=True) + eps)
    elif std == "global":
        centered = centered / (rewards.std(unbiased=False) + eps)
    advantages = centered.reshape(-1)
    return advantages if clip is None else advantages.clamp(-clip, clip)


def normalize_per_reward(
    scores: dict[str, Tensor],
    group_size: int,
    std: StdMode = "group",
    eps: float = ADVANTAGE_EPS,
    clip: float | None = None,
) -> dict[str, Tensor]:
    """``Â^m = group_advantages(r^m)`` for each reward m separately (GNDMR W1, ``docs/methods/gndm.md``).

    Normalising before combining gives every reward a unit scale, so that the
    weights ω_m, not the rewards' native ranges, set their relative influence.
    Arguments other than ``scores`` are those of :func:`group_advantages`.
    """
    if not scores:
        raise ValueError("scores is empty; expected at least one reward name → [B] tensor")
    return {name: group_advantages(values, group_size, std, eps, clip) for name, values in scores.items()}


def combine_weighted(
    advantages: dict[str, Tensor],
    weights: dict[str, float],
    renormalize: bool = False,
    eps: float = ADVANTAGE_EPS,
) -> Tensor:
    """``A_i = Σ_m ω_m·Â^m_i`` (W1 of ``docs/methods/gndm.md``; ``docs/methods/gdmd.md``).

    Args:
        advantages: Per-reward advantages ``[B]``, e.g. from :func:`normalize_per_reward`.
        weights: ω_m for exactly the rewards in ``advantages``.
        renormalize: Then ``A ← (A − mean A) / (std A + ε)`` over the whole
            (gathered) batch, population std: RTDMD's renormalisation (``docs/methods/rtdmd.md``, "Stage 2, ``RTDMD``").
        eps: ε of the renormalisation.

    Raises:
        ValueError: a reward without a weight, or a weight without a reward, naming them.
    """
    missing = sorted(set(advantages) - set(weights))
    unknown = sorted(set(weights) - set(advantages))
    if missing or unknown or not advantages:
        raise ValueError(
            f"reward weights must name exactly the rewards {sorted(advantages)}; "
            f"missing weights for {missing}, weights for unknown rewards {unknown}"
        )
    combined = sum(weights[name] * values for name, values in advantages.items())
    if renormalize:
        combined = (combined - combined.mean()) / (combined.std(unbiased=False) + eps)
    return combined


def clipped_advantage_weights(advantages: Tensor, kappa: float = 0.5, clip: float = 2.0) -> Tensor:
    """``w_i = (1 + κ·clip(A_i, −c, c))₊`` (``docs/methods/gndm.md``; ``docs/methods/gdmd.md``, ``linear``).

    ``A = 0`` gives ``w = 1``, and always ``0 ≤ w ≤ 1 + κ·c``. Detached.

    Args:
        advantages: ``[B]`` advantages.
        kappa: κ, the strength of the weighting (0 turns it off: every w = 1).
        clip: c, the bound on |A| before weighting.
    """
    if kappa < 0 or clip <= 0:
        raise ValueError(f"need kappa >= 0 and clip > 0, got kappa={kappa}, clip={clip}")
    return (1.0 + kappa * advantages.detach().clamp(-clip, clip)).clamp_min(0.0)


def softmax_group_weights(
    advantages: Tensor, group_size: int, temperature: float = 1.0, w_max: float | None = 3.0
) -> Tensor:
    """``w_i = min(K·softmax_{i∈group}(A_i / T), w_max)`` (``docs/methods/gdmd.md``, ``softmax``).

    Without a cap each group's weights average exactly 1; the cap is not
    renormalised afterwards (as the spec says), so with it ``0 ≤ w ≤ w_max``. Detached.

    Args:
        advantages: ``[B]`` advantages, groups of ``group_size`` consecutive samples.
        group_size: K; must divide B.
        temperature: T > 0.
        w_max: Upper bound on a weight; ``None`` for no cap.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if w_max is not None and w_max <= 0:
        raise ValueError(f"w_max must be > 0 or None, got {w_max}")
    weights = group_size * torch.softmax(_grouped(advantages.detach(), group_size) / temperature, dim=1)
    weights = weights.reshape(-1)
    return weights if w_max is None else weights.clamp_max(w_max)


def scale_matched_gradient(reward_grad: Tensor, eps: float = 1e-8) -> Tensor:
    """GNDMR W2 (``docs/methods/gndm.md``): ``ĝ_i = γ_i / (mean_pix|γ_i| + ε)``, per sample.

    This puts a reward gradient on the mean-absolute scale of the DM direction
    g (whose normaliser makes ``mean_pix|g|`` order 1), so λ_m alone sets the
    balance; ``mean_pix|ĝ_i| = q/(q + ε)`` with ``q = mean_pix|γ_i|``. Detached:
    γ is taken at ``sg(x)`` and only enters the loss through the detached target.

    Args:
        reward_grad: γ, ``[B, ...]`` gradient of the reward with respect to the latents.
        eps: ε of the denominator.
    """
    reward_grad = reward_grad.detach()
    dims = tuple(range(1, reward_grad.ndim))
    return reward_grad / (reward_grad.abs().mean(dim=dims, keepdim=True) + eps)


def reward_guided_direction(
    dm_direction: Tensor, matched_grads: dict[str, Tensor], lambdas: dict[str, float]
) -> Tensor:
    """``h_i = g_i − Σ_m λ_m·ĝ^m_i`` (W2/W3 of ``docs/methods/gndm.md``), the direction fed to ``ℓ_i(h_i)``.

    Terms with ``λ_m = 0`` are skipped rather than multiplied, so that during the
    cold start h is ``g`` itself, bit for bit, even if a reward gradient is not
    finite.

    Args:
        dm_direction: g, ``[B, ...]``.
        matched_grads: ĝ^m per reward, from :func:`scale_matched_gradient`.
        lambdas: λ_m(u) for exactly the rewards in ``matched_grads``.

    Raises:
        ValueError: the names of ``matched_grads`` and ``lambdas`` differ, naming the differences.
    """
    if set(matched_grads) != set(lambdas):
        raise ValueError(
            f"lambdas must name exactly the reward gradients {sorted(matched_grads)}; "
            f"missing {sorted(set(matched_grads) - set(lambdas))}, unknown {sorted(set(lambdas) - set(matched_grads))}"
        )
    direction = dm_direction
    for name, weight in lambdas.items():
        if weight != 0:
            direction = direction - weight * matched_grads[name]
    return direction


def _log_ratio(log_prob_new: Tensor, log_prob_old: Tensor) -> Tensor:
    if log_prob_new.shape != log_prob_old.shape:
        raise ValueError(
            f"log_prob_new {tuple(log_prob_new.shape)} and log_prob_old {tuple(log_prob_old.shape)} differ in shape"
        )
    return log_prob_new - log_prob_old.detach()


def clipped_importance_ratio(log_prob_new: Tensor, log_prob_old: Tensor, clip_range: float) -> Tensor:
    """GNDM IS weight ``ρ_i = clip(exp(Σ_j [log π_θ − log π_old]), 1 − ε, 1 + ε)``, detached.

    ``docs/methods/gndm.md``, "Importance sampling": the prefix ratio of a reused trajectory, a
    constant weight on its loss.

    Args:
        log_prob_new: ``[B]`` or ``[B, k]`` log-probabilities of the stored prefix
            transitions under the current parameters; a ``[B, k]`` tensor is summed
            over its k steps, so ``k = 0`` (no prefix) gives ``ρ = 1`` exactly.
        log_prob_old: The same under the rollout parameters, same shape.
        clip_range: ε_IS (``1e-3`` by default in the spec), in ``[0, 1)``.
    """
    if not 0 <= clip_range < 1:
        raise ValueError(f"clip_range must be in [0, 1), got {clip_range}")
    log_ratio = _log_ratio(log_prob_new.detach(), log_prob_old)
    if log_ratio.ndim > 1:
        log_ratio = log_ratio.flatten(1).sum(dim=1)
    return torch.exp(log_ratio).clamp(1 - clip_range, 1 + clip_range)


def ppo_clipped_loss(advantages: Tensor, log_prob_new: Tensor, log_prob_old: Tensor, clip_range: float) -> Tensor:
    """PPO loss ``mean(max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)))`` with ``ρ = exp(log π_θ − log π_old)``.

    ``docs/methods/rtdmd.md``, "Stage 2, ``RTDMD``" (β_KL = 0; a KL term is the caller's).

    Gradients flow through ``log_prob_new`` only: unclipped, ``∂L/∂ρ_i = −A_i/n``;
    once ρ leaves the clip range on the side A favours (A > 0, ρ > 1 + ε or
    A < 0, ρ < 1 − ε) the term is constant and its gradient is 0.

    Args:
        advantages: ``[B]``, detached here; broadcast over trailing step dimensions
            of the log-probabilities (A is shared by every trained step).
        log_prob_new: ``[B]`` or ``[B, T]``, with gradient.
        log_prob_old: Same shape, from the rollout.
        clip_range: ε, in ``[0, 1)``.
    """
    if not 0 <= clip_range < 1:
        raise ValueError(f"clip_range must be in [0, 1), got {clip_range}")
    ratio = torch.exp(_log_ratio(log_prob_new, log_prob_old))
    advantages = advantages.detach().reshape(advantages.shape + (1,) * (ratio.ndim - advantages.ndim))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


def gather_batch(values: Tensor, all_gather: Callable[[Tensor], Tensor]) -> Tensor:
    """This rank's ``[B, ...]`` values concatenated over ranks, rank 0 first: ``[W·B, ...]``.

    Groups never span ranks under :class:`~rdm_lightning.data.groups.GroupBatchSampler`,
    so the gathered batch keeps whole groups; statistics computed on it (e.g.
    ``std="global"``) are identical on every rank. This rank's slice is
    ``[rank·B : (rank + 1)·B]``.

    Args:
        values: ``[B, ...]`` on this rank.
        all_gather: ``LightningModule.all_gather`` or ``strategy.all_gather``:
            ``[W, B, ...]`` under W > 1 processes, the input itself under one.
    """
    return all_gather(values).reshape(-1, *values.shape[1:])
