"""Rewards of the digits domain: 8×8 grey images against prompts naming a digit.

- :class:`DigitsClassifierReward`: log-probability of the prompted digit under the
  evaluation classifier (differentiable; the analogue of CLIP score / GenEval).
- :class:`StrokeContrastReward`: ink brightness minus background brightness, a
  reward of a different kind (no network, prompt-independent), so multi-reward
  code runs for real.
- :class:`DigitsGoldReward`: probability of the prompted digit under an
  independently trained classifier of another architecture (an MLP). It is
  logged, never optimized, so reward hacking of the classifier reward shows up
  as a gap between the two.

Images are ``(B, 1, 8, 8)``; ``(B, 3, 8, 8)`` is accepted and averaged over
channels, so an RGB rendering of a grey digit scores like the digit itself.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from rdm_lightning.cache import cache_dir
from rdm_lightning.data.digits import NUM_CLASSES, digit_from_prompt
from rdm_lightning.evaluation.digits import load_digits_classifier, load_or_train_classifier
from rdm_lightning.rewards.base import RewardModel

IMAGE_SIZE = 8
GOLD_HIDDEN = 512
# The MLP lacks the CNN's shift invariance; 50 epochs of shifted digits give it ~98% test accuracy in ~5 s.
GOLD_EPOCHS = 50


def grey_digits(images: Tensor) -> Tensor:
    """``(B, 1, 8, 8)`` from ``(B, 1, 8, 8)`` or ``(B, 3, 8, 8)`` (channel mean), else a ValueError."""
    if images.shape[1] not in (1, 3) or images.shape[2:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"digits rewards take images shaped (B, 1, 8, 8) or (B, 3, 8, 8), got {tuple(images.shape)}")
    return images.mean(dim=1, keepdim=True)


class DigitsMLP(nn.Module):
    """The gold classifier's architecture: an MLP on the 64 flattened pixels, ``(B, 1, 8, 8)`` → ``(B, 10)`` logits.

    Unlike the evaluation CNN it has no convolutions, so the two share no inductive bias
    that an optimized generator could exploit in both at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(IMAGE_SIZE * IMAGE_SIZE, GOLD_HIDDEN),
            nn.SiLU(),
            nn.Linear(GOLD_HIDDEN, GOLD_HIDDEN),
            nn.SiLU(),
            nn.Linear(GOLD_HIDDEN, NUM_CLASSES),
        )

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``(B, 10)``."""
        return self.layers(images)


def load_gold_classifier(seed: int = 1, cache: str | Path | None = None) -> tuple[DigitsMLP, float]:
    """The gold ``DigitsMLP`` of ``seed``, trained on the default split and cached after the first call.

    Args:
        seed: Training seed (the evaluation classifier uses 0).
        cache: Cache root; ``None`` uses ``cache_dir()`` (``$RDM_CACHE``). The file is
            ``<cache>/digits/gold-classifier-seed{seed}.pt``.

    Returns:
        The classifier in eval mode and its test accuracy.

    Raises:
        ValueError: the test accuracy is below 0.97.
    """
    path = Path(cache if cache is not None else cache_dir()) / "digits" / f"gold-classifier-seed{seed}.pt"
    return load_or_train_classifier(path, DigitsMLP, seed, epochs=GOLD_EPOCHS)


class _PromptedDigitReward(RewardModel):
    """(Log-)probability that ``classifier`` gives the digit each prompt names."""

    def __init__(
        self, classifier: nn.Module, log_prob: bool, name: str | None, train_scale: float, report_scale: float
    ) -> None:
        super().__init__(name=name, train_scale=train_scale, report_scale=report_scale)
        self.classifier = classifier
        self.log_prob = log_prob

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        labels = torch.tensor([digit_from_prompt(prompt) for prompt in prompts], device=images.device)
        log_probs = self.classifier(grey_digits(images)).log_softmax(dim=1)
        chosen = log_probs.gather(1, labels[:, None]).squeeze(1)
        return chosen if self.log_prob else chosen.exp()


class DigitsClassifierReward(_PromptedDigitReward):
    """Log-probability of the prompted digit under the evaluation classifier; differentiable.

    Args:
        seed: Which cached ``DigitsClassifier`` (see ``load_digits_classifier``); 0 is the
            one digits evaluation uses.
        cache: Cache root; ``None`` uses ``$RDM_CACHE``.
        log_prob: Score ``log p(digit | image)`` (≤ 0); ``False`` scores ``p`` (in ``[0, 1]``).
        name: Name in logs; ``None`` uses the class name.
        train_scale: Factor of the score in training objectives.
        report_scale: Factor of the score in reported tables.
    """

    differentiable = True

    def __init__(
        self,
        seed: int = 0,
        cache: str | None = None,
        log_prob: bool = True,
        name: str | None = None,
        train_scale: float = 1.0,
        report_scale: float = 1.0,
    ) -> None:
        classifier, _ = load_digits_classifier(seed=seed, cache=cache)
        super().__init__(classifier, log_prob, name, train_scale, report_scale)


class DigitsGoldReward(_PromptedDigitReward):
    """Probability of the prompted digit under the independent gold ``DigitsMLP``; logged, never optimized.

    Not differentiable by design: ``score(..., with_grad=True)`` raises, so no
    objective can back-propagate into the reward that is meant to detect hacking.

    Args:
        seed: Which cached gold classifier (see ``load_gold_classifier``).
        cache: Cache root; ``None`` uses ``$RDM_CACHE``.
        log_prob: Score ``log p`` instead of ``p``.
        name: Name in logs; ``None`` uses the class name.
        train_scale: Factor of the score in training objectives (unused in practice).
        report_scale: Factor of the score in reported tables.
    """

    differentiable = False

    def __init__(
        self,
        seed: int = 1,
        cache: str | None = None,
        log_prob: bool = False,
        name: str | None = None,
        train_scale: float = 1.0,
        report_scale: float = 1.0,
    ) -> None:
        classifier, _ = load_gold_classifier(seed=seed, cache=cache)
        super().__init__(classifier, log_prob, name, train_scale, report_scale)


class StrokeContrastReward(RewardModel):
    """Mean of the brightest ``ink_fraction`` of pixels minus the mean of the rest; differentiable.

    On the grey image (channel mean) with ``n`` pixels and ``k = round(ink_fraction · n)``
    (kept in ``1..n-1``) ink pixels, the score lies in ``[0, 1]``: 1 for pure white
    strokes on black, 0 for a flat image. It ignores the prompt. Its gradient is
    ``1/k`` on the ink pixels and ``-1/(n-k)`` on the rest (almost everywhere; ties at
    the ink threshold pick one side).

    Args:
        ink_fraction: Share of pixels counted as ink, in ``(0, 1)``; about 29% of the real digits'
            pixels are above 0.5.
        name: Name in logs; ``None`` uses the class name.
        train_scale: Factor of the score in training objectives.
        report_scale: Factor of the score in reported tables.
    """

    differentiable = True

    def __init__(
        self,
        ink_fraction: float = 0.25,
        name: str | None = None,
        train_scale: float = 1.0,
        report_scale: float = 1.0,
    ) -> None:
        super().__init__(name=name, train_scale=train_scale, report_scale=report_scale)
        if not 0.0 < ink_fraction < 1.0:
            raise ValueError(f"ink_fraction must be in (0, 1), got {ink_fraction!r}")
        self.ink_fraction = ink_fraction

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = images.mean(dim=1).flatten(1)
        count = pixels.shape[1]
        if count < 2:
            raise ValueError(f"stroke contrast needs at least 2 pixels per image, got {tuple(images.shape)}")
        ink_count = min(max(round(self.ink_fraction * count), 1), count - 1)
        ink = pixels.topk(ink_count, dim=1).values.sum(dim=1)
        background = pixels.sum(dim=1) - ink
        return ink / ink_count - background / (count - ink_count)
