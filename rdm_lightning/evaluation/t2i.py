"""Text-to-image evaluation: reward scores, FID against a reference set and FID-SD, and the report files.

- :func:`image_features` (from :mod:`rdm_lightning.evaluation.fid`): features of a set under a
  frozen extractor (the FID InceptionV3, or the digits classifier's body on 8×8 digits);
- :func:`reward_scores`: per-image scores of each reward, times its ``report_scale``;
- :func:`t2i_metrics`: the summaries of those scores (:func:`score_summary`), the FID of the
  features against a reference set's statistics, and FID-SD, the FID of the student's features
  against the teacher's samples on the same prompts (the library's definition);
- :func:`evaluate_t2i`: the three above on one set of images;
- :func:`write_report`: ``evaluation.json``, ``evaluation.md`` and one bar chart per metric;
- :func:`feature_extractor`: the FID InceptionV3 from its weight file, or the digits features.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from rdm_lightning.evaluation.fid import FeatureStatistics, extractor_fingerprint, fid, image_features
from rdm_lightning.evaluation.statistics import score_summary
from rdm_lightning.rewards.base import RewardModel

__all__ = ["evaluate_t2i", "feature_extractor", "image_features", "reward_scores", "t2i_metrics", "write_report"]

FID_METRICS = {"fid": "FID", "fid_sd": "FID-SD"}
"""The distance keys of a :func:`t2i_metrics` report and their names in tables and charts."""


def reward_scores(
    images: Tensor,
    prompts: Sequence[str],
    rewards: Mapping[str, RewardModel],
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Per-image scores ``(N,)`` (float32, CPU) of each reward, times its ``report_scale``, keyed as ``rewards``.

    Args:
        images: ``(N, C, H, W)`` in ``[0, 1]``, as :meth:`RewardModel.score` takes them.
        prompts: One prompt per image.
        rewards: The rewards by report name.
        batch_size: Images per reward call.
        progress: Show a tqdm progress bar.

    Raises:
        ValueError: a prompt count that is not the image count, a batch size that is not a
            positive integer, or what :meth:`RewardModel.score` refuses.
        TypeError: a value of ``rewards`` that is not a RewardModel.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
    for name, reward in rewards.items():
        if not isinstance(reward, RewardModel):
            raise TypeError(f"reward {name!r} must be a RewardModel, got {type(reward).__name__}")
    prompts = list(prompts)
    scores = {}
    with tqdm(total=len(images) * len(rewards), unit="image", desc="rewards", disable=not progress) as bar:
        for name, reward in rewards.items():
            bar.set_postfix_str(name)
            batches = []
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size]
                batches.append(reward.score(batch, prompts[start : start + batch_size]).float().cpu())
                bar.update(len(batch))
            scores[name] = torch.cat(batches) * reward.report_scale
    return scores


def t2i_metrics(
    scores: Mapping[str, Tensor],
    *,
    features: Tensor | None = None,
    reference: FeatureStatistics | None = None,
    teacher_features: Tensor | None = None,
    fingerprint: str | None = None,
) -> dict:
    """The report of one image set: ``{"num_images", "rewards", "fid"?, "fid_sd"?}``.

    Args:
        scores: Per-image scores of each reward (:func:`reward_scores`), each summarised by
            :func:`score_summary` under ``"rewards"``.
        features: The set's features ``(N, D)`` (:func:`image_features`); needed by, and only
            given with, ``reference`` or ``teacher_features``.
        reference: Statistics of a reference set; ``"fid"`` is the FID of ``features`` against them.
        teacher_features: Features ``(N, D)`` of the teacher's samples on the same prompts;
            ``"fid_sd"`` is the FID of ``features`` against them.
        fingerprint: :func:`~rdm_lightning.evaluation.fid.extractor_fingerprint` of the network of
            ``features``, checked against ``reference``'s when both are known.

    Raises:
        ValueError: nothing to report, sets of different lengths (the message names each), fewer
            than 2 images, ``features`` without ``reference`` or ``teacher_features`` (or the
            other way round), a ``fingerprint`` without ``features``, or a reference computed
            with another network.
    """
    if features is None and (reference is not None or teacher_features is not None or fingerprint is not None):
        raise ValueError("reference, teacher_features and fingerprint describe features: pass features too")
    if features is not None and reference is None and teacher_features is None:
        raise ValueError("features are compared with a reference or teacher_features; pass one of them, "
                         "or leave features out")
    lengths = {f"scores[{name!r}]": len(values) for name, values in scores.items()}
    if features is not None:
        lengths["features"] = len(features)
    if teacher_features is not None:
        lengths["teacher_features"] = len(teacher_features)
    if not lengths:
        raise ValueError("nothing to report: pass reward scores, or features with a reference or teacher_features")
    if len(set(lengths.values())) > 1:
        raise ValueError(f"every set must hold one entry per image (FID-SD compares the teacher's samples on the "
                         f"same prompts), got lengths {lengths}")
    num_images = next(iter(lengths.values()))
    if num_images < 2:
        raise ValueError(f"metrics need at least 2 images (a covariance, a standard deviation), got {num_images}")
    report: dict = {"num_images": num_images, "rewards": {name: score_summary(values) for name, values in scores.items()}}
    if features is not None:
        statistics = FeatureStatistics.from_features(features, fingerprint=fingerprint)
        if reference is not None:
            report["fid"] = fid(statistics, reference)
        if teacher_features is not None:
            report["fid_sd"] = fid(statistics, FeatureStatistics.from_features(teacher_features, fingerprint=fingerprint))
    return report


def evaluate_t2i(
    images: Tensor,
    prompts: Sequence[str],
    *,
    rewards: Mapping[str, RewardModel] | None = None,
    extractor: nn.Module | None = None,
    reference: FeatureStatistics | None = None,
    teacher_images: Tensor | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """:func:`t2i_metrics` of ``images``: reward scores, FID against ``reference``, FID-SD against ``teacher_images``.

    Args:
        images: ``(N, C, H, W)`` in ``[0, 1]`` (``C = 3``; 1 for digits).
        prompts: The prompt of each image.
        rewards: The rewards by report name; ``None``: none.
        extractor: The feature network of FID and FID-SD (needed by, and only given with,
            ``reference`` or ``teacher_images``).
        reference: Statistics of the reference set, from ``extractor``.
        teacher_images: The teacher's samples on the same ``prompts``, as many as ``images``.
        batch_size: Images per reward call and per feature forward pass.
        progress: Show tqdm progress bars.

    Raises:
        ValueError: images that are not ``(N, C, H, W)``, ``extractor`` without ``reference`` or
            ``teacher_images`` or the other way round, ``teacher_images`` not as many as ``images``,
            and what :func:`reward_scores` and :func:`t2i_metrics` refuse.
    """
    for label, value in (("images", images), ("teacher_images", teacher_images)):
        if value is not None and (not isinstance(value, Tensor) or value.ndim != 4):
            found = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{label} must be a (N, C, H, W) tensor in [0, 1], got {found}")
    wants_features = reference is not None or teacher_images is not None
    if (extractor is not None) != wants_features:
        raise ValueError("extractor computes the features of FID (reference) and FID-SD (teacher_images): "
                         "pass it together with at least one of them")
    if teacher_images is not None and len(teacher_images) != len(images):
        raise ValueError(f"FID-SD compares samples of the same prompts: got {len(images)} images but "
                         f"{len(teacher_images)} teacher_images")
    scores = reward_scores(images, prompts, rewards or {}, batch_size=batch_size, progress=progress)
    if extractor is None:
        return t2i_metrics(scores)
    features = image_features(images, extractor, batch_size=batch_size, progress=progress)
    teacher_features = None
    if teacher_images is not None:
        teacher_features = image_features(teacher_images, extractor, batch_size=batch_size, progress=progress)
    return t2i_metrics(scores, features=features, reference=reference, teacher_features=teacher_features,
                       fingerprint=extractor_fingerprint(extractor))


def write_report(report: dict, folder: str | Path) -> list[Path]:
    """Write ``report`` into ``folder``: ``evaluation.json``, ``evaluation.md`` and ``evaluation_<metric>.png``.

    Args:
        report: One :func:`t2i_metrics` report, or several by set name (e.g. ``{"student": ...,
            "teacher": ...}``), which the table lists one after the other and the charts side by side.
        folder: Where to write (created if missing).

    The markdown table has one row per reward (``metric | value | ± std | 95% CI | n``: the mean,
    the standard deviation, the interval ``mean ± ci95`` of :func:`score_summary`, the count) and
    one per distance (FID, FID-SD: a value and ``n``). Each chart draws a metric's value for
    every set that has it, with the 95% interval as error bars for rewards.

    Returns:
        The written paths: the json, the markdown, then the charts in table order.

    Raises:
        ValueError: ``report`` is neither a report nor a mapping of reports.
    """
    sets = _report_sets(report)
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "evaluation.json"
    json_path.write_text(json.dumps(report, indent=2))
    markdown_path = folder / "evaluation.md"
    markdown_path.write_text(_markdown(sets))
    charts = [_bar_chart(metric, label, sets, folder) for metric, label in _metric_names(sets)]
    return [json_path, markdown_path, *charts]


def _report_sets(report: dict) -> dict[str, dict]:
    """``report`` as ``{set name: report}`` (one report is the set ``""``), each checked."""
    sets = {"": report} if isinstance(report, Mapping) and "num_images" in report else report
    if not isinstance(sets, Mapping) or not sets:
        raise ValueError(f"report must be a t2i_metrics report or a non-empty mapping of them, got {type(report).__name__}")
    for name, entry in sets.items():
        if not (isinstance(entry, Mapping) and "num_images" in entry and isinstance(entry.get("rewards"), Mapping)):
            raise ValueError(f"report entry {name!r} is not a t2i_metrics report (with 'num_images' and 'rewards'), "
                             f"got {entry!r}")
    return dict(sets)


def _metric_names(sets: dict[str, dict]) -> list[tuple[str, str]]:
    """``(key, display name)`` of every metric of any set: rewards in first-seen order, then the distances."""
    rewards = list(dict.fromkeys(name for entry in sets.values() for name in entry["rewards"]))
    clashes = [name for name in rewards if name in FID_METRICS]
    if clashes:
        raise ValueError(f"rewards named {clashes} clash with the distances {list(FID_METRICS)}; rename them")
    distances = [key for key in FID_METRICS if any(key in entry for entry in sets.values())]
    return [(name, name) for name in rewards] + [(key, FID_METRICS[key]) for key in distances]


def _number(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.5g}"


def _markdown_rows(entry: dict) -> list[str]:
    """The table rows ``| metric | value | ± std | 95% CI | n |`` of one report."""
    rows = []
    for name, summary in entry["rewards"].items():
        mean, half = summary["mean"], summary["ci95"]
        interval = "–" if math.isnan(half) else f"[{_number(mean - half)}, {_number(mean + half)}]"
        rows.append(f"| {name} | {_number(mean)} | {_number(summary['std'])} | {interval} | {summary['n']} |")
    for key, label in FID_METRICS.items():
        if key in entry:
            rows.append(f"| {label} | {_number(entry[key])} | – | – | {entry['num_images']} |")
    return rows


def _markdown(sets: dict[str, dict]) -> str:
    header = ["| metric | value | ± std | 95% CI | n |", "|---|---|---|---|---|"]
    lines = ["# Evaluation", ""]
    for name, entry in sets.items():
        if name:
            lines += [f"## {name}", ""]
        lines += [*header, *_markdown_rows(entry), ""]
    return "\n".join(lines)


def _bar_chart(metric: str, label: str, sets: dict[str, dict], folder: Path) -> Path:
    """One bar per set that has ``metric``, with the reward's 95% interval as error bars."""
    from matplotlib.figure import Figure

    names, values, errors = [], [], []
    for name, entry in sets.items():
        if metric in FID_METRICS and metric in entry:
            names.append(name or "samples")
            values.append(entry[metric])
            errors.append(0.0)
        elif metric not in FID_METRICS and metric in entry["rewards"]:
            summary = entry["rewards"][metric]
            names.append(name or "samples")
            values.append(summary["mean"])
            errors.append(0.0 if math.isnan(summary["ci95"]) else summary["ci95"])
    figure = Figure(figsize=(1.6 + 1.2 * len(names), 3.6))
    axes = figure.subplots()
    positions = np.arange(len(names))
    axes.bar(positions, values, yerr=errors, capsize=6, color=[f"C{i}" for i in range(len(names))])
    axes.set_xticks(positions, names)
    axes.set_title(label if metric in FID_METRICS else f"{label} (mean, 95% CI)")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path = folder / f"evaluation_{re.sub(r'[^A-Za-z0-9_.-]+', '_', metric)}.png"
    figure.savefig(path, dpi=100)
    return path


def feature_extractor(features: str | None, inception: str | None, device: torch.device) -> torch.nn.Module:
    """The network of FID and FID-SD: the FID InceptionV3 of ``inception`` (``features`` ``"inception"``, the
    default), or the digits classifier's feature body on 8×8 digits (``"digits"``).

    Raises:
        ValueError: ``"inception"`` without its weight file, or ``"digits"`` with one.
    """
    from rdm_lightning.evaluation.inception import WEIGHTS_URLS, FIDInceptionV3

    if features == "digits":
        from rdm_lightning.evaluation.digits import load_digits_classifier

        if inception is not None:
            raise ValueError("--inception is the network of --features inception; --features digits uses the digits classifier")
        classifier, _ = load_digits_classifier(seed=0)
        # DigitsClassifier.features is its body: the 128-d space of digits-FD.
        return classifier.body.to(device)
    if inception is None:
        raise ValueError(f"FID and FID-SD need --inception PATH, the FID InceptionV3 weights (published as "
                         f"{' and '.join(WEIGHTS_URLS)}); on 8×8 digits, --features digits uses the digits classifier")
    return FIDInceptionV3.from_file(inception).to(device)
