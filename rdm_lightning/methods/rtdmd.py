"""RTDMD stage 2 (``docs/methods/rtdmd.md``, "Stage 2, ``RTDMD``"): RL with SubGRPO on an AC-DMD generator.

Objective: p̃ ∝ p_teacher·exp(β·r), so the generator follows ∇KL(p_θ‖p_teacher) (the AC-DMD auxiliary,
weight 0.001) plus −β·∇E[r] (the PPO steps on the rollout and the reward backprop of the final step).

The module starts from a stage-1 :class:`~rdm_lightning.methods.acdmd.ACDMD` checkpoint
(``stage1_checkpoint``): the generator from its generator EMA (its generator if it had no EMA), the fake
score from its fake score. Counters, RNG and optimizer state of stage 1 are not carried over: stage 2
starts at RL iteration 0 with fresh AdamW states.

One Lightning ``training_step`` is one RL iteration (the spec's "epoch"), on one K-repeated batch
(``DigitsDataModule(group_size=K)``; K consecutive samples per prompt)::

    e = rl_iterations (checkpointed);  S = subgrpo_steps(seed, e, {0..T−2}, 2)    (same on every rank)
    rollout (no grad): T CPS steps (η = acdmd.eta) from independent initial latents; steps 0..T−2 are
        stochastic, steps in S draw fresh noise (per rank), the other stochastic steps use the per-prompt
        noise subgrpo_step_noise(prompts, S, e) (same for the K images of a prompt on every rank); the
        last step (into σ = 0) is deterministic. Latents and cps_simplified log-probs are stored.
    rewards r_m(decode(x̂0)) of the final x̂0 (no grad); gold rewards are logged only
    fake score: ONE step of L_F = L_ADSM + γ·L_cons on the stored final x̂0 (σ_s = 0)   (ACDMD.critic_loss)
    advantages: rtdmd_advantages over the gathered batch (per-reward group-centred / global std, Σ ω_m,
        global renormalisation), zero-advantage samples masked (below), clipped to ±5
    generator: ONE step of
        L = [ Σ_{j∈S} PPO_j  +  w_aux·L_ACDMD(x̂0, σ_s = 0)  +  w_bp·mean(ReLU(h − R)) ] / (|S| + 1)
        PPO_j   = clipped PPO of step j (trajectory_policy_loss over S, clip ε = 1e-5; ρ = 1 exactly, since the
                  rollout and the single generator step use the same weights)
        x̂0      = x_{σ_{T−1}} − σ_{T−1}·v_θ(x_{σ_{T−1}})  WITH grad, from the stored latent
        R       = Σ_m ω_m·train_scale_m·r_m(decode(x̂0))  (differentiable rewards, with grad)

Choices, where the spec leaves room or the library differs from the reference:

- **One batch per RL iteration.** The reference samples 16 batches per epoch, then takes one optimizer
  step with gradients accumulated over its sub-batches; here one (larger) K-repeated batch is the epoch's
  whole sample, so nothing has to survive between training steps and nothing but the iteration counter
  needs checkpointing (unlike GNDM's stored IS rollout). Its per-(sub-batch, step) division by
  ``grad_accum × |steps|`` becomes the mean over the batch and the division by ``|S| + 1``
  (``RTDMDConfig.average_over_steps``); Σ_{j∈S} PPO_j is ``|S|`` × the step mean of
  :func:`~rdm_lightning.core.policy.trajectory_policy_loss`.
- **Zero advantages.** The spec drops samples whose advantage is all zero; after the global
  renormalisation a constant group gets ``−mean/std ≈ 1e-8``, not 0, so that test never fires on the
  renormalised values. The mask is therefore taken *before* renormalising: a sample whose per-reward
  group-centred advantages ``A_m`` are all exactly 0 is set to exactly 0 afterwards, which
  ``trajectory_policy_loss`` then drops. The renormalisation itself runs over the whole gathered batch
  (the reference's statistics), so masking moves the kept values by nothing and the dropped ones by
  ~1e-8. With no sub-batches there is no "re-add dropped samples until the count divides" step.
- **Groups are positional** (K consecutive samples), as everywhere in the library; the reference groups
  by prompt string, which is the same partition unless two groups share a prompt (the digits prompts
  repeat: two groups of "a handwritten digit 3" stay two groups, and share their per-prompt noise).
- **Rank-local draws.** Stage 2's t_r, Δ and all noise are local to each rank (``docs/methods/rtdmd.md``),
  so :meth:`RTDMD.shared_draw` does not broadcast (ACDMD's stage 1 does). The SubGRPO steps and the
  per-prompt noise need no collective by construction.
- **Rewards.** ``reward_weights`` (default 1 each) are both the ω_m of the advantages and the weights of
  R in the backprop term (with each reward's ``train_scale``, e.g. PickScore/26). The backprop term needs
  differentiable rewards; with ``backprop_weight: 0`` any reward is accepted (advantages only).
- **EMA.** The spec's stage-2 EMA, decay ``min((1+n)/(10+n), 0.9)`` every 8 generator updates, is
  :class:`~rdm_lightning.callbacks.GeneratorEMA` with ``decay: 0.9, every_n_updates: 8, warmup: true``.
- **LoRA** (``roles`` layouts, ``docs/roles.md``; ``docs/methods/rtdmd.md``, "LoRA roles"). A stage-1
  checkpoint with LoRA roles is merged on load: each role is rebuilt as stage 1 built it (its
  checkpoint's ``roles``), its adapter loaded and folded into its base weights. With a ``lora`` layout
  here too, those merged weights become the base of fresh adapters (B = 0, so stage 2 starts from
  exactly stage 1's networks) and only the new adapters train; ``rdm export`` merges them in turn.
  Full and LoRA stages mix freely. A ``shared_lora`` role cannot take stage 1's weights as its base (that
  base is the teacher's): it continues stage 1's own ``shared_lora`` adapter, and refuses any other.
- ``dmd.guidance_scale`` is the teacher CFG of the AC-DMD auxiliary (the stage-1 value);
  ``dmd.generator_update_ratio`` is unused (every iteration updates both roles once) and
  ``dmd.generator_samples`` must stay ``backward_simulation`` (the auxiliary is always at the final step).

- **Resuming.** S and the shared noise depend on (seed, rl_iterations, prompt) only, so a resumed run
  selects the same steps and draws the same per-prompt noise. From an epoch-boundary checkpoint the whole
  next iteration repeats bit for bit; mid-epoch, Lightning restarts the (non-stateful) loader, so the
  resumed iteration may see other prompts. :meth:`RTDMD.load_from_checkpoint` does not re-read
  ``stage1_checkpoint`` (a stage-2 checkpoint holds every trained weight).
- The rewards of the final x̂0 are scored twice: without grad on the rollout (advantages, logs) and with
  grad on the recomputed x̂0 of the backprop term (equal values).

Draw order in one iteration (module stream ``self.rng``): initial latents, the selected steps' noise
(in step order), the fake score's t_r, n, Δ and transitions, then the auxiliary's t_r, n and z′.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from rdm_lightning.backbones.base import Backbone, Conditioning, require_path
from rdm_lightning.core.advantages import ADVANTAGE_EPS, gather_batch, normalize_per_reward
from rdm_lightning.core.policy import trajectory_policy_loss
from rdm_lightning.core.rtdmd import rtdmd_advantages, subgrpo_step_noise, subgrpo_steps
from rdm_lightning.core.stochastic import Trajectory, stochastic_sample
from rdm_lightning.data.groups import check_grouped_prompts
from rdm_lightning.methods.acdmd import ACDMD, ACDMDConfig
from rdm_lightning.methods.base import StudentConfig, check_finite, refuse_ignored_settings
from rdm_lightning.methods.dmd import DMDConfig, require_generator_samples
from rdm_lightning.methods.grpo import flow_velocity
from rdm_lightning.methods.lora import has_lora_entries, load_base_weights, lora_parameters, merge_lora
from rdm_lightning.methods.optim import OptimizerConfig
from rdm_lightning.methods.rewarded import RewardedMethod, weighted_rewards
from rdm_lightning.methods.roles import RoleConfig, build_role_network, load_trained_entries, stage1_role_config
from rdm_lightning.rewards.base import RewardModel

STAGE1_ROLES = ("generator", "fake_score")


@dataclass
class RTDMDConfig:
    """RTDMD stage-2 settings (defaults: ``docs/methods/rtdmd.md``, "Stage 2, ``RTDMD``"; CPS η and γ are
    ``ACDMDConfig``'s)."""

    group_size: int = 4
    """K, images per prompt; the batch must be K-repeated (the data module's ``group_size``).
    The spec uses 16–24 on text-to-image; 4 gives 16 groups in a digits batch of 64."""
    num_selected_steps: int = 2
    """|S|: stochastic steps {0..T−2} trained each RL iteration (SubGRPO: 2 of {0, 1, 2})."""
    clip_range: float = 1e-5
    """PPO's ε (``docs/methods/rtdmd.md``, "Stage 2, ``RTDMD``")."""
    advantage_clip: float = 5.0
    """Advantages are clipped to ±this after the renormalisation."""
    reward_weights: dict[str, float] | None = None
    """ω_m per optimized reward, by name: the weights of the per-reward advantages and of R in the
    backprop term; ``None`` gives every reward 1 (the spec's ω_m = 1)."""
    acdmd_weight: float = 1e-3
    """Weight of the AC-DMD auxiliary at the final step (σ_s = 0); 0 skips it (and its teacher passes)."""
    backprop_weight: float = 1e-4
    """Weight of the reward-backprop term ``mean(ReLU(hinge − R))`` on decode(x̂0); 0 skips it, and then
    the optimized rewards need not be differentiable."""
    backprop_hinge: float = 3.0
    """Hinge of the reward-backprop term (3.0: with R ≈ 1.5 on SD3 it is effectively −w·R)."""
    average_over_steps: bool = True
    """Divide the generator loss by |S| + 1 (the trained steps plus the final step), as the reference
    divides each (sub-batch, step) backward by ``grad_accum × |steps|``; ``False`` steps on the plain sum."""

    def __post_init__(self):
        if int(self.group_size) != self.group_size or self.group_size < 2:
            raise ValueError(f"rtdmd.group_size must be an integer >= 2 (group-relative advantages), got {self.group_size}")
        self.group_size = int(self.group_size)
        if int(self.num_selected_steps) != self.num_selected_steps or self.num_selected_steps < 1:
            raise ValueError(f"rtdmd.num_selected_steps must be an integer >= 1, got {self.num_selected_steps}")
        self.num_selected_steps = int(self.num_selected_steps)
        if not 0 <= self.clip_range < 1:
            raise ValueError(f"rtdmd.clip_range must lie in [0, 1), got {self.clip_range}")
        for name in ("advantage_clip", "acdmd_weight", "backprop_weight", "backprop_hinge"):
            check_finite(f"rtdmd.{name}", getattr(self, name))
        if not self.advantage_clip > 0:
            raise ValueError(f"rtdmd.advantage_clip must be > 0, got {self.advantage_clip}")
        for name in ("acdmd_weight", "backprop_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"rtdmd.{name} must be >= 0, got {getattr(self, name)}")
        if self.reward_weights is not None:
            for name, weight in self.reward_weights.items():
                check_finite(f"rtdmd.reward_weights[{name!r}]", weight)
            self.reward_weights = dict(self.reward_weights)


@dataclass
class RLRollout:
    """One RL iteration's rollout: what the fake score, the advantages and the generator loss use."""

    prompts: list[str]
    trajectory: Trajectory
    """T CPS steps, recorded with cps_simplified log-probs (no grad)."""
    selected_steps: list[int]
    """S, the stochastic steps trained this iteration."""
    step_noise: dict[int, Tensor] = field(default_factory=dict)
    """The per-prompt shared noise ξ_j of the unselected stochastic steps (on the module's device)."""
    iteration: int = 0
    """The RL iteration (the spec's epoch) the rollout belongs to."""

    @property
    def final_x0(self) -> Tensor:
        """x̂0 of the last step, the sample that is rewarded and trains the fake score."""
        return self.trajectory.final_x0


def masked_rtdmd_advantages(
    scores: dict[str, Tensor], group_size: int, weights: dict[str, float] | None = None, clip: float = 5.0,
    eps: float = ADVANTAGE_EPS,
) -> tuple[Tensor, Tensor, Tensor]:
    """RTDMD advantages of a gathered batch, with zero-advantage samples masked: ``(raw, advantages, keep)``.

    ``raw`` is :func:`~rdm_lightning.core.rtdmd.rtdmd_advantages` before the clip (mean 0, std ≈ 1 over
    the batch; ``docs/methods/rtdmd.md``). ``keep`` is False where every per-reward group-centred
    advantage ``A_m`` is exactly 0 (e.g. a constant group), decided before the renormalisation that would
    turn those zeros into ~1e-8. ``advantages`` is ``clip(raw, ±clip)`` with the masked samples exactly 0.
    """
    per_reward = normalize_per_reward(dict(scores), group_size, std="global", eps=eps)
    keep = torch.stack([a != 0 for a in per_reward.values()]).any(dim=0)
    raw = rtdmd_advantages(scores, group_size, weights, eps=eps)
    advantages = torch.where(keep, raw.clamp(-clip, clip), torch.zeros_like(raw))
    return raw, advantages, keep


class RTDMD(RewardedMethod, ACDMD):
    """RTDMD stage 2: RL (SubGRPO + reward backprop + AC-DMD auxiliary) from a stage-1 AC-DMD checkpoint.

    Args:
        backbone: flow model family adapter (an ε/VP backbone is refused); the same teacher as stage 1.
        rewards: the optimized rewards (advantages, and the backprop term: differentiable unless
            ``rtdmd.backprop_weight`` is 0).
        gold_rewards: rewards scored and logged on the rollouts, never optimized.
        stage1_checkpoint: an ACDMD checkpoint (``rdm fit`` of ``configs/digits/rtdmd_stage1.yaml``)
            whose generator EMA (or generator) and fake score initialise this module; ``None`` starts
            from the pretrained network (only for tests and ablations).
        rtdmd: stage-2 settings (group size, SubGRPO, PPO clip, loss weights).
        acdmd: CPS η of rollouts and sampling, and the fake score's consistency γ, as in stage 1.
        dmd: ``guidance_scale`` is the teacher CFG of the AC-DMD auxiliary and ``norm_eps`` its normaliser's ε;
            ``generator_samples`` must stay ``backward_simulation`` (stage 2 draws its own rollouts), and
            setting ``generator_update_ratio`` or the level ranges is an error (unused here).
        generator_optimizer: AdamW of the generator (spec: lr 3e-6, weight decay 1e-4, clip 1.0).
        fake_score_optimizer: AdamW of the fake score (spec: lr 3e-5).
        **kwargs: the other arguments every method shares (:class:`DistillationModule`); ``student`` needs
            T >= 2 steps so that a stochastic step exists, and one generator update is one RL iteration.
    """

    def __init__(
        self,
        backbone: Backbone,
        rewards: list[RewardModel] | None = None,
        gold_rewards: list[RewardModel] | None = None,
        stage1_checkpoint: str | None = None,
        rtdmd: RTDMDConfig = RTDMDConfig(),
        acdmd: ACDMDConfig = ACDMDConfig(),
        dmd: DMDConfig = DMDConfig(),
        generator_optimizer: OptimizerConfig = OptimizerConfig(lr=3e-6, weight_decay=1e-4, grad_clip=1.0),
        fake_score_optimizer: OptimizerConfig = OptimizerConfig(lr=3e-5, weight_decay=1e-4, grad_clip=1.0),
        **kwargs,
    ):
        # Stage 2 draws its own rollouts; only the default is honoured.
        require_generator_samples(type(self).__name__, dmd, ("backward_simulation",))
        refuse_ignored_settings(type(self).__name__, "dmd", dmd, ("generator_update_ratio",),
                                "every RL iteration updates the fake score once, then the generator once")
        super().__init__(
            backbone, acdmd, dmd, generator_optimizer=generator_optimizer, fake_score_optimizer=fake_score_optimizer,
            **kwargs,
        )
        self.rtdmd = rtdmd
        num_steps = len(self.student_levels())
        if rtdmd.num_selected_steps > num_steps - 1:
            raise ValueError(
                f"rtdmd.num_selected_steps={rtdmd.num_selected_steps} exceeds the {num_steps - 1} stochastic steps "
                f"of a {num_steps}-step student (the last step, into σ = 0, is deterministic)"
            )
        rewards = list(rewards or [])
        if not rewards:
            raise ValueError("RTDMD stage 2 needs at least one reward in `rewards` (its advantages come from them)")
        weights = rtdmd.reward_weights if rtdmd.reward_weights is not None else {r.name: 1.0 for r in rewards}
        self.rewards = weighted_rewards(rewards, weights)
        if rtdmd.backprop_weight > 0:
            self.rewards.require_differentiable(
                needed_by=f"RTDMD's reward backprop (rtdmd.backprop_weight={rtdmd.backprop_weight})",
                remedy="Log such a reward as a gold reward, or set rtdmd.backprop_weight: 0 to optimize "
                "through the advantages only",
            )
        self.gold_rewards = nn.ModuleList(gold_rewards or [])
        self.rl_iterations = 0
        """RL iterations (the spec's epochs) done; seeds the SubGRPO steps and shared noise. Checkpointed."""
        self.stage1_source: str | None = None
        """Which stage-1 network the generator was initialised from (``generator_ema`` or ``generator``)."""
        if stage1_checkpoint is not None:
            self.load_stage1(stage1_checkpoint)

    # ---- stage-1 initialisation -----------------------------------------------------------------------
    def load_stage1(self, path: str | Path) -> None:
        """Initialise the generator from the stage-1 generator EMA (its generator without one) and the fake
        score from the stage-1 fake score, from a ``rdm fit`` checkpoint of ACDMD (``checkpoint["state_dict"]``
        with ``generator.``, ``generator_ema.``, ``fake_score.`` entries; frozen parts are not stored there)."""
        path = require_path(path, "stage1_checkpoint (the RTDMD stage-1 ACDMD checkpoint)")
        if not path.is_file():
            raise FileNotFoundError(f"stage1_checkpoint {str(path)!r} is not a file; pass the .ckpt of the stage-1 run")
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"stage1_checkpoint {str(path)!r} is not a Lightning checkpoint (no 'state_dict')")
        hparams = checkpoint.get("hyper_parameters") or {}
        self._check_stage1_student(hparams, path)
        source = "generator_ema" if any(k.startswith("generator_ema.") for k in state) else "generator"
        for role, prefix in (("generator", source), ("fake_score", "fake_score")):
            entries = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
            if not entries:
                raise ValueError(f"stage1_checkpoint {str(path)!r} has no {prefix!r} weights; is it an ACDMD checkpoint?")
            try:
                if self.roles[role].layout == "shared_lora":
                    self._continue_stage1_adapter(entries, role, hparams, path)
                    continue
                if has_lora_entries(entries):
                    entries = self._merged_stage1_weights(entries, role, hparams, path)
                network = getattr(self, role)
                if lora_parameters(network):
                    load_base_weights(network, entries)
                else:
                    network.load_state_dict(entries, strict=True)
            except RuntimeError as err:
                raise ValueError(
                    f"stage1_checkpoint {str(path)!r}: its {prefix!r} weights do not fit this module's {role} "
                    f"(same backbone as stage 1?): {err}"
                ) from err
        self.stage1_source = source

    def _continue_stage1_adapter(self, entries: dict, role: str, hparams: dict, path: Path) -> None:
        """A ``shared_lora`` role's base is the teacher's, so stage 1's weights cannot become it: the role
        continues stage 1's own adapter, which must be a ``shared_lora`` one on the same teacher (its rank and
        targets are checked by loading its weights strictly)."""
        stage1 = stage1_role_config(hparams, role)
        if stage1 is None or stage1.layout != "shared_lora":
            raise ValueError(
                f"roles.{role}.layout='shared_lora' continues stage 1's adapter on the teacher's weights, but "
                f"stage1_checkpoint {str(path)!r} trained the {role} as {getattr(stage1, 'layout', 'full')!r}: "
                "use layout 'lora' (stage 1's network merged, plus a fresh adapter) or 'full'"
            )
        load_trained_entries(getattr(self, role), self.roles[role], entries)

    def _merged_stage1_weights(self, entries: dict, role: str, hparams: dict, path: Path) -> dict[str, Tensor]:
        """The plain weights of a stage-1 role in a LoRA layout: the role rebuilt as stage 1 built it (its
        ``roles.<role>`` from the checkpoint's hyperparameters), on its own copy of the pretrained weights
        (a ``shared_lora`` one too, so the merge never touches this module's teacher), its adapter loaded
        from ``entries``, then merged (docs/roles.md)."""
        stage1 = stage1_role_config(hparams, role)
        if stage1 is None or not stage1.adapted:
            raise ValueError(
                f"stage1_checkpoint {str(path)!r} holds LoRA weights for the {role}, but its hyperparameters give "
                f"roles.{role} no LoRA layout (got {stage1!r}); stage 2 needs stage 1's rank and alpha to merge them"
            )
        own_copy = RoleConfig(
            layout="lora", rank=stage1.rank, alpha=stage1.alpha, target_modules=stage1.target_modules,
            init=stage1.init if stage1.layout == "lora" else None,
        )
        network = build_role_network(
            role, own_copy, self.backbone.load_denoiser, self.teacher, self.backbone.lora_target_modules, seed=0
        )
        load_trained_entries(network, own_copy, entries)
        return merge_lora(network).state_dict()

    def _check_stage1_student(self, hparams: dict, path: Path) -> None:
        """Warn when stage 1 trained other student levels than stage 2 samples with."""
        student = hparams.get("student")
        if isinstance(student, dict):
            try:
                student = StudentConfig(**student)
            except (TypeError, ValueError):
                return
        if not isinstance(student, StudentConfig):
            return
        if student.levels is not None:
            theirs = torch.tensor(student.levels, dtype=torch.float64)
        else:
            theirs = self.backbone.schedule.generator_levels(student.num_steps)
        ours = self.student_levels()
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours):
            warnings.warn(
                f"stage1_checkpoint {str(path)!r} trained student levels {theirs.tolist()}, stage 2 uses {ours.tolist()}",
                stacklevel=3,
            )

    # ---- randomness --------------------------------------------------------------------------------
    def shared_draw(self, draw: Callable[[torch.Generator], Tensor]) -> Tensor:
        """Stage 2 keeps t_r and Δ local to each rank (``docs/methods/rtdmd.md``): ``draw(self.rng)``, no broadcast."""
        return draw(self.rng)

    def stochastic_steps(self) -> list[int]:
        """Steps 0..T−2: CPS with ς > 0. The last step, into σ = 0, is deterministic (log-prob 0)."""
        return list(range(len(self.student_levels()) - 1))

    def selected_steps(self, iteration: int | None = None) -> list[int]:
        """S of RL iteration ``iteration`` (default: the current one): a function of (seed, iteration) only,
        so every rank, and a resumed run, selects the same steps."""
        iteration = self.rl_iterations if iteration is None else iteration
        return subgrpo_steps(self.seed, iteration, self.stochastic_steps(), self.rtdmd.num_selected_steps)

    # ---- one RL iteration -----------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: Sequence[str], cond: Conditioning, iteration: int | None = None) -> RLRollout:
        """T CPS steps of the generator from independent initial latents (no grad); steps in S draw fresh
        noise from ``self.rng``, the other stochastic steps take the per-prompt shared noise."""
        prompts = list(prompts)
        iteration = self.rl_iterations if iteration is None else iteration
        levels = self.student_levels()
        selected = self.selected_steps(iteration)
        shape = self.backbone.latent_shape
        step_noise = {
            j: z.to(self.device)
            for j, z in subgrpo_step_noise(prompts, selected, iteration, len(levels), shape).items()
        }
        trajectory = stochastic_sample(
            flow_velocity(self.backbone, self.generator, cond), self.randn((len(prompts), *shape)), levels, "cps",
            {"eta": self.acdmd.eta}, stochastic_steps=set(self.stochastic_steps()), generator=self.rng,
            log_prob="cps_simplified", step_noise=step_noise,
        )
        return RLRollout(prompts, trajectory, selected, step_noise, iteration)

    def gather(self, values: Tensor) -> Tensor:
        """``values`` of every rank, rank 0 first (the identity without a trainer or on one device)."""
        if self._trainer is None:
            return values
        return gather_batch(values, self.all_gather)

    def rollout_advantages(self, scores: dict[str, Tensor]) -> tuple[Tensor, dict]:
        """This rank's advantages ``[B]`` from its reward scores, with statistics over the gathered batch."""
        local = len(next(iter(scores.values())))
        gathered = {name: self.gather(values.detach().float()) for name, values in scores.items()}
        raw, advantages, keep = masked_rtdmd_advantages(
            gathered, self.rtdmd.group_size, {t.name: t.weight for t in self.reward_terms()}, self.rtdmd.advantage_clip
        )
        rank = self.global_rank if self._trainer is not None else 0
        mine = slice(rank * local, (rank + 1) * local)
        logs = {
            "train/advantage_mean": raw.mean(),
            "train/advantage_std": raw.std(unbiased=False),
            "train/advantage_abs": advantages.abs().mean(),
            "train/advantage_kept": keep.float().mean(),
            "train/advantage_clipped": (raw.abs() > self.rtdmd.advantage_clip).float().mean(),
        }
        return advantages[mine].to(self.device), logs

    def final_step_x0(self, rollout: RLRollout, cond: Conditioning) -> Tensor:
        """``x̂0 = x_{σ_{T−1}} − σ_{T−1}·v_θ(x_{σ_{T−1}})`` with grad, from the stored latent
        (docs/methods/rtdmd.md)."""
        x_in = rollout.trajectory.latents[-2]
        level = torch.full((len(x_in),), float(rollout.trajectory.sigmas[-2]), dtype=torch.float64, device=x_in.device)
        return self.backbone.predict_x0(self.generator, x_in, level, cond)

    def rl_generator_loss(
        self, rollout: RLRollout, advantages: Tensor, cond: Conditioning, uncond: Conditioning
    ) -> tuple[Tensor, dict]:
        """``[Σ_{j∈S} PPO_j + w_aux·L_ACDMD + w_bp·mean(ReLU(h − R))] / (|S| + 1)`` (module docstring)."""
        config = self.rtdmd
        steps = rollout.selected_steps
        velocity = flow_velocity(self.backbone, self.generator, cond)
        ppo_mean, logs = trajectory_policy_loss(velocity, rollout.trajectory, advantages, config.clip_range, steps=steps)
        loss = len(steps) * ppo_mean  # Σ_j of the per-step means
        logs["train/loss_ppo"] = loss.detach()
        if config.acdmd_weight > 0 or config.backprop_weight > 0:
            x0 = self.final_step_x0(rollout, cond)
            if config.acdmd_weight > 0:
                sigma_s = torch.zeros(len(x0), dtype=torch.float64, device=x0.device)
                loss_dm, _, dm_logs = self.acdmd_loss(x0, sigma_s, cond, uncond)
                loss = loss + config.acdmd_weight * loss_dm.float()
                logs.update(dm_logs)
            if config.backprop_weight > 0:
                scores = self.rewards.score_all(self.backbone.decode(x0), rollout.prompts, with_grad=True)
                total = self.rewards.weighted_sum(scores)
                loss_bp = self.reward_loss(total, config.backprop_weight, config.backprop_hinge)
                loss = loss + loss_bp
                logs.update({"train/loss_backprop": loss_bp.detach(), "train/reward_sum": total.detach().mean()})
        if config.average_over_steps:
            loss = loss / (len(steps) + 1)
        logs["train/loss_generator"] = loss.detach()
        return loss, logs

    def training_step(self, batch: dict, batch_idx: int) -> None:
        """One RL iteration: rollout, rewards, one fake-score step, advantages, one generator step."""
        prompts = list(batch["prompts"])
        check_grouped_prompts(prompts, self.rtdmd.group_size)
        cond = self.backbone.encode_prompts(prompts)
        uncond = self.backbone.empty_conditioning(len(prompts))
        rollout = self.rollout(prompts, cond)
        x0 = rollout.final_x0.detach()
        with torch.no_grad():
            images = self.backbone.decode(x0)
            scores = self.rewards.score_all(images, prompts)
        logs = {f"reward/{name}": values.mean() for name, values in scores.items()}
        logs.update(self.gold_reward_logs(x0, prompts, images))
        with self.trainable_role("fake_score"):
            sigma_s = torch.zeros(len(prompts), dtype=torch.float64, device=x0.device)
            loss_fake, fake_logs = self.critic_loss(x0, sigma_s, cond)
            self.step_role("fake_score", loss_fake)
        advantages, adv_logs = self.rollout_advantages(scores)
        with self.trainable_role("generator"):
            loss, gen_logs = self.rl_generator_loss(rollout, advantages, cond, uncond)
            self.step_role("generator", loss)
        self.rl_iterations += 1
        self.iterations += 1
        logs.update({**fake_logs, **adv_logs, **gen_logs})
        logs["train/subgrpo_step_mask"] = float(sum(2**j for j in rollout.selected_steps))
        self.log_dict(logs, prog_bar=False, batch_size=len(prompts))
        self.log("generator_updates", float(self.generator_updates), prog_bar=True, batch_size=len(prompts))
        self.log("rl_iterations", float(self.rl_iterations), prog_bar=True, batch_size=len(prompts))

    # ---- checkpoints -------------------------------------------------------------------------------
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's ``load_from_checkpoint``, without re-reading the stage-1 checkpoint: a stage-2
        checkpoint holds every trained weight, so ``rdm sample``/``rdm export`` work even after the stage-1
        file has moved (pass ``stage1_checkpoint=...`` to override)."""
        kwargs.setdefault("stage1_checkpoint", None)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["rtdmd"] = {"rl_iterations": self.rl_iterations, "stage1_source": self.stage1_source}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("rtdmd")
        if state is not None:
            self.rl_iterations = int(state["rl_iterations"])
            self.stage1_source = state.get("stage1_source")
