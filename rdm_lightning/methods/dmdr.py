"""DMDR (``docs/methods/dmdr.md``): DMD as the regulariser of a ReFL reward term, after a pure-DMD cold start.

Generator loss at generator update ``u``::

    L = L_DM                                         (u < cold_start_updates)
    L = L_DM + Σ_m w_m·mean(ReLU(hinge − r_m))       (afterwards; ReFL through decode(x̂0))

with DynaRS re-noising (σ ~ Beta(a(u), b(u)) for the DM loss), a real CFG scale
jittered in ``[w − j, w + j]``, ε_n = 1e-8 and TTUR 5.

The critic (docs/methods/dmdr.md, ``DMDRConfig.critic``):

- ``full_copy`` (default here): the fake score is a full trainable copy of the teacher, as in DMD2.
- ``lora_on_teacher`` (the paper's): the fake score is the frozen teacher's own weights plus
  one LoRA (rank 32, α 32, Gaussian A, B = 0), shared without a second copy of the network.
  The LoRA's runtime scale picks the role: the fake score runs at ``fake_lora_scale`` (2.0),
  the real score at DynaDG's ``s_r(u) = s_r0·½(1 + cos(π·u/K_dg))`` (docs/methods/dmdr.md), which is
  the plain adapter-free teacher once ``s_r(u) = 0``. Only the LoRA weights train, and
  checkpoints hold only them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from rdm_lightning.backbones.base import Backbone, Conditioning
from rdm_lightning.core.schedules_training import (
    dynamic_guidance_scale,
    dynamic_renoise_beta,
    hinge_reward_loss,
    sample_beta,
)
from rdm_lightning.methods.base import StudentConfig, TeacherSamplingConfig, check_choice, check_finite
from rdm_lightning.methods.dmd import DMD, DMDConfig, Iteration
from rdm_lightning.methods.lora import add_lora, lora_scale, shared_copy
from rdm_lightning.methods.optim import OptimizerConfig
from rdm_lightning.methods.rewarded import RewardedMethod, weighted_rewards
from rdm_lightning.rewards.base import RewardModel, RewardTerm


CRITICS = ("full_copy", "lora_on_teacher")
CRITIC_ADAPTER = "critic"
"""peft adapter name of the LoRA critic."""


@dataclass
class DMDRConfig:
    """DMDR settings (defaults: DMDR's SD3-M recipe, in generator updates; docs/methods/dmdr.md)."""

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
    critic: Literal["full_copy", "lora_on_teacher"] = "full_copy"
    """The fake score: ``full_copy``, a full trainable copy of the teacher (DMD2's critic, the
    default here), or ``lora_on_teacher``, the paper's: one LoRA on the frozen teacher's shared
    weights, whose runtime scale gives the fake score (``fake_lora_scale``) and the real score
    (DynaDG); needs peft (the ``lora`` extra)."""
    critic_lora_rank: int = 32
    """Rank ``r`` of the critic LoRA (``lora_on_teacher``)."""
    critic_lora_alpha: float = 32
    """``lora_alpha`` of the critic LoRA; its update is ``scale·(α/r)·B·A``."""
    fake_lora_scale: float = 2.0
    """Runtime LoRA scale of the fake score (``lora_on_teacher``), in its DM estimate and its denoising loss."""
    dynadg_scale: float = 0.0
    """DynaDG's ``s_r0``: the real score's LoRA scale at generator update 0, annealed by
    ``s_r(u) = s_r0·½(1 + cos(π·u/K_dg))`` to 0 (the plain teacher) at ``dynadg_updates``;
    0 = off. Needs ``critic: lora_on_teacher`` (paper: 0.5 text-to-image, 0.75 SiT)."""
    dynadg_updates: int = 0
    """DynaDG period ``K_dg`` in generator updates (paper: 2000, the cold start); ``s_r(u) = 0`` from it on."""

    def __post_init__(self):
        if self.cold_start_updates < 0 or self.dynamic_renoise_updates < 0:
            raise ValueError(
                f"cold_start_updates and dynamic_renoise_updates must be >= 0, "
                f"got {self.cold_start_updates}, {self.dynamic_renoise_updates}"
            )
        for name in ("reward_hinge", "guidance_jitter", "critic_lora_alpha", "fake_lora_scale", "dynadg_scale"):
            check_finite(f"dmdr.{name}", getattr(self, name))
        for name, weight in self.reward_weights.items():
            check_finite(f"dmdr.reward_weights[{name!r}]", weight)
        if self.guidance_jitter < 0:
            raise ValueError(f"guidance_jitter must be >= 0, got {self.guidance_jitter}")
        check_choice("critic", self.critic, CRITICS)
        if self.critic_lora_rank < 1:
            raise ValueError(f"critic_lora_rank must be >= 1, got {self.critic_lora_rank}")
        if not (self.critic_lora_alpha > 0 and self.fake_lora_scale > 0):
            raise ValueError(
                f"critic_lora_alpha and fake_lora_scale must be > 0, got {self.critic_lora_alpha}, {self.fake_lora_scale}"
            )
        if not (self.dynadg_scale >= 0 and self.dynadg_updates >= 0):
            raise ValueError(
                f"dynadg_scale and dynadg_updates must be >= 0, got {self.dynadg_scale}, {self.dynadg_updates}"
            )
        if self.dynadg_scale > 0 and (self.critic != "lora_on_teacher" or self.dynadg_updates == 0):
            raise ValueError(
                f"DynaDG (dynadg_scale={self.dynadg_scale}) scales the critic LoRA on the teacher: it needs "
                f"critic='lora_on_teacher' (got {self.critic!r}) and dynadg_updates > 0 (got {self.dynadg_updates})"
            )

    @property
    def lora_critic(self) -> bool:
        """Whether the critic is a LoRA on the teacher's shared weights."""
        return self.critic == "lora_on_teacher"


class DMDR(RewardedMethod, DMD):
    """DMD2 jointly trained with differentiable rewards (ReFL hinge), after a pure-DMD cold start.

    Args:
        backbone: model family adapter.
        rewards: the optimized rewards; each must be differentiable (ReFL back-propagates through it).
        gold_rewards: rewards that are scored and logged on generator samples, never optimized
            (to make reward hacking visible).
        dmdr: cold start, hinge, CFG jitter, DynaRS, reward weights, critic kind and DynaDG.
        dmd: DMD2 settings (DMDR uses ε_n = 1e-8, TTUR 5, no GAN).
        generator_optimizer: AdamW of the generator.
        fake_score_optimizer: AdamW of the fake score (with the LoRA critic: of its LoRA weights only).
        student: the generator's sampler.
        teacher_sampling: the teacher's default sampler.
        teacher_dtype: dtype of the frozen teacher.
        seed: seed of the module's random stream (and of the critic LoRA's initialisation).
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
        self.dmdr = dmdr  # read by load_fake_score, which DistillationModule.__init__ calls
        super().__init__(
            backbone, dmd, generator_optimizer, fake_score_optimizer, student, teacher_sampling, teacher_dtype, seed,
            max_generator_updates,
        )
        if dmd.use_gan:
            raise ValueError(f"{type(self).__name__} trains without a GAN head: set dmd.gan_generator_weight to 0")
        self.rewards = weighted_rewards(rewards or [], dmdr.reward_weights)
        self.gold_rewards = nn.ModuleList(gold_rewards or [])
        self.check_rewards()

    # ---- critic -----------------------------------------------------------------------------
    def load_fake_score(self) -> nn.Module:
        """``full_copy``: a fresh copy of the network. ``lora_on_teacher``: the teacher's own
        weights (shared, frozen) plus the critic LoRA, resting at ``fake_lora_scale``."""
        self.shared_critic_keys: frozenset[str] = frozenset()
        if not self.dmdr.lora_critic:
            return super().load_fake_score()
        targets = self.backbone.lora_target_modules
        if targets is None:
            raise ValueError(
                f"critic='lora_on_teacher' needs the backbone's lora_target_modules; {type(self.backbone).__name__} declares none"
            )
        config = self.dmdr
        critic = add_lora(
            shared_copy(self.teacher), targets, config.critic_lora_rank, config.critic_lora_alpha, CRITIC_ADAPTER,
            scale=config.fake_lora_scale, seed=self.seed,
        )
        teacher = {id(t) for t in (*self.teacher.parameters(), *self.teacher.buffers())}
        # Entries of the critic that are the teacher's tensors: frozen, out of checkpoints.
        self.shared_critic_keys = frozenset(
            f"fake_score.{name}"
            for name, t in (*critic.named_parameters(), *critic.named_buffers())
            if id(t) in teacher
        )
        return critic

    def role_parameters(self) -> dict[str, list[nn.Parameter]]:
        """With the LoRA critic, the fake score owns its LoRA weights only, never the teacher's."""
        params = super().role_parameters()
        if self.dmdr.lora_critic:
            teacher = {id(p) for p in self.teacher.parameters()}
            params["fake_score"] = [p for p in params["fake_score"] if id(p) not in teacher]
        return params

    def is_frozen_state_key(self, key: str) -> bool:
        """Also the LoRA critic's shared teacher weights: its checkpoint entries are the LoRA alone."""
        return super().is_frozen_state_key(key) or key in self.shared_critic_keys

    def real_lora_scale(self) -> float:
        """DynaDG's ``s_r(u)`` at the current generator update (0 without the LoRA critic)."""
        if not self.dmdr.lora_critic:
            return 0.0
        return dynamic_guidance_scale(self.generator_updates, self.dmdr.dynadg_scale, self.dmdr.dynadg_updates)

    def real_x0(self, x_t: Tensor, level: Tensor, cond: Conditioning, guidance_scale: float, uncond=None) -> Tensor:
        """The plain teacher at ``s_r(u) = 0``; otherwise the teacher's CFG prediction through the
        critic LoRA at scale ``s_r(u)`` (DynaDG, docs/methods/dmdr.md)."""
        scale = self.real_lora_scale()
        if scale == 0.0:
            return super().real_x0(x_t, level, cond, guidance_scale, uncond)
        with lora_scale(self.fake_score, CRITIC_ADAPTER, scale):
            return self.teacher_x0(x_t, level, cond, guidance_scale, uncond, network=self.fake_score)

    def fake_x0(self, x_t: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        """The LoRA critic runs in the teacher's dtype at ``fake_lora_scale``, without CFG."""
        if not self.dmdr.lora_critic:
            return super().fake_x0(x_t, level, cond)
        with lora_scale(self.fake_score, CRITIC_ADAPTER, self.dmdr.fake_lora_scale):
            return self.teacher_x0(x_t, level, cond, 1.0, network=self.fake_score)

    def fake_score_loss(self, x0: Tensor, state: Iteration) -> tuple[Tensor, dict]:
        """The LoRA critic's loss runs in the teacher's dtype at ``fake_lora_scale``."""
        if not self.dmdr.lora_critic:
            return super().fake_score_loss(x0, state)
        with self.teacher_precision(), lora_scale(self.fake_score, CRITIC_ADAPTER, self.dmdr.fake_lora_scale):
            return super().fake_score_loss(x0, state)

    # ---- rewards ----------------------------------------------------------------------------
    def check_rewards(self) -> None:
        """DMDR back-propagates every reward (ReFL): it needs at least one, all differentiable."""
        if self.rewards is None:
            raise ValueError(f"{type(self).__name__} needs at least one reward in `rewards`")
        self.rewards.require_differentiable()

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

    def generator_loss(self, x0: Tensor, state: Iteration) -> tuple[Tensor, dict]:
        """``L_DM`` during the cold start, then ``L_DM + Σ_m w_m·mean(ReLU(hinge − r_m))``."""
        loss, logs = super().generator_loss(x0, state)
        if self.dmdr.lora_critic:
            logs["train/real_lora_scale"] = self.real_lora_scale()
        prompts = state.prompts
        images = None
        if not self.in_cold_start():
            images = self.backbone.decode(x0)
            scores = self.rewards.score_all(images, prompts, with_grad=True)
            for term in self.reward_terms():
                loss = loss + self.reward_loss(scores[term.name], term)
                logs[f"reward/{term.name}"] = scores[term.name].detach().mean()
        logs.update(self.gold_reward_logs(x0, prompts, images))
        return loss, logs
