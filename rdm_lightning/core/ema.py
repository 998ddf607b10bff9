"""Parameter EMA as a pure function."""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn


def ema_update(ema: nn.Module, live: nn.Module, decay: float) -> None:
    """``ema ← decay·ema + (1 − decay)·live`` for every parameter and floating buffer.

    ``parameters()``/``buffers()`` list a tied tensor once, so it is averaged once; a tensor the EMA
    shares with ``live`` (a frozen base under a role adapter) is left as it is. Under DeepSpeed ZeRO-3, which
    partitions parameters across the processes, each pair is gathered, averaged and partitioned again
    (:func:`zero3_gathered`): a collective then, which every process calls.
    """
    with torch.no_grad():
        pairs = list(zip(ema.parameters(), live.parameters())) + list(zip(ema.buffers(), live.buffers()))
        for ema_t, live_t in pairs:
            if ema_t.is_floating_point() and ema_t is not live_t:
                with zero3_gathered(ema_t, live_t):
                    ema_t.lerp_(live_t.to(ema_t.dtype), 1.0 - decay)


def zero3_gathered(*tensors: torch.Tensor):
    """DeepSpeed's ``GatheredParameters`` over the ZeRO-3-partitioned ones among ``tensors`` (whole inside the
    block; rank 0's values written back into every partition after it); a no-op context for other tensors."""
    partitioned = [t for t in tensors if hasattr(t, "ds_id")]
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)


def ema_warmup_decay(update: int, max_decay: float) -> float:
    """Warm-up decay ``min((1 + n)/(10 + n), max_decay)`` after n updates (Flow-GRPO's
    ``EMAModuleWrapper``; RTDMD stage 2, ``docs/methods/rtdmd.md``, "Stage 2, ``RTDMD``"): early averages forget the
    start quickly."""
    if update < 0:
        raise ValueError(f"update must be >= 0, got {update}")
    return min((1 + update) / (10 + update), max_decay)
