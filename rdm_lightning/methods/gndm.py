"""GNDM / GNDMR (``docs/methods/gndm.md``): distribution matching read as a reward R_dm, with RL group tools.

Batches are K-repeated (K consecutive samples per prompt). At generator update ``u``::

    g_i = d_i / (n̄_group + ε_n)                          A1 (or per-sample n_i: DMD, A2)
    h_i = g_i − Σ_{m ∈ W2} λ_m(u)·ĝ^m_i                  W2 differentiable rewards, W3 schedule
    w_i = (1 + κ·clip(Σ_m ω_m·Â^m_i, −c, c))₊            R_dm advantage (adv_weighting) + W1 rewards
    L   = (1/B)·Σ_i w_i·½·mean_pix((x_i − sg(x_i − h_i))²)

Without rewards this is GNDM; with them, GNDMR. The substrate is DMDR's
(DynaRS, CFG jitter, ε_n = 1e-8, TTUR 5, cold start), and ``dmdr.cold_start_updates``
is the N0 of every reward term: before it the loss is pure GNDM.

Importance sampling (``importance_sampling.enabled``): backward simulation runs
its k prefix steps with a stochastic rule (CPS by default) and records log π_old; each
such rollout then serves ``reuses`` generator updates. A reuse recomputes x̂0 at the
stored x_{σ_k} and weights every sample's loss by the detached, clipped prefix ratio
``ρ_i = clip(exp(Σ_{j<k} log π_θ − log π_old), 1 ± ε_IS)`` (ρ = 1 on the first use).
The critic keeps training on fresh rollouts (``target=generator``), or on the reused
ones weighted by ρ (``target=fake_score``).

``mode=grpo`` (A3, for ablation): a generator update rolls the student out with CPS steps and
steps on the PPO loss (``methods/grpo.py``) with R_dm (and W1 rewards) as group advantages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rdm_lightning.backbones.base import Backbone, Conditioning
from rdm_lightning.core.advantages import (
    check_group_size,
    clipped_advantage_weights,
    clipped_importance_ratio,
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
from rdm_lightning.core.schedules_training import cosine_ramp
from rdm_lightning.core.stochastic import Trajectory, step_log_prob, stochastic_sample
from rdm_lightning.data.groups import check_grouped_prompts
from rdm_lightning.methods.base import check_choice, check_finite
from rdm_lightning.methods.dmd import DMD, DMDConfig, Iteration
from rdm_lightning.methods.dmdr import DMDRConfig, DMDRParts
from rdm_lightning.methods.grpo import GRPOConfig, GRPOMixin, flow_velocity, require_flow
from rdm_lightning.methods.rewarded import RewardedMethod
from rdm_lightning.rewards.base import RewardModel, RewardTerm

NORMALIZERS = ("group_mean", "per_sample")
ADV_WEIGHTINGS = ("none", "clipped")
RDM_SCALARS = ("mismatch", "elbo_diff")
REWARD_COMBINATIONS = ("auto", "refl_sum", "group_adv")
MODES = ("pathwise", "grpo")
IS_RULES = ("cps", "flowgrpo_sde")
IS_LOG_PROBS = ("exact_mean", "exact_sum")
IS_TARGETS = ("generator", "fake_score")
DM_REWARD = "dm"
"""Name of R_dm among the advantages ``Â^m`` (weight ω_dm = 1)."""


@dataclass
class GNDMConfig:
    """GNDM / GNDMR switches (``docs/methods/gndm.md``; defaults: the library's)."""

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
    group_level: bool = True
    """Draw the DM re-noising level once per group (the library's reading of A1): the group mean
    n̄ then compares samples at one σ, so their relative magnitudes measure the distance to the
    teacher, not the σ each drew. ``False``: one level per sample, as DMD."""
    mode: Literal["pathwise", "grpo"] = "pathwise"
    """``pathwise``: DMD's pathwise update (A1/A2); ``grpo`` (A3, for ablation): the R_dm scalar
    (set ``rdm_scalar: elbo_diff``, the spec's) plus W1 rewards as GRPO advantages on CPS rollouts."""
    lambda_path: float = 0.0
    """A3: weight of the pathwise GNDM loss added to the GRPO loss (0: none)."""
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
            ("mode", self.mode, MODES),
        ):
            check_choice(name, value, accepted)
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.rdm_draws < 1:
            raise ValueError(f"rdm_draws must be >= 1, got {self.rdm_draws}")
        for name in ("adv_kappa", "adv_clip", "lambda_path"):
            check_finite(f"gndm.{name}", getattr(self, name))
        if self.adv_kappa < 0 or self.adv_clip <= 0:
            raise ValueError(f"need adv_kappa >= 0 and adv_clip > 0, got {self.adv_kappa}, {self.adv_clip}")
        if self.lambda_path < 0:
            raise ValueError(f"lambda_path must be >= 0, got {self.lambda_path}")
        if self.lambda_ramp_updates < 0:
            raise ValueError(f"lambda_ramp_updates must be >= 0, got {self.lambda_ramp_updates}")


@dataclass
class ImportanceSamplingConfig:
    """Trajectory reuse with clipped prefix importance ratios (``docs/methods/gndm.md``,
    "Importance sampling"); off by default."""

    enabled: bool = False
    """Roll the backward-simulation prefix out stochastically and reuse each rollout."""
    reuses: int = 2
    """n_reuse: generator updates served by one stored rollout (2–4)."""
    rule: Literal["cps", "flowgrpo_sde"] = "cps"
    """Stochastic rule of the prefix steps: CPS (``eta``) or the Flow-GRPO SDE (``noise_level``)."""
    eta: float = 0.9
    """η of the CPS prefix steps."""
    noise_level: float = 0.7
    """a of the Flow-GRPO SDE prefix steps."""
    log_prob: Literal["exact_mean", "exact_sum"] = "exact_mean"
    """``exact_mean``: Gaussian log-densities averaged over dimensions, one ratio over the prefix;
    ``exact_sum``: summed over dimensions, with per-step clipped ratios multiplied."""
    clip_range: float | None = None
    """ε_IS; ``None`` takes 1e-3 for ``exact_mean`` and 0.2 for ``exact_sum``."""
    target: Literal["generator", "fake_score"] = "generator"
    """``generator``: the critic trains on fresh rollouts only; ``fake_score``: on reuse
    iterations it trains on the reused samples too, weighted by ρ."""

    def __post_init__(self):
        for name, value, accepted in (
            ("rule", self.rule, IS_RULES), ("log_prob", self.log_prob, IS_LOG_PROBS), ("target", self.target, IS_TARGETS),
        ):
            check_choice(f"importance_sampling.{name}", value, accepted)
        if self.reuses < 1:
            raise ValueError(f"importance_sampling.reuses must be >= 1, got {self.reuses}")
        check_finite("importance_sampling.noise_level", self.noise_level)
        if not 0 < self.eta <= 1 or self.noise_level <= 0:
            raise ValueError(f"need 0 < eta <= 1 and noise_level > 0, got eta={self.eta}, noise_level={self.noise_level}")
        if self.clip_range is not None and not 0 <= self.clip_range < 1:
            raise ValueError(f"importance_sampling.clip_range must be in [0, 1), got {self.clip_range}")

    @property
    def epsilon(self) -> float:
        """ε_IS: the configured clip range, or the default of the log-prob form."""
        if self.clip_range is not None:
            return self.clip_range
        return 1e-3 if self.log_prob == "exact_mean" else 0.2

    @property
    def rule_kwargs(self) -> dict[str, float]:
        return {"eta": self.eta} if self.rule == "cps" else {"noise_level": self.noise_level}


@dataclass
class StoredRollout:
    """A stochastic prefix kept for reuse: its prompts, trajectory (x_{σ_0..σ_k}, log π_old) and uses so far."""

    prompts: list[str]
    trajectory: Trajectory
    uses: int = 1

    def state(self) -> dict:
        """Plain tensors and lists for the checkpoint."""
        t = self.trajectory
        return {"prompts": self.prompts, "latents": t.latents, "sigmas": t.sigmas, "stds": t.stds, "log_probs": t.log_probs,
                "stochastic": t.stochastic, "rule_kwargs": t.rule_kwargs, "uses": self.uses}

    @classmethod
    def from_state(cls, state: dict, config: ImportanceSamplingConfig) -> "StoredRollout":
        trajectory = Trajectory(
            latents=list(state["latents"]), sigmas=state["sigmas"], velocities=[], x0_preds=[], means=[],
            stds=list(state["stds"]), log_probs=list(state["log_probs"]), stochastic=list(state["stochastic"]),
            rule=config.rule, rule_kwargs=dict(state["rule_kwargs"]), log_prob=config.log_prob,
        )
        return cls(list(state["prompts"]), trajectory, state["uses"])


@dataclass(frozen=True, kw_only=True)
class ReuseIteration(Iteration):
    """A generator update that reuses a stored rollout (importance sampling): ``cond``, ``x_in`` and
    ``level`` are the stored rollout's and ``sample_weights`` its ratios ρ; ``batch`` is still the
    loader's, whose fresh rollout the critic trains on with ``target=generator``."""

    reused: StoredRollout
    """The stored rollout the generator trains on."""

    @property
    def prompts(self) -> list[str]:
        """The prompts of the generator's samples: the stored rollout's."""
        return self.reused.prompts


class GNDM(GRPOMixin, DMDRParts, RewardedMethod, DMD):
    """GNDM (no rewards) or GNDMR (rewards): group-normalised DMD with R_dm advantages and reward directions.

    Args:
        backbone: model family adapter.
        rewards: optimized rewards; empty for pure GNDM. Under ``auto`` differentiable ones
            steer the direction (W2) and the others the weights (W1); ``group_adv`` puts all
            in the weights; ``refl_sum`` needs differentiable ones (DMDR's hinge).
        gold_rewards: rewards scored and logged on generator samples, never optimized.
        gndm: GNDM / GNDMR switches.
        importance_sampling: trajectory reuse with clipped prefix ratios; off by default.
        grpo: rollouts and PPO loss of ``gndm.mode=grpo`` (A3).
        dmdr: DMDR substrate: cold start (N0 of every reward term), hinge (``refl_sum``), CFG
            jitter, DynaRS, and ``reward_weights``: per reward, ω_m (W1), λ_m^max (W2) or w_m (hinge).
        dmd: DMD2 settings (ε_n = 1e-8, TTUR 5, no GAN).
        **kwargs: the arguments every method shares (:class:`DistillationModule`).
    """

    def __init__(
        self,
        backbone: Backbone,
        rewards: list[RewardModel] | None = None,
        gold_rewards: list[RewardModel] | None = None,
        gndm: GNDMConfig = GNDMConfig(),
        importance_sampling: ImportanceSamplingConfig = ImportanceSamplingConfig(),
        grpo: GRPOConfig = GRPOConfig(),
        dmdr: DMDRConfig = DMDRConfig(),
        dmd: DMDConfig = DMDConfig(generator_update_ratio=5, norm_eps=1e-8),
        **kwargs,
    ):
        # GRPO rollouts and IS prefixes hand the generator one step's input: no gradient through a rollout.
        if dmd.generator_samples == "rollout" and (gndm.mode == "grpo" or importance_sampling.enabled):
            raise ValueError(
                "dmd.generator_samples='rollout' trains the pathwise DM loss on the whole rollout: not with "
                f"gndm.mode={gndm.mode!r} or importance_sampling.enabled={importance_sampling.enabled} "
                "(use mode 'pathwise' without importance sampling, or generator_samples 'backward_simulation')"
            )
        self.dmdr = dmdr
        super().__init__(backbone, dmd, **kwargs)
        self.setup_dmdr_parts()
        self.setup_rewards(rewards, gold_rewards, dmdr.reward_weights)
        self.gndm = gndm
        if self.rewards is not None and gndm.reward_combination == "refl_sum":
            self.rewards.require_differentiable()
        self.importance_sampling = importance_sampling
        self.grpo = grpo
        if gndm.mode == "grpo":
            self.check_grpo()
        if importance_sampling.enabled:
            require_flow(backbone, "importance sampling")
            if gndm.mode == "grpo":
                raise ValueError("importance sampling reuses pathwise backward-simulation prefixes: not with mode='grpo'")
            if dmd.generator_samples != "backward_simulation":
                raise ValueError(
                    "importance sampling reuses backward-simulation prefixes: set dmd.generator_samples: "
                    f"backward_simulation (got {dmd.generator_samples!r})"
                )
        self.stored_rollout: StoredRollout | None = None
        self.rollouts = {"generator": 0, "fake_score": 0}
        """Fresh backward-simulation rollouts so far, by the role whose update drew them."""

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
    def dm_levels(self, n: int) -> Tensor:
        """DynaRS levels, one per group under ``group_level`` (repeated over its K samples)."""
        if not self.gndm.group_level:
            return super().dm_levels(n)
        check_group_size(n, self.gndm.group_size)
        return super().dm_levels(n // self.gndm.group_size).repeat_interleave(self.gndm.group_size)

    def unguarded_dm_gradient(self, x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> tuple[Tensor, Tensor]:
        """``(g, nonfinite)`` of one draw under the configured normaliser (A1 group mean, or DMD's per sample)."""
        if self.gndm.normalizer == "group_mean":
            return group_dmd_gradient(
                x, x0_real, x0_fake, self.gndm.group_size, self.dmd.norm_eps, return_nonfinite=True
            )
        return super().unguarded_dm_gradient(x, x0_real, x0_fake)

    def dm_direction(self, x: Tensor, cond: Conditioning, uncond: Conditioning) -> tuple[Tensor, Tensor, Tensor]:
        """``(g, r, replaced)``: the DM direction of the first draw, the per-sample R_dm scalar ``[B]``
        and the number of non-finite entries replaced over every draw (each draw is guarded).

        r averages ``rdm_draws`` draws only when it weights the loss or is the GRPO reward; for logging alone
        the first draw is enough and saves the extra teacher and critic passes.
        """
        draws = self.gndm.rdm_draws if self.gndm.adv_weighting == "clipped" or self.gndm.mode == "grpo" else 1
        x0_real, x0_fake, scale = self.dm_estimates(x, cond, uncond)
        reals, fakes = [x0_real], [x0_fake]
        for _ in range(draws - 1):
            x0_real, x0_fake, _ = self.dm_estimates(x, cond, uncond, scale)
            reals.append(x0_real)
            fakes.append(x0_fake)
        gradients, replaced = zip(*(self.dm_gradient(x, real, fake) for real, fake in zip(reals, fakes)))
        if self.gndm.rdm_scalar == "mismatch":
            rdm = mismatch_scalar(gradients)
        else:
            rdm = elbo_diff_scalar(x, reals, fakes)
        gradient = gradients[0]
        if self.gndm.center_gradient:
            gradient = center_gradient(gradient, self.gndm.group_size)
        return gradient, rdm, sum(replaced)

    # ---- the generator loss -----------------------------------------------------------------
    def generator_loss(self, x0: Tensor, state: Iteration) -> tuple[Tensor, dict]:
        """``(1/B)·Σ_i w_i·ℓ_i(h_i)`` (+ DMDR's hinge under ``refl_sum``), see the module docstring;
        under importance sampling ``w_i`` includes ``state.sample_weights`` (ρ_i)."""
        prompts = list(state.prompts)
        group_size = self.gndm.group_size
        check_grouped_prompts(prompts, group_size)
        if self.gndm.mode == "grpo":
            return self.grpo_generator_loss(x0, state)
        gradient, rdm, replaced = self.dm_direction(x0.detach(), state.cond, state.uncond)
        logs = {
            "train/rdm_scalar": rdm.mean(),
            "train/dmd_grad_abs": gradient.abs().mean(),
            "train/dmd_grad_nonfinite": replaced,
        }
        # Â^m and ω_m of every term of the weights; R_dm's own when adv_weighting is on.
        advantages: dict[str, Tensor] = {}
        omegas: dict[str, float] = {}
        if self.gndm.adv_weighting == "clipped":
            advantages[DM_REWARD], omegas[DM_REWARD] = group_advantages(rdm, group_size), 1.0
        # ĝ^m and λ_m(u) of every W2 term with λ ≠ 0 (so that λ = 0 leaves g bit-identical).
        matched: dict[str, Tensor] = {}
        lambdas: dict[str, float] = {}
        hinge_terms: list[RewardTerm] = []
        images = None
        if not self.in_cold_start():
            images = self.backbone.decode(x0.detach())
            for term in self.reward_terms():
                if self.gndm.reward_combination == "refl_sum":
                    hinge_terms.append(term)
                elif self.uses_direction(term):
                    weight = self.reward_lambda(term)
                    logs[f"train/lambda/{term.name}"] = weight
                    if weight != 0:
                        scores, gamma = self.reward_gradient(term.reward, x0, prompts)
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
        ratios = state.sample_weights
        if ratios is not None:
            weights = ratios if weights is None else weights * ratios
            logs.update({"train/is_ratio_min": ratios.min(), "train/is_ratio_max": ratios.max()})
        loss = weighted_dmd_loss(x0, direction, weights)
        logs["train/loss_dm"] = loss.detach()
        if weights is not None:
            logs.update({"train/weight_mean": weights.mean(), "train/weight_min": weights.min(),
                         "train/weight_max": weights.max()})
        if hinge_terms:
            differentiable_images = self.backbone.decode(x0)
            for term in hinge_terms:
                scores = term.reward.score(differentiable_images, prompts, with_grad=True)
                loss = loss + self.reward_loss(scores, term.weight, self.dmdr.reward_hinge)
                logs[f"reward/{term.name}"] = scores.detach().mean()
        logs.update(self.gold_reward_logs(x0, prompts, images))
        return loss, logs

    def grpo_generator_loss(self, x0: Tensor, state: Iteration) -> tuple[Tensor, dict]:
        """A3: GRPO on the rollout ``state.trajectory`` with advantage ``Σ_m ω_m·Â^m`` of R_dm (ω = 1)
        and, after the cold start, every reward (W1), plus ``lambda_path`` × the pathwise GNDM loss.

        ``x0`` is the generator's prediction at the rollout's last input: its final sample, with grad.
        """
        prompts = list(state.prompts)
        group_size = self.gndm.group_size
        gradient, rdm, replaced = self.dm_direction(x0.detach(), state.cond, state.uncond)
        scores, omegas = {DM_REWARD: rdm}, {DM_REWARD: 1.0}
        images = None
        if not self.in_cold_start() and self.rewards is not None:
            images = self.backbone.decode(x0.detach())
            scores.update(self.rewards.score_all(images, prompts))
            omegas.update({term.name: term.weight for term in self.reward_terms()})
        advantages = combine_weighted({name: self.policy_advantages(r, group_size) for name, r in scores.items()}, omegas)
        loss, logs = self.policy_loss(state.trajectory, state.cond, advantages)
        logs.update({
            "train/rdm_scalar": rdm.mean(),
            "train/dmd_grad_abs": gradient.abs().mean(),
            "train/dmd_grad_nonfinite": replaced,
        })
        logs.update({f"reward/{name}": r.mean() for name, r in scores.items() if name != DM_REWARD})
        if self.gndm.lambda_path > 0:
            loss_path = weighted_dmd_loss(x0, gradient)
            loss = loss + self.gndm.lambda_path * loss_path
            logs["train/loss_dm"] = loss_path.detach()
        logs.update(self.gold_reward_logs(x0, prompts, images))
        return loss, logs

    # ---- importance sampling (docs/methods/gndm.md, "Importance sampling") ------------------
    @torch.no_grad()
    def stochastic_prefix(self, cond: Conditioning, n: int, role: str) -> Trajectory:
        """Backward simulation with stochastic steps: k ~ U{0..N−1} (same on every rank), then k
        steps of the IS rule from fresh noise, recording x_{σ_0..σ_k} and log π_old."""
        levels = self.student_levels()
        step = self.shared_randint(len(levels))
        config = self.importance_sampling
        self.rollouts[role] += 1
        return stochastic_sample(
            flow_velocity(self.backbone, self.generator, cond), self.randn((n, *self.backbone.latent_shape)), levels, config.rule,
            config.rule_kwargs, generator=self.rng, log_prob=config.log_prob, num_steps=step,
        )

    def prefix_input(self, trajectory: Trajectory) -> tuple[Tensor, Tensor]:
        """The generator input of a prefix: its last latent x_{σ_k} and σ_k per sample."""
        x_in = trajectory.latents[-1]
        return x_in, trajectory.sigmas[trajectory.num_steps].to(x_in).expand(len(x_in))

    @torch.no_grad()
    def prefix_ratio(self, trajectory: Trajectory, cond: Conditioning) -> Tensor:
        """ρ_i: the detached, clipped importance ratio of the stored prefix under the current generator."""
        n = len(trajectory.latents[0])
        if trajectory.num_steps == 0:
            return torch.ones(n, device=self.device)
        velocity = flow_velocity(self.backbone, self.generator, cond)
        new = torch.stack([step_log_prob(velocity, trajectory, j) for j in range(trajectory.num_steps)], dim=1)
        old = torch.stack(trajectory.log_probs, dim=1)
        epsilon = self.importance_sampling.epsilon
        if self.importance_sampling.log_prob == "exact_mean":
            return clipped_importance_ratio(new, old, epsilon)
        return torch.stack(
            [clipped_importance_ratio(new[:, j], old[:, j], epsilon) for j in range(trajectory.num_steps)]
        ).prod(dim=0)

    def generator_input(self, cond: Conditioning, n: int) -> tuple[Tensor, Tensor]:
        if not self.importance_sampling.enabled:
            return super().generator_input(cond, n)
        return self.prefix_input(self.stochastic_prefix(cond, n, "fake_score"))

    def training_inputs(self, batch: dict, update_generator: bool) -> Iteration:
        """``mode=grpo``: a generator update rolls out with CPS. Under IS a generator update reuses the
        stored rollout while it has uses left (a :class:`ReuseIteration`), else rolls out and stores (ρ = 1)."""
        if self.gndm.mode == "grpo" and update_generator:
            return self.policy_inputs(batch)
        config = self.importance_sampling
        if not (config.enabled and update_generator):
            return super().training_inputs(batch, update_generator)
        stored = self.stored_rollout
        if stored is not None:
            cond = self.backbone.encode_prompts(stored.prompts)
            ratios = self.prefix_ratio(stored.trajectory, cond)
            stored.uses += 1
            if stored.uses >= config.reuses:
                self.stored_rollout = None
            x_in, level = self.prefix_input(stored.trajectory)
            return self.iteration(
                ReuseIteration, batch=batch, update_generator=True, cond=cond, x_in=x_in, level=level,
                sample_weights=ratios, critic_weights=ratios if config.target == "fake_score" else None,
                reused=stored,
            )
        prompts = list(batch["prompts"])
        cond = self.backbone.encode_prompts(prompts)
        trajectory = self.stochastic_prefix(cond, len(prompts), "generator")
        if config.reuses > 1:
            self.stored_rollout = StoredRollout(prompts, trajectory)
        x_in, level = self.prefix_input(trajectory)
        return self.iteration(
            batch=batch, update_generator=True, cond=cond, x_in=x_in, level=level,
            sample_weights=torch.ones(len(prompts), device=self.device),
        )

    def critic_inputs(self, state: Iteration, x0: Tensor) -> tuple[Iteration, Tensor]:
        """On a reuse iteration with ``target=generator`` the critic gets a fresh rollout of the incoming batch."""
        if not isinstance(state, ReuseIteration) or self.importance_sampling.target == "fake_score":
            return state, x0
        prompts = state.batch["prompts"]
        cond = self.backbone.encode_prompts(prompts)
        x_in, level = self.generator_input(cond, len(prompts))
        with torch.no_grad():
            x0 = self.backbone.predict_x0(self.generator, x_in, level, cond)
        fresh = Iteration(
            batch=state.batch, update_generator=state.update_generator, cond=cond, uncond=state.uncond, x_in=x_in,
            level=level,
        )
        return fresh, x0

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.importance_sampling.enabled:
            updates = max(self.generator_updates, 1)
            self.log_dict({"train/generator_rollouts_per_update": self.rollouts["generator"] / updates,
                           "train/rollouts_per_update": sum(self.rollouts.values()) / updates})

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        stored = self.stored_rollout.state() if self.stored_rollout is not None else None
        # Every rank reuses its own rollout.
        checkpoint["gndm_importance_sampling"] = {"rollouts": dict(self.rollouts), "stored_rollout_per_rank": self.gather_per_rank(stored)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("gndm_importance_sampling")
        if state is not None:
            self.rollouts = dict(state["rollouts"])
            stored = self.own_rank_state(state["stored_rollout_per_rank"], "stored importance-sampling rollout")
            self.stored_rollout = None if stored is None else StoredRollout.from_state(stored, self.importance_sampling)
