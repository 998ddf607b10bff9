"""``DistillationModule``: roles, manual optimization and sampling shared by every method.

Roles: the frozen ``teacher`` (real score), the ``generator`` (student), the
``fake_score`` (critic) and an optional discriminator head that trains with
the fake score. Methods compute losses; :meth:`DistillationModule.step_role`
does the rest (live parameters, backward, clipping, step, schedule), under
any strategy: two AdamW under DDP/FSDP2, one :class:`RoleAwareAdamW` under
DeepSpeed, which accepts a single optimizer.
"""
from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn

from rdm_lightning.backbones.base import Backbone, Conditioning, torch_dtype
from rdm_lightning.core.sampling import STEP_RULES, few_step_sample
from rdm_lightning.methods.optim import OptimizerConfig, RoleAwareAdamW, role_param_group
from rdm_lightning.methods.roles import (
    RolesConfig,
    build_role_network,
    ema_copy,
    enable_gradient_checkpointing,
    frozen_entry_names,
    role_dtype,
    run_under_autocast,
    trainable_parameters,
)
from rdm_lightning.methods.sharding import check_same_on_every_rank, check_shardable_roles, is_sharded, shard_network
from rdm_lightning.methods.zero import PRESETS, check_zero_config, set_step_clipping
from rdm_lightning.strategies import DeepSpeedZeroStrategy, FSDP2Strategy

TRAINABLE_ROLES = ("generator", "fake_score")
FROZEN_PREFIXES = ("teacher.", "backbone.")
ACCEPTED_STRATEGIES = (
    "a single device, DDP with find_unused_parameters=True (ddp_find_unused_parameters_true, configs/strategy/ddp.yaml), "
    "DeepSpeed ZeRO stages 1-3 (rdm_lightning.strategies.DeepSpeedZeroStrategy, configs/strategy/deepspeed_zero2.yaml, "
    "deepspeed_zero3.yaml; Lightning's deepspeed_stage_1/2/3), FSDP2 (rdm_lightning.strategies.FSDP2Strategy, configs/strategy/fsdp2.yaml)"
)
"""The strategies a distillation module runs under, for the error naming a refused one."""
FLOAT32_MAX = torch.finfo(torch.float32).max
"""Largest finite float32: :meth:`Backbone.predict_x0` combines the CFG branches in float32."""


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block; every submodule's own mode is restored on exit."""
    modes = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for sub, training in modes:
            sub.training = training


def check_choice(name: str, value: str, accepted: tuple[str, ...]) -> None:
    """The config check of a named option: a ValueError naming the value and what is accepted."""
    if value not in accepted:
        raise ValueError(f"{name} must be one of {accepted}, got {value!r}")


def check_finite(name: str, value: float) -> None:
    """The config check of a float setting: a ValueError naming the value unless it is finite (not NaN, not ±inf)."""
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def refuse_ignored_settings(method: str, group: str, config, fields: Sequence[str], reason: str) -> None:
    """A ValueError naming each of ``fields`` of the dataclass ``config`` (the ``group`` argument) that is set
    away from its default although ``method`` does not use it, and why (``reason``)."""
    defaults = type(config)()
    changed = {f"{group}.{name}": getattr(config, name) for name in fields if getattr(config, name) != getattr(defaults, name)}
    if changed:
        raise ValueError(f"{method} does not use {changed} ({reason}): remove them from the config")


def check_guidance_scale(name: str, value: float) -> None:
    """The config check of a CFG scale: finite in float32, where the branches are combined
    (a larger scale is inf there, so every guided x̂0 would be NaN)."""
    if not abs(value) <= FLOAT32_MAX:  # also rejects NaN
        raise ValueError(f"{name} must be a finite number of magnitude <= {FLOAT32_MAX:.4g} (float32), got {value!r}")


@dataclass
class StudentConfig:
    """How the few-step generator samples."""

    num_steps: int = 4
    """Number of generator steps (1–4 in the papers)."""
    levels: list[float] | None = None
    """Explicit conditioning levels, highest first (e.g. ``[399]`` for SDXL 1-step);
    ``None`` takes the schedule's evenly spaced grid for ``num_steps``."""
    step_rule: str = "sde"
    """Between steps: ``sde`` re-noises x̂0 with fresh noise (DMD2), ``ode`` is the Euler/DDIM step."""

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.levels is not None:
            if len(self.levels) != self.num_steps:
                raise ValueError(f"levels {self.levels} must have num_steps={self.num_steps} entries")
            for level in self.levels:
                check_finite("levels", level)
        check_choice("step_rule", self.step_rule, STEP_RULES)


@dataclass
class TeacherSamplingConfig:
    """The teacher's default sampler (the multi-step baseline)."""

    num_steps: int = 32
    """Number of teacher steps."""
    guidance_scale: float = 2.0
    """Classifier-free guidance scale ``w`` (1 = none)."""
    step_rule: str = "ode"
    """``ode``: Euler (flow) / DDIM η=0 (VP); ``sde``: re-noise x̂0 each step."""

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        check_guidance_scale("teacher_sampling.guidance_scale", self.guidance_scale)
        check_choice("step_rule", self.step_rule, STEP_RULES)


class DistillationModule(L.LightningModule):
    """Base of every distillation method.

    Args:
        backbone: the model family adapter; it loads the teacher and the
            initial generator and fake-score networks.
        generator_optimizer: AdamW settings of the generator.
        fake_score_optimizer: AdamW settings of the fake score (and discriminator head).
        student: how the generator samples.
        teacher_sampling: the teacher's default sampler (baseline, ``rdm sample --role teacher``).
        teacher_dtype: dtype of the frozen teacher (``float32``, ``bfloat16``, ``float16``).
        seed: seed of the module's own random stream (noise, levels, steps); each
            rank offsets it by its rank, and it is checkpointed so resumed runs match.
        max_generator_updates: stop fit after this many generator updates (``None``:
            the trainer's limits). Lightning's ``max_steps`` counts every role's
            optimizer steps, which is rarely what a distillation budget means.
        roles: how the generator and the fake score hold their networks: ``full`` trainable copies
            (the default), ``lora`` (own frozen copy + adapter) or ``shared_lora`` (an adapter on the
            frozen teacher's own weights), with the LoRA's rank, alpha, targets, dropout and an ``init``
            file (docs/roles.md).
    """

    def __init__(
        self,
        backbone: Backbone,
        generator_optimizer: OptimizerConfig = OptimizerConfig(),
        fake_score_optimizer: OptimizerConfig = OptimizerConfig(),
        student: StudentConfig = StudentConfig(),
        teacher_sampling: TeacherSamplingConfig = TeacherSamplingConfig(),
        teacher_dtype: str = "float32",
        seed: int = 0,
        max_generator_updates: int | None = None,
        roles: RolesConfig = RolesConfig(),
    ):
        super().__init__()
        if max_generator_updates is not None and max_generator_updates < 1:
            raise ValueError(f"max_generator_updates must be >= 1 or None, got {max_generator_updates}")
        with warnings.catch_warnings():
            # Under LightningCLI the backbone is saved as its class_path/init_args config,
            # which is how load_from_checkpoint rebuilds it; the nn.Module warning does not apply.
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            self.save_hyperparameters()
        self.automatic_optimization = False
        self.backbone = backbone.requires_grad_(False)
        dtype = torch_dtype(teacher_dtype)
        self.teacher = backbone.load_denoiser().to(dtype).requires_grad_(False).eval()
        self.teacher_dtype = dtype
        self.seed = seed
        self.roles = roles
        self.generator = self.build_role("generator")
        self.fake_score = self.build_role("fake_score")
        self.discriminator_head: nn.Module | None = None
        self.generator_ema: nn.Module | None = None
        self._frozen_role_keys: frozenset[str] | None = None
        self._deepspeed_clips_roles = False
        self.optimizer_configs = {"generator": generator_optimizer, "fake_score": fake_score_optimizer}
        self.student = student
        self.teacher_sampling = teacher_sampling
        self.max_generator_updates = max_generator_updates
        self.role_updates = {role: 0 for role in TRAINABLE_ROLES}
        self.iterations = 0
        self.rng = torch.Generator().manual_seed(seed)

    # ---- counters -------------------------------------------------------------------------
    @property
    def generator_updates(self) -> int:
        """Generator optimizer steps so far (Lightning's ``global_step`` counts every role's)."""
        return self.role_updates["generator"]

    def train(self, mode: bool = True) -> "DistillationModule":
        """The trainable roles' modules (:meth:`role_modules`) follow ``mode``; the teacher, the
        backbone (VAE, text encoders), the generator's EMA and the rewards always stay in eval mode,
        so their dropout (and any other train-only behaviour) never acts (CONTRIBUTING.md, "Writing a new method")."""
        super().train(False)
        self.training = mode
        for modules in self.role_modules().values():
            for module in modules:
                module.train(mode)
        return self

    def setup(self, stage: str) -> None:
        if stage == "fit":
            # Before Lightning's model summary; networks loaded by from_pretrained arrive in eval mode.
            self.train()
        strategy = self.trainer.strategy
        # Each backward reaches one role only; DDP must expect the other role's parameters to be unused
        # (DeepSpeedStrategy subclasses DDPStrategy but wraps no DDP: its engine reduces the gradients).
        if (isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)
                and not strategy._ddp_kwargs.get("find_unused_parameters", False)):
            raise ValueError(
                "DDP needs find_unused_parameters=True for distillation (each backward updates one role): "
                "use --trainer.strategy=ddp_find_unused_parameters_true"
            )
        if isinstance(strategy, FSDPStrategy):
            raise ValueError(
                f"trainer.strategy {type(strategy).__name__} (FSDP1) cannot train a distillation module: its precision "
                "plugin refuses norm clipping (grad_clip), and the module shards its networks per role with FSDP2; "
                f"accepted: {ACCEPTED_STRATEGIES}"
            )
        if isinstance(strategy, ModelParallelStrategy):
            if not isinstance(strategy, FSDP2Strategy):
                raise ValueError(
                    f"trainer.strategy {type(strategy).__name__}: use its subclass rdm_lightning.strategies.FSDP2Strategy "
                    "(data parallel over every process, tensor parallel 1, and a resume that rebuilds the frozen "
                    f"networks the checkpoint leaves out); accepted: {ACCEPTED_STRATEGIES}"
                )
            check_shardable_roles(self.roles)
        self._deepspeed_clips_roles = False
        if isinstance(strategy, DeepSpeedStrategy):
            self.setup_deepspeed(strategy)

    # ---- DeepSpeed (docs/scaling.md, "DeepSpeed ZeRO-2 and ZeRO-3") --------------------------------------
    def setup_deepspeed(self, strategy: DeepSpeedStrategy) -> None:
        """Check that the module can train under ``strategy``'s DeepSpeed config (:func:`check_zero_config`:
        a ZeRO stage, clipping set once) and whether the roles' ``grad_clip`` are applied
        through DeepSpeed's own clipping. Lightning's plain ``DeepSpeedStrategy`` trains the same, but saves the
        frozen teacher, backbone and LoRA bases into every checkpoint: a warning names the subclass that does not.

        Raises:
            ValueError: see :func:`check_zero_config`.
        """
        from lightning.pytorch.utilities.rank_zero import rank_zero_warn

        grad_clips = {role: self.optimizer_configs[role].grad_clip for role in TRAINABLE_ROLES}
        check_zero_config(strategy.config, grad_clips)
        self._deepspeed_clips_roles = any(clip is not None for clip in grad_clips.values())
        if not isinstance(strategy, DeepSpeedZeroStrategy):
            rank_zero_warn(f"{type(strategy).__name__} saves the frozen teacher, backbone and LoRA bases into every "
                           "checkpoint (twice under ZeRO-2/3: the module state and DeepSpeed's frozen-parameter copy); "
                           f"rdm_lightning.strategies.DeepSpeedZeroStrategy ({PRESETS}) leaves them out")

    def configure_model(self) -> None:
        """Under FSDP2 (:class:`~rdm_lightning.strategies.FSDP2Strategy`), shard every network over the
        data-parallel mesh with ``fully_shard``, each in its backbone's units
        (:meth:`~rdm_lightning.backbones.base.Backbone.shard_units`) and then its root (:meth:`sharded_networks`).
        The frozen backbone (text encoders, VAE) and the rewards stay whole on every rank. Under any other
        strategy nothing happens; a second call (validate after fit) leaves the sharded networks as they are."""
        if self._trainer is None or not isinstance(self.trainer.strategy, ModelParallelStrategy) or is_sharded(self.generator):
            return
        mesh = self.device_mesh["data_parallel"]
        for name, (network, units) in self.sharded_networks().items():
            check_same_on_every_rank(name, network, self.gather_per_rank)
            shard_network(name, network, units, mesh)

    def sharded_networks(self) -> dict[str, tuple[nn.Module, list[nn.Module]]]:
        """The networks FSDP2 shards, by name, each with its units: the teacher, the generator, the fake score
        and the generator's EMA in the backbone's units, the discriminator head as one unit."""
        networks = {"teacher": self.teacher, "generator": self.generator, "fake_score": self.fake_score}
        if self.generator_ema is not None:
            networks["generator_ema"] = self.generator_ema
        sharded = {name: (network, self.backbone.shard_units(network)) for name, network in networks.items()}
        if self.discriminator_head is not None:
            sharded["discriminator_head"] = (self.discriminator_head, [])
        return sharded

    def configure_callbacks(self) -> list[L.Callback]:
        """The run's progress bar: generator updates out of ``max_generator_updates``, their rate and the
        time left (:class:`~rdm_lightning.callbacks.progress.UpdateProgressBar`), in place of Lightning's
        per-epoch bar; a bar the trainer was given, or ``enable_progress_bar: false``, is kept."""
        from rdm_lightning.callbacks.progress import default_progress_bar  # the callbacks import this module

        return default_progress_bar(self.trainer)

    def on_fit_start(self) -> None:
        if self.iterations == 0:
            self.rng.manual_seed(self.seed + self.global_rank)

    @property
    def budget_reached(self) -> bool:
        """Whether ``max_generator_updates`` generator updates are done (never, without a budget)."""
        return self.max_generator_updates is not None and self.generator_updates >= self.max_generator_updates

    def on_train_start(self) -> None:
        # A run resumed at its budget (from its final checkpoint) stops before another iteration.
        if self.budget_reached:
            self.trainer.should_stop = True

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.budget_reached:
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        self.backbone.flush_embedding_cache()

    # ---- randomness -----------------------------------------------------------------------
    def randn(self, shape: Sequence[int]) -> Tensor:
        """Standard normal noise from the module's own (checkpointed) stream."""
        return torch.randn(tuple(shape), generator=self.rng).to(self.device)

    def sample_levels(self, n: int, low: float, high: float) -> Tensor:
        """Training levels with ``u ~ U[low, high]`` from the module's stream."""
        return self.backbone.schedule.sample_levels(n, low, high, generator=self.rng).to(self.device)

    def shared_randint(self, high: int) -> int:
        """An integer in ``[0, high)`` drawn on rank 0 and broadcast, so every rank agrees."""
        value = int(torch.randint(high, (1,), generator=self.rng))
        return int(self.trainer.strategy.broadcast(value, src=0)) if self._trainer is not None else value

    # ---- roles ----------------------------------------------------------------------------
    def build_role(self, role: str) -> nn.Module:
        """``role``'s network in its layout (``roles.<role>``, docs/roles.md). An adapter's initialisation is
        seeded by ``seed`` for the fake score (as DMDR's LoRA critic always was, so its measured runs stand)
        and ``seed + 1`` for the generator. A ``shared_lora`` role on a reduced-precision teacher runs every
        forward under the teacher's autocast (its base is the teacher's weights), and any role with
        ``precision: bfloat16`` under bf16 autocast; ``gradient_checkpointing`` switches on the network's own."""
        config = self.roles[role]
        network = build_role_network(
            role, config, self.backbone.load_denoiser, self.teacher, self.backbone.lora_target_modules,
            seed=self.seed + (role == "generator"),
        )
        dtype = role_dtype(role, config, self.teacher_dtype)
        if dtype != torch.float32:
            run_under_autocast(network, dtype)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(role, network)
        return network

    def role_modules(self) -> dict[str, list[nn.Module]]:
        """Modules each trainable role's networks are made of."""
        fake = [self.fake_score] + ([self.discriminator_head] if self.discriminator_head is not None else [])
        return {"generator": [self.generator], "fake_score": fake}

    def role_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters each trainable role's optimizer owns and :meth:`trainable_role` toggles.

        By default every parameter of :meth:`role_modules`, and only the adapter's of a network in a
        LoRA layout (``roles``). A role may own only part of its modules (DMDR's LoRA critic: its LoRA
        weights, not the teacher weights it shares); parameters no role owns stay frozen.
        """
        params = {role: [p for m in modules for p in m.parameters()] for role, modules in self.role_modules().items()}
        for role in TRAINABLE_ROLES:
            if self.roles[role].adapted:
                network = getattr(self, role)
                frozen = {id(p) for p in network.parameters()} - {id(p) for p in trainable_parameters(network, self.roles[role])}
                params[role] = [p for p in params[role] if id(p) not in frozen]
        return params

    @contextmanager
    def trainable_role(self, role: str) -> Iterator[None]:
        """Only ``role``'s parameters require grad inside (forward and backward)."""
        if role not in TRAINABLE_ROLES:
            raise ValueError(f"unknown role {role!r}; trainable roles: {TRAINABLE_ROLES}")
        params = self.role_parameters()
        for name, role_params in params.items():
            for p in role_params:
                p.requires_grad_(name == role)
        try:
            yield
        finally:
            for role_params in params.values():
                for p in role_params:
                    p.requires_grad_(True)

    def _optimizer_of(self, role: str):
        optimizers = self.optimizers()
        if isinstance(optimizers, list):
            return optimizers[TRAINABLE_ROLES.index(role)]
        # Under DeepSpeed the LightningOptimizer wraps DeepSpeed's optimizer (ZeRO, BF16_Optimizer…),
        # which wraps ours in ``.optimizer``: the role must be set on the RoleAwareAdamW itself.
        inner = optimizers.optimizer
        while not isinstance(inner, RoleAwareAdamW) and hasattr(inner, "optimizer"):
            inner = inner.optimizer
        if not isinstance(inner, RoleAwareAdamW):
            raise TypeError(f"a single optimizer must be (or wrap) a RoleAwareAdamW, got {type(optimizers.optimizer).__name__}")
        inner.active_role = role
        return optimizers

    def numeric_stop(self, problem: str) -> FloatingPointError:
        """The error that stops the run on a numeric failure, naming where it happened
        (its type lets a crash handler tell a numeric stop from other failures)."""
        return FloatingPointError(
            f"{problem} at iteration {self.iterations} (generator update {self.generator_updates}); stopping the run"
        )

    def guard_nonfinite(self, what: str, nonfinite: Tensor) -> Tensor:
        """The number of non-finite entries of ``what`` that ``nan_to_num`` replaced, from ``nonfinite``,
        the ``[B]`` count of each sample's; stops the run when every sample of the batch had one
        (nothing of the batch would train, and the loss would look finite). A float tensor, for the log."""
        if bool((nonfinite > 0).all()):
            raise self.numeric_stop(
                f"{what} is non-finite in every sample of the batch ({int(nonfinite.sum())} entries replaced)"
            )
        return nonfinite.sum().float()

    def step_role(self, role: str, loss: Tensor) -> None:
        """Backward ``loss`` into ``role`` only, clip, step its optimizer and LR schedule."""
        if not torch.isfinite(loss.detach()).all():
            raise self.numeric_stop(f"{role} loss is {loss.detach().float().item()}")
        optimizer = self._optimizer_of(role)
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        clip = self.optimizer_configs[role].grad_clip
        if clip is not None:
            self.clip_role_gradients(role, optimizer, clip)
        elif self._deepspeed_clips_roles:  # DeepSpeed's step() would clip at the clip_grad another role set
            set_step_clipping(optimizer, None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.role_updates[role] += 1
        schedulers = self.lr_schedulers()
        # One scheduler per role, or one over all role groups under DeepSpeed.
        (schedulers[TRAINABLE_ROLES.index(role)] if isinstance(schedulers, list) else schedulers).step()

    def clip_role_gradients(self, role: str, optimizer, max_norm: float) -> None:
        """Scale ``role``'s gradients so that their total 2-norm is at most ``max_norm``
        (``OptimizerConfig.grad_clip``).

        Sharded (FSDP2): here, by ``torch.nn.utils.clip_grad_norm_`` over the role's gradient shards (DTensors,
        whose norm is that of the whole gradient across ranks), so that it never rests on a precision plugin
        (Lightning's FSDP one refuses norm clipping). Otherwise Lightning's ``clip_gradients`` (the precision
        plugin unscales fp16 gradients first).

        DeepSpeed: its ZeRO optimizer clips inside its ``step()``, by the total norm of all its groups, which is
        the active role's (the other role's gradients are zero); here its ``clip_grad`` is set to ``max_norm``
        for that step (:func:`~rdm_lightning.methods.zero.set_step_clipping`).
        """
        if is_sharded(self.generator):
            grads = [p for p in self.role_parameters()[role] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, max_norm)
        elif self._trainer is not None and isinstance(self.trainer.strategy, DeepSpeedStrategy):
            set_step_clipping(optimizer, max_norm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")

    def configure_optimizers(self):
        params = self.role_parameters()
        groups = {role: role_param_group(role, params[role], self.optimizer_configs[role]) for role in TRAINABLE_ROLES}
        if isinstance(self.trainer.strategy, DeepSpeedStrategy):
            optimizer = RoleAwareAdamW(list(groups.values()))
            lambdas = [self._warmup_lambda(g["role"]) for g in optimizer.param_groups]
            return [optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)]
        optimizers = [torch.optim.AdamW([groups[role]]) for role in TRAINABLE_ROLES]
        schedulers = [
            torch.optim.lr_scheduler.LambdaLR(opt, self._warmup_lambda(role))
            for opt, role in zip(optimizers, TRAINABLE_ROLES)
        ]
        return optimizers, schedulers

    def _warmup_lambda(self, role: str):
        config = self.optimizer_configs[role]
        return lambda _: config.warmup_factor(self.role_updates[role])

    def reward_models(self) -> dict[str, nn.Module]:
        """Rewards to report beside the digits metrics, by name (optimized and gold); none here."""
        return {}

    # ---- EMA of the generator -------------------------------------------------------------
    def enable_generator_ema(self) -> nn.Module:
        """Create (once) the frozen EMA copy of the generator; it is checkpointed with the module."""
        if self.generator_ema is None:
            if is_sharded(self.generator):
                raise RuntimeError("the generator is already sharded (FSDP2): create its EMA before configure_model, "
                                   "in a callback's setup (GeneratorEMA does)")
            if self.roles.generator.adapted:
                # The EMA averages the adapter; its frozen base is the generator's own tensors.
                self.generator_ema = ema_copy(self.generator)
            else:
                self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False).eval()
            self._frozen_role_keys = None
        return self.generator_ema

    @property
    def sampling_generator(self) -> nn.Module:
        """The generator used for sampling, evaluation and export: its EMA when there is one."""
        return self.generator_ema if self.generator_ema is not None else self.generator

    # ---- checkpoints ----------------------------------------------------------------------
    def is_frozen_state_key(self, key: str) -> bool:
        """Whether the state-dict entry ``key`` is frozen and rebuilt at construction (teacher, backbone,
        and a role's base under a LoRA layout), hence left out of checkpoints and refilled on load."""
        return key.startswith(FROZEN_PREFIXES) or key in self.frozen_role_keys()

    def frozen_role_keys(self) -> frozenset[str]:
        """State-dict names of the roles' frozen bases under LoRA layouts (``roles``), the EMA's included
        (its base is the generator's); computed once the networks are built."""
        if self._frozen_role_keys is None:
            keys = set()
            for role in TRAINABLE_ROLES:
                names = list(frozen_entry_names(getattr(self, role), self.roles[role]))
                keys.update(f"{role}.{name}" for name in names)
                if role == "generator" and self.generator_ema is not None:
                    keys.update(f"generator_ema.{name}" for name in names)
            self._frozen_role_keys = frozenset(keys)
        return self._frozen_role_keys

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Prompts encoded since the last checkpoint survive a preempted run.
        self.backbone.flush_embedding_cache()
        # The frozen teacher and backbone are reloaded from their paths; keep them out.
        state = checkpoint["state_dict"]
        for key in [k for k in state if self.is_frozen_state_key(k)]:
            del state[key]
        checkpoint["rdm"] = {
            "role_updates": dict(self.role_updates),
            "iterations": self.iterations,
            "rng": self.rng.get_state(),
            # Each rank draws from its own stream (seed + rank): a resumed rank continues its own.
            "rng_per_rank": self.gather_per_rank(self.rng.get_state()),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A distributed checkpoint (FSDP2) has no state_dict here: FSDP2Strategy loaded its entries into the
        # sharded networks already, the EMA (created in GeneratorEMA.setup) included.
        state = checkpoint.get("state_dict")
        if state is not None:
            if any(k.startswith("generator_ema.") for k in state):
                self.enable_generator_ema()
            for key, value in self.state_dict().items():
                if self.is_frozen_state_key(key):
                    state[key] = value
        rdm = checkpoint.get("rdm")
        if rdm is not None:
            self.role_updates = dict(rdm["role_updates"])
            self.iterations = rdm["iterations"]
            state = self.own_rank_state(rdm.get("rng_per_rank", [rdm["rng"]]), "random stream")
            if state is None:
                self.rng.manual_seed(hash((self.seed, self.global_rank, self.iterations)))
            else:
                self.rng.set_state(state)

    def gather_per_rank(self, value):
        """``value`` of every rank, in rank order; ``[value]`` in a single process. A collective
        under several processes, which every checkpoint save is."""
        if self._trainer is None or self.trainer.world_size == 1 or not torch.distributed.is_initialized():
            return [value]
        values = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(values, value)
        return values

    def own_rank_state(self, states: list, what: str):
        """This rank's entry of a per-rank checkpoint state, ``None`` when the checkpoint has none for
        it (it was written by fewer processes): the run then continues, no longer bit for bit."""
        rank = self.global_rank
        if rank < len(states):
            return states[rank]
        warnings.warn(f"the checkpoint has the {what} of {len(states)} processes, none for rank {rank}: "
                      "that rank starts a fresh one, so the resumed run is not bit for bit")
        return None

    # ---- scores ---------------------------------------------------------------------------
    def teacher_precision(self) -> torch.autocast:
        """Autocast to the teacher's dtype when it is reduced precision (a no-op for float32)."""
        return torch.autocast(self.device.type, dtype=self.teacher_dtype, enabled=self.teacher_dtype != torch.float32)

    def teacher_x0(
        self,
        x_t: Tensor,
        level: Tensor,
        cond: Conditioning,
        guidance_scale: float,
        uncond=None,
        network: nn.Module | None = None,
    ) -> Tensor:
        """The teacher's x̂0 (float32), run in the teacher's dtype (autocast when reduced precision).

        ``network``: a network on the teacher's weights to run instead (DMDR's LoRA'd
        teacher); ``None`` is the adapter-free teacher.
        """
        network = self.teacher if network is None else network
        with self.teacher_precision():
            return self.backbone.predict_x0(network, x_t, level, cond, guidance_scale, uncond).float()

    def real_x0(self, x_t: Tensor, level: Tensor, cond: Conditioning, guidance_scale: float, uncond=None) -> Tensor:
        """The real score's x̂0 in the DM loss: the teacher with CFG ``guidance_scale`` (DMDR: its DynaDG variant)."""
        return self.teacher_x0(x_t, level, cond, guidance_scale, uncond)

    def fake_x0(self, x_t: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        """The fake score's x̂0 in the DM loss (no CFG)."""
        return self.backbone.predict_x0(self.fake_score, x_t, level, cond)

    # ---- sampling -------------------------------------------------------------------------
    def student_levels(self) -> Tensor:
        """The generator's conditioning levels, highest first."""
        if self.student.levels is not None:
            return torch.tensor(self.student.levels, dtype=torch.float64)
        return self.backbone.schedule.generator_levels(self.student.num_steps)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        noise: Tensor | None = None,
        role: str = "generator",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Latents for ``prompts``: the (EMA) generator's few-step sampler, or the teacher's default sampler.

        ``noise`` is the initial noise and ``generator`` (CPU) seeds any fresh noise
        the sampler draws between steps, so both together fix the output.
        """
        cond = self.backbone.encode_prompts(list(prompts))
        if noise is None:
            noise = self.randn((len(prompts), *self.backbone.latent_shape))
        if role == "generator":
            with eval_mode(self.sampling_generator) as network:
                return self.student_sample(network, cond, noise, generator)
        if role == "teacher":
            uncond = self.backbone.empty_conditioning(len(prompts))
            config = self.teacher_sampling
            return few_step_sample(
                lambda x, t: self.teacher_x0(x, t, cond, config.guidance_scale, uncond),
                noise, self.backbone.schedule.generator_levels(config.num_steps), self.backbone.schedule, config.step_rule,
                generator, self.backbone.sampler_noise,
            )
        raise ValueError(f"unknown sampling role {role!r}; accepted: 'generator', 'teacher'")

    def student_sample(
        self, network: nn.Module, cond: Conditioning, noise: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        """The student's few-step sampler with ``network`` from ``noise`` (``generate`` hands it the
        (EMA) generator in eval mode): ``student.step_rule`` at :meth:`student_levels`."""
        return few_step_sample(
            lambda x, t: self.backbone.predict_x0(network, x, t, cond),
            noise, self.student_levels(), self.backbone.schedule, self.student.step_rule, generator,
            self.backbone.sampler_noise,
        )

    def nfe(self, role: str = "generator") -> int:
        """Network evaluations per image of :meth:`generate` (CFG counts twice)."""
        if role == "generator":
            return len(self.student_levels())
        return self.teacher_sampling.num_steps * (1 if self.teacher_sampling.guidance_scale == 1.0 else 2)

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        """Generate images for the validation prompts with fixed noise; callbacks score them."""
        generator = torch.Generator().manual_seed(batch_idx)
        noise = torch.randn((len(batch["prompts"]), *self.backbone.latent_shape), generator=generator).to(self.device)
        return self.backbone.decode(self.generate(batch["prompts"], noise, generator=generator))

