"""A new reward term in one short file: a softplus instead of the hinge, in every reward-driven method.

DMDR adds ``w·mean(ReLU(0.7 − r))`` to the DMD loss, whose gradient vanishes once a
reward passes the hinge. ``SoftReward`` overrides the one hook every reward-driven method
passes its reward term through (``reward_loss(scores, weight, hinge)``) with
``w·mean(softplus((m − r)/τ))·τ``: the same slope ``−w/B`` far below the margin ``m``, a
gradient that fades smoothly above it instead of stopping. Mixed into DMDR, GNDMR
(``refl_sum``) or RTDMD stage 2 (its reward backprop), it changes that method's term.

Run it on the digits default exactly like a shipped method::

    python -m rdm_lightning fit --config configs/digits/dmdr.yaml \\
        --model.class_path=examples.custom_method.SoftRewardDMD --model.init_args.temperature=0.05
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from rdm_lightning.methods import DMDR, GNDM, RTDMD


class SoftReward:
    """Mixin (listed before the method) whose reward term is a softplus of the reward's distance to the margin.

    Args:
        temperature: softness ``τ`` of the margin (→ 0 recovers the hinge).
        **method_args: every argument of the method it is mixed into.
    """

    def __init__(self, *args, temperature: float = 0.05, **method_args):
        super().__init__(*args, **method_args)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def reward_loss(self, scores: Tensor, weight: float, hinge: float) -> Tensor:
        tau = self.temperature
        return weight * tau * F.softplus((hinge - scores) / tau).mean()


class SoftRewardDMD(SoftReward, DMDR):
    """DMDR with the softplus reward term."""


class SoftRewardGNDM(SoftReward, GNDM):
    """GNDMR (``reward_combination: refl_sum``) with the softplus reward term."""


class SoftRewardRTDMD(SoftReward, RTDMD):
    """RTDMD stage 2 whose reward backprop is the softplus term."""
