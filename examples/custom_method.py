"""A new reward-based method in one short file: DMDR with a softplus reward term instead of the hinge.

DMDR adds ``w·mean(ReLU(0.7 − r))`` to the DMD loss, whose gradient vanishes once a
reward passes the hinge. ``SoftRewardDMD`` overrides the one hook that computes
that term with ``w·mean(softplus((m − r)/τ))·τ``: the same slope ``−w/B`` far below
the margin ``m``, a gradient that fades smoothly above it instead of stopping.

Run it on the digits default exactly like a shipped method::

    python -m rdm_lightning fit --config configs/digits/dmdr.yaml \\
        --model.class_path=examples.custom_method.SoftRewardDMD --model.init_args.temperature=0.05
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from rdm_lightning.methods import DMDR
from rdm_lightning.rewards import RewardTerm


class SoftRewardDMD(DMDR):
    """DMDR whose ReFL term is a softplus of the reward's distance to the margin.

    Args:
        temperature: softness ``τ`` of the margin (→ 0 recovers DMDR's hinge).
        **dmdr_args: every DMDR argument (backbone, rewards, dmdr, dmd, …).
    """

    def __init__(self, *args, temperature: float = 0.05, **dmdr_args):
        super().__init__(*args, **dmdr_args)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def reward_loss(self, scores: Tensor, term: RewardTerm) -> Tensor:
        margin, tau = self.dmdr.reward_hinge, self.temperature
        return term.weight * tau * F.softplus((margin - scores) / tau).mean()
