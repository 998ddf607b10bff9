"""Launching the 2-process workers (tests/fsdp2_worker.py, tests/deepspeed_worker.py), reading what they wrote,
and comparing it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def run_worker(worker: Path, processes: int, *args: str, timeout: float, **env: str) -> None:
    """``torchrun --nproc-per-node <processes> <worker> <args>`` (one thread per process, warnings off, ``env``
    added); fails with the end of its output unless it exits 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **env}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               str(worker), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def record(runs: Path, run: str, rank: int = 0) -> dict:
    """What rank ``rank`` of the run ``run`` wrote to ``<runs>/<run>_rank<rank>.pt``."""
    return torch.load(runs / f"{run}_rank{rank}.pt", weights_only=False)


def assert_same_states(a: dict, b: dict, exact: bool = True) -> None:
    """Two ``{network: state_dict}`` records hold the same networks, keys and tensors: bit for bit, or (``exact``
    False) up to a few float32 ulps (relative 1e-6, absolute 1e-7), for the same training computed on weights in
    another memory layout, which CPU kernels may round differently (FSDP2's all-gathered parameters are views into
    one flat buffer)."""
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            if exact:
                assert torch.equal(a[name][key], b[name][key]), f"{name}.{key}"
            else:
                torch.testing.assert_close(a[name][key], b[name][key], rtol=1e-6, atol=1e-7,
                                           msg=lambda m, at=f"{name}.{key}": f"{at}: {m}")
