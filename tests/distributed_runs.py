"""The digits DMD fit the 2-process workers (tests/fsdp2_worker.py, tests/deepspeed_worker.py) run under DDP,
FSDP2 and DeepSpeed ZeRO, and what each rank records of it.

:class:`RecordingDMD` records each role's clipping (the role's gradient norm before and after, over all ranks)
and, at each generator step, whether the fake score, its GAN head, their optimizer state and the teacher stayed
bit-identical. :func:`fit` runs one fit in the current process group and writes ``<out>/<run>_rank<r>.pt``:
the rank's whole (gathered) weights and those records, read back by tests/worker_records.py.

Modules are built as ``rdm fit`` builds them (LightningCLI's hyperparameters: class paths and plain values), so
their checkpoints load with ``rdm sample``'s loader.
"""
from __future__ import annotations

import shutil
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import nn
from torch.distributed.tensor import DTensor

from rdm_lightning.backbones.digits import DigitsBackbone
from rdm_lightning.callbacks import GeneratorEMA, RunCheckpoint
from rdm_lightning.data.digits import DigitsDataModule
from rdm_lightning.methods import DMD, DMDConfig, OptimizerConfig, StudentConfig
from rdm_lightning.methods.roles import RoleConfig, RolesConfig

WORLD_SIZE = 2
BUDGET = 4
"""Generator updates of a full run (7 iterations at generator_update_ratio 2)."""
GENERATOR_CLIP = 1e-3
"""Small enough to act at every generator update."""
FAKE_SCORE_CLIP = 1e6
"""Large enough never to act."""
NETWORKS = ("generator", "fake_score", "discriminator_head", "generator_ema")
BF16_EMA_DECAY = 0.99
"""The EMA's decay in the bf16-mixed runs: a bf16 EMA would lose most of its averaging steps."""
TIMEOUT = timedelta(seconds=120)
"""Of the collectives."""


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of the whole tensor of an FSDP2 shard (a collective: every rank calls it), or of the tensor itself.
    (On a mesh of one process ``full_tensor()`` is the local tensor itself, not a copy.)"""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def is_partitioned(tensor: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 partitioned ``tensor`` across the processes."""
    return hasattr(tensor, "ds_id")


def whole_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``network``'s whole state dict on every rank (a collective when FSDP2 shards or ZeRO-3
    partitions it)."""
    params = list(network.parameters())
    gathered = nullcontext()
    if any(is_partitioned(p) for p in params):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params)
    with gathered:
        return {k: full(v) for k, v in network.state_dict().items()}


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


def offloaded(optimizer) -> set[str]:
    """What DeepSpeed's ZeRO ``optimizer`` keeps in CPU memory: ``optimizer`` (its master weights and moments),
    ``parameters`` (ZeRO-3's partitions)."""
    flags = {"optimizer": getattr(optimizer, "cpu_offload", False) or getattr(optimizer, "offload_optimizer", False),
             "parameters": getattr(optimizer, "offload_param", False)}
    return {name for name, on in flags.items() if on}


class RecordingDMD(DMD):
    """DMD that records each role's clipping and, at each generator step, whether the fake score, its GAN head,
    their optimizer state and the teacher stayed bit-identical (see the module docstring). Under DeepSpeed,
    which clips inside its own step, the norm before is DeepSpeed's and the norm after that of the gradients
    the role-aware AdamW steps with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clips: list[dict] = []
        self.untouched: list[bool] = []
        self.stepped: dict[int, torch.Tensor] = {}
        self.start_state: dict[str, dict[str, torch.Tensor]] = {}
        """Every network's whole state as training starts (after a resumed checkpoint is loaded)."""
        self.generator_history: list[dict[str, torch.Tensor]] = []
        """The generator's whole state after each of its updates."""

    def on_train_start(self) -> None:
        super().on_train_start()
        self.start_state = {name: whole_state(getattr(self, name)) for name in NETWORKS}

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
        grads = [full(p.grad).flatten() for p in self.role_parameters()[role] if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.cat(grads)))

    def clip_role_gradients(self, role: str, optimizer, max_norm: float) -> None:
        if self.under_deepspeed:  # DeepSpeed clips inside its step: recorded in step_role
            return super().clip_role_gradients(role, optimizer, max_norm)
        before = self.role_grad_norm(role)
        super().clip_role_gradients(role, optimizer, max_norm)
        self.clips.append({"role": role, "max_norm": max_norm, "before": before, "after": self.role_grad_norm(role)})

    def frozen_during_generator_step(self) -> list[torch.Tensor]:
        tensors = [t for name in ("fake_score", "discriminator_head", "teacher") for t in whole_state(getattr(self, name)).values()]
        if self.under_deepspeed:
            return tensors + zero_masters(self.trainer.strategy.deepspeed_engine.optimizer, "fake_score")
        fake_optimizer = self.optimizers()[1].optimizer
        for param in fake_optimizer.param_groups[0]["params"]:
            tensors.extend(full(value) for value in fake_optimizer.state[param].values())
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
            self.generator_history.append(whole_state(self.generator))


def preset_config(name: str) -> dict:
    """The DeepSpeed config of the strategy preset ``configs/strategy/<name>.yaml``."""
    preset = yaml.safe_load((Path(__file__).parents[1] / "configs" / "strategy" / f"{name}.yaml").read_text())
    return preset["trainer"]["strategy"]["init_args"]["config"]


def keep_checkpoint(source: Path, destination: Path) -> None:
    """Rank 0 copies the checkpoint (file or folder) ``source`` to ``destination``; every rank waits for it."""
    if torch.distributed.get_rank() == 0:
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, destination)
    torch.distributed.barrier()


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
        ckpt_path: Path | None = None, layouts: dict[str, str] | None = None, seed: bool = True,
        extra_callbacks: tuple[L.Callback, ...] = (), save_at_end: bool = False, precision: str = "32-true",
        ema_decay: float = 0.5, devices: int = WORLD_SIZE) -> None:
    """One DMD fit (2 processes by default) with the generator's EMA; rank r writes ``<out>/<run>_rank<r>.pt``.

    ``checkpoints``: a RunCheckpoint folder (every 2 updates); ``ckpt_path``: resume from it; ``layouts``: as in
    :func:`build_module`; ``seed``: seed every rank alike before building the module, as ``rdm fit`` does
    (``seed_everything``); ``extra_callbacks``: more callbacks, writing into ``<out>/<run>``; ``save_at_end``: a
    checkpoint ``<out>/<run>.ckpt`` after the fit; ``precision``, ``devices``: the Trainer's.
    """
    if seed:
        L.seed_everything(0, verbose=False)
    module = build_module(teacher, budget, layouts or {})
    callbacks = [GeneratorEMA(decay=ema_decay), *extra_callbacks]
    if checkpoints is not None:
        callbacks.append(RunCheckpoint(every_n_updates=2, dirpath=str(checkpoints)))
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, precision=precision, max_epochs=-1, logger=False,
        callbacks=callbacks, enable_checkpointing=checkpoints is not None, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out / run,
    )
    trainer.fit(module, DigitsDataModule(batch_size=8), ckpt_path=ckpt_path)
    if save_at_end:
        trainer.save_checkpoint(out / f"{run}.ckpt")
    placed = {name: list(getattr(module, name).parameters()) for name in (*NETWORKS, "teacher")}
    record = {
        "state": {name: whole_state(getattr(module, name)) for name in NETWORKS},
        "start_state": module.start_state,
        "generator_history": module.generator_history,
        # of the parameters, or of their partitions under ZeRO-3
        "dtypes": {name: {getattr(p, "ds_tensor", p).dtype for p in params} for name, params in placed.items()},
        "clips": module.clips,
        "untouched": module.untouched,
        "role_updates": dict(module.role_updates),
        "world_size": trainer.world_size,
        "sharded": {name: isinstance(params[0], DTensor) for name, params in placed.items()},
        "partitioned": {name: any(is_partitioned(p) for p in params) for name, params in placed.items()},
        "optimizer": type(trainer.strategy.deepspeed_engine.optimizer).__name__ if module.under_deepspeed else None,
        "offloaded": offloaded(trainer.strategy.deepspeed_engine.optimizer) if module.under_deepspeed else set(),
    }
    torch.save(record, out / f"{run}_rank{trainer.global_rank}.pt")
