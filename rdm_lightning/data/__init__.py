"""LightningDataModules: prompt files and the digits domain; public benchmark prompt sets; the K-repeat group sampler."""
from rdm_lightning.data.digits import DigitsDataModule, digit_from_prompt, digit_prompt, digits_split
from rdm_lightning.data.groups import GroupBatchSampler, group_noise
from rdm_lightning.data.prompt_sets import load_prompt_set
from rdm_lightning.data.prompts import PromptDataModule, load_prompts

__all__ = ["DigitsDataModule", "GroupBatchSampler", "group_noise", "PromptDataModule", "digit_from_prompt", "digit_prompt", "digits_split", "load_prompt_set", "load_prompts"]
