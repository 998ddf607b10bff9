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
- ``zero2_stopped`` / ``zero2_resumed``: ZeRO-2 to half the budget with a checkpoint folder (kept as
  ``zero2_stopped.ckpt``), then resumed; with ``--one-process`` (under ``torchrun --nproc-per-node 1``),
  ``zero2_on_one``: the error of resuming that checkpoint in one process;
- ``zero3``: ZeRO-3 (every parameter partitioned: persistence threshold 0), with a checkpoint folder at the end;
- ``zero3_stopped`` / ``zero3_resumed``: ZeRO-3 to half the budget with a checkpoint folder, then resumed;
- ``ddp_lora`` / ``zero2_lora``: ``lora`` roles (own frozen bases) under DDP and ZeRO-2, half the budget;
- ``ddp_shared`` / ``zero3_shared``: a ``shared_lora`` fake score (an adapter on the teacher's own weights) under
  DDP and ZeRO-3, half the budget;
- ``zero2_offload``: ZeRO-2 with the optimizer offloaded to CPU memory (configs/strategy/deepspeed_zero2_offload.yaml);
  ``zero3_offload``: ZeRO-3 with the parameters and the optimizer offloaded (deepspeed_zero3_offload.yaml), half
  the budget;
- ``zero2_bf16`` / ``zero3_bf16``: ``bf16-mixed`` (DeepSpeed casts every network to bf16) with an EMA at decay
  0.99, each with a checkpoint folder at the end; ``zero2_bf16_shared``: the same with a ``shared_lora`` generator
  (its EMA averages the adapter over the teacher's bf16 weights); ``zero2_bf16_stopped`` / ``zero2_bf16_resumed``: ZeRO-2 bf16
  to half the budget with a checkpoint folder, then resumed.

Usage: ``torchrun --nproc-per-node 2 tests/deepspeed_worker.py TEACHER_FOLDER OUT_FOLDER``, then
``torchrun --nproc-per-node 1 tests/deepspeed_worker.py TEACHER_FOLDER OUT_FOLDER --one-process``
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch.strategies import DDPStrategy

from distributed_runs import BF16_EMA_DECAY, BUDGET, TIMEOUT, WORLD_SIZE, fit, keep_checkpoint, preset_config
from rdm_lightning.strategies import DeepSpeedZeroStrategy

class CPUDeepSpeedZeroStrategy(DeepSpeedZeroStrategy):
    """DeepSpeedZeroStrategy on CPU processes, for this test only (see the module docstring)."""

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own refuses a CPU accelerator


def zero_strategy(stage: int, config: dict | None = None, world_size: int = WORLD_SIZE) -> CPUDeepSpeedZeroStrategy:
    """ZeRO ``stage`` over the two CPU processes (or the DeepSpeed ``config``); under ZeRO-3 every parameter is
    partitioned (DeepSpeed keeps parameters below ``stage3_param_persistence_threshold`` elements whole, which
    would be all of digits')."""
    if config is None and stage == 3:
        config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  "zero_allow_untested_optimizer": True}  # RoleAwareAdamW: "untested" by DeepSpeed
    return CPUDeepSpeedZeroStrategy(stage=stage, config=config, process_group_backend="gloo", timeout=TIMEOUT,
                                    parallel_devices=[torch.device("cpu", i) for i in range(world_size)])


def main(teacher: str, out: str) -> None:
    torch.set_num_threads(1)
    out = Path(out)
    ddp = DDPStrategy(find_unused_parameters=True, process_group_backend="gloo", timeout=TIMEOUT)
    fit(teacher, out, "ddp", ddp, BUDGET)
    fit(teacher, out, "zero2", zero_strategy(2), BUDGET)
    checkpoints = out / "checkpoints"
    fit(teacher, out, "zero2_stopped", zero_strategy(2), BUDGET // 2, checkpoints)
    keep_checkpoint(checkpoints / "last.ckpt", out / "zero2_stopped.ckpt")
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
    fit(teacher, out, "zero2_offload", zero_strategy(2, preset_config("deepspeed_zero2_offload")), BUDGET)
    zero3_offload = preset_config("deepspeed_zero3_offload")
    zero3_offload["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # as zero_strategy(3)
    fit(teacher, out, "zero3_offload", zero_strategy(3, zero3_offload), BUDGET // 2)
    bf16 = {"precision": "bf16-mixed", "ema_decay": BF16_EMA_DECAY}
    for stage in (2, 3):
        fit(teacher, out, f"zero{stage}_bf16", zero_strategy(stage), BUDGET, save_at_end=True, **bf16)
    fit(teacher, out, "zero2_bf16_shared", zero_strategy(2), BUDGET, layouts={"generator": "shared_lora"}, **bf16)
    checkpoints = out / "checkpoints_bf16"
    fit(teacher, out, "zero2_bf16_stopped", zero_strategy(2), BUDGET // 2, checkpoints, **bf16)
    fit(teacher, out, "zero2_bf16_resumed", zero_strategy(2), BUDGET, checkpoints, ckpt_path=checkpoints / "last.ckpt", **bf16)


def one_process(teacher: str, out: str) -> None:
    """``zero2_on_one``: the 2-process ``zero2_stopped`` checkpoint resumed by one process, which DeepSpeed
    refuses (ZeRO's optimizer partitions are per process); the error is recorded."""
    torch.set_num_threads(1)
    out = Path(out)
    try:
        fit(teacher, out, "zero2_on_one", zero_strategy(2, world_size=1), BUDGET, out / "checkpoints_on_one",
            ckpt_path=out / "zero2_stopped.ckpt", devices=1)
    except ValueError as error:
        torch.save({"error": str(error)}, out / "zero2_on_one_rank0.pt")


if __name__ == "__main__":
    (one_process if sys.argv[3:] == ["--one-process"] else main)(*sys.argv[1:3])
