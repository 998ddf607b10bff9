"""Parameter EMA as a pure function."""
from __future__ import annotations

import torch
from torch import nn


def ema_update(ema: nn.Module, live: nn.Module, decay: float) -> None:
    """``ema ← decay·ema + (1 − decay)·live`` for every parameter and floating buffer.

    ``parameters()``/``buffers()`` list a tied tensor once, so it is averaged once; a tensor the EMA
    shares with ``live`` (a frozen base under a role adapter) is left as it is.
    """
    with torch.no_grad():
        pairs = list(zip(ema.parameters(), live.parameters())) + list(zip(ema.buffers(), live.buffers()))
        for ema_t, live_t in pairs:
            if ema_t.is_floating_point() and ema_t is not live_t:
                ema_t.lerp_(live_t.to(ema_t.dtype), 1.0 - decay)


def ema_warmup_decay(update: int, max_decay: float) -> float:
    """Warm-up decay ``min((1 + n)/(10 + n), max_decay)`` after n updates (Flow-GRPO's
    ``EMAModuleWrapper``; RTDMD stage 2, ``docs/methods/rtdmd.md``, "Stage 2, ``RTDMD``"): early averages forget the
    start quickly."""
    if update < 0:
        raise ValueError(f"update must be >= 0, got {update}")
    return min((1 + update) / (10 + update), max_decay)
