"""GNDM / GNDMR (``gndm.md``): distribution matching read as a reward R_dm, with RL group tools.

Batches are K-repeated (K consecutive samples per prompt). At generator update ``u``::

    g_i = d_i / (n̄_group + ε_n)                          A1 (or per-sample n_i: DMD, A2)
    h_i = g_i − Σ_{m ∈ W2} λ_m(u)·ĝ^m_i                  W2 differentiable rewards, W3 schedule
    w_i = (1 + κ·clip(Σ_m ω_m·Â^m_i, −c, c))₊            R_dm advantage (adv_weighting) + W1 rewards
    L   = (1/B)·Σ_i w_i·½·mean_pix((x_i − sg(x_i − h_i))²)

Without rewards this is GNDM; with them, GNDMR. The substrate is DMDR's
(DynaRS, CFG jitter, ε_n = 1e-8, TTUR 5, cold start), and ``dmdr.cold_start_updates``
is the N0 of every reward term: before it the loss is pure GNDM. Importance
sampling (§2.5) and ``mode=grpo`` (A3) are not implemented.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rdm_lightning.backbones.base import Backbone, Conditioning
from rdm_lightning.core.advantages import (
    clipped_advantage_weights,
    combine_weighted,
    group_advantages,
    reward_guided_direction,
    scale_matched_gradient,
)
from rdm_lightning.core.group_dmd import (
    center_gradient,
    elbo_diff_scalar,
    group_dmd_gradient,
    mismatch_scalar,
    weighted_dmd_loss,
)
from rdm_lightning.core.schedules_training import cosine_ramp, hinge_reward_loss
from rdm_lightning.data.groups import check_grouped_prompts
from rdm_lightning.methods.base import StudentConfig, TeacherSamplingConfig
from rdm_lightning.methods.dmd import DMDConfig
from rdm_lightning.methods.dmdr import DMDR, DMDRConfig
from rdm_lightning.methods.optim import OptimizerConfig
from rdm_lightning.rewards.base import RewardModel, RewardTerm

NORMALIZERS = ("group_mean", "per_sample")
ADV_WEIGHTINGS = ("none", "clipped")
RDM_SCALARS = ("mismatch", "elbo_diff")
REWARD_COMBINATIONS = ("auto", "refl_sum", "group_adv")
DM_REWARD = "dm"
"""Name of R_dm among the advantages ``Â^m`` (weight ω_dm = 1)."""


@dataclass
class GNDMConfig:
    """GNDM / GNDMR switches (``gndm.md`` §2.7; defaults: the library's)."""

    group_size: int = 4
    """K, samples per prompt; the batch must be K-repeated (the data module's ``group_size``)."""
    normalizer: Literal["group_mean", "per_sample"] = "group_mean"
    """DM normaliser: ``group_mean`` (A1, n̄ of the group) or ``per_sample`` (DMD's n_i; with ``clipped``: A2)."""
    adv_weighting: Literal["none", "clipped"] = "none"
    """``clipped``: weight each sample by ``(1 + κ·clip(Â_dm, −c, c))₊`` from the R_dm scalar's group advantage."""
    adv_kappa: float = 0.5
    """κ of the clipped weights (R_dm advantage and W1 rewards)."""
    adv_clip: float = 2.0
    """c of the clipped weights."""
    rdm_scalar: Literal["mismatch", "elbo_diff"] = "mismatch"
    """Per-sample R_dm estimate: ``mismatch`` (−mean_pix g²) or ``elbo_diff`` (w(σ) ≡ 1)."""
    rdm_draws: int = 2
    """J draws of (σ, ε) averaged by the R_dm scalar (the first reuses the DM draw); only
    drawn when ``adv_weighting=clipped``, else the logged scalar uses the DM draw alone."""
    center_gradient: bool = False
    """A1′: subtract the group mean of g (not recommended: it removes the shared push)."""
    reward_combination: Literal["auto", "refl_sum", "group_adv"] = "auto"
    """``auto``: W2 for differentiable rewards, W1 for the rest; ``refl_sum``: DMDR's hinge
    ``Σ w_m·mean(ReLU(hinge − r_m))`` added to the GNDM loss; ``group_adv``: W1 for every reward."""
    lambda_ramp_updates: int = 500
    """W3 N_ramp: λ_m rises from 0 at N0 = ``dmdr.cold_start_updates`` to its maximum
    ``dmdr.reward_weights[m]`` over this many generator updates (cosine)."""

    def __post_init__(self):
        for name, value, accepted in (
            ("normalizer", self.normalizer, NORMALIZERS),
            ("adv_weighting", self.adv_weighting, ADV_WEIGHTINGS),
            ("rdm_scalar", self.rdm_scalar, RDM_SCALARS),
            ("reward_combination", self.reward_combination, REWARD_COMBINATIONS),
        ):
            if value not in accepted:
                raise ValueError(f"{name} must be one of {accepted}, got {value!r}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.rdm_draws < 1:
            raise ValueError(f"rdm_draws must be >= 1, got {self.rdm_draws}")
        if self.adv_kappa < 0 or self.adv_clip <= 0:
            raise ValueError(f"need adv_kappa >= 0 and adv_clip > 0, got {self.adv_kappa}, {self.adv_clip}")
        if self.lambda_ramp_updates < 0:
            raise ValueError(f"lambda_ramp_updates must be >= 0, got {self.lambda_ramp_updates}")


class GNDM(DMDR):
    """GNDM (no rewards) or GNDMR (rewards): group-normalised DMD with R_dm advantages and reward directions.

    Args:
        backbone: model family adapter.
        rewards: optimized rewards; empty for pure GNDM. Under ``auto`` differentiable ones
            steer the direction (W2) and the others the weights (W1); ``group_adv`` puts all
            in the weights; ``refl_sum`` needs differentiable ones (DMDR's hinge).
        gold_rewards: rewards scored and logged on generator samples, never optimized.
        gndm: GNDM / GNDMR switches.
        dmdr: DMDR substrate: cold start (N0 of every reward term), hinge (``refl_sum``), CFG
            jitter, DynaRS, and ``reward_weights``: per reward, ω_m (W1), λ_m^max (W2) or w_m (hinge).
        dmd: DMD2 settings (ε_n = 1e-8, TTUR 5, no GAN).
        generator_optimizer: AdamW of the generator.
        fake_score_optimizer: AdamW of the fake score.
        student: the generator's sampler.
        teacher_sampling: the teacher's default sampler.
        teacher_dtype: dtype of the frozen teacher.
        seed: seed of the module's random stream.
        max_generator_updates: stop fit after this many generator updates.
    """

    def __init__(
        self,
        backbone: Backbone,
        rewards: list[RewardModel] | None = None,
        gold_rewards: list[RewardModel] | None = None,
        gndm: GNDMConfig = GNDMConfig(),
        dmdr: DMDRConfig = DMDRConfig(),
        dmd: DMDConfig = DMDConfig(generator_update_ratio=5, norm_eps=1e-8),
        generator_optimizer: OptimizerConfig = OptimizerConfig(),
        fake_score_optimizer: OptimizerConfig = OptimizerConfig(),
        student: StudentConfig = StudentConfig(),
        teacher_sampling: TeacherSamplingConfig = TeacherSamplingConfig(),
        teacher_dtype: str = "float32",
        seed: int = 0,
        max_generator_updates: int | None = None,
    ):
        super().__init__(
            backbone, rewards, gold_rewards, dmdr, dmd, generator_optimizer, fake_score_optimizer, student,
            teacher_sampling, teacher_dtype, seed, max_generator_updates,
        )
        self.gndm = gndm
        if self.rewards is not None and gndm.reward_combination == "refl_sum":
            self.rewards.require_differentiable()

    def check_rewards(self) -> None:
        """GNDM needs no reward (pure GNDM) and takes non-differentiable ones (W1); ``dm`` is R_dm's name."""
        if DM_REWARD in [term.name for term in self.reward_terms()]:
            raise ValueError(f"reward name {DM_REWARD!r} is reserved for R_dm; rename that reward")

    def uses_direction(self, term: RewardTerm) -> bool:
        """Whether reward ``term`` steers the direction h (W2) rather than the weights (W1) or the hinge."""
        return self.gndm.reward_combination == "auto" and term.reward.differentiable

    def reward_lambda(self, term: RewardTerm) -> float:
        """W3: ``λ_m(u)`` = 0 before N0, then a cosine ramp to ``λ_m^max`` over N_ramp updates."""
        return cosine_ramp(
            self.generator_updates, self.dmdr.cold_start_updates, self.gndm.lambda_ramp_updates, term.weight
        )

    # ---- the DM direction and R_dm ----------------------------------------------------------
    def dm_gradient(self, x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
        """g of one draw under the configured normaliser (A1 group mean, or DMD's per sample)."""
        if self.gndm.normalizer == "group_mean":
            return group_dmd_gradient(x, x0_real, x0_fake, self.gndm.group_size, self.dmd.norm_eps)
        return super().dm_gradient(x, x0_real, x0_fake)

    def dm_direction(self, x: Tensor, cond: Conditioning, uncond: Conditioning) -> tuple[Tensor, Tensor]:
        """``(g, r)``: the DM direction of the first draw and the per-sample R_dm scalar ``[B]``.

        r averages ``rdm_draws`` draws only when it weights the loss; for logging alone
        the first draw is enough and saves the extra teacher and critic passes.
        """
        draws = self.gndm.rdm_draws if self.gndm.adv_weighting == "clipped" else 1
        x0_real, x0_fake, scale = self.dm_estimates(x, cond, uncond)
        reals, fakes = [x0_real], [x0_fake]
        for _ in range(draws - 1):
            x0_real, x0_fake, _ = self.dm_estimates(x, cond, uncond, scale)
            reals.append(x0_real)
            fakes.append(x0_fake)
        gradients = [self.dm_gradient(x, real, fake) for real, fake in zip(reals, fakes)]
        if self.gndm.rdm_scalar == "mismatch":
            rdm = mismatch_scalar(gradients)
        else:
            rdm = elbo_diff_scalar(x, reals, fakes)
        gradient = gradients[0]
        if self.gndm.center_gradient:
            gradient = center_gradient(gradient, self.gndm.group_size)
        return gradient, rdm

    # ---- the generator loss -----------------------------------------------------------------
    def reward_gradient(self, term: RewardTerm, x: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """W2: the scores ``R_m(decode(y), c_i)`` and ``γ_i = ∇_y R_m`` at a detached copy ``y = sg(x)``."""
        y = x.detach().requires_grad_(True)
        with torch.enable_grad():
            scores = term.reward.score(self.backbone.decode(y), prompts, with_grad=True)
            (gamma,) = torch.autograd.grad(scores.sum(), y)
        return scores.detach(), gamma

    def generator_loss(self, x0: Tensor, cond: Conditioning, uncond: Conditioning, batch: dict) -> tuple[Tensor, dict]:
        """``(1/B)·Σ_i w_i·ℓ_i(h_i)`` (+ DMDR's hinge under ``refl_sum``), see the module docstring."""
        prompts = list(batch["prompts"])
        group_size = self.gndm.group_size
        check_grouped_prompts(prompts, group_size)
        gradient, rdm = self.dm_direction(x0.detach(), cond, uncond)
        logs = {"train/rdm_scalar": rdm.mean(), "train/dmd_grad_abs": gradient.abs().mean()}
        # Â^m and ω_m of every term of the weights; R_dm's own when adv_weighting is on.
        advantages: dict[str, Tensor] = {}
        omegas: dict[str, float] = {}
        if self.gndm.adv_weighting == "clipped":
            advantages[DM_REWARD], omegas[DM_REWARD] = group_advantages(rdm, group_size), 1.0
        # ĝ^m and λ_m(u) of every W2 term with λ ≠ 0 (so that λ = 0 leaves g bit-identical).
        matched: dict[str, Tensor] = {}
        lambdas: dict[str, float] = {}
        hinge_terms: list[RewardTerm] = []
        if not self.in_cold_start():
            images = self.backbone.decode(x0.detach())
            for term in self.reward_terms():
                if self.gndm.reward_combination == "refl_sum":
                    hinge_terms.append(term)
                elif self.uses_direction(term):
                    weight = self.reward_lambda(term)
                    logs[f"train/lambda/{term.name}"] = weight
                    if weight != 0:
                        scores, gamma = self.reward_gradient(term, x0, prompts)
                        matched[term.name], lambdas[term.name] = scale_matched_gradient(gamma), weight
                        logs[f"reward/{term.name}"] = scores.mean()
                else:
                    scores = term.reward.score(images, prompts)
                    advantages[term.name], omegas[term.name] = group_advantages(scores, group_size), term.weight
                    logs[f"reward/{term.name}"] = scores.mean()
        direction = reward_guided_direction(gradient, matched, lambdas)
        weights = (
            clipped_advantage_weights(combine_weighted(advantages, omegas), self.gndm.adv_kappa, self.gndm.adv_clip)
            if advantages
            else None
        )
        loss = weighted_dmd_loss(x0, direction, weights)
        logs["train/loss_dm"] = loss.detach()
        if weights is not None:
            logs.update({"train/weight_mean": weights.mean(), "train/weight_min": weights.min(),
                         "train/weight_max": weights.max()})
        if hinge_terms:
            images = self.backbone.decode(x0)
            for term in hinge_terms:
                scores = term.reward.score(images, prompts, with_grad=True)
                loss = loss + hinge_reward_loss(scores, term.weight, self.dmdr.reward_hinge)
                logs[f"reward/{term.name}"] = scores.detach().mean()
        if self.gold_rewards:
            images = self.backbone.decode(x0.detach())
            for reward in self.gold_rewards:
                logs[f"reward/gold/{reward.name}"] = reward.score(images, prompts).mean()
        return loss, logs
