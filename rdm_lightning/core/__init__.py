"""Pure tensor math: schedules, parameterizations, DMD gradient, samplers. No Lightning."""
from rdm_lightning.core.dmd import (
    classifier_free_guidance,
    dmd_gradient,
    dmd_loss,
    dmd_normalizer,
    gan_discriminator_loss,
    gan_generator_loss,
)
from rdm_lightning.core.parameterization import Prediction, prediction_to_x0, training_target
from rdm_lightning.core.sampling import backward_simulation_input, few_step_sample, next_sample, renoise
from rdm_lightning.core.schedules import FlowSchedule, NoiseSchedule, VPSchedule

__all__ = [
    "FlowSchedule",
    "NoiseSchedule",
    "Prediction",
    "VPSchedule",
    "backward_simulation_input",
    "classifier_free_guidance",
    "dmd_gradient",
    "dmd_loss",
    "dmd_normalizer",
    "few_step_sample",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "next_sample",
    "prediction_to_x0",
    "renoise",
    "training_target",
]
