"""Quality of generated digits: a small classifier and the metrics built on it.

The classifier is trained on the train split; the held-out test split is the
real reference. Metrics (see ``DigitsEvaluator``):

- ``digits_fd``: Fréchet distance of the classifier's penultimate features
  between generated images and the test split (the digits analogue of FID);
- ``prompt_accuracy``: share of images classified as the digit their prompt names;
- ``pixel_fd``: Fréchet distance in pixel space, on the leading principal components of the
  train split (``PixelBasis``): a second distance that does not rely on the classifier, whose
  features can be blind to how far samples spread off the data (``docs/methods/dmd.md``).

``DigitsEvaluator.real_data_floor`` scores the train split against the test split: the
distances real digits themselves reach, the floor to read every other score against.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdm_lightning.cache import cache_dir
from rdm_lightning.runs import run_once
from rdm_lightning.data.digits import NUM_CLASSES, DigitsSplit, digit_from_prompt, digit_prompt, digits_split
from rdm_lightning.evaluation.frechet import frechet_distance, gaussian_statistics

MIN_TEST_ACCURACY = 0.97
FEATURE_DIM = 128


class DigitsClassifier(nn.Module):
    """A small CNN on ``(B, 1, 8, 8)`` digit images in ``[0, 1]``.

    ``features`` is the 128-d penultimate activation (the space of digits-FD);
    ``forward`` gives the 10 class logits.
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),  # 8×8 → 4×4
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, FEATURE_DIM),
            nn.SiLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features ``(B, 128)``."""
        return self.body(images)

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``(B, 10)``."""
        return self.head(self.features(images))


def random_shift(images: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Shift each image by its own random offset in ``[-max_shift, max_shift]`` pixels per axis.

    Pads with zeros (the background), then crops back to the original size.
    """
    batch, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, batch, 1), generator=generator)
    rows = (dy + torch.arange(height))[:, :, None]  # (B, H, 1)
    cols = (dx + torch.arange(width))[:, None, :]  # (B, 1, W)
    return padded[torch.arange(batch)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def train_digits_classifier(
    split: DigitsSplit,
    seed: int = 0,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    architecture: Callable[[], nn.Module] = DigitsClassifier,
) -> tuple[nn.Module, float]:
    """Train a classifier on ``split``'s train images, with ±1 pixel random shifts.

    Args:
        split: The data; training uses only the train half, accuracy the test half.
        seed: Seeds the weights, the batch order and the shifts; the global RNG is untouched.
        epochs: Passes over the train split.
        batch_size: Images per step.
        lr: Peak AdamW learning rate of a one-cycle schedule (warm-up, then cosine decay to ~0).
        weight_decay: AdamW weight decay.
        architecture: Builds the untrained network, ``(B, 1, 8, 8)`` images to ``(B, 10)``
            logits; called under ``seed``.

    Returns:
        The classifier in eval mode and its accuracy on the test split.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got epochs={epochs}, batch_size={batch_size}")
    generator = torch.Generator().manual_seed(seed)
    # Weight init draws from the global RNG: fork it so training is seeded without side effects.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = architecture()
    images, labels = split.train_images, split.train_labels
    steps_per_epoch = len(labels) // batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, anneal_strategy="cos"
    )
    model.train()
    with _single_thread():
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=generator)
            for step in range(steps_per_epoch):
                index = order[step * batch_size : (step + 1) * batch_size]
                loss = F.cross_entropy(model(random_shift(images[index], generator)), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    model.eval()
    return model, classifier_accuracy(model, split.test_images, split.test_labels)


@torch.no_grad()
def classifier_accuracy(model: DigitsClassifier, images: Tensor, labels: Tensor) -> float:
    """Share of ``images`` that ``model`` assigns to their ``labels``."""
    predictions = model(images.to(_device_of(model))).argmax(dim=1).cpu()
    return (predictions == labels).float().mean().item()


def load_digits_classifier(seed: int = 0, cache: str | Path | None = None) -> tuple[DigitsClassifier, float]:
    """The classifier of ``seed`` trained on the default split, cached after the first call.

    Args:
        seed: Training seed; another seed gives an independently trained classifier
            (e.g. a gold reward that is never optimized).
        cache: Cache root; ``None`` uses ``cache_dir()`` (``$RDM_CACHE``). The file is
            ``<cache>/digits/classifier-seed{seed}.pt``.

    Returns:
        The classifier in eval mode and its test accuracy.

    Raises:
        ValueError: the test accuracy is below 0.97.
    """
    path = Path(cache if cache is not None else cache_dir()) / "digits" / f"classifier-seed{seed}.pt"
    return load_or_train_classifier(path, DigitsClassifier, seed)


def load_or_train_classifier(
    path: Path, architecture: Callable[[], nn.Module], seed: int, epochs: int = 30
) -> tuple[nn.Module, float]:
    """The ``architecture`` network stored at ``path``, or trained on the default split and saved there.

    Args:
        path: The checkpoint file, ``{"state_dict", "test_accuracy"}``.
        architecture: Builds the network (see ``train_digits_classifier``).
        seed: Training seed, used only when ``path`` does not exist yet.
        epochs: Training epochs, likewise.

    Returns:
        The network in eval mode and its test accuracy.

    Raises:
        ValueError: the test accuracy is below 0.97.
    """
    # Under a multi-process launch rank 0 trains while the other ranks wait for the file.
    run_once(path.is_file, lambda: _train_and_save(path, architecture, seed, epochs), f"train the classifier {path}")
    model = architecture()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    accuracy = float(checkpoint["test_accuracy"])
    if accuracy < MIN_TEST_ACCURACY:
        raise ValueError(
            f"digits classifier {str(path)!r} has test accuracy {accuracy:.4f}, below the required "
            f"{MIN_TEST_ACCURACY}; delete the file to retrain, or use another seed"
        )
    return model, accuracy


def _train_and_save(path: Path, architecture: Callable[[], nn.Module], seed: int, epochs: int) -> None:
    model, accuracy = train_digits_classifier(digits_split(), seed=seed, epochs=epochs, architecture=architecture)
    _save_atomically({"state_dict": model.state_dict(), "test_accuracy": accuracy}, path)


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread, restoring the previous count afterwards.

    The classifier is so small that threads gain little, while on a busy CPU their
    synchronisation made training ~100× slower (measured: 4 ms vs 400 ms a step).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _save_atomically(obj: dict, path: Path) -> None:
    # Write-then-rename, so that a concurrent reader (another DDP rank) never sees half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(obj, partial)
    os.replace(partial, path)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


PIXEL_COMPONENTS = 20
"""Principal components of ``pixel_fd``: 20 of the 64 pixel dimensions hold 89 % of the train
split's variance, and a 20-d covariance is estimated well from the 360 test images."""


class PixelBasis:
    """The leading principal components of real digits: ``features(x) = (flatten(x) − mean)·Vₖ``.

    Args:
        images: Real images ``(N, 1, 8, 8)`` the basis is fitted to (the train split).
        components: ``k``, how many leading components to keep, in ``[1, 64]``.
    """

    def __init__(self, images: Tensor, components: int = PIXEL_COMPONENTS) -> None:
        pixels = _check_images(images, "images").flatten(1).double()
        if not 1 <= components <= pixels.shape[1]:
            raise ValueError(f"components must be in [1, {pixels.shape[1]}], got {components}")
        self.mean = pixels.mean(0)
        # Right singular vectors of the centred data, by decreasing variance.
        _, singular_values, vh = torch.linalg.svd(pixels - self.mean, full_matrices=False)
        self.components = vh[:components].T
        variances = singular_values**2
        self.explained_variance = float(variances[:components].sum() / variances.sum())

    def features(self, images: Tensor) -> Tensor:
        """``(N, k)`` float64 coordinates of ``images`` in the basis."""
        return (_check_images(images, "images").flatten(1).double() - self.mean) @ self.components


class DigitsEvaluator:
    """digits-FD and prompt accuracy of generated digits against a real reference set.

    Args:
        classifier: The evaluation network (see ``load_digits_classifier``).
        reference_images: Real images ``(N, 1, 8, 8)`` in ``[0, 1]``, normally the
            held-out test split; their feature statistics are computed once here.
        pixel_basis: The basis of ``pixel_fd`` (fitted to the train split by ``default``).
        batch_size: Images per classifier forward pass.
    """

    def __init__(
        self, classifier: DigitsClassifier, reference_images: Tensor, pixel_basis: PixelBasis, batch_size: int = 512
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.classifier = classifier.eval()
        self.batch_size = batch_size
        self.pixel_basis = pixel_basis
        reference_images = _check_images(reference_images, "reference_images")
        features, _ = self._features_and_predictions(reference_images)
        self.reference_mu, self.reference_cov = gaussian_statistics(features)
        self.reference_pixel_mu, self.reference_pixel_cov = gaussian_statistics(pixel_basis.features(reference_images))

    @classmethod
    def default(cls) -> DigitsEvaluator:
        """The cached seed-0 classifier and the train split's pixel basis against the default test split."""
        classifier, _ = load_digits_classifier(seed=0)
        split = digits_split()
        return cls(classifier, split.test_images, PixelBasis(split.train_images))

    def real_data_floor(self) -> dict[str, float]:
        """``digits_fd`` and ``pixel_fd`` of the train split against the reference: what real digits score."""
        split = digits_split()
        metrics = self.evaluate(split.train_images, [digit_prompt(int(label)) for label in split.train_labels])
        return {"digits_fd": metrics["digits_fd"], "pixel_fd": metrics["pixel_fd"], "num_samples": metrics["num_samples"]}

    def evaluate(self, images: Tensor, prompts: list[str]) -> dict[str, float | int]:
        """Score generated ``images`` against the reference set.

        Args:
            images: ``(N, 1, 8, 8)`` or channels-last ``(N, 8, 8, 1)``, values in ``[0, 1]``, N ≥ 2.
            prompts: The prompt each image was generated from; each must name a digit.

        Returns:
            ``{"digits_fd", "pixel_fd", "prompt_accuracy", "num_samples"}``.
        """
        images = _check_images(images, "images")
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
        targets = torch.tensor([digit_from_prompt(prompt) for prompt in prompts])
        features, predictions = self._features_and_predictions(images)
        mu, cov = gaussian_statistics(features)
        pixel_mu, pixel_cov = gaussian_statistics(self.pixel_basis.features(images))
        return {
            "digits_fd": frechet_distance(mu, cov, self.reference_mu, self.reference_cov),
            "pixel_fd": frechet_distance(pixel_mu, pixel_cov, self.reference_pixel_mu, self.reference_pixel_cov),
            "prompt_accuracy": (predictions == targets).float().mean().item(),
            "num_samples": len(images),
        }

    @torch.no_grad()
    def _features_and_predictions(self, images: Tensor) -> tuple[Tensor, Tensor]:
        device = _device_of(self.classifier)
        features, predictions = [], []
        for batch in images.split(self.batch_size):
            batch_features = self.classifier.features(batch.to(device))
            features.append(batch_features.double().cpu())
            predictions.append(self.classifier.head(batch_features).argmax(dim=1).cpu())
        return torch.cat(features), torch.cat(predictions)


def _check_images(images: Tensor, name: str) -> Tensor:
    """``images`` as float32 ``(N, 1, 8, 8)``, or a ValueError saying what is wrong."""
    if not isinstance(images, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim == 4 and images.shape[1:] == (8, 8, 1):
        images = images.permute(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1:] != (1, 8, 8):
        raise ValueError(f"{name} must be shaped (N, 1, 8, 8) or (N, 8, 8, 1), got {tuple(images.shape)}")
    if len(images) < 2:
        raise ValueError(f"{name} needs at least 2 images for a covariance, got {len(images)}")
    images = images.detach().float()
    low, high = images.min().item(), images.max().item()
    # NaN fails both comparisons, so it is caught here too.
    if not (low >= 0.0 and high <= 1.0):
        raise ValueError(f"{name} must have values in [0, 1], got range [{low}, {high}]")
    return images
