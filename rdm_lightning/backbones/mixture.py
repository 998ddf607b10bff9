"""An exact-teacher domain: a 2-D class-conditional Gaussian mixture.

Data: ``C`` classes of ``M`` isotropic Gaussian modes each (std ``s``), the ``C·M`` means on a
ring with ``separation`` between neighbours, each class owning a seeded random ``M`` of them.
Under the flow schedule ``x_σ = (1−σ)·x0 + σ·ε`` the teacher is the exact posterior mean

    E[x0 | x_σ, c] = Σ_k r_k(x_σ) · (μ_k + α·s² / (α²·s² + σ²) · (x_σ − α·μ_k)),
    r_k ∝ π_k(c) · N(x_σ; α·μ_k, (α²·s² + σ²)·I),   α = 1 − σ,

with ``π(c)`` uniform over the class's modes (over all modes for the empty prompt, the
unconditional branch of CFG). Any gap between a distilled student and the data is then the
method's, never the teacher's. Prompts are ``"class <c>"``; the "latent" is the point itself.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from rdm_lightning.backbones.base import Backbone, Conditioning
from rdm_lightning.core.parameterization import Prediction
from rdm_lightning.core.schedules import FlowSchedule

CLASS_PROMPT = re.compile(r"class (\d+)")
UNCONDITIONAL = -1
"""Class index of the empty prompt: the mixture over every mode."""


@dataclass
class GaussianMixture:
    """Layout of the class-conditional mixture."""

    means: Tensor
    """``[K, 2]`` mode means (float64)."""
    mode_class: Tensor
    """``[K]`` class of each mode (long)."""
    std: float
    """Standard deviation of every mode, per coordinate."""
    num_classes: int
    """Number of classes ``C``."""

    def weights(self, classes: Tensor) -> Tensor:
        """``[N, K]`` mode weights ``π(c)`` of each class (uniform over all modes for :data:`UNCONDITIONAL`)."""
        classes = classes.long().cpu()
        own = (self.mode_class[None] == classes[:, None]) | (classes[:, None] == UNCONDITIONAL)
        return own.double() / own.sum(dim=1, keepdim=True)

    def sample(self, classes: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``[N, 2]`` float64 samples of the given classes."""
        modes = torch.multinomial(self.weights(classes), 1, generator=generator).squeeze(1)
        noise = torch.randn(len(modes), 2, generator=generator, dtype=torch.float64)
        return self.means[modes] + self.std * noise

    def log_prob(self, x: Tensor, classes: Tensor) -> Tensor:
        """``[N]`` log-density of ``x`` under each sample's class mixture."""
        return mixture_log_prob(x, self.means, self.std, self.weights(classes))


@dataclass(frozen=True)
class MixtureLayout:
    """Layout of the ring mixture: the ``num_classes·modes_per_class`` means evenly on a ring,
    ``separation`` apart; the seed deals them to classes at random, so a class's modes are
    generally far apart."""

    num_classes: int = 4
    """Number of classes ``C``."""
    modes_per_class: int = 2
    """Modes ``M`` of each class."""
    separation: float = 2.0
    """Distance between neighbouring modes on the ring."""
    mode_std: float = 0.2
    """Standard deviation of every mode, per coordinate."""
    seed: int = 0
    """Seed of which modes each class owns."""

    def __post_init__(self):
        for name in ("num_classes", "modes_per_class"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("separation", "mode_std"):
            value = getattr(self, name)
            if not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")

    def mixture(self) -> GaussianMixture:
        """The :class:`GaussianMixture` of this layout."""
        num_modes = self.num_classes * self.modes_per_class
        radius = self.separation / (2 * math.sin(math.pi / num_modes)) if num_modes > 1 else 0.0
        angles = 2 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes
        means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        order = torch.randperm(num_modes, generator=torch.Generator().manual_seed(self.seed))
        mode_class = torch.empty(num_modes, dtype=torch.long)
        mode_class[order] = torch.arange(num_modes) // self.modes_per_class
        return GaussianMixture(means, mode_class, float(self.mode_std), self.num_classes)


def component_log_densities(x: Tensor, means: Tensor, variance: Tensor | float) -> Tensor:
    """``[N, K]`` log N(x_n; μ_k, v·I) in float64; ``means`` is ``[K, D]`` or per sample ``[N, K, D]``,
    ``variance`` a scalar or ``[N, 1]``."""
    x, means = x.double(), means.double().to(x.device)
    variance = torch.as_tensor(variance, dtype=torch.float64, device=x.device)
    squared = ((x[:, None, :] - means) ** 2).sum(-1)
    return -0.5 * squared / variance - 0.5 * x.shape[1] * torch.log(2 * math.pi * variance)


def mixture_log_prob(x: Tensor, means: Tensor, std: float, weights: Tensor) -> Tensor:
    """``[N]`` log Σ_k π_nk·N(x_n; μ_k, s²·I); ``weights`` is ``[N, K]`` or ``[K]``."""
    log_weights = weights.double().to(x.device).log().expand(len(x), -1)
    return torch.logsumexp(log_weights + component_log_densities(x, means, std**2), dim=1)


def mixture_posterior_mean(x_t: Tensor, alpha: Tensor, sigma: Tensor, means: Tensor, std: float, weights: Tensor) -> Tensor:
    """Exact ``E[x0 | x_t = α·x0 + σ·ε]`` under the mixture (module docstring), float64.

    ``alpha``, ``sigma``: ``[N, 1]``; ``weights``: ``[N, K]`` mode weights of each sample.
    """
    x_t, alpha, sigma, means = x_t.double(), alpha.double(), sigma.double(), means.double().to(x_t.device)
    variance = alpha**2 * std**2 + sigma**2
    log_r = weights.double().to(x_t.device).log() + component_log_densities(x_t, alpha[:, :, None] * means, variance)
    responsibilities = torch.softmax(log_r, dim=1)
    gain = (alpha * std**2 / variance)[:, :, None]
    per_mode = means[None] + gain * (x_t[:, None, :] - alpha[:, :, None] * means[None])
    return (responsibilities[:, :, None] * per_mode).sum(dim=1)


class ExactMixtureDenoiser(nn.Module):
    """Flow-velocity network: the exact velocity of the mixture plus a trainable residual MLP.

    The MLP's last layer starts at zero, so a fresh copy is the exact teacher; the generator
    and fake score train the residual. It is added in velocity space (what the denoising loss
    regresses), so its weight in the loss does not blow up as ``1/σ`` at low noise.
    """

    def __init__(self, mixture: GaussianMixture, hidden: int = 128, depth: int = 2):
        super().__init__()
        self.register_buffer("means", mixture.means.clone())
        self.std = mixture.std
        num_modes = len(mixture.means)
        layers = [nn.Linear(2 + 1 + num_modes, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        self.residual = nn.Sequential(*layers, nn.Linear(hidden, 2))
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)

    def exact_velocity(self, x_t: Tensor, sigma: Tensor, weights: Tensor) -> Tensor:
        """``v = (x_t − E[x0|x_t]) / σ`` (float64): ``x̂0 = x_t − σ·v`` is then the exact posterior mean."""
        sigma = sigma.double()[:, None]
        x0 = mixture_posterior_mean(x_t, 1.0 - sigma, sigma, self.means, self.std, weights)
        # σ is never 0 where the library evaluates a network (levels are drawn from a continuum);
        # the clamp only keeps an explicit σ = 0 finite.
        return (x_t.double() - x0) / sigma.clamp_min(1e-12)

    def forward(self, x_t: Tensor, sigma: Tensor, weights: Tensor) -> Tensor:
        features = torch.cat([x_t.float(), sigma.float()[:, None], weights.float()], dim=1)
        return self.exact_velocity(x_t, sigma, weights).float() + self.residual(features)


def class_of_prompt(prompt: str, num_classes: int) -> int:
    """``"class <c>"`` → ``c``; ``""`` → :data:`UNCONDITIONAL`."""
    if not prompt.strip():
        return UNCONDITIONAL
    match = CLASS_PROMPT.fullmatch(prompt.strip().lower())
    if match is None or int(match.group(1)) >= num_classes:
        raise ValueError(f"prompt {prompt!r} is not a mixture class: accepted 'class 0' … 'class {num_classes - 1}' or ''")
    return int(match.group(1))


class MixtureBackbone(Backbone):
    """The Gaussian-mixture domain behind the :class:`Backbone` interface, with its exact teacher.

    Args:
        layout: the mixture's classes, modes and their placement on the ring.
        hidden: width of the denoiser's residual MLP.
        depth: number of hidden layers of the residual MLP.
    """

    prediction = Prediction.FLOW_VELOCITY

    def __init__(self, layout: MixtureLayout = MixtureLayout(), hidden: int = 128, depth: int = 2):
        super().__init__()
        for name, value in (("hidden", hidden), ("depth", depth)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.mixture = layout.mixture()
        self.hidden = hidden
        self.depth = depth
        self.schedule = FlowSchedule(shift=1.0)
        self.register_buffer("device_anchor", torch.zeros(()), persistent=False)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (2,)

    def load_denoiser(self) -> nn.Module:
        # The residual's hidden layers are seeded so every role starts from the same network.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return ExactMixtureDenoiser(self.mixture, self.hidden, self.depth).to(self.device_anchor.device)

    def classes(self, prompts: Sequence[str]) -> Tensor:
        """``[N]`` class index of each prompt (:data:`UNCONDITIONAL` for ``""``)."""
        return torch.tensor([class_of_prompt(p, self.mixture.num_classes) for p in prompts], dtype=torch.long)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        weights = self.mixture.weights(self.classes(prompts))
        return Conditioning({"weights": weights.float().to(self.device_anchor.device)})

    def network_output(self, network: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        return network(x_t, level.to(x_t.device), cond.tensors["weights"])

    def decode(self, latents: Tensor) -> Tensor:
        """The points themselves (the domain has no pixel space)."""
        return latents.float()

    def encode_images(self, images: Tensor) -> Tensor:
        """The points themselves."""
        return images.float()


class MixtureSamples(IterableDataset):
    """Endless batches ``{"prompts": ["class c", …], "images": [B, 2] true samples}``, classes uniform,
    each drawn class ``group_size`` times in a row (group-relative methods)."""

    def __init__(self, mixture: GaussianMixture, batch_size: int, seed: int, group_size: int = 1):
        self.mixture = mixture
        self.batch_size = batch_size
        self.seed = seed
        self.group_size = group_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            groups = torch.randint(self.mixture.num_classes, (self.batch_size // self.group_size,), generator=generator)
            classes = groups.repeat_interleave(self.group_size)
            yield {
                "prompts": [f"class {c}" for c in classes.tolist()],
                "images": self.mixture.sample(classes, generator).float(),
            }


class MixtureDataModule(L.LightningDataModule):
    """Training batches of the mixture domain.

    Args:
        layout: the mixture's layout; the same as the :class:`MixtureBackbone`'s.
        batch_size: prompts (and true samples) per batch.
        seed: seed of the batches' classes and samples.
        group_size: K, each class of a batch repeated K times in a row; must divide ``batch_size``.
    """

    def __init__(
        self, layout: MixtureLayout = MixtureLayout(), batch_size: int = 256, seed: int = 0, group_size: int = 1
    ):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(group_size, int) or group_size < 1 or batch_size % group_size:
            raise ValueError(f"group_size must be an integer >= 1 dividing batch_size={batch_size}, got {group_size!r}")
        self.mixture = layout.mixture()
        self.batch_size = batch_size
        self.seed = seed
        self.group_size = group_size

    def train_dataloader(self) -> DataLoader:
        """Endless seeded batches; the method's ``max_generator_updates`` ends the run."""
        return DataLoader(MixtureSamples(self.mixture, self.batch_size, self.seed, self.group_size), batch_size=None)
