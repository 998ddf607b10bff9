"""The reward interface: images in ``[0, 1]`` plus prompts in, one float32 score per image out.

A :class:`RewardModel` is frozen (no trainable parameters, always in eval mode)
and scores through :meth:`RewardModel.score`, which validates the input, moves it
to the reward's device and dtype, batches it, and runs either without gradients
(evaluation, logging) or, for rewards marked ``differentiable``, with them
(reward back-propagation). Both paths return identical values.

Methods combine several rewards with weights in :class:`WeightedRewards`, and
configs name a reward by a short alias, a class path, or a LightningCLI-style
``{"class_path": ..., "init_args": {...}}`` dict (see :func:`build_reward`).
"""
from __future__ import annotations

import importlib
import math
from abc import ABCMeta, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

# Decoded images may overshoot [0, 1] by float rounding; anything further out is refused
# rather than clamped, because clamping would silently zero the gradient of those pixels
# and hide a generator that leaves the data range.
RANGE_TOLERANCE = 1e-3

REWARD_ALIASES: dict[str, str] = {
    "digits_logprob": "rdm_lightning.rewards.digits.DigitsClassifierReward",
    "stroke_contrast": "rdm_lightning.rewards.digits.StrokeContrastReward",
    "digits_gold": "rdm_lightning.rewards.digits.DigitsGoldReward",
    "clip_score": "rdm_lightning.rewards.clip.CLIPScoreReward",
    "pickscore": "rdm_lightning.rewards.clip.PickScoreReward",
    "srpo": "rdm_lightning.rewards.clip.SRPOReward",
    "hpsv2": "rdm_lightning.rewards.open_clip.HPSv2Reward",
    "dfn_clip": "rdm_lightning.rewards.open_clip.DFNCLIPReward",
    "aesthetic": "rdm_lightning.rewards.aesthetic.AestheticReward",
    "image_reward": "rdm_lightning.rewards.image_reward.ImageReward",
    "hpsv3": "rdm_lightning.rewards.hpsv3.HPSv3Reward",
}


class _FrozenAfterInit(ABCMeta):
    """Freezes every reward once its most-derived ``__init__`` has built all its modules."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        reward = super().__call__(*args, **kwargs)
        reward.requires_grad_(False)
        reward.eval()
        return reward


class RewardModel(nn.Module, metaclass=_FrozenAfterInit):
    """A frozen scorer of images against prompts.

    Subclasses set ``differentiable`` and implement ``_score``; callers use ``score``.

    Args:
        name: Name in logs and in :class:`WeightedRewards`; ``None`` uses the class name.
        train_scale: Factor the score is multiplied by in training objectives
            (e.g. RTDMD trains on PickScore / 26, i.e. ``1 / 26``).
        report_scale: Factor the score is multiplied by in reported tables
            (e.g. papers report HPS × 100).
    """

    differentiable: ClassVar[bool] = False
    """Whether ``score(..., with_grad=True)`` gives gradients with respect to the images."""

    def __init__(self, name: str | None = None, train_scale: float = 1.0, report_scale: float = 1.0) -> None:
        super().__init__()
        if name is not None and not (isinstance(name, str) and name):
            raise ValueError(f"reward name must be a non-empty string or None, got {name!r}")
        for label, scale in (("train_scale", train_scale), ("report_scale", report_scale)):
            if not math.isfinite(scale):
                raise ValueError(f"{label} must be a finite number, got {scale!r}")
        self.name = name if name is not None else type(self).__name__
        self.train_scale = float(train_scale)
        self.report_scale = float(report_scale)

    @abstractmethod
    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Scores ``(B,)`` of validated ``images`` ``(B, C, H, W)`` in ``[0, 1]`` on the reward's device and dtype."""

    def score(
        self, images: Tensor, prompts: Sequence[str], *, with_grad: bool = False, batch_size: int | None = None
    ) -> Tensor:
        """One float32 score per image, on the images' device.

        Args:
            images: ``(B, C, H, W)`` floating point, values in ``[0, 1]`` (up to ``RANGE_TOLERANCE``).
            prompts: One prompt per image.
            with_grad: Keep the autograd graph back to ``images``; only for differentiable rewards.
            batch_size: Images per forward pass; ``None`` scores all at once.

        Raises:
            ValueError: malformed images, prompts or batch size, or ``with_grad`` on a
                reward that is not differentiable.
        """
        if with_grad and not self.differentiable:
            raise ValueError(
                f"reward {self.name!r} ({type(self).__name__}) is not differentiable, so it cannot be "
                f"scored with_grad=True; log it with with_grad=False, or optimize a differentiable "
                f"reward instead (registered: {', '.join(differentiable_aliases())})"
            )
        _check_images(images)
        prompts = _check_prompts(prompts, len(images))
        if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        device, dtype = self._placement(images)
        step = batch_size or len(images)
        scores = []
        with torch.set_grad_enabled(with_grad):
            for start in range(0, len(images), step):
                batch = images[start : start + step].to(device=device, dtype=dtype)
                batch_scores = self._score(batch, prompts[start : start + step])
                if batch_scores.shape != (len(batch),):
                    raise RuntimeError(
                        f"{type(self).__name__}._score returned shape {tuple(batch_scores.shape)} "
                        f"for {len(batch)} images; it must return ({len(batch)},)"
                    )
                scores.append(batch_scores.float())
        return torch.cat(scores).to(images.device)

    def train(self, mode: bool = True) -> RewardModel:
        """Stay in eval mode whatever ``mode`` is: rewards are frozen (no dropout, fixed norms)."""
        return super().train(False)

    def _placement(self, images: Tensor) -> tuple[torch.device, torch.dtype]:
        """Device and dtype of the reward's first floating tensor; a reward without one computes in float32."""
        for tensor in (*self.parameters(), *self.buffers()):
            if tensor.is_floating_point():
                return tensor.device, tensor.dtype
        return images.device, torch.float32

    def extra_repr(self) -> str:
        return f"name={self.name!r}, differentiable={self.differentiable}"


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be shaped (B, C, H, W) with B >= 1, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}; divide uint8 by 255")
    low, high = images.detach().aminmax()
    low, high = low.item(), high.item()
    # NaN fails both comparisons, so it is refused here too.
    if not (low >= -RANGE_TOLERANCE and high <= 1.0 + RANGE_TOLERANCE):
        raise ValueError(f"images must have values in [0, 1], got range [{low}, {high}]")


def _check_prompts(prompts: Sequence[str], num_images: int) -> list[str]:
    if isinstance(prompts, str) or not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError(f"prompts must be a list of strings, got {prompts!r}")
    if len(prompts) != num_images:
        raise ValueError(f"got {num_images} images but {len(prompts)} prompts; pass one prompt per image")
    return list(prompts)


@dataclass
class RewardTerm:
    """One reward in a weighted objective.

    Args:
        reward: The scorer.
        weight: Its weight in :meth:`WeightedRewards.weighted_sum` (may be negative).
        name: Key of its scores; ``None`` uses ``reward.name``.
    """

    reward: RewardModel
    weight: float = 1.0
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.reward, RewardModel):
            raise TypeError(f"RewardTerm.reward must be a RewardModel, got {type(self.reward).__name__}")
        if not math.isfinite(self.weight):
            raise ValueError(f"weight of reward {self.reward.name!r} must be finite, got {self.weight!r}")
        if self.name is None:
            self.name = self.reward.name
        if not (isinstance(self.name, str) and self.name):
            raise ValueError(f"reward term name must be a non-empty string or None, got {self.name!r}")


class WeightedRewards(nn.Module):
    """Several rewards with weights: scores of each, and their weighted sum.

    Args:
        terms: The rewards; their names must be unique.
    """

    def __init__(self, terms: Sequence[RewardTerm]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("WeightedRewards needs at least one RewardTerm")
        names = [term.name for term in terms]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"duplicate reward name {name!r} in {names}; give the terms distinct names")
        self.terms = tuple(terms)
        # Registered as submodules so that .to(device/dtype) moves the rewards with the method.
        self.rewards = nn.ModuleList(term.reward for term in terms)

    @property
    def names(self) -> list[str]:
        """The term names, in order."""
        return [term.name for term in self.terms]

    def require_differentiable(
        self, names: Iterable[str] | None = None, *, needed_by: str | None = None, remedy: str | None = None
    ) -> None:
        """Raise unless every named term (``None``: every term) is differentiable.

        ``needed_by`` names what differentiates the rewards (e.g. "GDMD's B2 auxiliary (b2_weight=0.1)")
        and ``remedy`` says how to fix the config; both lead and close the message.

        Raises:
            ValueError: a name is not a term here, or a term is not differentiable
                (the message names it and lists the differentiable terms).
        """
        by_name = {term.name: term for term in self.terms}
        wanted = list(by_name) if names is None else list(names)
        unknown = [name for name in wanted if name not in by_name]
        if unknown:
            raise ValueError(f"unknown reward terms {unknown}; terms here: {self.names}")
        offending = [name for name in wanted if not by_name[name].reward.differentiable]
        if offending:
            usable = [term.name for term in self.terms if term.reward.differentiable]
            message = (
                f"reward terms {offending} are not differentiable but are used where gradients are needed; "
                f"differentiable terms here: {usable}"
            )
            if needed_by is not None:
                message = f"{needed_by} differentiates every reward: {message}"
            raise ValueError(message if remedy is None else f"{message}. {remedy}")

    def score_all(
        self, images: Tensor, prompts: Sequence[str], *, with_grad: bool = False, batch_size: int | None = None
    ) -> dict[str, Tensor]:
        """Scores ``(B,)`` of every term, keyed by name (see :meth:`RewardModel.score`)."""
        if with_grad:
            self.require_differentiable()
        return {
            term.name: term.reward.score(images, prompts, with_grad=with_grad, batch_size=batch_size)
            for term in self.terms
        }

    def weighted_sum(self, scores: Mapping[str, Tensor]) -> Tensor:
        """``Σ weight · train_scale · score`` over the terms, per image.

        Args:
            scores: The output of :meth:`score_all` (extra keys are ignored).
        """
        missing = [name for name in self.names if name not in scores]
        if missing:
            raise ValueError(f"scores lack reward terms {missing}; got {sorted(scores)}")
        return sum(term.weight * term.reward.train_scale * scores[term.name] for term in self.terms)


def differentiable_aliases() -> list[str]:
    """The registered aliases whose reward class is differentiable."""
    return [alias for alias, path in REWARD_ALIASES.items() if _import_reward_class(path, alias).differentiable]


def build_reward(spec: str | Mapping[str, Any] | RewardModel) -> RewardModel:
    """A reward from a config entry.

    Args:
        spec: A registered alias (``REWARD_ALIASES``, e.g. ``"digits_logprob"``), a class
            path (``"rdm_lightning.rewards.StrokeContrastReward"``), a dict
            ``{"class_path": alias or path, "init_args": {...}}`` (LightningCLI's form),
            or a reward already built (returned as is).

    Raises:
        ValueError: an unknown name (the message lists the aliases), or a malformed dict.
        TypeError: the class is not a RewardModel, or ``spec`` has another type.
    """
    if isinstance(spec, RewardModel):
        return spec
    if isinstance(spec, str):
        return _import_reward_class(REWARD_ALIASES.get(spec, spec), spec)()
    if isinstance(spec, Mapping):
        extra = set(spec) - {"class_path", "init_args"}
        if "class_path" not in spec or extra:
            raise ValueError(
                f"a reward dict needs 'class_path' and optionally 'init_args', got keys {sorted(spec)}"
            )
        init_args = spec.get("init_args") or {}
        if not isinstance(init_args, Mapping):
            raise ValueError(f"init_args of reward {spec['class_path']!r} must be a dict, got {init_args!r}")
        name = spec["class_path"]
        return _import_reward_class(REWARD_ALIASES.get(name, name), name)(**init_args)
    raise TypeError(f"a reward spec must be a str, a dict or a RewardModel, got {type(spec).__name__}")


REWARD_ALIAS_PARSER_MODE = "yaml_with_reward_aliases"
"""jsonargparse parser mode of ``rdm`` configs: YAML, with reward aliases allowed as ``class_path``."""


def resolve_reward_aliases(value: Any) -> Any:
    """``value`` (a loaded config, or part of one) with every ``class_path`` that is a reward alias
    replaced by the alias's class path, so that jsonargparse, which knows class paths and class
    names only, accepts ``class_path: digits_logprob`` wherever a reward is named."""
    if isinstance(value, Mapping):
        resolved = {key: resolve_reward_aliases(item) for key, item in value.items()}
        class_path = resolved.get("class_path")
        if isinstance(class_path, str) and class_path in REWARD_ALIASES:
            resolved["class_path"] = REWARD_ALIASES[class_path]
        return resolved
    if isinstance(value, list):
        return [resolve_reward_aliases(item) for item in value]
    return value


def resolve_reward_alias_args(args: Sequence[str]) -> list[str]:
    """Command-line ``args`` with a reward alias given alone as a class (``--model.init_args.rewards+=srpo``,
    ``--model.init_args.scorer.class_path clip_score``) replaced by its class path; YAML values and
    config files are resolved by the ``REWARD_ALIAS_PARSER_MODE`` loader instead."""
    resolved = list(args)
    for i, arg in enumerate(resolved):
        key, equals, value = arg.partition("=")
        if not (key.startswith("--") and (key.endswith("+") or key.endswith(".class_path"))):
            continue
        if equals and value in REWARD_ALIASES:
            resolved[i] = f"{key}={REWARD_ALIASES[value]}"
        elif not equals and i + 1 < len(resolved) and resolved[i + 1] in REWARD_ALIASES:
            resolved[i + 1] = REWARD_ALIASES[resolved[i + 1]]
    return resolved


def _load_yaml_with_reward_aliases(text: str) -> Any:
    from jsonargparse import get_loader

    return resolve_reward_aliases(get_loader("yaml")(text))


def register_reward_alias_parser_mode() -> str:
    """Register ``REWARD_ALIAS_PARSER_MODE`` with jsonargparse (idempotent) and return its name,
    the ``parser_mode`` to give a LightningCLI's parser."""
    import yaml
    from jsonargparse import set_loader

    set_loader(REWARD_ALIAS_PARSER_MODE, _load_yaml_with_reward_aliases, (yaml.YAMLError,))
    return REWARD_ALIAS_PARSER_MODE


def _import_reward_class(class_path: str, requested: str) -> type[RewardModel]:
    module_name, _, class_name = class_path.rpartition(".")
    unknown = ValueError(
        f"unknown reward {requested!r}: neither a registered alias ({', '.join(REWARD_ALIASES)}) "
        f"nor an importable 'package.module.Class' path"
    )
    if not module_name:
        raise unknown
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Only a missing module on the path itself means an unknown name; a missing
        # dependency inside an existing reward module is a real error and propagates.
        if error.name is None or not (module_name + ".").startswith(error.name + "."):
            raise
        raise unknown from error
    cls = getattr(module, class_name, None)
    if cls is None:
        raise unknown
    if not (isinstance(cls, type) and issubclass(cls, RewardModel)):
        raise TypeError(f"reward {requested!r} resolves to {class_path}, which is not a RewardModel subclass")
    return cls
