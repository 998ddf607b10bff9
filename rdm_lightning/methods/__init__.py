"""LightningModules of the distillation methods."""
from rdm_lightning.methods.acdmd import ACDMD, ACDMDConfig
from rdm_lightning.methods.base import DistillationModule, StudentConfig, TeacherSamplingConfig
from rdm_lightning.methods.dmd import DMD, DMDConfig, Iteration
from rdm_lightning.methods.dmdr import DMDR, DMDRConfig
from rdm_lightning.methods.gndm import GNDM, GNDMConfig, ImportanceSamplingConfig
from rdm_lightning.methods.gdmd import GDMD, GDMDConfig
from rdm_lightning.methods.grpo import GRPOConfig
from rdm_lightning.methods.rtdmd import RTDMD, RTDMDConfig
from rdm_lightning.methods.optim import OptimizerConfig, RoleAwareAdamW
from rdm_lightning.methods.teacher import DigitsTeacherPretraining, ensure_digits_teacher

__all__ = [
    "ACDMD",
    "ACDMDConfig",
    "DMD",
    "DMDConfig",
    "DMDR",
    "DMDRConfig",
    "GDMD",
    "GDMDConfig",
    "DigitsTeacherPretraining",
    "DistillationModule",
    "GNDM",
    "GNDMConfig",
    "GRPOConfig",
    "ImportanceSamplingConfig",
    "Iteration",
    "OptimizerConfig",
    "RTDMD",
    "RTDMDConfig",
    "RoleAwareAdamW",
    "StudentConfig",
    "TeacherSamplingConfig",
    "ensure_digits_teacher",
]
