"""The 2-process part of tests/test_deepspeed.py, run under ``torchrun`` (``python -m torch.distributed.run``).

DeepSpeed runs on CPU processes here: its CPU accelerator (``DS_ACCELERATOR=cpu``) with gloo. Lightning's
``DeepSpeedStrategy`` refuses any accelerator but CUDA in ``setup_environment``; :class:`CPUDeepSpeedZeroStrategy`,
a test-only subclass, skips that check and gives each process the device ``cpu:<local rank>`` (DeepSpeed's engine
takes its device from the root device's index). Nothing else of the library's strategy changes.

Every fit runs in the same two processes (one process group), and each rank writes what it saw to
``<out>/<run>_rank<r>.pt`` (tests/distributed_runs.py):

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

Usage: ``torchrun --nproc-per-node 2 tests/deepspeed_worker.py TEACHER_FOLDER OUT_FOLDER``
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch.strategies import DDPStrategy

from distributed_runs import BUDGET, TIMEOUT, WORLD_SIZE, fit
from rdm_lightning.strategies import DeepSpeedZeroStrategy

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
