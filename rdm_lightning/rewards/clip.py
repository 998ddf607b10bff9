"""CLIP-family rewards: the CLIP score, PickScore, and DMDR's SRPO-style reward over a scorer's embeddings.

- :class:`CLIPScoreReward`: cosine of a transformers ``CLIPModel``'s projected image and
  prompt embeddings (optionally times ``logit_scale.exp()``), loaded offline from a local
  folder; differentiable.
- :class:`PickScoreReward`: PickScore v1, ``logit_scale.exp()`` times that cosine, with its
  processor's bicubic resize; differentiable.
- :class:`SRPOReward`: ``f_img · (k·f_txt(pos ⊕ prompt) − f_txt(neg ⊕ prompt))`` with control
  words drawn per image, over any scorer exposing ``embed_images`` and ``embed_texts``;
  differentiable.

Preprocessing is tensor-only (:func:`clip_preprocess`), so gradients reach the pixels and
neither PIL nor torchvision is needed; each reward resizes as its reference does
(docs/rewards.md). transformers is imported when a model is loaded, not when this module is.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdm_lightning.rewards.base import RewardModel, build_reward

# OpenAI CLIP's published image normalisation constants (per-channel RGB mean and std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# DMDR's control words (docs/methods/dmdr.md), adapted there from SRPO.
SRPO_POSITIVE_WORDS = ("Natural-lighting", "Detailed", "Realistic")
SRPO_NEGATIVE_WORDS = ("Painting", "CG Render", "Oil")

CLIP_FOLDER_CONTENTS = (
    "a folder written by CLIPModel.save_pretrained (config.json and the weights) plus the "
    "tokenizer's save_pretrained (tokenizer.json, or vocab.json and merges.txt)"
)
# Weight files that transformers' from_pretrained reads from a local folder.
CLIP_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

RESIZE_INTERPOLATIONS = ("bilinear", "bicubic")
"""``F.interpolate`` modes of the CLIP resize: torchvision's tensor ``Resize`` default (RTDMD's CLIP
score) and the bicubic of the CLIP image processors (PickScore, the LAION aesthetic predictor)."""


def check_resize_options(interpolation: str, antialias: bool) -> None:
    """Raise a ValueError unless ``interpolation`` is in :data:`RESIZE_INTERPOLATIONS` and ``antialias`` is a bool."""
    if interpolation not in RESIZE_INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {RESIZE_INTERPOLATIONS}, got {interpolation!r}")
    if not isinstance(antialias, bool):
        raise ValueError(f"antialias must be True or False, got {antialias!r}")


def resize_shortest_side(images: Tensor, size: int, mode: str = "bilinear", antialias: bool = True) -> Tensor:
    """``images`` ``(B, C, H, W)`` resized so that the shorter side is ``size``, as torchvision's
    ``Resize(size)`` resizes a float tensor.

    The longer side is ``int(size · long / short)``, torchvision's (and transformers') rounding;
    an image whose shorter side already is ``size`` is returned as is, as torchvision returns it.
    The resize is ``F.interpolate(mode=mode, antialias=antialias, align_corners=False)``. With
    ``antialias=True`` (torchvision's tensor default since 0.17) downscaling low-pass filters
    like PIL, and ``"bicubic"`` then uses PIL's cubic kernel (``a = -0.5``); without it a
    downscale interpolates between neighbouring pixels only (aliasing), and ``"bicubic"`` uses
    ``a = -0.75``.

    Args:
        images: ``(B, C, H, W)`` floating point.
        size: Target length of the shorter side.
        mode: ``"bilinear"`` or ``"bicubic"`` (:data:`RESIZE_INTERPOLATIONS`).
        antialias: Antialias as torchvision's tensor ``Resize`` and PIL do.

    Raises:
        ValueError: ``mode`` or ``antialias`` is not accepted.
    """
    check_resize_options(mode, antialias)
    height, width = images.shape[-2:]
    short, long = min(height, width), max(height, width)
    resized_long = int(size * long / short)
    target = (size, resized_long) if height <= width else (resized_long, size)
    if target == (height, width):
        return images
    return F.interpolate(images, size=target, mode=mode, align_corners=False, antialias=antialias)


def center_crop(images: Tensor, size: int) -> Tensor:
    """The central ``size × size`` window of ``images`` ``(B, C, H, W)``, ``H, W >= size``.

    Offsets are rounded as torchvision's ``center_crop`` rounds them (``int(round(excess / 2))``,
    half to even); transformers' image processors floor them instead, which puts the window one
    pixel further up or left when the excess is 3 mod 4 (docs/rewards.md).
    """
    height, width = images.shape[-2:]
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def clip_preprocess(images: Tensor, size: int, mode: str = "bilinear", antialias: bool = True) -> Tensor:
    """CLIP input ``(B, 3, size, size)`` from images ``(B, 1 or 3, H, W)`` in ``[0, 1]``.

    Resize the shorter side to ``size`` (:func:`resize_shortest_side`), centre-crop to
    ``size × size``, repeat a grey channel to RGB and apply the OpenAI CLIP normalisation.
    Every step is a tensor op, so the result is differentiable with respect to ``images``.
    The defaults are RTDMD's CLIP-score transform (torchvision's tensor ``Resize`` defaults).

    Args:
        images: ``(B, 1 or 3, H, W)`` in ``[0, 1]``.
        size: The model's input side.
        mode: Resize interpolation, ``"bilinear"`` or ``"bicubic"``.
        antialias: Antialias the resize.

    Raises:
        ValueError: ``images`` is not 4-d with 1 or 3 channels, or a resize option is not accepted.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"CLIP rewards take RGB (B, 3, H, W) or grey (B, 1, H, W) images, got {tuple(images.shape)}"
        )
    images = resize_shortest_side(images.expand(-1, 3, -1, -1), size, mode=mode, antialias=antialias)
    images = center_crop(images, size)
    mean = images.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def clip_image_embeddings(vision_model: nn.Module, visual_projection: nn.Module, pixels: Tensor) -> Tensor:
    """L2-normalised projected embeddings ``(B, D)`` of preprocessed ``pixels`` ``(B, 3, S, S)``:
    ``visual_projection`` of the vision tower's pooled output, as ``CLIPModel.get_image_features``.

    The tower and projection are called directly because ``get_image_features`` returns an
    output object rather than a tensor under transformers 5.
    """
    return F.normalize(visual_projection(vision_model(pixel_values=pixels).pooler_output), dim=-1)


def require_clip_folder(folder: Path, contents: str, tokenizer: bool = True) -> None:
    """Raise a FileNotFoundError unless ``folder`` holds a model config, weights and (with
    ``tokenizer``) tokenizer files; ``contents`` says what the folder should be, for the message.

    Checked up front because transformers fails silently or without saying what the folder
    should hold: without config.json ``CLIPModel.from_pretrained`` builds a default ViT-B/32
    config, without tokenizer files the tokenizer silently has a 2-token vocabulary, and
    without weights it raises an OSError naming the file names only.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"CLIP model folder not found at {str(folder)!r}; expected {contents}")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / name).is_file() for name in CLIP_WEIGHT_FILES):
        missing.append(f"weights ({' or '.join(CLIP_WEIGHT_FILES)})")
    has_tokenizer = (folder / "tokenizer.json").is_file() or all(
        (folder / name).is_file() for name in ("vocab.json", "merges.txt")
    )
    if tokenizer and not has_tokenizer:
        missing.append("tokenizer.json (or vocab.json and merges.txt)")
    if missing:
        raise FileNotFoundError(f"CLIP model folder {str(folder)!r} lacks {' and '.join(missing)}; expected {contents}")


class CLIPScoreReward(RewardModel):
    """CLIP score: cosine of the projected, L2-normalised image and prompt embeddings; differentiable.

    This is the diagonal of ``logits_per_image / logit_scale.exp()`` (RTDMD
    uses ``openai/clip-vit-large-patch14``, DMDR DFN5B-CLIP-ViT-H-14), in ``[-1, 1]``,
    typically 0.28–0.32 for matching pairs. With ``logit_scale=True`` it is multiplied by
    the model's ``logit_scale.exp()`` (PickScore's form, see :class:`PickScoreReward`; 100 for
    OpenAI CLIP).

    Images go through :func:`clip_preprocess` at the model's ``vision_config.image_size``, by
    default with RTDMD's CLIP-score resize: torchvision's tensor ``Resize`` defaults, bilinear
    and antialiased (docs/rewards.md). Prompts are padded and truncated to the tokenizer's
    maximum length (77 for CLIP). Weights are loaded in float32, offline.

    Args:
        model_path: Local folder written by ``CLIPModel.save_pretrained`` that also holds the
            tokenizer (``tokenizer.json``, or ``vocab.json`` and ``merges.txt``), e.g. a
            downloaded snapshot of ``openai/clip-vit-large-patch14``.
        logit_scale: Multiply the cosine by ``logit_scale.exp()``.
        interpolation: Resize interpolation, ``"bilinear"`` (RTDMD's CLIP score) or
            ``"bicubic"`` (the CLIP image processors' ``resample=3``).
        antialias: Antialias the resize, as torchvision's tensor ``Resize`` (since 0.17) and PIL do.
        name: Name in logs; ``None`` uses the class name.
        train_scale: Factor of the score in training objectives (RTDMD trains PickScore at ``1 / 26``).
        report_scale: Factor of the score in reported tables (some papers report CLIP × 100).

    Raises:
        FileNotFoundError: ``model_path`` is not a folder with a model config, weights and a tokenizer.
        ValueError: ``interpolation`` or ``antialias`` is not accepted.
    """

    differentiable = True
    folder_contents: ClassVar[str] = CLIP_FOLDER_CONTENTS
    """What ``model_path`` must hold, for error messages."""

    def __init__(
        self,
        model_path: str,
        logit_scale: bool = False,
        interpolation: str = "bilinear",
        antialias: bool = True,
        name: str | None = None,
        train_scale: float = 1.0,
        report_scale: float = 1.0,
    ) -> None:
        super().__init__(name=name, train_scale=train_scale, report_scale=report_scale)
        check_resize_options(interpolation, antialias)
        folder = Path(model_path).expanduser()
        require_clip_folder(folder, self.folder_contents)
        # Imported here so that importing the rewards package does not load transformers' CLIP.
        from transformers import AutoTokenizer, CLIPModel

        # float32 explicitly: transformers 5 otherwise keeps the checkpoint's dtype (often float16).
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.image_size = self.model.config.vision_config.image_size
        # Folders without a tokenizer config report a huge model_max_length; the position table bounds it.
        self.max_tokens = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        self.logit_scale = logit_scale
        self.interpolation = interpolation
        self.antialias = antialias

    def embed_images(self, images: Tensor) -> Tensor:
        """L2-normalised projected embeddings ``(B, D)`` of images ``(B, 1 or 3, H, W)`` in ``[0, 1]``
        on the reward's device and dtype."""
        pixels = clip_preprocess(images, self.image_size, mode=self.interpolation, antialias=self.antialias)
        return clip_image_embeddings(self.model.vision_model, self.model.visual_projection, pixels)

    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised projected embeddings ``(N, D)`` of ``texts``, on the reward's device."""
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.model.device)
        pooled = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        return F.normalize(self.model.text_projection(pooled), dim=-1)

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        cosine = (self.embed_images(images) * self.embed_texts(prompts)).sum(dim=-1)
        return cosine * self.model.logit_scale.exp() if self.logit_scale else cosine

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, interpolation={self.interpolation!r}, antialias={self.antialias}"


class PickScoreReward(CLIPScoreReward):
    """PickScore v1: ``logit_scale.exp() · cosine`` of its image and prompt embeddings; differentiable.

    ``yuvalkirstain/PickScore_v1`` is a transformers ``CLIPModel`` (ViT-H/14, ``logit_scale.exp()``
    ≈ 100), scored as its authors and RTDMD score it (tables report about 21–24). Images are
    resized as its processor (that of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``) resizes them:
    shorter side to 224 bicubically with antialiasing (PIL's filter), centre crop 224, OpenAI
    normalisation; prompts are padded and truncated to 77 tokens (docs/rewards.md).

    RTDMD trains on PickScore / 26: set ``train_scale`` to ``1 / 26`` (the configs do); the
    default 1 keeps the score unscaled, as tables report it.

    Args:
        model_path: Local snapshot folder of ``yuvalkirstain/PickScore_v1`` (config.json and the
            weights) with the tokenizer files of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``
            copied in (PickScore_v1 ships without a tokenizer).
        name: Name in logs; ``None`` uses the class name.
        train_scale: Factor of the score in training objectives (RTDMD: ``1 / 26``).
        report_scale: Factor of the score in reported tables.

    Raises:
        FileNotFoundError: ``model_path`` is not a folder with a model config, weights and a tokenizer.
    """

    folder_contents: ClassVar[str] = (
        "a snapshot of the hub repo yuvalkirstain/PickScore_v1 (config.json and model.safetensors or "
        "pytorch_model.bin) with the tokenizer files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K "
        "(tokenizer.json, or vocab.json and merges.txt) copied in"
    )

    def __init__(
        self, model_path: str, name: str | None = None, train_scale: float = 1.0, report_scale: float = 1.0
    ) -> None:
        super().__init__(
            model_path,
            logit_scale=True,
            interpolation="bicubic",
            antialias=True,
            name=name,
            train_scale=train_scale,
            report_scale=report_scale,
        )


class SRPOReward(RewardModel):
    """DMDR's SRPO-style reward ``f_img · (k·f_txt(pos ⊕ prompt) − f_txt(neg ⊕ prompt))``; differentiable.

    ``f`` are the scorer's L2-normalised image and text embeddings, ``k`` is ``positive_scale``
    (DMDR: 1.1, i.e. its ``srpo_k = 0.1`` plus one), and ``pos`` / ``neg`` are control words
    drawn uniformly from ``positive_words`` / ``negative_words`` (docs/methods/dmdr.md). ``word ⊕ prompt``
    is ``f"{word}. {prompt}"``, the joiner of DMDR's released code (the spec leaves it open).

    Each image gets its own ``(pos, neg)`` pair, and each :meth:`score` call draws fresh pairs
    from a private ``random.Random(seed)``: rewards built with the same seed draw the same
    words call after call, the global ``random`` state is untouched, and as pairs are drawn
    image by image in order, the words do not depend on ``batch_size``. DMDR's code draws one
    pair per training step for the whole batch; per-image draws have the same expectation.

    DMDR's code takes the embeddings from HPSv2.1; any reward with ``embed_images`` and
    ``embed_texts`` (e.g. :class:`CLIPScoreReward`) can be the scorer. It becomes a submodule,
    so it is frozen with this reward and moves with ``.to()``.

    Args:
        scorer: The embedding model: a reward with ``embed_images(images) -> (B, D)`` and
            ``embed_texts(texts) -> (N, D)``, or a spec that :func:`build_reward` builds into one
            (``{"class_path": "clip_score", "init_args": {"model_path": ...}}``).
        positive_words: Words of the image style the reward pulls towards.
        negative_words: Words of the style it pushes away from.
        positive_scale: ``k``, the weight of the positive text embedding.
        seed: Seed of the word draws.
        name: Name in logs; ``None`` uses the class name.
        train_scale: Factor of the score in training objectives.
        report_scale: Factor of the score in reported tables.

    Raises:
        TypeError: the scorer lacks ``embed_images`` or ``embed_texts``.
        ValueError: a word list is empty or holds a non-string or empty word, or
            ``positive_scale`` is not finite.
    """

    differentiable = True

    def __init__(
        self,
        scorer: RewardModel | dict[str, Any] | str,
        positive_words: Sequence[str] = SRPO_POSITIVE_WORDS,
        negative_words: Sequence[str] = SRPO_NEGATIVE_WORDS,
        positive_scale: float = 1.1,
        seed: int = 0,
        name: str | None = None,
        train_scale: float = 1.0,
        report_scale: float = 1.0,
    ) -> None:
        super().__init__(name=name, train_scale=train_scale, report_scale=report_scale)
        self.positive_words = _check_words("positive_words", positive_words)
        self.negative_words = _check_words("negative_words", negative_words)
        if not math.isfinite(positive_scale):
            raise ValueError(f"positive_scale must be a finite number, got {positive_scale!r}")
        self.positive_scale = float(positive_scale)
        scorer = build_reward(scorer)
        lacking = [method for method in ("embed_images", "embed_texts") if not callable(getattr(scorer, method, None))]
        if lacking:
            raise TypeError(
                f"SRPOReward needs a scorer with embed_images and embed_texts (e.g. CLIPScoreReward), "
                f"got {type(scorer).__name__}, which lacks {' and '.join(lacking)}"
            )
        self.scorer = scorer
        self.rng = random.Random(seed)

    def draw_control_words(self, count: int) -> list[tuple[str, str]]:
        """``count`` fresh ``(positive, negative)`` word pairs, one per image."""
        return [(self.rng.choice(self.positive_words), self.rng.choice(self.negative_words)) for _ in range(count)]

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        pairs = self.draw_control_words(len(prompts))
        positive_texts = [f"{positive}. {prompt}" for (positive, _), prompt in zip(pairs, prompts)]
        negative_texts = [f"{negative}. {prompt}" for (_, negative), prompt in zip(pairs, prompts)]
        # One text forward for both sets: padding to the longer text changes nothing, as CLIP
        # pools at the end-of-text token under a causal mask.
        positive, negative = self.scorer.embed_texts(positive_texts + negative_texts).chunk(2)
        return (self.scorer.embed_images(images) * (self.positive_scale * positive - negative)).sum(dim=-1)


def _check_words(label: str, words: Sequence[str]) -> tuple[str, ...]:
    if isinstance(words, str) or not words or not all(isinstance(word, str) and word for word in words):
        raise ValueError(f"{label} must be a non-empty list of non-empty strings, got {words!r}")
    return tuple(words)
