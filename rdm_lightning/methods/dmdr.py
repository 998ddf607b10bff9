"""DMDR (``dmdr.md``): DMD as the regulariser of a ReFL reward term, after a pure-DMD cold start.

Generator loss at generator update ``u``::

    L = L_DM                                         (u < cold_start_updates)
    L = L_DM + Σ_m w_m·mean(ReLU(hinge − r_m))       (afterwards; ReFL through decode(x̂0))

with DynaRS re-noising (σ ~ Beta(a(u), b(u)) for the DM loss), a real CFG scale
jittered in ``[w − j, w + j]``, ε_n = 1e-8 and TTUR 5. The critic is a full copy
of the teacher (dmdr.md's ``critic: full_copy``); the LoRA-on-teacher critic and
DynaDG, which needs it, are not in this module yet.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rdm_lightning.backbones.base import Backbone, Conditioning
from rdm_lightning.core.schedules_training import dynamic_renoise_beta, hinge_reward_loss, sample_beta
from rdm_lightning.methods.base import StudentConfig, TeacherSamplingConfig
from rdm_lightning.methods.dmd import DMD, DMDConfig
from rdm_lightning.methods.optim import OptimizerConfig
from rdm_lightning.rewards.base import RewardModel, RewardTerm, WeightedRewards


@dataclass
class DMDRConfig:
    """DMDR settings (defaults: the SD3-M recipe of dmdr.md §7, in generator updates)."""

    cold_start_updates: int = 2000
    """Generator updates of pure DMD before the reward term switches on."""
    reward_hinge: float = 0.7
    """Hinge of the ReFL term ``mean(ReLU(hinge − r))``."""
    guidance_jitter: float = 0.5
    """The real CFG scale is drawn from ``U[w − j, w + j]`` each generator update (0: fixed ``w``)."""
    dynamic_renoise_updates: int = 2000
    """DynaRS period ``K_rs``: DM re-noising u ~ Beta(1 + 3c, 1 + 0.5c), c = cosine decay over K_rs; 0 = uniform."""
    reward_weights: dict[str, float] = field(default_factory=dict)
    """Weight ``w_m`` of each optimized reward, by reward name; every reward needs one."""

    def __post_init__(self):
        if self.cold_start_updates < 0 or self.dynamic_renoise_updates < 0:
            raise ValueError(
                f"cold_start_updates and dynamic_renoise_updates must be >= 0, "
                f"got {self.cold_start_updates}, {self.dynamic_renoise_updates}"
            )
        if self.guidance_jitter < 0:
            raise ValueError(f"guidance_jitter must be >= 0, got {self.guidance_jitter}")


def weighted_rewards(rewards: list[RewardModel], weights: dict[str, float]) -> WeightedRewards | None:
    """The rewards with their weights by name, or None for no rewards; every reward needs exactly one weight."""
    names = [reward.name for reward in rewards]
    missing = sorted(set(names) - set(weights))
    unknown = sorted(set(weights) - set(names))
    if missing or unknown:
        raise ValueError(f"reward_weights must give one weight per reward {names}: missing {missing}, unknown {unknown}")
    return WeightedRewards([RewardTerm(r, weights[r.name]) for r in rewards]) if rewards else None


class DMDR(DMD):
    """DMD2 jointly trained with differentiable rewards (ReFL hinge), after a pure-DMD cold start.

    Args:
        backbone: model family adapter.
        rewards: the optimized rewards; each must be differentiable (ReFL back-propagates through it).
        gold_rewards: rewards that are scored and logged on generator samples, never optimized
            (to make reward hacking visible).
        dmdr: cold start, hinge, CFG jitter, DynaRS and reward weights.
        dmd: DMD2 settings (DMDR uses ε_n = 1e-8, TTUR 5, no GAN).
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
            backbone, dmd, generator_optimizer, fake_score_optimizer, student, teacher_sampling, teacher_dtype, seed,
            max_generator_updates,
        )
        if dmd.use_gan:
            raise ValueError(f"{type(self).__name__} trains without a GAN head: set dmd.gan_generator_weight to 0")
        self.dmdr = dmdr
        self.rewards = weighted_rewards(rewards or [], dmdr.reward_weights)
        self.gold_rewards = nn.ModuleList(gold_rewards or [])
        self.check_rewards()

    def check_rewards(self) -> None:
        """DMDR back-propagates every reward (ReFL): it needs at least one, all differentiable."""
        if self.rewards is None:
            raise ValueError(f"{type(self).__name__} needs at least one reward in `rewards`")
        self.rewards.require_differentiable()

    def reward_terms(self) -> tuple[RewardTerm, ...]:
        """The optimized rewards with their weights (none when there are no rewards)."""
        return self.rewards.terms if self.rewards is not None else ()

    def reward_models(self) -> dict[str, nn.Module]:
        gold = {f"gold/{reward.name}": reward for reward in self.gold_rewards}
        return {**{term.name: term.reward for term in self.reward_terms()}, **gold}

    def dm_levels(self, n: int) -> Tensor:
        """DynaRS: ``u ~ Beta(a(u), b(u))`` mapped through the schedule (σ = u without shift)."""
        a, b = dynamic_renoise_beta(self.generator_updates, self.dmdr.dynamic_renoise_updates)
        u = sample_beta(n, a, b, self.rng).clamp(1e-3, 1.0 - 1e-3)
        return self.backbone.schedule.levels_from_fraction(u).to(self.device)

    def real_guidance_scale(self) -> float:
        jitter = self.dmdr.guidance_jitter
        return self.dmd.guidance_scale + jitter * (2.0 * float(torch.rand((), generator=self.rng)) - 1.0)

    def in_cold_start(self) -> bool:
        return self.generator_updates < self.dmdr.cold_start_updates

    def reward_loss(self, scores: Tensor, term: RewardTerm) -> Tensor:
        """The ReFL term of one reward: ``w_m·mean(ReLU(hinge − r_m))`` (scores carry gradients)."""
        return hinge_reward_loss(scores, term.weight, self.dmdr.reward_hinge)

    def generator_loss(self, x0: Tensor, cond: Conditioning, uncond: Conditioning, batch: dict) -> tuple[Tensor, dict]:
        """``L_DM`` during the cold start, then ``L_DM + Σ_m w_m·mean(ReLU(hinge − r_m))``."""
        loss, logs = super().generator_loss(x0, cond, uncond, batch)
        prompts = batch["prompts"]
        if not self.in_cold_start():
            images = self.backbone.decode(x0)
            scores = self.rewards.score_all(images, prompts, with_grad=True)
            for term in self.reward_terms():
                loss = loss + self.reward_loss(scores[term.name], term)
                logs[f"reward/{term.name}"] = scores[term.name].detach().mean()
        if self.gold_rewards:
            images = self.backbone.decode(x0.detach())
            for reward in self.gold_rewards:
                logs[f"reward/gold/{reward.name}"] = reward.score(images, prompts).mean()
        return loss, logs
