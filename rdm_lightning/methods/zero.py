"""DeepSpeed ZeRO (Lightning's ``DeepSpeedStrategy``) from the distillation module's side: the stages it runs
under, and per-role gradient clipping (docs/scaling.md, "DeepSpeed ZeRO-2 and ZeRO-3").

Under DeepSpeed the module steps one :class:`~rdm_lightning.methods.optim.RoleAwareAdamW` over both roles.
DeepSpeed's ZeRO optimizer (stages 1–3, and its BF16 optimizer) computes the gradient norm over all of its
parameter groups and clips inside its own ``step()`` by its ``clip_grad`` attribute, which the config's
``gradient_clipping`` only initialises. At each step only the active role holds gradients (the other role's are
zero), so that norm is the active role's, and setting ``clip_grad`` to the active role's ``grad_clip`` before
the step clips each role by its own norm and threshold.
"""
from __future__ import annotations

from typing import Mapping

ZERO_STAGES = (1, 2, 3)
"""ZeRO stages a distillation module trains under (stage 0, plain data parallelism, clips only by the config)."""
PRESETS = "configs/strategy/deepspeed_zero2.yaml, configs/strategy/deepspeed_zero3.yaml"
"""The strategy presets, for the errors."""
OFFLOAD_PRESET = "configs/strategy/deepspeed_zero2_offload.yaml"
"""The preset that offloads the optimizer, for the errors."""


def zero_stage(config: Mapping) -> int:
    """The ZeRO stage of a DeepSpeed config dict (0 without ``zero_optimization``)."""
    zero = config.get("zero_optimization")
    return int(zero.get("stage", 0)) if isinstance(zero, Mapping) else 0


def offloaded_optimizer(config: Mapping) -> str | None:
    """Where the DeepSpeed ``config`` offloads the optimizer (``cpu`` or ``nvme``); ``None`` when it does not."""
    zero = config.get("zero_optimization")
    offload = zero.get("offload_optimizer") if isinstance(zero, Mapping) else None
    device = offload.get("device", "none") if isinstance(offload, Mapping) else "none"
    return None if device in (None, "none") else str(device)


def check_zero_config(config: Mapping, grad_clips: Mapping[str, float | None]) -> None:
    """A ValueError unless a distillation module can train under the DeepSpeed ``config``: a ZeRO stage in
    :data:`ZERO_STAGES`, clipping set once (the config's ``gradient_clipping`` or the roles' ``grad_clip``,
    ``grad_clips`` by role, never both), and an offloaded optimizer left to the module (DeepSpeed's own CPU Adam
    cannot step one role at a time: ``zero_force_ds_cpu_optimizer: false``). Every role layout trains under
    every stage (ZeRO-3 partitions each parameter on its own and gathers it for the module that runs it, a
    ``shared_lora`` role's base, the teacher's own weights, included)."""
    stage = zero_stage(config)
    if stage not in ZERO_STAGES:
        raise ValueError(f"DeepSpeed ZeRO stage {stage}: a distillation module trains under ZeRO stages {ZERO_STAGES} "
                         f"(their optimizer clips each role by its own grad_clip); use {PRESETS}")
    offload = offloaded_optimizer(config)
    if offload is not None and config.get("zero_force_ds_cpu_optimizer", True) is not False:
        raise ValueError(f"zero_optimization.offload_optimizer.device={offload!r} with zero_force_ds_cpu_optimizer="
                         f"{config.get('zero_force_ds_cpu_optimizer', True)!r}: DeepSpeed would demand its own CPU Adam, "
                         "which cannot step one role at a time; set zero_force_ds_cpu_optimizer: false in the DeepSpeed "
                         f"config so that the offloaded master weights are stepped by the role-aware AdamW ({OFFLOAD_PRESET})")
    configured = float(config.get("gradient_clipping") or 0.0)
    clipped = {f"{role}_optimizer.grad_clip": clip for role, clip in grad_clips.items() if clip is not None}
    if configured > 0 and clipped:
        raise ValueError(f"gradient clipping set twice: the DeepSpeed config's gradient_clipping={configured} and "
                         f"{clipped}; remove gradient_clipping from the DeepSpeed config (each role's grad_clip is "
                         "applied through DeepSpeed's own clipping), or set every role's grad_clip to null to clip "
                         "all of them at gradient_clipping")


def set_step_clipping(optimizer, max_norm: float | None) -> None:
    """Make the next ``step()`` of DeepSpeed's optimizer clip the gradient norm at ``max_norm`` (``None``: not at
    all), by its ``clip_grad``. ``optimizer``: DeepSpeed's ZeRO/BF16 optimizer, or Lightning's wrapper of it.

    Raises:
        TypeError: the optimizer has no ``clip_grad`` (DeepSpeed without ZeRO, which clips only by its config).
    """
    from lightning.pytorch.core.optimizer import LightningOptimizer

    engine_optimizer = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
    if not hasattr(engine_optimizer, "clip_grad"):
        raise TypeError(f"{type(engine_optimizer).__name__} has no clip_grad: per-role grad_clip under DeepSpeed needs "
                        f"its ZeRO optimizer (stages {ZERO_STAGES})")
    engine_optimizer.clip_grad = 0.0 if max_norm is None else float(max_norm)
