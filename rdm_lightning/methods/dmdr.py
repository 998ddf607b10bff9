"""DMDR (``docs/methods/dmdr.md``): DMD as the regulariser of a ReFL reward term, after a pure-DMD cold start.

Generator loss at generator update ``u``::

    L = L_DM                                         (u < cold_start_updates)
    L = L_DM + Σ_m w_m·mean(ReLU(hinge − r_m))       (afterwards; ReFL through decode(x̂0))

with DynaRS re-noising (σ ~ Beta(a(u), b(u)) for the DM loss), a real CFG scale
jittered in ``[w − j, w + j]``, ε_n = 1e-8 and TTUR 5.

The critic is the fake score's role layout (``roles.fake_score``, docs/roles.md, docs/methods/dmdr.md):

- ``full`` (default here): a full trainable copy of the teacher, as in DMD2.
- ``shared_lora`` (the paper's critic: rank 32, α 32): the frozen teacher's own weights plus one
  LoRA, without a second copy of the network. The LoRA's runtime scale picks the role: the fake
  score runs at ``fake_lora_scale`` (2.0), the real score at DynaDG's ``s_r(u) = s_r0·½(1 + cos(π·u/K_dg))``
  (docs/methods/dmdr.md), which is the plain adapter-free teacher once ``s_r(u) = 0``.
- ``lora``: the adapter on the fake score's own frozen copy, at ``fake_lora_scale`` (no DynaDG).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rdm_lightning.backbones.base import Backbone, Conditioning
from rdm_lightning.core.schedules_training import (
    dynamic_guidance_scale,
    dynamic_renoise_beta,
    sample_beta,
)
from rdm_lightning.methods.base import check_finite
from rdm_lightning.methods.dmd import DMD, DMDConfig, Iteration
from rdm_lightning.methods.lora import lora_scale, set_lora_scale
from rdm_lightning.methods.rewarded import RewardedMethod
from rdm_lightning.rewards.base import RewardModel


DEFAULT_FAKE_LORA_SCALE = 2.0
"""The paper's runtime scale of the LoRA critic in the fake score."""


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
    fake_lora_scale: float | None = None
    """Runtime scale of the fake score's LoRA (``roles.fake_score`` in a LoRA layout), in its DM estimate
    and its denoising loss; ``None``: the paper's 2.0. With a ``full`` fake score there is no LoRA to
    scale, and setting it is an error."""
    dynadg_scale: float = 0.0
    """DynaDG's ``s_r0``: the real score's LoRA scale at generator update 0, annealed by
    ``s_r(u) = s_r0·½(1 + cos(π·u/K_dg))`` to 0 (the plain teacher) at ``dynadg_updates``;
    0 = off. Needs ``roles.fake_score.layout: shared_lora`` (paper: 0.5 text-to-image, 0.75 SiT)."""
    dynadg_updates: int = 0
    """DynaDG period ``K_dg`` in generator updates (paper: 2000, the cold start); ``s_r(u) = 0`` from it on."""

    def __post_init__(self):
        if self.cold_start_updates < 0 or self.dynamic_renoise_updates < 0:
            raise ValueError(
                f"cold_start_updates and dynamic_renoise_updates must be >= 0, "
                f"got {self.cold_start_updates}, {self.dynamic_renoise_updates}"
            )
        for name in ("reward_hinge", "guidance_jitter", "dynadg_scale"):
            check_finite(f"dmdr.{name}", getattr(self, name))
        for name, weight in self.reward_weights.items():
            check_finite(f"dmdr.reward_weights[{name!r}]", weight)
        if self.guidance_jitter < 0:
            raise ValueError(f"guidance_jitter must be >= 0, got {self.guidance_jitter}")
        if self.fake_lora_scale is not None and not 0 < self.fake_lora_scale < math.inf:
            raise ValueError(f"dmdr.fake_lora_scale must be a finite number > 0 (or None: 2.0), got {self.fake_lora_scale!r}")
        if not (self.dynadg_scale >= 0 and self.dynadg_updates >= 0):
            raise ValueError(
                f"dynadg_scale and dynadg_updates must be >= 0, got {self.dynadg_scale}, {self.dynadg_updates}"
            )
        if self.dynadg_scale > 0 and self.dynadg_updates == 0:
            raise ValueError(f"DynaDG (dynadg_scale={self.dynadg_scale}) anneals over dynadg_updates > 0 (got 0)")


class DMDRParts:
    """DMDR's schedules as a part any DMD method can turn on (listed before its base, like ``RewardedMethod``):
    the reward cold start, DynaRS re-noising of the DM loss, the real score's CFG jitter, the LoRA critic's
    resting scale and DynaDG (docs/methods/dmdr.md). The method sets ``self.dmdr`` (a :class:`DMDRConfig`)
    and calls :meth:`setup_dmdr_parts` once DMD's ``__init__`` has built the roles. DMDR, GNDM and GDMD use it."""

    dmdr: DMDRConfig

    def setup_dmdr_parts(self) -> None:
        """Check the parts' settings against the module (no GAN head; the critic's layout) and rest the
        LoRA critic at its fake scale."""
        dmdr, fake = self.dmdr, self.roles.fake_score
        if self.dmd.use_gan:
            raise ValueError(f"{type(self).__name__} trains without a GAN head: set dmd.gan_generator_weight to 0")
        if dmdr.fake_lora_scale is not None and not fake.adapted:
            raise ValueError(
                f"dmdr.fake_lora_scale={dmdr.fake_lora_scale} scales the fake score's LoRA, but roles.fake_score.layout "
                "is 'full' (no LoRA): it would be ignored. Use layout 'shared_lora' (the paper's critic), or drop it"
            )
        if dmdr.dynadg_scale > 0 and fake.layout != "shared_lora":
            raise ValueError(
                f"DynaDG (dmdr.dynadg_scale={dmdr.dynadg_scale}) runs the teacher through the critic's LoRA: it needs "
                f"roles.fake_score.layout 'shared_lora' (got {fake.layout!r})"
            )
        if fake.adapted:
            # The critic rests at its fake scale; DynaDG's real score changes it for one forward only.
            set_lora_scale(self.fake_score, "fake_score", self.fake_lora_scale)

    # ---- critic -----------------------------------------------------------------------------
    @property
    def fake_lora_scale(self) -> float:
        """Runtime scale of the LoRA critic (``dmdr.fake_lora_scale``, default 2.0)."""
        return DEFAULT_FAKE_LORA_SCALE if self.dmdr.fake_lora_scale is None else self.dmdr.fake_lora_scale

    @property
    def dynadg(self) -> bool:
        """Whether the real score can run through the critic's LoRA (it sits on the teacher's weights)."""
        return self.roles.fake_score.layout == "shared_lora"

    def real_lora_scale(self) -> float:
        """DynaDG's ``s_r(u)`` at the current generator update (0 without a critic on the teacher's weights)."""
        if not self.dynadg:
            return 0.0
        return dynamic_guidance_scale(self.generator_updates, self.dmdr.dynadg_scale, self.dmdr.dynadg_updates)

    def real_x0(self, x_t: Tensor, level: Tensor, cond: Conditioning, guidance_scale: float, uncond=None) -> Tensor:
        """The plain teacher at ``s_r(u) = 0``; otherwise the teacher's CFG prediction through the
        critic LoRA at scale ``s_r(u)`` (DynaDG, docs/methods/dmdr.md)."""
        scale = self.real_lora_scale()
        if scale == 0.0:
            return super().real_x0(x_t, level, cond, guidance_scale, uncond)
        with lora_scale(self.fake_score, "fake_score", scale):
            return self.teacher_x0(x_t, level, cond, guidance_scale, uncond, network=self.fake_score)

    # ---- schedules --------------------------------------------------------------------------
    def dm_levels(self, n: int) -> Tensor:
        """DynaRS: ``u ~ Beta(a(u), b(u))`` mapped through the schedule (σ = u without shift)."""
        a, b = dynamic_renoise_beta(self.generator_updates, self.dmdr.dynamic_renoise_updates)
        u = sample_beta(n, a, b, self.rng).clamp(1e-3, 1.0 - 1e-3)
        return self.backbone.schedule.levels_from_fraction(u).to(self.device)

    def real_guidance_scale(self) -> float:
        """The real score's CFG scale, jittered in ``[w − j, w + j]`` each generator update."""
        jitter = self.dmdr.guidance_jitter
        return self.dmd.guidance_scale + jitter * (2.0 * float(torch.rand((), generator=self.rng)) - 1.0)

    def in_cold_start(self) -> bool:
        """Whether the reward terms are still off (the first ``dmdr.cold_start_updates`` generator updates)."""
        return self.generator_updates < self.dmdr.cold_start_updates


class DMDR(DMDRParts, RewardedMethod, DMD):
    """DMD2 jointly trained with differentiable rewards (ReFL hinge), after a pure-DMD cold start.

    Args:
        backbone: model family adapter.
        rewards: the optimized rewards; each must be differentiable (ReFL back-propagates through it).
        gold_rewards: rewards that are scored and logged on generator samples, never optimized
            (to make reward hacking visible).
        dmdr: cold start, hinge, CFG jitter, DynaRS, reward weights, the LoRA critic's scale and DynaDG.
        dmd: DMD2 settings (DMDR uses ε_n = 1e-8, TTUR 5, no GAN).
        **kwargs: the arguments every method shares (:class:`DistillationModule`), ``roles`` among them:
            ``roles.fake_score`` in a LoRA layout is the LoRA critic.
    """

    def __init__(
        self,
        backbone: Backbone,
        rewards: list[RewardModel] | None = None,
        gold_rewards: list[RewardModel] | None = None,
        dmdr: DMDRConfig = DMDRConfig(),
        dmd: DMDConfig = DMDConfig(generator_update_ratio=5, norm_eps=1e-8),
        **kwargs,
    ):
        self.dmdr = dmdr
        super().__init__(backbone, dmd, **kwargs)
        self.setup_dmdr_parts()
        self.setup_rewards(rewards, gold_rewards, dmdr.reward_weights)

    def check_rewards(self) -> None:
        """DMDR back-propagates every reward (ReFL): it needs at least one, all differentiable."""
        if self.rewards is None:
            raise ValueError(f"{type(self).__name__} needs at least one reward in `rewards`")
        self.rewards.require_differentiable()

    def generator_loss(self, x0: Tensor, state: Iteration) -> tuple[Tensor, dict]:
        """``L_DM`` during the cold start, then ``L_DM + Σ_m w_m·mean(ReLU(hinge − r_m))``."""
        loss, logs = super().generator_loss(x0, state)
        if self.dynadg:
            logs["train/real_lora_scale"] = self.real_lora_scale()
        prompts = state.prompts
        images = None
        if not self.in_cold_start():
            images = self.backbone.decode(x0)
            scores = self.rewards.score_all(images, prompts, with_grad=True)
            for term in self.reward_terms():
                loss = loss + self.reward_loss(scores[term.name], term.weight, self.dmdr.reward_hinge)
                logs[f"reward/{term.name}"] = scores[term.name].detach().mean()
        logs.update(self.gold_reward_logs(x0, prompts, images))
        return loss, logs
