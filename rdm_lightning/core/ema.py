"""Parameter EMA as a pure function."""
from __future__ import annotations

import torch
from torch import nn


def ema_update(ema: nn.Module, live: nn.Module, decay: float) -> None:
    """``ema ← decay·ema + (1 − decay)·live`` for every parameter and floating buffer.

    ``parameters()``/``buffers()`` list a tied tensor once, so it is averaged once.
    """
    with torch.no_grad():
        pairs = list(zip(ema.parameters(), live.parameters())) + list(zip(ema.buffers(), live.buffers()))
        for ema_t, live_t in pairs:
            if ema_t.is_floating_point():
                ema_t.lerp_(live_t.to(ema_t.dtype), 1.0 - decay)
