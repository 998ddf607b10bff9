"""rdm_lightning: few-step diffusion distillation with distribution matching and rewards."""

__version__ = "0.1.0"
