"""The 2-process part of tests/test_deepspeed.py, run under ``torchrun`` (``python -m torch.distributed.run``).

DeepSpeed runs on CPU processes here: its CPU accelerator (``DS_ACCELERATOR=cpu``) with gloo. Lightning's
``DeepSpeedStrategy`` refuses any accelerator but CUDA in ``setup_environment``; :class:`CPUDeepSpeedZeroStrategy`,
a test-only subclass, skips that check and gives each process the device ``cpu:<local rank>`` (DeepSpeed's engine
takes its device from the root device's index). Nothing else of the library's strategy changes.

Every fit runs in the same two processes (one process group), and each rank writes what it saw to
``<out>/<run>_rank<r>.pt``:

- ``ddp``: DMD (GAN head, EMA) under DDP, the reference of unsharded training, with each clipping recorded;
- ``zero2``: the same under ZeRO-2, recording DeepSpeed's gradient norm before its clipping and the norm of the
  gradients the role-aware AdamW then steps with, and whether a generator step left the fake score, its GAN
  head, their ZeRO master weights and moments and the teacher bit-identical;
- ``zero2_stopped`` / ``zero2_resumed``: ZeRO-2 to half the budget with a checkpoint folder, then resumed;
- ``zero3``: ZeRO-3 (every parameter partitioned: persistence threshold 0), with a checkpoint folder at the end;
- ``zero3_stopped`` / ``zero3_resumed``: ZeRO-3 to half the budget with a checkpoint folder, then resumed;
- ``ddp_lora`` / ``zero2_lora``: ``lora`` roles (own frozen bases) under DDP and ZeRO-2, half the budget;
- ``ddp_shared`` / ``zero3_shared``: a ``shared_lora`` fake score (an adapter on the teacher's own weights) under
  DDP and ZeRO-3, half the budget.

Modules are built as ``rdm fit`` builds them (LightningCLI's hyperparameters: class paths and plain values),
so their checkpoints load with ``rdm sample``'s loader.

Usage: ``torchrun --nproc-per-node 2 tests/deepspeed_worker.py TEACHER_FOLDER OUT_FOLDER``
"""
from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import deepspeed
import lightning as L
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from rdm_lightning.backbones.digits import DigitsBackbone
from rdm_lightning.callbacks import GeneratorEMA, RunCheckpoint
from rdm_lightning.data.digits import DigitsDataModule
from rdm_lightning.methods import DMD, DMDConfig, OptimizerConfig, StudentConfig
from rdm_lightning.methods.roles import RoleConfig, RolesConfig
from rdm_lightning.strategies import DeepSpeedZeroStrategy

BUDGET = 4
"""Generator updates of a full run (7 iterations at generator_update_ratio 2)."""
GENERATOR_CLIP = 1e-3
"""Small enough to act at every generator update."""
FAKE_SCORE_CLIP = 1e6
"""Large enough never to act."""
NETWORKS = ("generator", "fake_score", "discriminator_head", "generator_ema")
WORLD_SIZE = 2
TIMEOUT = timedelta(seconds=120)


class CPUDeepSpeedZeroStrategy(DeepSpeedZeroStrategy):
    """DeepSpeedZeroStrategy on CPU processes, for this test only (see the module docstring)."""

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own refuses a CPU accelerator


def zero_strategy(stage: int) -> CPUDeepSpeedZeroStrategy:
    """ZeRO ``stage`` over the two CPU processes; under ZeRO-3 every parameter is partitioned (DeepSpeed keeps
    parameters below ``stage3_param_persistence_threshold`` elements whole, which would be all of digits')."""
    config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True} if stage == 3 else None  # RoleAwareAdamW: "untested" by DeepSpeed
    return CPUDeepSpeedZeroStrategy(stage=stage, config=config, process_group_backend="gloo", timeout=TIMEOUT,
                                    parallel_devices=[torch.device("cpu", i) for i in range(WORLD_SIZE)])


def is_partitioned(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")


def full_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``network``'s whole state dict on every rank (a collective under ZeRO-3, which partitions it)."""
    params = list(network.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=any(is_partitioned(p) for p in params)):
        return {k: v.detach().clone() for k, v in network.state_dict().items()}


def zero_masters(optimizer, role: str) -> list[torch.Tensor]:
    """Copies of ZeRO's float32 master partitions of ``role``'s parameter groups and of their AdamW state."""
    inner = optimizer.optimizer
    if hasattr(optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2: one flat partition per group
        masters = [(g, m) for g, m in zip(inner.param_groups, optimizer.single_partition_of_fp32_groups)]
    else:  # ZeRO-3: one flat partition per sub-group
        masters = [(inner.param_groups[optimizer.sub_group_to_group_id[i]], m)
                   for i, m in enumerate(optimizer.fp32_partitioned_groups_flat)]
    tensors = []
    for group, master in masters:
        if group["role"] == role:
            tensors.append(master.detach().clone())
            tensors.extend(v.detach().clone() for v in inner.state.get(master, {}).values())
    return tensors


class RecordingDMD(DMD):
    """DMD that records each role's clipping (the gradient norm before and after, over all ranks) and, at each
    generator step, whether the fake score, its GAN head, their optimizer state and the teacher stayed
    bit-identical."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clips: list[dict] = []
        self.untouched: list[bool] = []
        self.stepped: dict[int, torch.Tensor] = {}

    @property
    def under_deepspeed(self) -> bool:
        return isinstance(self.trainer.strategy, DeepSpeedStrategy)

    def configure_optimizers(self):
        optimizers, schedulers = super().configure_optimizers()
        if self.under_deepspeed:  # the squared norm of the gradients the role-aware AdamW steps with (after clipping)
            optimizers[0].register_step_pre_hook(self.record_stepped_gradients)
        return optimizers, schedulers

    def record_stepped_gradients(self, optimizer, args, kwargs) -> None:
        # By tensor: AdamW.step, which RoleAwareAdamW.step calls, runs the same hooks once torch has patched it.
        for group in optimizer.param_groups:
            if group["role"] == optimizer.active_role:
                for p in group["params"]:
                    if p.grad is not None:
                        self.stepped[id(p)] = p.grad.double().pow(2).sum()

    def role_grad_norm(self, role: str) -> float:
        grads = [p.grad.flatten() for p in self.role_parameters()[role] if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.cat(grads)))

    def clip_role_gradients(self, role: str, optimizer, max_norm: float) -> None:
        if self.under_deepspeed:  # DeepSpeed clips inside its step: recorded in step_role
            return super().clip_role_gradients(role, optimizer, max_norm)
        before = self.role_grad_norm(role)
        super().clip_role_gradients(role, optimizer, max_norm)
        self.clips.append({"role": role, "max_norm": max_norm, "before": before, "after": self.role_grad_norm(role)})

    def frozen_during_generator_step(self) -> list[torch.Tensor]:
        tensors = [t for name in ("fake_score", "discriminator_head", "teacher") for t in full_state(getattr(self, name)).values()]
        if self.under_deepspeed:
            return tensors + zero_masters(self.trainer.strategy.deepspeed_engine.optimizer, "fake_score")
        fake_optimizer = self.optimizers()[1].optimizer
        for param in fake_optimizer.param_groups[0]["params"]:
            tensors.extend(value.clone() for value in fake_optimizer.state[param].values())
        return tensors

    def step_role(self, role: str, loss: torch.Tensor) -> None:
        before = self.frozen_during_generator_step() if role == "generator" else None
        self.stepped.clear()
        super().step_role(role, loss)
        if self.under_deepspeed:  # each rank steps its partition of the gradients
            stepped = sum(self.stepped.values(), torch.zeros((), dtype=torch.float64))
            torch.distributed.all_reduce(stepped)
            self.clips.append({"role": role, "max_norm": self.optimizer_configs[role].grad_clip,
                               "before": float(self.trainer.strategy.deepspeed_engine.get_global_grad_norm()),
                               "after": float(stepped.sqrt())})
        if before is not None:
            after = self.frozen_during_generator_step()
            self.untouched.append(len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after)))


def build_module(teacher: str, budget: int, layouts: dict[str, str]) -> RecordingDMD:
    """The module as ``rdm fit`` builds it: LightningCLI's hyperparameters (class paths, plain values);
    ``layouts``: the role layouts other than ``full``, by role (rank-2 adapters)."""
    roles = RolesConfig(**{role: RoleConfig(layout=layout, rank=2) for role, layout in layouts.items()})
    hparams = {
        "_class_path": "rdm_lightning.methods.DMD",
        "backbone": {"class_path": "rdm_lightning.backbones.digits.DigitsBackbone", "init_args": {"path": teacher}},
        "dmd": {"generator_update_ratio": 2, "gan_generator_weight": 1e-2},
        "generator_optimizer": {"lr": 1e-3, "grad_clip": GENERATOR_CLIP},
        "fake_score_optimizer": {"lr": 1e-3, "grad_clip": FAKE_SCORE_CLIP},
        "student": {"num_steps": 2},
        "max_generator_updates": budget,
        "roles": {role: {"layout": layout, "rank": 2} for role, layout in layouts.items()},
    }
    with _given_hyperparameters_context(hparams=hparams, instantiator="lightning.pytorch.cli.instantiate_module"):
        return RecordingDMD(
            DigitsBackbone(path=teacher),
            dmd=DMDConfig(generator_update_ratio=2, gan_generator_weight=1e-2),
            generator_optimizer=OptimizerConfig(lr=1e-3, grad_clip=GENERATOR_CLIP),
            fake_score_optimizer=OptimizerConfig(lr=1e-3, grad_clip=FAKE_SCORE_CLIP),
            student=StudentConfig(num_steps=2),
            max_generator_updates=budget,
            roles=roles,
        )


def fit(teacher: str, out: Path, run: str, strategy, budget: int, checkpoints: Path | None = None,
        ckpt_path: Path | None = None, layouts: dict[str, str] | None = None, save_at_end: bool = False) -> None:
    """One 2-process DMD fit; rank r writes ``<out>/<run>_rank<r>.pt``: its gathered weights and records."""
    L.seed_everything(0, verbose=False)
    module = build_module(teacher, budget, layouts or {})
    callbacks = [GeneratorEMA(decay=0.5)]
    if checkpoints is not None:
        callbacks.append(RunCheckpoint(every_n_updates=2, dirpath=str(checkpoints)))
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD_SIZE, strategy=strategy, max_epochs=-1, logger=False, callbacks=callbacks,
        enable_checkpointing=checkpoints is not None, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out / run,
    )
    trainer.fit(module, DigitsDataModule(batch_size=8), ckpt_path=ckpt_path)
    if save_at_end:
        trainer.save_checkpoint(out / f"{run}.ckpt")
    names = [name for name in NETWORKS if getattr(module, name) is not None]
    record = {
        "state": {name: full_state(getattr(module, name)) for name in names},
        "clips": module.clips,
        "untouched": module.untouched,
        "role_updates": dict(module.role_updates),
        "world_size": trainer.world_size,
        "partitioned": {name: any(is_partitioned(p) for p in getattr(module, name).parameters()) for name in (*names, "teacher")},
        "optimizer": type(trainer.strategy.deepspeed_engine.optimizer).__name__ if module.under_deepspeed else None,
    }
    torch.save(record, out / f"{run}_rank{trainer.global_rank}.pt")


def main(teacher: str, out: str) -> None:
    torch.set_num_threads(1)
    out = Path(out)
    ddp = DDPStrategy(find_unused_parameters=True, process_group_backend="gloo", timeout=TIMEOUT)
    fit(teacher, out, "ddp", ddp, BUDGET)
    fit(teacher, out, "zero2", zero_strategy(2), BUDGET)
    checkpoints = out / "checkpoints"
    fit(teacher, out, "zero2_stopped", zero_strategy(2), BUDGET // 2, checkpoints)
    fit(teacher, out, "zero2_resumed", zero_strategy(2), BUDGET, checkpoints, ckpt_path=checkpoints / "last.ckpt")
    fit(teacher, out, "zero3", zero_strategy(3), BUDGET, save_at_end=True)
    checkpoints = out / "checkpoints_zero3"
    fit(teacher, out, "zero3_stopped", zero_strategy(3), BUDGET // 2, checkpoints)
    fit(teacher, out, "zero3_resumed", zero_strategy(3), BUDGET, checkpoints, ckpt_path=checkpoints / "last.ckpt")
    lora, shared = {"generator": "lora", "fake_score": "lora"}, {"fake_score": "shared_lora"}
    for run, layouts in (("lora", lora), ("shared", shared)):
        ddp = DDPStrategy(find_unused_parameters=True, process_group_backend="gloo", timeout=TIMEOUT)
        fit(teacher, out, f"ddp_{run}", ddp, BUDGET // 2, layouts=layouts)
    fit(teacher, out, "zero2_lora", zero_strategy(2), BUDGET // 2, layouts=lora)
    fit(teacher, out, "zero3_shared", zero_strategy(3), BUDGET // 2, layouts=shared)


if __name__ == "__main__":
    main(*sys.argv[1:])
