"""AC-DMD, stage 1 of RTDMD (``docs/methods/rtdmd.md``, "Stage 1, ``ACDMD``"): DMD on CPS boundary samples.

Flow backbones only (``x_σ = (1−σ)·x0 + σ·ε``, ``v = ε − x0``, ``t = 1000·σ``). The student's
levels ``σ_0 > … > σ_{N−1}`` (then 0) are sampled with CPS steps of η = 0.9 (``docs/methods/rtdmd.md``),
in training, evaluation and :meth:`ACDMD.generate` alike.

One iteration (:meth:`DMD.training_step`, reused through its hooks)::

    generator iteration (iteration % r == 0, TTUR r = dmd.generator_update_ratio, 10 in the spec):
        k ~ U{1..N} (same on every rank); k−1 CPS steps from ε without grad → x_in at σ = σ_{k−1}
        x̂0 = G(x_in, σ) WITH grad; x_s = CPS(x_in → σ_s = σ_k, or 0 for k = N; step noise z)
        t_r ~ U[1000σ_s + 10, 1000] clamped to [20, 980] (same on every rank), n ~ N(0, I)
        x_r = a·x_s + σ_rs·n                                        (ambient renoising)
        xs_real = CPS(x_r → σ_s; teacher velocity with CFG w; noise z′)
        xs_fake = CPS(x_r → σ_s; fake velocity, no CFG;     the SAME z′)
        g = nan_to_num((xs_fake − xs_real)/mean_pix|x_s − xs_real|)
        L_G = ½·MSE(x_s, sg(x_s − g)) in float64                    ⇒ ∂L_G/∂x_s = g/N
    every iteration, on its own no-grad rollout (its own k):
        L_F = mean(min(1, 10σ_rs²)·(v_φ(x_r, t_r) − v*)²) + γ·L_cons  (ambient DSM + consistency)

How it maps onto DMD's hooks (the spec's "step k carries gradient" with DMD's structure):

- :meth:`training_inputs` draws the rollout prefix and returns step k's *input* ``(x_in, σ_{k−1})``;
  the step's noise z and σ_s ride on the iteration's state (:class:`ACDMDIteration`) as its
  :class:`BoundaryRollout`.
  :meth:`DMD.training_step` then runs ``x̂0 = G(x_in, σ_{k−1})`` (with grad on a generator
  iteration) and :meth:`generator_loss` turns it into ``x_s`` with the differentiable CPS step
  (:meth:`boundary_sample`)::

      x_s = (1 − σ_s)·x̂0 + σ_s·cosθ·ε̂ + σ_s·sinθ·z,   ε̂ = (x_in − (1 − σ)·x̂0)/σ,   θ = η·π/2

  i.e. :func:`~rdm_lightning.core.stochastic.cps_step` with ``v = (x_in − x̂0)/σ``, the velocity the
  rollout's own steps use, so ``x_s`` is exactly step k's output. For k = N (σ_s = 0), ``x_s = x̂0``.
- On a critic-only iteration the rollout of :meth:`training_inputs` *is* the critic's: DMD runs step k
  without grad and :meth:`critic_inputs` applies the same CPS step. On a generator iteration that rollout
  trained the generator, so :meth:`critic_inputs` draws the critic a separate no-grad rollout with its
  own k (spec: "It trains on a separate no-grad rollout with its own k"), after the generator step.
- :meth:`fake_score_loss` receives ``x_s`` (and the state's ``critic_rollout``, with its σ_s) in place of DMD's x̂0.

Randomness: k, t_r and the consistency Δ are drawn from the module's stream ``self.rng`` on every
rank (keeping the per-rank streams in step) and rank 0's value is broadcast, as
:meth:`~rdm_lightning.methods.base.DistillationModule.shared_randint` does for k and as the
reference broadcasts them (``dist.broadcast(..., src=0)``). All noise (ε, z, n, z′, the consistency
transitions) is per rank. On one device the broadcast is the identity.

Differences from the reference trainer, all deliberate:

- Within a generator iteration the generator updates before the fake score (DMD's order; the
  reference updates the fake score first). Each still uses its own fresh rollout.
- The generator EMA is :class:`~rdm_lightning.callbacks.GeneratorEMA`, which steps once per generator
  update; the reference steps its EMA every iteration, which with TTUR r is a per-update decay of
  ``decay**r`` (0.99¹⁰ ≈ 0.904).
- The consistency terms ``h = x − σ·v_φ(x, σ)`` are taken as the fake score's x̂0 (identical for a
  flow network, and defined at σ′ = 0, where ``t′ = max(t_r − Δ, 0)`` can land).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor, nn

from rdm_lightning.backbones.base import Backbone, Conditioning
from rdm_lightning.core.rtdmd import (
    CONSISTENCY_MAX_DELTA,
    NUM_TRAIN_TIMESTEPS,
    RENOISE_CLAMP,
    RENOISE_OFFSET,
    acdmd_generator_loss,
    ambient_dsm_loss,
    ambient_renoise,
    ambient_target_weight,
    ambient_velocity_target,
    consistency_loss,
    consistency_sigma,
    consistency_transitions,
    project_to_boundary,
    sample_renoise_sigma,
)
from rdm_lightning.core.stochastic import cps_step, stochastic_sample
from rdm_lightning.methods.base import check_finite, refuse_ignored_settings
from rdm_lightning.methods.dmd import DMD, DMDConfig, Iteration, require_generator_samples
from rdm_lightning.methods.grpo import flow_velocity, require_flow

@dataclass
class ACDMDConfig:
    """AC-DMD settings (defaults: ``docs/methods/rtdmd.md``, "Stage 1, ``ACDMD``", and the released stage-1 configs)."""

    eta: float = 0.9
    """CPS η (θ = η·π/2) of every stochastic step: the rollouts, step k itself, the projection of the
    real and fake velocities back to σ_s, the consistency transitions, and :meth:`ACDMD.generate`."""
    consistency_weight: float = 0.01
    """γ of the consistency term in ``L_F = L_ADSM + γ·L_cons``; 0 switches it off (and skips its two
    extra fake-score passes), as the FLUX.1-dev / FLUX.2-9B configs do."""
    consistency_max_delta: int = CONSISTENCY_MAX_DELTA
    """Δ ~ UniformInt[1, this] timesteps between x_r and the consistency target: t′ = max(t_r − Δ, 0)."""
    renoise_clamp: tuple[float, float] = RENOISE_CLAMP
    """Clamp ``(min, max)`` of the renoise timestep t_r = 1000·σ_r, drawn from U[1000·σ_s + 10, 1000]."""
    adsm_weight_cap: float = 10.0
    """Cap c of the ambient-DSM weight ``min(1, c·σ_rs²)`` (the reference's ``clamp(1/σ_rs², max=c)``
    applied to ``σ_rs·v``; ``target_formula_move_scale_out: true``)."""

    def __post_init__(self):
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"acdmd.eta must lie in [0, 1], got {self.eta}")
        for name in ("consistency_weight", "adsm_weight_cap"):
            check_finite(f"acdmd.{name}", getattr(self, name))
        if self.consistency_weight < 0:
            raise ValueError(f"acdmd.consistency_weight must be >= 0, got {self.consistency_weight}")
        if int(self.consistency_max_delta) != self.consistency_max_delta or self.consistency_max_delta < 1:
            raise ValueError(f"acdmd.consistency_max_delta must be an integer >= 1, got {self.consistency_max_delta}")
        self.consistency_max_delta = int(self.consistency_max_delta)
        low, high = (float(v) for v in self.renoise_clamp)
        if not 0.0 <= low <= high <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(
                f"acdmd.renoise_clamp must satisfy 0 <= min <= max <= {NUM_TRAIN_TIMESTEPS}, got {self.renoise_clamp}"
            )
        if high < RENOISE_OFFSET:
            raise ValueError(f"acdmd.renoise_clamp max {high} leaves no renoise interval above t = {RENOISE_OFFSET}")
        self.renoise_clamp = (low, high)
        if self.adsm_weight_cap <= 0:
            raise ValueError(f"acdmd.adsm_weight_cap must be > 0, got {self.adsm_weight_cap}")
        if self.eta == 0 and self.consistency_weight > 0:
            warnings.warn(
                "acdmd.eta = 0 makes the consistency transitions deterministic: both samples coincide and "
                "L_cons becomes the biased mean((h1 − h0)²)",
                stacklevel=2,
            )


@dataclass
class BoundaryRollout:
    """Step k of a CPS rollout, up to its network call: ``x_s = CPS(x_in, G(x_in, σ) → σ_s; noise)``."""

    x_in: Tensor
    """Input of step k: pure noise for k = 1, else the output of k − 1 no-grad CPS steps."""
    level: Tensor
    """σ = σ_{k−1} per sample ``(B,)`` (float64), the level step k conditions the generator on."""
    sigma_s: Tensor
    """Boundary level σ_s = σ_k, or 0 for the last step, per sample ``(B,)`` (float64)."""
    noise: Tensor
    """z, step k's CPS noise (unused where σ_s = 0: that step is deterministic)."""
    step: int
    """k ∈ {1..N}, the number of the trained step (1-based, as in the spec)."""


@dataclass(frozen=True, kw_only=True)
class ACDMDIteration(Iteration):
    """An AC-DMD iteration: ``(x_in, level)`` is step k's input of :attr:`rollout`."""

    rollout: BoundaryRollout
    """The rollout :meth:`ACDMD.training_inputs` drew: the generator's on a generator iteration, else the critic's."""
    critic_rollout: BoundaryRollout | None = None
    """The rollout whose boundary samples the fake score trains on (its σ_s, its k), set by
    :meth:`ACDMD.critic_inputs`."""


def velocity_from_x0(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """Flow velocity ``v = (x − x̂0)/σ`` (fp32, ``σ > 0`` per sample), as :func:`flow_velocity` computes it."""
    return (x.float() - x0.float()) / sigma.float().to(x.device).view(-1, *[1] * (x.ndim - 1))


class ACDMD(DMD):
    """AC-DMD (RTDMD stage 1) distillation of a flow ``backbone``'s teacher into a CPS few-step generator.

    Args:
        backbone: model family adapter with a flow schedule (an ε/VP backbone is refused).
        acdmd: AC-DMD settings (CPS η, consistency γ and Δ, renoise clamp, ADSM weight cap).
        dmd: the DMD settings AC-DMD shares: ``guidance_scale`` (teacher CFG w of the real velocity),
            ``generator_update_ratio`` (TTUR, 10 in the spec), ``norm_eps`` (0: the spec's
            normaliser) and ``generator_samples`` (``first_step`` trains step 1 only; a ``rollout``
            is refused: the DM loss is at a CPS boundary sample). Setting the DM/fake level ranges is an
            error (t_r follows ``acdmd.renoise_clamp``), as are a GAN head and ``critic_on_final_step``.
        **kwargs: the arguments every method shares (:class:`DistillationModule`); of ``student`` only the
            levels (``num_steps`` / ``levels``) are used: the student samples with CPS(``acdmd.eta``), and
            setting its ``step_rule`` is an error.
    """

    def __init__(
        self,
        backbone: Backbone,
        acdmd: ACDMDConfig = ACDMDConfig(),
        dmd: DMDConfig = DMDConfig(),
        **kwargs,
    ):
        # Checked before the networks load: CPS steps and ambient renoising are flow-only.
        require_flow(backbone, "AC-DMD")
        method = type(self).__name__
        refuse_ignored_settings(method, "dmd", dmd, ("dm_level_range", "fake_level_range"),
                                "its renoise level t_r follows acdmd.renoise_clamp")
        if dmd.use_gan:
            raise ValueError(
                f"AC-DMD has no GAN head: set dmd.gan_generator_weight=0 (got {dmd.gan_generator_weight})"
            )
        # Its DM loss is at a CPS boundary sample, and its critic fits those samples.
        require_generator_samples(type(self).__name__, dmd, ("backward_simulation", "first_step"))
        if dmd.critic_on_final_step:
            raise ValueError(
                f"{type(self).__name__} has its own critic batch: dmd.critic_on_final_step=true is not supported"
            )
        super().__init__(backbone, dmd, **kwargs)
        # After the base's __init__: the CLI resolves the shared arguments only where they are passed on whole.
        refuse_ignored_settings(method, "student", self.student, ("step_rule",),
                                f"the student samples with CPS(acdmd.eta={acdmd.eta})")
        self.acdmd = acdmd
        self._check_levels()
    def _check_levels(self) -> None:
        """Every boundary σ_s < 1 must leave a renoise interval: 1000·σ_s + 10 <= clamp max."""
        levels = self.student_levels()
        if not ((levels > 0).all() and (levels <= 1).all() and (levels[1:] < levels[:-1]).all()):
            raise ValueError(f"AC-DMD needs student levels strictly decreasing in (0, 1], got {levels.tolist()}")
        t_max = self.acdmd.renoise_clamp[1]
        too_high = [float(s) for s in levels[1:] if NUM_TRAIN_TIMESTEPS * float(s) + RENOISE_OFFSET > t_max]
        if too_high:
            raise ValueError(
                f"boundary levels {too_high} leave no renoise interval: t_r ~ U[1000·σ_s + {RENOISE_OFFSET}, 1000] "
                f"must start at or below acdmd.renoise_clamp max {t_max}"
            )

    # ---- randomness shared across ranks -----------------------------------------------------
    def shared_draw(self, draw: Callable[[torch.Generator], Tensor]) -> Tensor:
        """``draw(self.rng)`` on every rank (keeping the streams in step), rank 0's value kept (CPU).

        Like :meth:`shared_randint`: every rank agrees on t_r and Δ (``docs/methods/rtdmd.md``, "Stage 1, ``ACDMD``").
        """
        value = draw(self.rng)
        return self.trainer.strategy.broadcast(value, src=0) if self._trainer is not None else value

    def renoise_sigma(self, sigma_s: Tensor) -> Tensor:
        """σ_r = t_r/1000 per sample, ``t_r ~ U[1000σ_s + 10, 1000]`` clamped; same on every rank."""
        sigma_s = sigma_s.detach().cpu()
        sigma_r = self.shared_draw(lambda g: sample_renoise_sigma(sigma_s, g, self.acdmd.renoise_clamp))
        return sigma_r.to(self.device)

    def consistency_prime(self, sigma_r: Tensor) -> Tensor:
        """σ′ = max(t_r − Δ, 0)/1000, ``Δ ~ UniformInt[1, max_delta]``; same on every rank."""
        sigma_r = sigma_r.detach().cpu()
        prime = self.shared_draw(lambda g: consistency_sigma(sigma_r, g, self.acdmd.consistency_max_delta))
        return prime.to(self.device)

    # ---- rollout and boundary sample ------------------------------------------------------
    def draw_step(self) -> int:
        """k ∈ {1..N}, the same on every rank (k = 1 without backward simulation)."""
        if self.dmd.generator_samples == "first_step":
            return 1
        return self.shared_randint(len(self.student_levels())) + 1

    def boundary_rollout(self, cond: Conditioning, n: int) -> BoundaryRollout:
        """Draw k, run k − 1 CPS steps from fresh noise without grad, and draw step k's noise z."""
        levels = self.student_levels()
        step = self.draw_step()
        noise = self.randn((n, *self.backbone.latent_shape))
        with torch.no_grad():
            x_in = stochastic_sample(
                flow_velocity(self.backbone, self.generator, cond), noise, levels, "cps", {"eta": self.acdmd.eta},
                generator=self.rng, return_trajectory=False, num_steps=step - 1,
            )
        sigma_s = float(levels[step]) if step < len(levels) else 0.0
        return BoundaryRollout(
            x_in=x_in,
            level=torch.full((n,), float(levels[step - 1]), dtype=torch.float64, device=self.device),
            sigma_s=torch.full((n,), sigma_s, dtype=torch.float64, device=self.device),
            noise=self.randn(x_in.shape),
            step=step,
        )

    def boundary_sample(self, rollout: BoundaryRollout, x0: Tensor) -> Tensor:
        """``x_s`` of step k from the generator's x̂0 at ``rollout.x_in`` (differentiable in x̂0).

        The CPS step with ``v = (x_in − x̂0)/σ`` and the rollout's z; ``x_s = x̂0`` where σ_s = 0.
        """
        velocity = velocity_from_x0(rollout.x_in, x0, rollout.level)
        final = rollout.sigma_s == 0
        # A step into σ_s = 0 is deterministic and returns x̂0 itself, not x − σ·(x − x̂0)/σ.
        if bool(final.all()):
            return x0.float()
        x_s = cps_step(rollout.x_in, velocity, rollout.level, rollout.sigma_s, self.acdmd.eta, noise=rollout.noise).sample
        if bool(final.any()):
            x_s = torch.where(final.view(-1, *[1] * (x_s.ndim - 1)), x0.to(x_s.dtype), x_s)
        return x_s

    # ---- the generator loss (docs/methods/rtdmd.md, "Stage 1, `ACDMD`") -------------------
    def boundary_estimates(
        self, x_s: Tensor, sigma_s: Tensor, cond: Conditioning, uncond: Conditioning
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One AC-DMD draw at detached ``x_s``: ``(xs_real, xs_fake, σ_r)``.

        Draw order: t_r (shared), n (ambient renoising), z′ (the projection noise, one for both).
        """
        sigma_r = self.renoise_sigma(sigma_s)
        x_r, _, _ = ambient_renoise(x_s, sigma_s, sigma_r, self.randn(x_s.shape))
        z = self.randn(x_s.shape)
        scale = self.real_guidance_scale()
        with torch.no_grad():
            v_real = velocity_from_x0(x_r, self.real_x0(x_r, sigma_r, cond, scale, uncond), sigma_r)
            v_fake = velocity_from_x0(x_r, self.fake_x0(x_r, sigma_r, cond), sigma_r)
            xs_real = project_to_boundary(x_r, v_real, sigma_r, sigma_s, self.acdmd.eta, z).sample
            xs_fake = project_to_boundary(x_r, v_fake, sigma_r, sigma_s, self.acdmd.eta, z).sample
        return xs_real, xs_fake, sigma_r

    def acdmd_loss(
        self, x_s: Tensor, sigma_s: Tensor, cond: Conditioning, uncond: Conditioning
    ) -> tuple[Tensor, Tensor, dict]:
        """``(L_G, g, logs)`` for boundary samples ``x_s`` (with grad): ``∂L_G/∂x_s = g/N`` (float64)."""
        x_detached = x_s.detach()
        xs_real, xs_fake, sigma_r = self.boundary_estimates(x_detached, sigma_s, cond, uncond)
        gradient, replaced = self.dm_gradient(x_detached, xs_real, xs_fake)
        loss = acdmd_generator_loss(x_s, gradient)
        logs = {
            "train/loss_dm": loss.detach().float(),
            "train/dmd_grad_abs": gradient.abs().mean(),
            "train/dmd_grad_nonfinite": replaced,
            "train/renoise_t": (NUM_TRAIN_TIMESTEPS * sigma_r).mean().float(),
        }
        return loss, gradient, logs

    def generator_loss(self, x0: Tensor, state: ACDMDIteration) -> tuple[Tensor, dict]:
        """``L_G`` of step k: ``x0`` is the generator's x̂0 at the rollout's ``x_in`` (with grad)."""
        rollout = state.rollout
        x_s = self.boundary_sample(rollout, x0)
        loss, _, logs = self.acdmd_loss(x_s, rollout.sigma_s, state.cond, state.uncond)
        logs["train/acdmd_step"] = float(rollout.step)
        return loss, logs

    # ---- the fake-score loss (docs/methods/rtdmd.md, "Stage 1, `ACDMD`") ------------------
    def consistency_term(
        self, x_r: Tensor, sigma_r: Tensor, v_r: Tensor, h0: Tensor, cond: Conditioning
    ) -> tuple[Tensor, Tensor]:
        """``(L_cons, replaced)``: ``L_cons = mean[(h1 − h0)⊙(h2 − h0)]`` from two no-grad CPS transitions
        x_r → σ′ with sg(v_r), then ``h_i = x′_i − σ′·v_φ(x′_i, t′)`` (the fake x̂0 at x′_i, with grad),
        and how many products were non-finite (any one zeroes L_cons; all samples stop the run).
        Draw order: Δ, then the two transitions' noise."""
        sigma_prime = self.consistency_prime(sigma_r)
        x1, x2 = consistency_transitions(x_r, v_r.detach(), sigma_r, sigma_prime, self.acdmd.eta, generator=self.rng)
        # One batched pass for both (the fake score has no batch statistics).
        h = self.fake_x0(torch.cat([x1, x2]), torch.cat([sigma_prime, sigma_prime]), Conditioning.cat([cond, cond]))
        h1, h2 = h.chunk(2)
        loss, nonfinite = consistency_loss(h0, h1, h2, return_nonfinite=True)
        return loss, self.guard_nonfinite("the consistency term", nonfinite)

    def fake_score_loss(self, x0: Tensor, state: ACDMDIteration) -> tuple[Tensor, dict]:
        """:meth:`critic_loss` on the critic's boundary samples ``x0`` (= x_s) at ``state.critic_rollout``'s σ_s."""
        return self.critic_loss(x0, state.critic_rollout.sigma_s, state.cond)

    def critic_loss(self, x_s: Tensor, sigma_s: Tensor, cond: Conditioning) -> tuple[Tensor, dict]:
        """``L_F = L_ADSM + γ·L_cons`` on boundary samples ``x_s`` at levels ``sigma_s`` (``(B,)``, float64).

        Draw order: t_r (shared), n, then (γ > 0) Δ (shared) and the transitions' noise.
        """
        x_s = x_s.detach()
        sigma_r = self.renoise_sigma(sigma_s)
        noise = self.randn(x_s.shape)
        x_r, _, sigma_rs = ambient_renoise(x_s, sigma_s, sigma_r, noise)
        target = ambient_velocity_target(x_s, sigma_s, sigma_r, sigma_rs, noise)
        h0 = self.fake_x0(x_r, sigma_r, cond)  # x_r − σ_r·v_φ(x_r, t_r), with grad
        v_r = velocity_from_x0(x_r, h0, sigma_r)
        loss_adsm = ambient_dsm_loss(v_r, target, ambient_target_weight(sigma_rs, self.acdmd.adsm_weight_cap))
        loss = loss_adsm
        logs = {"train/loss_adsm": loss_adsm.detach()}
        if self.acdmd.consistency_weight > 0:
            loss_cons, replaced = self.consistency_term(x_r, sigma_r, v_r, h0, cond)
            loss = loss + self.acdmd.consistency_weight * loss_cons
            logs["train/loss_consistency"] = loss_cons.detach()
            logs["train/consistency_nonfinite"] = replaced
        logs["train/loss_fake"] = loss.detach()
        return loss, logs

    # ---- DMD's hooks --------------------------------------------------------------------
    def training_inputs(self, batch: dict, update_generator: bool) -> ACDMDIteration:
        """A boundary rollout for this iteration; its step-k input ``(x_in, σ_{k−1})`` goes to DMD's
        ``x̂0 = G(x_in, σ)``. It trains the generator on a generator iteration, else the critic."""
        prompts = batch["prompts"]
        cond = self.backbone.encode_prompts(prompts)
        rollout = self.boundary_rollout(cond, len(prompts))
        return self.iteration(
            ACDMDIteration, batch=batch, update_generator=update_generator, cond=cond, x_in=rollout.x_in,
            level=rollout.level, rollout=rollout,
        )

    def critic_inputs(self, state: ACDMDIteration, x0: Tensor) -> tuple[ACDMDIteration, Tensor]:
        """The critic's boundary samples: this iteration's rollout on a critic-only iteration, else a
        separate no-grad rollout with its own k (drawn after the generator step)."""
        rollout = state.rollout
        with torch.no_grad():
            if state.update_generator:
                rollout = self.boundary_rollout(state.cond, len(x0))
                x0 = self.backbone.predict_x0(self.generator, rollout.x_in, rollout.level, state.cond)
            x_s = self.boundary_sample(rollout, x0)
        return replace(state, critic_rollout=rollout), x_s

    # ---- sampling -------------------------------------------------------------------------
    def student_sample(
        self, network: nn.Module, cond: Conditioning, noise: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        """The generator's CPS(η) sampler (``docs/methods/rtdmd.md``: inference is stochastic; the last
        step, into σ = 0, is deterministic and returns x̂0)."""
        return stochastic_sample(
            flow_velocity(self.backbone, network, cond), noise, self.student_levels(), "cps",
            {"eta": self.acdmd.eta}, generator=generator, return_trajectory=False,
        )
