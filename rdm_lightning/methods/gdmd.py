"""GDMD (``docs/methods/gdmd.md``): rewards of the implicit DMD target reweight each sample's DMD update.

Per generator update ``u``, on a batch of ``B/K`` prompts repeated ``K`` times in a row::

    g_i  = DM direction (per-sample or group-mean normaliser, ε_n = 1e-8)
    x̃_i  = sg(x_i − η·g_i)                                   the implicit target
    w_i  = 1                                                  (u < cold_start_updates)
    w_i  = weights(Σ_m ω_m·Â^m_i),  Â^m = group-normalised R_m(decode(x̃))   (afterwards, no grad)
    L_B1 = (1/B)·Σ_i w_i·½·mean_pix((x_i − x̃_i)²)           ⇒ ∂L/∂x_i = w_i·η·g_i / N

with N the number of elements of the whole batch x (B·pixels), as the batch mean
divides by B too. Optional B2 auxiliary, with
λ(u) = cosine_ramp(u, N0, b2_ramp_updates, b2_weight) (GNDMR's W3; 0 through the cold
start) and ω_m the reward weights::

    matched: ĝ^m_i = γ^m_i / (mean_pix|γ^m_i| + 1e-8),  γ^m_i = ∇_y R_m(decode(y), c_i) at y = x̃_i
             the B1 target becomes sg(x̃_i + λ·Σ_m ω_m·ĝ^m_i)
             ⇒ ∂L/∂x_i = w_i·(η·g_i − λ·Σ_m ω_m·ĝ^m_i) / N
    raw:     L = L_B1 − λ·(1/B)·Σ_i Σ_m ω_m·s_m·R_m(decode(x_i − sg(η·g_i)), c_i)   (s_m: train_scale)
             ⇒ ∂L/∂x_i = w_i·η·g_i / N − (λ/B)·Σ_m ω_m·s_m·γ^m_i     (γ^m_i as above, at x̃_i)

The substrate is DMDR without its reward term (DynaRS, CFG jitter, TTUR 5, no
GAN). B1 only scores the rewards, never differentiates them, so non-differentiable
rewards (e.g. the digits gold classifier) can be optimized; B2 (``b2_weight > 0``)
differentiates every reward, so then all must be differentiable. Implemented:
``mode=weighted`` (B1) with ``softmax`` or ``linear`` weighting, ``reward_signal``
``target`` or ``improvement``, any η, the ``per_sample`` or ``group_mean``
(GNDM-A1) normaliser, B2 ``matched`` or ``raw``, and ``mode=grpo`` (B3, for ablation): after
the cold start, GRPO on CPS rollouts with the target rewards as advantages (``methods/grpo.py``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rdm_lightning.backbones.base import Backbone
from rdm_lightning.core.advantages import (
    clipped_advantage_weights,
    combine_weighted,
    normalize_per_reward,
    reward_guided_direction,
    scale_matched_gradient,
    softmax_group_weights,
)
from rdm_lightning.core.group_dmd import group_dmd_gradient, weighted_dmd_loss
from rdm_lightning.core.schedules_training import cosine_ramp
from rdm_lightning.data.groups import check_grouped_prompts
from rdm_lightning.methods.base import check_choice, check_finite
from rdm_lightning.methods.dmd import DMD, DMDConfig, Iteration
from rdm_lightning.methods.dmdr import DMDRConfig, DMDRParts
from rdm_lightning.methods.grpo import GRPOConfig, GRPOMixin
from rdm_lightning.methods.rewarded import RewardedMethod
from rdm_lightning.rewards.base import RewardModel

MODES = ("weighted", "grpo")
NORMALIZERS = ("per_sample", "group_mean")
REWARD_SIGNALS = ("target", "improvement")
WEIGHTINGS = ("softmax", "linear")
B2_SCALES = ("matched", "raw")
# docs/methods/gdmd.md: below this group size the softmax weights of a group are too coarse to guard
# against diversity collapse, so the module warns.
RECOMMENDED_GROUP_SIZE = 8


@dataclass
class GDMDConfig:
    """GDMD settings (defaults: docs/methods/gdmd.md; the cold start mirrors DMDR's SD3-M run)."""

    mode: str = "weighted"
    """``weighted``: B1, reward-weighted DMD (docs/methods/gdmd.md); ``grpo``: B3 (for ablation): after the
    cold start, GRPO on CPS rollouts with the rewards of each final sample's implicit target as advantages."""
    eta: float = 1.0
    """η, the step of the implicit target ``x̃ = sg(x − η·g)``; 1 makes x̃ the regression target of L_DM."""
    normalizer: str = "per_sample"
    """DM normaliser: ``per_sample`` (DMD's ``n_i``) or ``group_mean`` (GNDM-A1: the group's mean ``n̄``)."""
    reward_signal: str = "target"
    """``target``: r = R(decode(x̃)); ``improvement``: Δ = R(decode(x̃)) − R(decode(x))."""
    weighting: str = "softmax"
    """``softmax``: w = min(K·softmax_group(A/T), w_max); ``linear``: w = (1 + κ·clip(A, −c, c))₊."""
    temperature: float = 1.0
    """T of the ``softmax`` weighting (> 0)."""
    w_max: float | None = 3.0
    """Cap of the ``softmax`` weights, not renormalised after capping; ``None``: no cap."""
    kappa: float = 0.5
    """κ of the ``linear`` weighting (>= 0; 0 gives every w = 1)."""
    advantage_clip: float = 2.0
    """c of the ``linear`` weighting: |A| is clipped to c before weighting (> 0)."""
    group_size: int = 8
    """K, samples per prompt; the data must repeat each prompt K times in a row
    (``DigitsDataModule(group_size=K)``). Warns below 8."""
    b2_weight: float = 0.0
    """λ_B2, the maximum weight of the B2 reward-gradient auxiliary: 0 = off (default),
    0.1–0.3 when enabled. Every reward must then be differentiable."""
    b2_scale: str = "matched"
    """B2 form, used only when ``b2_weight > 0``: ``matched`` (recommended) moves the B1 target
    to ``sg(x̃ + λ·Σ_m ω_m·ĝ^m)`` with scale-matched reward gradients ĝ^m at x̃; ``raw`` adds
    ``−λ·mean_i Σ_m ω_m·train_scale_m·R_m(decode(x_i − sg(η·g_i)))``, differentiated through x_i."""
    b2_ramp_updates: int = 500
    """W3 N_ramp of B2: λ rises from 0 at N0 = ``cold_start_updates`` to ``b2_weight`` over this many
    generator updates (cosine, as GNDMR's λ_m); 0 switches it on at full weight at N0."""
    cold_start_updates: int = 2000
    """N0: generator updates with w ≡ 1 and no reward call (the spec's ``cold_start_gen_steps``)."""
    dynamic_renoise_updates: int = 2000
    """DynaRS period ``K_rs`` of the DM re-noising (as DMDR); 0 = uniform."""
    guidance_jitter: float = 0.5
    """The real CFG scale is drawn from ``U[w − j, w + j]`` each generator update (as DMDR; 0: fixed)."""
    reward_weights: dict[str, float] = field(default_factory=dict)
    """ω_m of each reward, by reward name (every reward needs one): its advantage's weight in
    A = Σ_m ω_m·Â^m (B1), and its term's weight in B2 (``Σ_m ω_m·ĝ^m`` or ``Σ_m ω_m·R_m``)."""

    def __post_init__(self):
        for name, accepted in (
            ("mode", MODES),
            ("normalizer", NORMALIZERS),
            ("reward_signal", REWARD_SIGNALS),
            ("weighting", WEIGHTINGS),
            ("b2_scale", B2_SCALES),
        ):
            check_choice(name, getattr(self, name), accepted)
        for name in ("eta", "temperature", "kappa", "advantage_clip", "b2_weight", "guidance_jitter"):
            check_finite(f"gdmd.{name}", getattr(self, name))
        if self.w_max is not None:
            check_finite("gdmd.w_max", self.w_max)
        for name, weight in self.reward_weights.items():
            check_finite(f"gdmd.reward_weights[{name!r}]", weight)
        if self.eta <= 0:
            raise ValueError(f"eta must be > 0, got {self.eta}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.w_max is not None and self.w_max <= 0:
            raise ValueError(f"w_max must be > 0 or None, got {self.w_max}")
        if self.kappa < 0 or self.advantage_clip <= 0:
            raise ValueError(f"need kappa >= 0 and advantage_clip > 0, got {self.kappa}, {self.advantage_clip}")
        if self.group_size < 2:
            # K = 1 makes every advantage 0, so GDMD would silently reduce to DMD.
            raise ValueError(f"group_size must be >= 2 (advantages are relative to the group), got {self.group_size}")
        if self.group_size < RECOMMENDED_GROUP_SIZE:
            warnings.warn(
                f"GDMD group_size={self.group_size} < {RECOMMENDED_GROUP_SIZE}: docs/methods/gdmd.md recommends K >= 8 "
                "against diversity collapse",
                UserWarning,
                stacklevel=2,
            )
        if self.b2_weight < 0:
            raise ValueError(f"b2_weight must be >= 0, got {self.b2_weight}")
        if self.b2_ramp_updates < 0:
            raise ValueError(f"b2_ramp_updates must be >= 0, got {self.b2_ramp_updates}")
        if self.cold_start_updates < 0 or self.dynamic_renoise_updates < 0:
            raise ValueError(
                f"cold_start_updates and dynamic_renoise_updates must be >= 0, "
                f"got {self.cold_start_updates}, {self.dynamic_renoise_updates}"
            )
        if self.guidance_jitter < 0:
            raise ValueError(f"guidance_jitter must be >= 0, got {self.guidance_jitter}")


class GDMD(GRPOMixin, DMDRParts, RewardedMethod, DMD):
    """DMDR's substrate whose per-sample DMD updates are weighted by group advantages of the
    rewards of the implicit target ``x − η·g`` (B1, docs/methods/gdmd.md), optionally plus their gradient at
    that target (B2).

    Args:
        backbone: model family adapter.
        rewards: the rewards that weight the update. B1 only scores them (no gradient), so they need
            not be differentiable; B2 (``gdmd.b2_weight > 0``) differentiates each, so then they must be.
        gold_rewards: rewards that are scored and logged on generator samples, never optimized.
        gdmd: GDMD settings: target step, weighting, B2, group size, cold start, DynaRS, reward weights
            (ω_m of the advantages, and of the rewards' B2 terms).
        grpo: rollouts and PPO loss of ``gdmd.mode=grpo`` (B3).
        dmd: DMD2 settings (GDMD uses ε_n = 1e-8, TTUR 5, no GAN).
        **kwargs: the arguments every method shares (:class:`DistillationModule`).
    """

    def __init__(
        self,
        backbone: Backbone,
        rewards: list[RewardModel],
        gold_rewards: list[RewardModel] | None = None,
        gdmd: GDMDConfig = GDMDConfig(),
        grpo: GRPOConfig = GRPOConfig(),
        dmd: DMDConfig = DMDConfig(generator_update_ratio=5, norm_eps=1e-8),
        **kwargs,
    ):
        # B3's GRPO rollouts hand the generator one step's input: no gradient through a rollout.
        if dmd.generator_samples == "rollout" and gdmd.mode == "grpo":
            raise ValueError(
                "dmd.generator_samples='rollout' trains on the whole rollout's output: not with gdmd.mode='grpo' "
                "(use mode 'weighted', or generator_samples 'backward_simulation')"
            )
        # DMDR's hooks (cold start, DynaRS levels, CFG jitter) read their settings from `dmdr`.
        dmdr = DMDRConfig(
            cold_start_updates=gdmd.cold_start_updates,
            guidance_jitter=gdmd.guidance_jitter,
            dynamic_renoise_updates=gdmd.dynamic_renoise_updates,
            reward_weights=dict(gdmd.reward_weights),
        )
        self.dmdr = dmdr
        super().__init__(backbone, dmd, **kwargs)
        self.setup_dmdr_parts()
        self.setup_rewards(rewards, gold_rewards, dmdr.reward_weights)
        self.gdmd = gdmd
        self.grpo = grpo
        if gdmd.mode == "grpo":
            self.check_grpo()
        if gdmd.b2_weight > 0:
            # Checked here, not at the first post-cold-start update thousands of steps into a run.
            self.rewards.require_differentiable(
                needed_by=f"GDMD's B2 auxiliary (b2_weight={gdmd.b2_weight})",
                remedy="Drop those rewards, or set b2_weight=0 (B1 alone takes any reward)",
            )

    def check_rewards(self) -> None:
        """B1 only scores the rewards: any reward works, at least one (B2's needs are checked in ``__init__``)."""
        if self.rewards is None:
            raise ValueError("GDMD needs at least one reward in `rewards`")

    def b2_lambda(self) -> float:
        """W3: ``λ_B2(u)`` = 0 before N0, then a cosine ramp to ``b2_weight`` over ``b2_ramp_updates``."""
        return cosine_ramp(
            self.generator_updates, self.dmdr.cold_start_updates, self.gdmd.b2_ramp_updates, self.gdmd.b2_weight
        )

    def unguarded_dm_gradient(self, x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> tuple[Tensor, Tensor]:
        """``(g, nonfinite)`` with the configured normaliser (``group_mean``: GNDM-A1's ``n̄ + ε_n``)."""
        if self.gdmd.normalizer == "group_mean":
            return group_dmd_gradient(
                x, x0_real, x0_fake, self.gdmd.group_size, self.dmd.norm_eps, return_nonfinite=True
            )
        return super().unguarded_dm_gradient(x, x0_real, x0_fake)

    def sample_weights(self, target_scores: dict[str, Tensor], sample_scores: dict[str, Tensor]) -> Tensor:
        """Detached per-sample weights ``w`` ``[B]`` from the rewards of the targets and of the samples.

        Args:
            target_scores: ``r^m`` of ``decode(x̃)`` per reward, ``[B]`` each.
            sample_scores: ``r^m`` of ``decode(x)``; used by ``reward_signal=improvement``.
        """
        config = self.gdmd
        # Group statistics need no cross-rank gather: the group batch sampler keeps groups on one rank.
        if config.reward_signal == "improvement":
            signals = {name: target_scores[name] - sample_scores[name] for name in target_scores}
        else:
            signals = target_scores
        advantages = combine_weighted(normalize_per_reward(signals, config.group_size), config.reward_weights)
        if config.weighting == "softmax":
            return softmax_group_weights(advantages, config.group_size, config.temperature, config.w_max)
        return clipped_advantage_weights(advantages, config.kappa, config.advantage_clip)

    def b2_matched_direction(
        self, x: Tensor, direction: Tensor, prompts: list[str], weight: float, logs: dict
    ) -> Tensor:
        """B2 ``matched``: ``η·g − λ·Σ_m ω_m·ĝ^m``, so that the B1 target is ``sg(x̃ + λ·Σ_m ω_m·ĝ^m)``.

        Args:
            x: ``[B, ...]`` generator samples (only their values are used).
            direction: ``η·g``, detached, so that ``x̃ = x − direction``.
            prompts: one per sample.
            weight: λ_B2(u) (> 0).
            logs: receives the rewards at x̃ and the raw reward-gradient scales ``mean|γ|``.
        """
        target = x.detach() - direction
        matched: dict[str, Tensor] = {}
        lambdas: dict[str, float] = {}
        for term in self.reward_terms():
            scores, gamma = self.reward_gradient(term.reward, target, prompts)
            # Scale matching makes λ·ω_m, not the reward's native gradient scale, set the pull.
            matched[term.name], lambdas[term.name] = scale_matched_gradient(gamma), weight * term.weight
            logs[f"reward/{term.name}/b2"] = scores.mean()
            logs[f"train/b2_gamma_abs/{term.name}"] = gamma.abs().mean()
        return reward_guided_direction(direction, matched, lambdas)

    def b2_raw_loss(
        self, x: Tensor, direction: Tensor, prompts: list[str], weight: float, logs: dict
    ) -> Tensor:
        """B2 ``raw``: ``−λ·mean_i Σ_m ω_m·train_scale_m·R_m(decode(x_i − sg(η·g_i)))``, grad through x_i.

        The rewards see the target's values while the gradient reaches x_i unchanged
        (``∂(x − sg(η·g))/∂x = I``): DMDR's ReFL moved to where DMD is about to move the sample.
        """
        scores = self.rewards.score_all(self.backbone.decode(x - direction.detach()), prompts, with_grad=True)
        loss = -weight * self.rewards.weighted_sum(scores).mean()
        for name in self.rewards.names:
            logs[f"reward/{name}/b2"] = scores[name].detach().mean()
        logs["train/loss_b2"] = loss.detach()
        return loss

    def in_grpo_phase(self) -> bool:
        """B3 runs GRPO after the cold start; during it the update is B1 with w ≡ 1 (pure DMD)."""
        return self.gdmd.mode == "grpo" and not self.in_cold_start()

    def training_inputs(self, batch: dict, update_generator: bool) -> Iteration:
        """B3 after the cold start: a generator update rolls the student out with CPS (``GRPOMixin``)."""
        if update_generator and self.in_grpo_phase():
            return self.policy_inputs(batch)
        return super().training_inputs(batch, update_generator)

    def grpo_generator_loss(self, x0: Tensor, state: Iteration) -> tuple[Tensor, dict]:
        """B3: the PPO loss of the rollout ``state.trajectory``, with advantage ``Σ_m ω_m·Â^m`` of
        ``R_m(decode(x̃))``, ``x̃ = x − η·g`` at each final sample ``x`` (no gradient through the rewards
        or g)."""
        prompts = state.prompts
        x0_real, x0_fake, _ = self.dm_estimates(x0.detach(), state.cond, state.uncond)
        gradient, replaced = self.dm_gradient(x0.detach(), x0_real, x0_fake)
        with torch.no_grad():
            scores = self.rewards.score_all(self.backbone.decode(x0.detach() - self.gdmd.eta * gradient), prompts)
        advantages = combine_weighted(
            {name: self.policy_advantages(r, self.gdmd.group_size) for name, r in scores.items()}, self.gdmd.reward_weights
        )
        loss, logs = self.policy_loss(state.trajectory, state.cond, advantages)
        logs.update({f"reward/{name}/target": r.mean() for name, r in scores.items()})
        logs.update({
            "train/dmd_grad_abs": gradient.abs().mean(),
            "train/dmd_grad_nonfinite": replaced,
            **self.gold_reward_logs(x0, prompts),
        })
        return loss, logs

    def generator_loss(self, x0: Tensor, state: Iteration) -> tuple[Tensor, dict]:
        """``L_B1 = (1/B)·Σ_i w_i·½·mean_pix((x_i − sg(x_i − η·g_i))²)`` (+ B2); w ≡ 1 during the cold start."""
        prompts = state.prompts
        check_grouped_prompts(prompts, self.gdmd.group_size)
        if state.trajectory is not None:
            return self.grpo_generator_loss(x0, state)
        loss_dm, gradient, replaced = self.distribution_matching_loss(x0, state.cond, state.uncond)
        direction = self.gdmd.eta * gradient
        logs = {
            "train/loss_dm": loss_dm.detach(),
            "train/dmd_grad_abs": gradient.abs().mean(),
            "train/dmd_grad_nonfinite": replaced,
        }
        sample_images = None
        if self.in_cold_start():
            # No reward model runs during the cold start (docs/methods/gdmd.md).
            weights = torch.ones(len(x0), device=x0.device)
        else:
            with torch.no_grad():
                target_images = self.backbone.decode(x0.detach() - direction)
                sample_images = self.backbone.decode(x0.detach())
                target_scores = self.rewards.score_all(target_images, prompts)
                sample_scores = self.rewards.score_all(sample_images, prompts)
            weights = self.sample_weights(target_scores, sample_scores)
            for name in self.rewards.names:
                logs[f"reward/{name}/target"] = target_scores[name].mean()
                logs[f"reward/{name}/sample"] = sample_scores[name].mean()
        b2_loss = None
        if self.gdmd.b2_weight > 0:
            b2_weight = self.b2_lambda()
            logs["train/lambda_b2"] = b2_weight
            # λ = 0 (cold start, ramp start) skips B2 entirely: no reward call, and B1 bit for bit.
            if b2_weight != 0:
                if self.gdmd.b2_scale == "matched":
                    direction = self.b2_matched_direction(x0, direction, prompts, b2_weight, logs)
                else:
                    b2_loss = self.b2_raw_loss(x0, direction, prompts, b2_weight, logs)
        loss = weighted_dmd_loss(x0, direction, weights)
        if b2_loss is not None:
            loss = loss + b2_loss
        logs.update({
            "train/loss_gdmd": loss.detach(),
            "train/gdmd_weight_mean": weights.mean(),
            "train/gdmd_weight_std": weights.std(unbiased=False),
            "train/gdmd_weight_min": weights.min(),
            "train/gdmd_weight_max": weights.max(),
        })
        logs.update(self.gold_reward_logs(x0, prompts, sample_images))
        return loss, logs
