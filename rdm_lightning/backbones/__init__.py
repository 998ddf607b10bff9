"""Model-family adapters behind the :class:`~rdm_lightning.backbones.base.Backbone` interface."""
from rdm_lightning.backbones.base import Backbone, Conditioning
from rdm_lightning.backbones.digits import DigitsBackbone
from rdm_lightning.backbones.flux import FluxBackbone
from rdm_lightning.backbones.flux2 import Flux2Backbone, Flux2KleinBackbone
from rdm_lightning.backbones.mixture import MixtureBackbone, MixtureDataModule, MixtureLayout
from rdm_lightning.backbones.qwen_image import QwenImageBackbone
from rdm_lightning.backbones.sd3 import SD3Backbone
from rdm_lightning.backbones.stable_diffusion import StableDiffusionBackbone
from rdm_lightning.backbones.z_image import ZImageBackbone

__all__ = [
    "Backbone", "Conditioning", "DigitsBackbone", "Flux2Backbone", "Flux2KleinBackbone", "FluxBackbone", "MixtureBackbone", "MixtureDataModule", "MixtureLayout",
    "QwenImageBackbone", "SD3Backbone", "StableDiffusionBackbone", "ZImageBackbone",
]
