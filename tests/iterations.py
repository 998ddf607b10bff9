"""The iteration state for tests that call a method's loss hooks directly."""
from __future__ import annotations

import torch
from torch import Tensor

from rdm_lightning.backbones.base import Conditioning
from rdm_lightning.methods import Iteration


def loss_state(x0: Tensor, cond: Conditioning, uncond: Conditioning, batch: dict, **fields) -> Iteration:
    """The :class:`Iteration` a loss hook reads for samples ``x0``: ``batch``, its conditioning and the
    typed ``fields``. ``x0`` stands in for the generator input ``(x_in, level)``, which no loss reads."""
    return Iteration(
        batch=batch, update_generator=True, cond=cond, uncond=uncond, x_in=x0.detach(), level=torch.zeros(len(x0)),
        **fields,
    )
