"""Reading what the 2-process workers (tests/fsdp2_worker.py, tests/deepspeed_worker.py) wrote, and comparing it."""
from __future__ import annotations

from pathlib import Path

import torch


def record(runs: Path, run: str, rank: int = 0) -> dict:
    """What rank ``rank`` of the run ``run`` wrote to ``<runs>/<run>_rank<rank>.pt``."""
    return torch.load(runs / f"{run}_rank{rank}.pt", weights_only=False)


def assert_same_states(a: dict, b: dict) -> None:
    """Two ``{network: state_dict}`` records hold the same networks, keys and tensors, bit for bit."""
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}.{key}"
