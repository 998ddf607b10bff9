"""Parameter EMA as a pure function."""
from __future__ import annotations

import torch
from torch import nn


def ema_update(ema: nn.Module, live: nn.Module, decay: float) -> None:
    """``ema ← decay·ema + (1 − decay)·live`` for every parameter and floating buffer."""
    with torch.no_grad():
        for ema_t, live_t in zip(ema.state_dict().values(), live.state_dict().values()):
            if ema_t.is_floating_point():
                ema_t.lerp_(live_t.to(ema_t.dtype), 1.0 - decay)
