"""The 2-process part of tests/test_fsdp2.py, run under ``torchrun`` (``python -m torch.distributed.run``).

``ModelParallelStrategy`` (hence ``FSDP2Strategy``) launches its processes by re-running the command line,
which from pytest would be pytest itself, and has no fork launcher: the test starts this script with
torchrun instead, Lightning's documented launch for it. Every fit below runs in the same two processes
(one process group, gloo), and each rank writes what it saw to ``<out>/<run>_rank<r>.pt``
(tests/distributed_runs.py):

- ``ddp_lora`` / ``fsdp2_lora``: DMD with ``lora`` roles under DDP and FSDP2, half the budget;
- ``ddp``: DMD (with GAN head and EMA) under DDP: the reference of unsharded training;
- ``fsdp2``: the same under FSDP2Strategy, recording clipping and the inactive role at every generator step;
- ``stopped`` / ``resumed``: FSDP2 to half the budget with a checkpoint folder (kept as ``stopped.ckpt``), then
  resumed from it; with ``--one-process`` (under ``torchrun --nproc-per-node 1``), ``resumed_on_one``: the same
  checkpoint resumed by one process;
- ``unseeded``: FSDP2 without seeding the ranks alike, which must stop before sharding;
- ``callbacks``: FSDP2 with SampleGrid, DigitsEvaluation and T2IEvaluation, writing into ``<out>/callbacks``.

Usage: ``torchrun --nproc-per-node 2 tests/fsdp2_worker.py TEACHER_FOLDER OUT_FOLDER``, then
``torchrun --nproc-per-node 1 tests/fsdp2_worker.py TEACHER_FOLDER OUT_FOLDER --one-process``
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch.strategies import DDPStrategy

from distributed_runs import BUDGET, TIMEOUT, fit, keep_checkpoint
from rdm_lightning.callbacks import DigitsEvaluation, SampleGrid, T2IEvaluation
from rdm_lightning.data.digits import digit_prompt
from rdm_lightning.rewards import StrokeContrastReward
from rdm_lightning.strategies import FSDP2Strategy


def main(teacher: str, out: str) -> None:
    torch.set_num_threads(1)
    out = Path(out)
    # Unseeded, each process draws its own discriminator head: FSDP2 must refuse to shard it.
    try:
        fit(teacher, out, "unseeded", FSDP2Strategy(process_group_backend="gloo", timeout=TIMEOUT), BUDGET, seed=False)
    except RuntimeError as error:
        torch.save({"error": str(error)}, out / f"unseeded_rank{torch.distributed.get_rank()}.pt")
    lora = {"generator": "lora", "fake_score": "lora"}
    fit(teacher, out, "ddp_lora", DDPStrategy(find_unused_parameters=True, process_group_backend="gloo", timeout=TIMEOUT),
        BUDGET // 2, layouts=lora)
    fit(teacher, out, "fsdp2_lora", FSDP2Strategy(process_group_backend="gloo", timeout=TIMEOUT), BUDGET // 2, layouts=lora)
    fit(teacher, out, "ddp", DDPStrategy(find_unused_parameters=True, process_group_backend="gloo", timeout=TIMEOUT), BUDGET)
    fit(teacher, out, "fsdp2", FSDP2Strategy(process_group_backend="gloo", timeout=TIMEOUT), BUDGET)
    checkpoints = out / "checkpoints"
    fit(teacher, out, "stopped", FSDP2Strategy(process_group_backend="gloo", timeout=TIMEOUT), BUDGET // 2, checkpoints)
    keep_checkpoint(checkpoints / "last.ckpt", out / "stopped.ckpt")
    fit(teacher, out, "resumed", FSDP2Strategy(process_group_backend="gloo", timeout=TIMEOUT), BUDGET, checkpoints,
        ckpt_path=checkpoints / "last.ckpt")
    # The sampling callbacks under sharding: every rank runs the sharded forwards, rank 0 writes. T2IEvaluation's
    # 3 batches of 2 are uneven over 2 ranks (rank 1 samples a throwaway batch to keep in step).
    prompts = [digit_prompt(i) for i in range(10)]
    evaluation = (SampleGrid(prompts[:2], num_per_prompt=2, every_n_updates=2),
                  DigitsEvaluation(every_n_updates=2, num_samples=10),
                  T2IEvaluation(prompts, num_samples=6, every_n_updates=2, batch_size=2, rewards=[StrokeContrastReward()],
                                extractor="digits", fid_sd=True, filename="t2i_metrics.json", progress=False))
    fit(teacher, out, "callbacks", FSDP2Strategy(process_group_backend="gloo", timeout=TIMEOUT), BUDGET // 2,
        extra_callbacks=evaluation)


def one_process(teacher: str, out: str) -> None:
    """``resumed_on_one``: the 2-process ``stopped`` checkpoint resumed by one process (the shards re-split)."""
    torch.set_num_threads(1)
    out = Path(out)
    fit(teacher, out, "resumed_on_one", FSDP2Strategy(process_group_backend="gloo", timeout=TIMEOUT), BUDGET,
        out / "checkpoints_on_one", ckpt_path=out / "stopped.ckpt", devices=1)


if __name__ == "__main__":
    (one_process if sys.argv[3:] == ["--one-process"] else main)(*sys.argv[1:3])
