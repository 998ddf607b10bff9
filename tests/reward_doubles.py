"""Reward test doubles shared by the method tests."""
from __future__ import annotations

from rdm_lightning.rewards import StrokeContrastReward


class CountingReward(StrokeContrastReward):
    """Stroke contrast (differentiable) that counts its calls."""

    def __init__(self, name: str = "counting"):
        super().__init__(name=name)
        self.calls = 0

    def _score(self, images, prompts):
        self.calls += 1
        return super()._score(images, prompts)
