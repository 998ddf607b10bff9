"""Reward models: ``(images in [0, 1], prompts) -> scores``, with a differentiable flag."""
from rdm_lightning.rewards.base import (
    REWARD_ALIASES,
    RewardModel,
    RewardTerm,
    WeightedRewards,
    build_reward,
    differentiable_aliases,
)
from rdm_lightning.rewards.aesthetic import AestheticReward
from rdm_lightning.rewards.clip import CLIPScoreReward, PickScoreReward, SRPOReward, clip_preprocess
from rdm_lightning.rewards.digits import (
    DigitsClassifierReward,
    DigitsGoldReward,
    DigitsMLP,
    StrokeContrastReward,
    load_gold_classifier,
)
from rdm_lightning.rewards.hpsv3 import HPSv3Reward
from rdm_lightning.rewards.image_reward import ImageReward
from rdm_lightning.rewards.open_clip import DFNCLIPReward, HPSv2Reward

__all__ = [
    "REWARD_ALIASES",
    "AestheticReward",
    "CLIPScoreReward",
    "DFNCLIPReward",
    "DigitsClassifierReward",
    "DigitsGoldReward",
    "DigitsMLP",
    "HPSv2Reward",
    "HPSv3Reward",
    "ImageReward",
    "PickScoreReward",
    "RewardModel",
    "RewardTerm",
    "SRPOReward",
    "StrokeContrastReward",
    "WeightedRewards",
    "build_reward",
    "clip_preprocess",
    "differentiable_aliases",
    "load_gold_classifier",
]
