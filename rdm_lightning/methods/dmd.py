"""DMD / DMD2 (``docs/methods/dmd.md``): distribution matching with a fake score, TTUR, GAN head, backward simulation.

One iteration:
1. The generator's x̂0 (``dmd.generator_samples``): backward simulation draws the trained step
   ``k`` (same on every rank), runs ``k`` generator steps without grad and re-noises to
   ``levels[k]``; ``rollout`` runs every step from pure noise, with grad on a generator update.
2. Every ``generator_update_ratio``-th iteration the generator updates on
   ``L_DM (+ w_G·gan_G)``; otherwise it only produces the critic's batch.
3. The fake score updates every iteration on the detached batch:
   ``L_fake (+ w_D·gan_D)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rdm_lightning.backbones.base import Backbone, Conditioning, network_dtype
from rdm_lightning.core.dmd import dmd_gradient, dmd_loss, gan_discriminator_loss, gan_generator_loss
from rdm_lightning.core.sampling import backward_simulation_input, few_step_sample
from rdm_lightning.core.stochastic import Trajectory
from rdm_lightning.methods.base import (
    DistillationModule,
    check_finite,
    check_guidance_scale,
)


GENERATOR_SAMPLES = ("backward_simulation", "first_step", "rollout")
"""Accepted ``DMDConfig.generator_samples``."""


def require_generator_samples(method: str, dmd: DMDConfig, accepted: tuple[str, ...]) -> None:
    """Refuse a ``dmd.generator_samples`` that ``method``'s training step does not honour (checked
    in the method's ``__init__``, before its networks load)."""
    if dmd.generator_samples not in accepted:
        raise ValueError(f"{method} trains with dmd.generator_samples in {accepted}, got {dmd.generator_samples!r}")


@dataclass
class DMDConfig:
    """DMD2 loss settings (defaults: the SD1.5 recipe)."""

    guidance_scale: float = 1.75
    """CFG scale ``w`` of the real score (teacher)."""
    fake_guidance_scale: float = 1.0
    """CFG of the fake score; DMD2 uses none, and any other value is an error."""
    generator_update_ratio: int = 10
    """TTUR ``r``: the generator updates when ``iteration % r == 0``; the critic every iteration."""
    dm_level_range: tuple[float, float] = (0.02, 0.98)
    """Range of ``u`` (fraction of the schedule) of the DM re-noising: t ∈ [20, 980] on VP."""
    fake_level_range: tuple[float, float] = (0.0, 1.0)
    """Range of ``u`` for the fake-score and GAN noise levels: t ∈ [0, 999] on VP."""
    norm_eps: float = 0.0
    """``ε_n`` added to the per-sample DMD normaliser (0 in DMD2, 1e-8 in DMDR)."""
    gan_generator_weight: float = 0.0
    """``w_G`` of the generator's GAN loss; 0 disables the GAN head altogether."""
    gan_discriminator_weight: float = 1e-2
    """``w_D`` of the discriminator loss added to the fake-score loss."""
    generator_samples: str = "backward_simulation"
    """Which generator x̂0 the DM loss and the fake score see (``docs/methods/dmd.md``):
    ``backward_simulation`` (DMD2): step ``k``'s x̂0 for a random ``k``, its input from a no-grad
    rollout of the first ``k`` steps; ``first_step``: step 0's x̂0 from pure noise only;
    ``rollout``: the final output of the whole student sampler, with gradient through every step
    (``num_steps`` generator forwards and their activations per update). ``rollout`` keeps a
    multi-step student from drifting away from the data, where backward simulation asks every
    step's x̂0 to look like data (measured in ``docs/methods/dmd.md``, student fidelity)."""
    critic_on_final_step: bool = False
    """Fit the fake score to the final-step output of a full no-grad student rollout instead of
    this iteration's x̂0 at step ``k``; costs ``num_steps`` extra generator forwards per iteration.
    A measured variant, not a fix (``docs/methods/dmd.md``, student fidelity): from a teacher whose
    few-step sampler is already good (the exact-teacher benchmark) it stops the 4-step student's
    drift, but on digits, where the early steps must change, it diverges after ~700 updates.
    With ``generator_samples: rollout`` the fake score already sees the final output: an error."""

    def __post_init__(self):
        check_guidance_scale("dmd.guidance_scale", self.guidance_scale)
        if self.fake_guidance_scale != 1.0:
            raise ValueError(
                f"fake_guidance_scale={self.fake_guidance_scale}: the DMD fake score runs without CFG (1.0 only)"
            )
        if self.generator_update_ratio < 1:
            raise ValueError(f"generator_update_ratio must be >= 1, got {self.generator_update_ratio}")
        for name in ("dm_level_range", "fake_level_range"):
            low, high = getattr(self, name)
            if not 0.0 <= low <= high <= 1.0:
                raise ValueError(f"{name} must satisfy 0 <= low <= high <= 1, got {(low, high)}")
        if self.generator_samples not in GENERATOR_SAMPLES:
            raise ValueError(f"dmd.generator_samples={self.generator_samples!r}: expected one of {GENERATOR_SAMPLES}")
        if not isinstance(self.critic_on_final_step, bool):
            raise ValueError(f"dmd.critic_on_final_step must be a bool, got {self.critic_on_final_step!r}")
        if self.critic_on_final_step and self.generator_samples == "rollout":
            raise ValueError(
                "dmd.critic_on_final_step=true with dmd.generator_samples='rollout': the fake score already "
                "fits the rollout's final output; set critic_on_final_step: false"
            )
        for name in ("norm_eps", "gan_generator_weight", "gan_discriminator_weight"):
            check_finite(f"dmd.{name}", getattr(self, name))
        if self.norm_eps < 0:
            raise ValueError(f"dmd.norm_eps must be >= 0, got {self.norm_eps}")
        if self.gan_generator_weight < 0 or self.gan_discriminator_weight < 0:
            raise ValueError(
                f"GAN weights must be >= 0, got gan_generator_weight={self.gan_generator_weight}, "
                f"gan_discriminator_weight={self.gan_discriminator_weight}"
            )
        if not self.use_gan and self.gan_discriminator_weight != DMDConfig.gan_discriminator_weight:
            raise ValueError(
                f"dmd.gan_discriminator_weight={self.gan_discriminator_weight} weights the GAN head's loss, but "
                "gan_generator_weight=0 switches the head off: set gan_generator_weight > 0, or drop it"
            )

    @property
    def use_gan(self) -> bool:
        return self.gan_generator_weight > 0


@dataclass(frozen=True, kw_only=True)
class Iteration:
    """What one training iteration hands from hook to hook (:meth:`DMD.training_step`).

    :meth:`DMD.training_inputs` builds it, the loss hooks read it, and :meth:`DMD.critic_inputs`
    returns the critic's: this one, or another where the critic trains on other samples. Methods keep
    per-iteration state in these typed fields (or a subclass's): nothing is ever added to ``batch``.
    """

    batch: dict
    """The loader's batch, data only (``prompts``, and ``images`` where the data has them); never written to."""
    update_generator: bool
    """Whether the generator updates this iteration (TTUR); the fake score updates every iteration."""
    cond: Conditioning
    """Conditioning of :attr:`prompts`."""
    uncond: Conditioning
    """The unconditional branch (empty prompts) of the real score's CFG, one per sample."""
    x_in: Tensor
    """The generator's input: noise, or a rollout's latent at ``level``."""
    level: Tensor
    """Noise level of ``x_in``, per sample."""
    trajectory: Trajectory | None = None
    """The no-grad stochastic rollout of a GRPO mode's generator update (:meth:`GRPOMixin.policy_inputs`)."""
    sample_weights: Tensor | None = None
    """Detached per-sample weights of the generator loss (GNDM's importance ratios ρ)."""
    critic_weights: Tensor | None = None
    """Detached per-sample weights of the fake-score loss (GNDM's ρ on a reuse with ``target=fake_score``)."""

    @property
    def prompts(self) -> list[str]:
        """The prompts of the generator's samples: the batch's."""
        return self.batch["prompts"]


class DiscriminatorHead(nn.Module):
    """DMD2's GAN head on bottleneck features: [Conv4×4/2 → GN → SiLU]* down to 4×4, Conv4×4/4, 1×1 → logit."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        if size < 4 or size & (size - 1):
            raise ValueError(f"feature size must be a power of two >= 4, got {size}")
        groups = min(32, channels)
        layers: list[nn.Module] = []
        while size > 4:
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(groups, channels), nn.SiLU()]
            size //= 2
        layers += [nn.Conv2d(channels, channels, 4, stride=4), nn.GroupNorm(groups, channels), nn.SiLU()]
        layers += [nn.Conv2d(channels, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        # In the head's own dtype: float32 beside a bf16 teacher, bf16 where DeepSpeed casts every network.
        return self.net(features.to(network_dtype(self))).flatten(1).mean(1)


class DMD(DistillationModule):
    """DMD2 distillation of ``backbone``'s teacher into a few-step generator.

    Args:
        backbone: model family adapter (teacher and initial networks).
        dmd: DMD2 loss and schedule settings.
        **kwargs: the arguments every method shares (:class:`DistillationModule`: optimizers, student,
            teacher sampler and dtype, seed, budget).
    """

    def __init__(
        self,
        backbone: Backbone,
        dmd: DMDConfig = DMDConfig(),
        **kwargs,
    ):
        super().__init__(backbone, **kwargs)
        self.dmd = dmd
        if dmd.use_gan:
            channels, height, _ = backbone.feature_shape
            self.discriminator_head = DiscriminatorHead(channels, height)

    # ---- losses ---------------------------------------------------------------------------
    def dm_levels(self, n: int) -> Tensor:
        """Re-noising levels of the DM loss: ``u ~ U[dm_level_range]``."""
        return self.sample_levels(n, *self.dmd.dm_level_range)

    def real_guidance_scale(self) -> float:
        """CFG scale of the real score for this generator update."""
        return self.dmd.guidance_scale

    def dm_estimates(
        self, x: Tensor, cond: Conditioning, uncond: Conditioning, guidance_scale: float | None = None
    ) -> tuple[Tensor, Tensor, float]:
        """One DM draw at detached samples ``x``: ``(x̂_real, x̂_fake, real CFG scale)``.

        Draw order: level, noise, then the CFG scale (when ``guidance_scale`` is None).
        """
        level = self.dm_levels(len(x))
        x_noisy = self.backbone.schedule.add_noise(x, self.randn(x.shape), level)
        scale = self.real_guidance_scale() if guidance_scale is None else guidance_scale
        with torch.no_grad():
            x0_real = self.real_x0(x_noisy, level, cond, scale, uncond)
            x0_fake = self.fake_x0(x_noisy, level, cond)
        return x0_real, x0_fake, scale

    def unguarded_dm_gradient(self, x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> tuple[Tensor, Tensor]:
        """``(g, nonfinite)``: the DMD gradient with the per-sample normaliser (docs/methods/dmd.md) and
        the ``[B]`` count of each sample's non-finite entries it replaced. The hook of the normaliser."""
        return dmd_gradient(x, x0_real, x0_fake, self.dmd.norm_eps, return_nonfinite=True)

    def dm_gradient(self, x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> tuple[Tensor, Tensor]:
        """``(g, replaced)``: the DM gradient of one draw and how many of its entries were non-finite
        (replaced); stops the run when every sample had one (:meth:`guard_nonfinite`)."""
        gradient, nonfinite = self.unguarded_dm_gradient(x, x0_real, x0_fake)
        return gradient, self.guard_nonfinite("the DMD gradient", nonfinite)

    def distribution_matching_loss(
        self, x0: Tensor, cond: Conditioning, uncond: Conditioning
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(L_DM, g, replaced)`` of generator samples ``x0``: the loss, the DMD gradient (docs/methods/dmd.md)
        and the number of its entries that were non-finite (replaced)."""
        x0_real, x0_fake, _ = self.dm_estimates(x0.detach(), cond, uncond)
        gradient, replaced = self.dm_gradient(x0.detach(), x0_real, x0_fake)
        return dmd_loss(x0, gradient), gradient, replaced

    def discriminator_logits(self, x0: Tensor, cond: Conditioning) -> Tensor:
        """GAN head on the fake score's bottleneck at a random noise level of ``x0``."""
        level = self.sample_levels(len(x0), *self.dmd.fake_level_range)
        x_noisy = self.backbone.schedule.add_noise(x0, self.randn(x0.shape), level)
        return self.discriminator_head(self.backbone.features(self.fake_score, x_noisy, level, cond))

    def generator_loss(self, x0: Tensor, state: Iteration) -> tuple[Tensor, dict]:
        """``L_G = L_DM + w_G·gan_G`` for generator samples ``x0`` (with grad) of the iteration ``state``."""
        loss_dm, gradient, replaced = self.distribution_matching_loss(x0, state.cond, state.uncond)
        logs = {
            "train/loss_dm": loss_dm.detach(),
            "train/dmd_grad_abs": gradient.abs().mean(),
            "train/dmd_grad_nonfinite": replaced,
        }
        loss = loss_dm
        if self.dmd.use_gan:
            loss_gan = gan_generator_loss(self.discriminator_logits(x0, state.cond))
            loss = loss + self.dmd.gan_generator_weight * loss_gan
            logs["train/loss_gan_g"] = loss_gan.detach()
        return loss, logs

    def fake_score_loss(self, x0: Tensor, state: Iteration) -> tuple[Tensor, dict]:
        """``L_guid = L_fake + w_D·gan_D`` on the detached generator batch ``x0`` of the critic's ``state``
        (weighted per sample by ``state.critic_weights`` where a method sets them)."""
        cond, batch = state.cond, state.batch
        level = self.sample_levels(len(x0), *self.dmd.fake_level_range)
        loss_fake = self.backbone.denoising_loss(
            self.fake_score, x0, cond, level, self.randn(x0.shape), state.critic_weights
        )
        logs = {"train/loss_fake": loss_fake.detach()}
        loss = loss_fake
        if self.dmd.use_gan:
            if "images" not in batch:
                raise KeyError("the GAN head needs real images: the batch has no 'images' key")
            real = self.backbone.encode_images(batch["images"])
            real_cond = self.backbone.encode_prompts(batch["prompts"])
            loss_gan = gan_discriminator_loss(self.discriminator_logits(real, real_cond), self.discriminator_logits(x0, cond))
            loss = loss + self.dmd.gan_discriminator_weight * loss_gan
            logs["train/loss_gan_d"] = loss_gan.detach()
        return loss, logs

    # ---- one iteration --------------------------------------------------------------------
    def generator_input(self, cond: Conditioning, n: int) -> tuple[Tensor, Tensor]:
        """The generator's input and its level (docs/methods/dmd.md): backward-simulated at a random step,
        or pure noise at the first level (``first_step``, and ``rollout``, which runs every step from it)."""
        levels = self.student_levels()
        if self.dmd.generator_samples == "rollout":
            return self.randn((n, *self.backbone.latent_shape)), levels[:1].expand(n)
        step = self.shared_randint(len(levels)) if self.dmd.generator_samples == "backward_simulation" else 0
        return backward_simulation_input(
            lambda x, t: self.backbone.predict_x0(self.generator, x, t, cond),
            self.randn((n, *self.backbone.latent_shape)),
            levels,
            step,
            self.backbone.schedule,
            self.student.step_rule,
            generator=self.rng,
        )

    def is_generator_iteration(self) -> bool:
        """TTUR: the generator updates when ``iteration % r == 0``."""
        return self.iterations % self.dmd.generator_update_ratio == 0

    def training_inputs(self, batch: dict, update_generator: bool) -> Iteration:
        """The iteration's state: the batch, its conditioning and the generator input (:meth:`generator_input`).

        A hook: methods that draw their own rollouts (GNDM's importance sampling and GRPO mode, AC-DMD)
        build the generator input, and what their other hooks need, here.
        """
        cond = self.backbone.encode_prompts(batch["prompts"])
        x_in, level = self.generator_input(cond, len(cond))
        return self.iteration(batch=batch, update_generator=update_generator, cond=cond, x_in=x_in, level=level)

    def iteration(self, kind: type[Iteration] = Iteration, **fields) -> Iteration:
        """An iteration state of ``kind`` from its ``fields``, with the unconditional branch (one empty prompt
        per sample of ``fields["cond"]``) derived here rather than at every hook that builds one."""
        return kind(uncond=self.backbone.empty_conditioning(len(fields["cond"])), **fields)

    def critic_inputs(self, state: Iteration, x0: Tensor) -> tuple[Iteration, Tensor]:
        """The fake score's state and samples: by default this iteration's, with its detached ``x0``.

        A hook: GNDM's importance sampling gives the critic fresh samples when the generator reuses old ones.
        """
        return state, x0

    def generator_x0(self, x_in: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        """The generator's x̂0 for the iteration's input ``x_in`` at ``level`` (grad as the caller allows):
        one step, or with ``generator_samples: rollout`` the whole sampler's output from the noise ``x_in``."""
        if self.dmd.generator_samples == "rollout":
            return self.rollout_x0(x_in, cond)
        return self.backbone.predict_x0(self.generator, x_in, level, cond)

    def rollout_x0(self, noise: Tensor, cond: Conditioning) -> Tensor:
        """The final-step x̂0 of the student sampler run through every level from ``noise``."""
        return few_step_sample(
            lambda x, t: self.backbone.predict_x0(self.generator, x, t, cond),
            noise,
            self.student_levels(),
            self.backbone.schedule,
            self.student.step_rule,
            generator=self.rng,
        )

    @torch.no_grad()
    def final_step_samples(self, cond: Conditioning, n: int) -> Tensor:
        """The final-step x̂0 of a full no-grad rollout of the student sampler (``critic_on_final_step``)."""
        return self.rollout_x0(self.randn((n, *self.backbone.latent_shape)), cond)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        state = self.training_inputs(batch, self.is_generator_iteration())
        batch_size = len(state.prompts)
        logs = {}
        if state.update_generator:
            with self.trainable_role("generator"):
                x0 = self.generator_x0(state.x_in, state.level, state.cond)
                loss, logs = self.generator_loss(x0, state)
                self.step_role("generator", loss)
            x0 = x0.detach()
        else:
            with torch.no_grad():
                x0 = self.generator_x0(state.x_in, state.level, state.cond)
        state, x0 = self.critic_inputs(state, x0)
        if self.dmd.critic_on_final_step:
            x0 = self.final_step_samples(state.cond, len(x0))
        with self.trainable_role("fake_score"):
            loss, fake_logs = self.fake_score_loss(x0, state)
            self.step_role("fake_score", loss)
        self.iterations += 1
        self.log_dict({**logs, **fake_logs}, prog_bar=True, batch_size=batch_size)
        self.log("generator_updates", float(self.generator_updates), prog_bar=True, batch_size=batch_size)
