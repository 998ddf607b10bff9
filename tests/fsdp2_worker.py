"""The 2-process part of tests/test_fsdp2.py, run under ``torchrun`` (``python -m torch.distributed.run``).

``ModelParallelStrategy`` (hence ``FSDP2Strategy``) launches its processes by re-running the command line,
which from pytest would be pytest itself, and has no fork launcher: the test starts this script with
torchrun instead, Lightning's documented launch for it. Every fit below runs in the same two processes
(one process group, gloo), and each rank writes what it saw to ``<out>/<run>_rank<r>.pt``:

- ``ddp_lora`` / ``fsdp2_lora``: DMD with ``lora`` roles under DDP and FSDP2, half the budget;
- ``ddp``: DMD (with GAN head and EMA) under DDP: the reference of unsharded training;
- ``fsdp2``: the same under FSDP2Strategy, recording clipping and the inactive role at every generator step;
- ``stopped`` / ``resumed``: FSDP2 to half the budget with a checkpoint folder, then resumed from it;
- ``unseeded``: FSDP2 without seeding the ranks alike, which must stop before sharding;
- ``callbacks``: FSDP2 with SampleGrid, DigitsEvaluation and T2IEvaluation, writing into ``<out>/callbacks``.

Usage: ``torchrun --nproc-per-node 2 tests/fsdp2_worker.py TEACHER_FOLDER OUT_FOLDER``
"""
from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.tensor import DTensor

from rdm_lightning.backbones.digits import DigitsBackbone
from rdm_lightning.callbacks import DigitsEvaluation, GeneratorEMA, RunCheckpoint, SampleGrid, T2IEvaluation
from rdm_lightning.data.digits import DigitsDataModule, digit_prompt
from rdm_lightning.methods import DMD, DMDConfig, OptimizerConfig, StudentConfig
from rdm_lightning.methods.roles import RoleConfig, RolesConfig
from rdm_lightning.rewards import StrokeContrastReward
from rdm_lightning.strategies import FSDP2Strategy

BUDGET = 4
"""Generator updates of a full run (7 iterations at generator_update_ratio 2)."""
GENERATOR_CLIP = 1e-3
"""Small enough to act at every generator update."""
FAKE_SCORE_CLIP = 1e6
"""Large enough never to act."""
NETWORKS = ("generator", "fake_score", "discriminator_head", "generator_ema")


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every rank calls it), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach().clone()


class RecordingDMD(DMD):
    """DMD that records each clipping (total gradient norm of the role before and after, gathered) and, at
    each generator step, whether the fake score, its discriminator head, their optimizer state and the
    teacher stayed bit-identical."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clips: list[dict] = []
        self.untouched: list[bool] = []

    def role_grad_norm(self, role: str) -> float:
        grads = [full(p.grad).flatten() for p in self.role_parameters()[role] if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.cat(grads)))

    def clip_role_gradients(self, role: str, optimizer, max_norm: float) -> None:
        before = self.role_grad_norm(role)
        super().clip_role_gradients(role, optimizer, max_norm)
        self.clips.append({"role": role, "max_norm": max_norm, "before": before, "after": self.role_grad_norm(role)})

    def frozen_during_generator_step(self) -> list[torch.Tensor]:
        tensors = [full(t) for name in ("fake_score", "discriminator_head", "teacher") for t in getattr(self, name).state_dict().values()]
        fake_optimizer = self.optimizers()[1].optimizer
        for param in fake_optimizer.param_groups[0]["params"]:
            tensors.extend(full(value) for value in fake_optimizer.state[param].values())
        return tensors

    def step_role(self, role: str, loss: torch.Tensor) -> None:
        before = self.frozen_during_generator_step() if role == "generator" else None
        super().step_role(role, loss)
        if before is not None:
            after = self.frozen_during_generator_step()
            self.untouched.append(len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after)))


def fit(teacher: str, out: Path, run: str, strategy, budget: int, checkpoints: Path | None = None,
        ckpt_path: Path | None = None, seed: bool = True, roles: RolesConfig = RolesConfig(),
        extra_callbacks: tuple[L.Callback, ...] = ()) -> None:
    """One 2-process DMD fit; rank r writes ``<out>/<run>_rank<r>.pt``: its gathered weights and records.
    ``seed``: seed every rank alike before building the module, as ``rdm fit`` does (``seed_everything``);
    ``roles``: the role layouts; ``extra_callbacks``: more callbacks, writing into ``<out>/<run>``."""
    if seed:
        L.seed_everything(0, verbose=False)
    module = RecordingDMD(
        DigitsBackbone(path=teacher),
        dmd=DMDConfig(generator_update_ratio=2, gan_generator_weight=1e-2),
        generator_optimizer=OptimizerConfig(lr=1e-3, grad_clip=GENERATOR_CLIP),
        fake_score_optimizer=OptimizerConfig(lr=1e-3, grad_clip=FAKE_SCORE_CLIP),
        student=StudentConfig(num_steps=2),
        max_generator_updates=budget,
        roles=roles,
    )
    callbacks = [GeneratorEMA(decay=0.5), *extra_callbacks]
    if checkpoints is not None:
        callbacks.append(RunCheckpoint(every_n_updates=2, dirpath=str(checkpoints)))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=-1, logger=False, callbacks=callbacks,
        enable_checkpointing=checkpoints is not None, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=out / run,
    )
    # weights_only=False: built outside LightningCLI, the hyperparameters hold the backbone object itself.
    trainer.fit(module, DigitsDataModule(batch_size=8), ckpt_path=ckpt_path, weights_only=False)
    record = {
        "state": {name: {k: full(v) for k, v in getattr(module, name).state_dict().items()} for name in NETWORKS},
        "clips": module.clips,
        "untouched": module.untouched,
        "role_updates": dict(module.role_updates),
        "world_size": trainer.world_size,
        "sharded": {name: isinstance(next(getattr(module, name).parameters()), DTensor) for name in (*NETWORKS, "teacher")},
    }
    torch.save(record, out / f"{run}_rank{trainer.global_rank}.pt")


def main(teacher: str, out: str) -> None:
    torch.set_num_threads(1)
    out = Path(out)
    timeout = timedelta(seconds=120)
    # Unseeded, each process draws its own discriminator head: FSDP2 must refuse to shard it.
    try:
        fit(teacher, out, "unseeded", FSDP2Strategy(process_group_backend="gloo", timeout=timeout), BUDGET, seed=False)
    except RuntimeError as error:
        torch.save({"error": str(error)}, out / f"unseeded_rank{torch.distributed.get_rank()}.pt")
    lora = RolesConfig(generator=RoleConfig(layout="lora", rank=2), fake_score=RoleConfig(layout="lora", rank=2))
    fit(teacher, out, "ddp_lora", DDPStrategy(find_unused_parameters=True, process_group_backend="gloo", timeout=timeout),
        BUDGET // 2, roles=lora)
    fit(teacher, out, "fsdp2_lora", FSDP2Strategy(process_group_backend="gloo", timeout=timeout), BUDGET // 2, roles=lora)
    fit(teacher, out, "ddp", DDPStrategy(find_unused_parameters=True, process_group_backend="gloo", timeout=timeout), BUDGET)
    fit(teacher, out, "fsdp2", FSDP2Strategy(process_group_backend="gloo", timeout=timeout), BUDGET)
    checkpoints = out / "checkpoints"
    fit(teacher, out, "stopped", FSDP2Strategy(process_group_backend="gloo", timeout=timeout), BUDGET // 2, checkpoints)
    fit(teacher, out, "resumed", FSDP2Strategy(process_group_backend="gloo", timeout=timeout), BUDGET, checkpoints,
        ckpt_path=checkpoints / "last.ckpt")
    # The sampling callbacks under sharding: every rank runs the sharded forwards, rank 0 writes. T2IEvaluation's
    # 3 batches of 2 are uneven over 2 ranks (rank 1 samples a throwaway batch to keep in step).
    prompts = [digit_prompt(i) for i in range(10)]
    evaluation = (SampleGrid(prompts[:2], num_per_prompt=2, every_n_updates=2),
                  DigitsEvaluation(every_n_updates=2, num_samples=10),
                  T2IEvaluation(prompts, num_samples=6, every_n_updates=2, batch_size=2, rewards=[StrokeContrastReward()],
                                extractor="digits", fid_sd=True, filename="t2i_metrics.json", progress=False))
    fit(teacher, out, "callbacks", FSDP2Strategy(process_group_backend="gloo", timeout=timeout), BUDGET // 2,
        extra_callbacks=evaluation)


if __name__ == "__main__":
    main(*sys.argv[1:])
