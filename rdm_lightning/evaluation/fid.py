"""FID: the Fréchet distance between Gaussians fitted to InceptionV3 features of two image sets.

:func:`image_features` runs any frozen feature extractor over a set
(:class:`~rdm_lightning.evaluation.inception.FIDInceptionV3` for FID), :func:`compute_statistics`
fits the Gaussian of those features, :func:`reference_statistics` does so for a reference set on
disk and caches the result, and :func:`fid` compares two. FID-SD is the FID of the student's
samples against the teacher's on the same prompts: the statistics of both sets, compared with
:func:`fid` (:func:`rdm_lightning.evaluation.t2i.t2i_metrics` reports both).

torchmetrics takes the same network: ``FrechetInceptionDistance(feature=FIDInceptionV3.from_file(path))``
gives the same FID (``tests/test_fid.py`` checks it); it hands a custom network the images
untouched, so update it with float images in ``[0, 1]`` whatever its ``normalize``.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from rdm_lightning.evaluation.frechet import frechet_distance, gaussian_statistics

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
STATISTICS_FORMAT = (
    "an .npz with 'mu' (D,) and 'sigma' (D, D), optionally 'count' and 'fingerprint' "
    "(as FeatureStatistics.save, pytorch-fid's --save-stats and clean-fid write)"
)
REFERENCE_SOURCES = (
    f"a folder of {'/'.join(IMAGE_SUFFIXES)} images, a samples.npz that `rdm sample` wrote, or {STATISTICS_FORMAT}"
)
# np.load's errors for a file that is not an .npz archive, or a damaged one.
_UNREADABLE_NPZ = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile)


@dataclass(eq=False)
class FeatureStatistics:
    """Mean and covariance of a set's features: all FID needs of the set.

    Args:
        mu: Feature mean ``(D,)``; stored as float64.
        sigma: Unbiased feature covariance ``(D, D)``; stored as float64.
        count: How many images the statistics come from; ``None`` when unknown (files
            from pytorch-fid or clean-fid do not record it).
        fingerprint: :func:`extractor_fingerprint` of the network the features come from;
            ``None`` when unknown (files from other tools).

    Raises:
        ValueError: shapes that are not ``(D,)`` and ``(D, D)``, non-finite values, a count
            below 2, or an empty fingerprint.
    """

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None = None
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        if self.mu.ndim != 1 or self.sigma.shape != (len(self.mu), len(self.mu)):
            raise ValueError(f"mu must be (D,) and sigma (D, D), got {self.mu.shape} and {self.sigma.shape}")
        if not (np.isfinite(self.mu).all() and np.isfinite(self.sigma).all()):
            raise ValueError("mu and sigma must be finite, got NaN or infinite values")
        if self.count is not None and (isinstance(self.count, bool) or int(self.count) != self.count or self.count < 2):
            raise ValueError(f"count must be an integer >= 2 (a covariance needs 2) or None, got {self.count!r}")
        self.count = None if self.count is None else int(self.count)
        if self.fingerprint is not None and (not isinstance(self.fingerprint, str) or not self.fingerprint):
            raise ValueError(f"fingerprint must be a non-empty string or None, got {self.fingerprint!r}")

    @classmethod
    def from_features(cls, features: np.ndarray | Tensor, fingerprint: str | None = None) -> FeatureStatistics:
        """Statistics of ``features`` shaped ``(N, D)``, via :func:`gaussian_statistics`.

        Args:
            features: One feature row per image.
            fingerprint: See the class.
        """
        mu, sigma = gaussian_statistics(features)
        return cls(mu, sigma, count=len(features), fingerprint=fingerprint)

    def save(self, path: str | Path) -> Path:
        """Write the statistics to ``path`` as an ``.npz`` (whole or not at all) and return it."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma}
        if self.count is not None:
            arrays["count"] = np.int64(self.count)
        if self.fingerprint is not None:
            arrays["fingerprint"] = np.str_(self.fingerprint)
        partial = path.with_name(path.name + ".partial")
        with open(partial, "wb") as file:
            np.savez(file, **arrays)
        os.replace(partial, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureStatistics:
        """Statistics from an ``.npz`` with ``mu`` and ``sigma`` (this class's, pytorch-fid's or clean-fid's).

        Raises:
            FileNotFoundError: ``path`` is not a file.
            ValueError: not a readable ``.npz``, lacking ``mu`` or ``sigma``, or holding
                invalid values (see the class).
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"feature statistics not found at {str(path)!r}; expected {STATISTICS_FORMAT}")
        members = _read_npz(path, STATISTICS_FORMAT)
        missing = sorted({"mu", "sigma"} - set(members))
        if missing:
            raise ValueError(f"{str(path)!r} lacks {missing}; expected {STATISTICS_FORMAT}")
        count, fingerprint = members.get("count"), members.get("fingerprint")
        try:
            return cls(
                members["mu"],
                members["sigma"],
                count=None if count is None else count.item(),
                fingerprint=None if fingerprint is None else str(fingerprint.item()),
            )
        except ValueError as error:
            raise ValueError(f"{str(path)!r}: {error}; expected {STATISTICS_FORMAT}") from error


def _read_npz(path: Path, expected: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``, or a ValueError naming it and ``expected``."""
    try:
        data = np.load(path)
    except _UNREADABLE_NPZ as error:
        raise ValueError(f"{str(path)!r} is not a readable .npz file ({error}); expected {expected}") from error
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{str(path)!r} holds one {type(data).__name__}, not an .npz archive; expected {expected}")
    with data:
        try:
            return {name: data[name] for name in data.files}
        except _UNREADABLE_NPZ as error:
            raise ValueError(f"{str(path)!r} is damaged ({error}); expected {expected}") from error


def extractor_fingerprint(extractor: nn.Module) -> str:
    """A sha256 of ``extractor``'s ``repr`` (architecture and options, such as the resize mode)
    and of every tensor of its state dict: equal exactly for networks that give equal features."""
    digest = hashlib.sha256(repr(extractor).encode())
    for name, tensor in sorted(extractor.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def image_features(
    images: Tensor | Iterable[Tensor],
    extractor: nn.Module,
    batch_size: int = 50,
    progress: bool = True,
) -> Tensor:
    """Features ``(N, D)`` of ``images`` under ``extractor``, on the CPU in the dtype it returns.

    Args:
        images: ``(N, C, H, W)`` images, or an iterable of such batches (batches of any size,
            each run ``batch_size`` at a time), in the range ``extractor`` takes (``[0, 1]``
            for :class:`~rdm_lightning.evaluation.inception.FIDInceptionV3`).
        extractor: A network in eval mode mapping ``(B, C, H, W)`` to features ``(B, D)``;
            batches are moved to the device of its first parameter or buffer.
        batch_size: Images per forward pass.
        progress: Show a tqdm progress bar.

    Raises:
        ValueError: ``extractor`` in training mode, ``batch_size`` not a positive integer,
            a batch that is not a 4-D tensor, features not ``(B, D)``, or no images at all.
    """
    if extractor.training:
        raise ValueError(f"extractor {type(extractor).__name__} is in training mode; call .eval() on it first")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    # A network without parameters or buffers gets its batches on the CPU.
    device = next(chain(extractor.parameters(), extractor.buffers()), torch.empty(0)).device
    features = []
    total = len(images) if isinstance(images, Tensor) else None
    with torch.inference_mode(), tqdm(total=total, unit="image", desc="image features", disable=not progress) as bar:
        for batch in _batches(images, batch_size):
            batch_features = extractor(batch.to(device))
            _check_features(batch_features, len(batch))
            features.append(batch_features.cpu())
            bar.update(len(batch))
    if not features:
        raise ValueError("images is empty; features need at least 1 image (statistics 2)")
    return torch.cat(features)


def compute_statistics(
    images: Tensor | Iterable[Tensor],
    extractor: nn.Module,
    batch_size: int = 50,
    progress: bool = True,
) -> FeatureStatistics:
    """Feature statistics of ``images`` under ``extractor``: :func:`image_features`, fitted by
    :meth:`FeatureStatistics.from_features` and marked with :func:`extractor_fingerprint`.

    Raises:
        ValueError: as :func:`image_features`, or fewer than 2 images.
    """
    features = image_features(images, extractor, batch_size=batch_size, progress=progress)
    return FeatureStatistics.from_features(features, fingerprint=extractor_fingerprint(extractor))


def _check_features(features: Tensor, batch_size: int) -> None:
    """Refuse extractor outputs that are not one feature row ``(D,)`` per image of the batch."""
    if not isinstance(features, Tensor) or features.ndim != 2 or len(features) != batch_size:
        found = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"extractor must return features (B, D) for a batch of B={batch_size} images, got {found}")


def _batches(images: Tensor | Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """``images`` (a tensor or an iterable of tensors) in chunks of at most ``batch_size``."""
    for chunk in [images] if isinstance(images, Tensor) else images:
        if not isinstance(chunk, Tensor) or chunk.ndim != 4:
            found = tuple(chunk.shape) if isinstance(chunk, Tensor) else type(chunk).__name__
            raise ValueError(f"images must be a (N, C, H, W) tensor or an iterable of such batches, got {found}")
        yield from chunk.split(batch_size)


def fid(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """FID between two sets' statistics (:func:`frechet_distance` of their Gaussians).

    Raises:
        ValueError: both statistics carry fingerprints and they differ (features of different
            networks or preprocessing are not comparable), or their dimensions differ.
    """
    if a.fingerprint is not None and b.fingerprint is not None and a.fingerprint != b.fingerprint:
        raise ValueError(
            f"the statistics come from different feature extractors (fingerprints {a.fingerprint[:12]}… and "
            f"{b.fingerprint[:12]}…); compute both with the same network"
        )
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def image_files(folder: str | Path) -> list[Path]:
    """The ``.png``/``.jpg``/``.jpeg`` files directly in ``folder``, sorted by name.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: it holds no such file.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found at {str(folder)!r}")
    files = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{str(folder)!r} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return files


def iter_image_folder(folder: str | Path, batch_size: int = 50) -> Iterator[Tensor]:
    """The images of ``folder`` (:func:`image_files`) as RGB batches ``(B, 3, H, W)`` in ``[0, 1]``.

    Grey and RGBA images are converted to RGB (alpha dropped), as torch-fidelity reads them.

    Raises:
        ValueError: an unreadable image, or images of different sizes (resize or crop the set
            to one size first, as FID reference sets are).
    """
    from PIL import Image, UnidentifiedImageError

    files = image_files(folder)
    size = None
    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start : start + batch_size]:
            try:
                with Image.open(path) as image:
                    array = np.array(image.convert("RGB"))
            except (UnidentifiedImageError, OSError) as error:
                raise ValueError(f"cannot read image {str(path)!r} ({error})") from error
            size = size or array.shape[:2]
            if array.shape[:2] != size:
                raise ValueError(
                    f"{str(path)!r} is {array.shape[1]}×{array.shape[0]} but {str(files[0])!r} is "
                    f"{size[1]}×{size[0]}; the images of a folder must share one size (resize or crop them first)"
                )
            batch.append(torch.from_numpy(array).permute(2, 0, 1))
        yield torch.stack(batch).float() / 255


def load_image_folder(path: str | Path) -> Tensor:
    """All images of the folder ``path`` as one tensor ``(N, 3, H, W)`` in ``[0, 1]`` (:func:`iter_image_folder`)."""
    return torch.cat(list(iter_image_folder(path)))


def reference_statistics(
    source: str | Path,
    extractor: nn.Module,
    cache_dir: str | Path | None,
    batch_size: int = 50,
    progress: bool = True,
) -> FeatureStatistics:
    """Feature statistics of a reference set, cached under ``cache_dir``.

    Args:
        source: A folder of images (streamed, :func:`iter_image_folder`), a samples.npz of
            ``rdm sample`` (``images`` ``(N, H, W, C)`` in ``[0, 1]``), or an ``.npz`` of
            statistics (``mu``, ``sigma``: returned as they are, never cached).
        extractor: The feature network, as :func:`compute_statistics` takes it.
        cache_dir: Folder for computed statistics, keyed by the source's resolved path, its
            files' sizes and modification times, and :func:`extractor_fingerprint`: a changed
            set or network computes afresh. ``None``: no cache.
        batch_size: Images per forward pass.
        progress: Show a tqdm progress bar while computing.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: ``source`` is none of the accepted kinds, a statistics file whose
            fingerprint is not ``extractor``'s, or a damaged cache file (the message names it).
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"reference set not found at {str(source)!r}; expected {REFERENCE_SOURCES}")
    fingerprint = extractor_fingerprint(extractor)
    is_samples = False
    if source.is_file():
        if source.suffix != ".npz":
            raise ValueError(f"reference set {str(source)!r} is not a folder or an .npz; expected {REFERENCE_SOURCES}")
        if {"mu", "sigma"} <= _npz_names(source):
            return _checked_statistics(source, fingerprint)
        is_samples = True
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir).expanduser() / f"fid_statistics_{_source_key(source, fingerprint)}.npz"
        if cache_file.is_file():
            return _checked_statistics(cache_file, fingerprint, cached_from=source)
    if is_samples:
        from rdm_lightning.tools import load_samples

        samples, _ = load_samples(source)
        images: Tensor | Iterable[Tensor] = samples.permute(0, 3, 1, 2)
    else:
        images = iter_image_folder(source, batch_size)
    statistics = compute_statistics(images, extractor, batch_size=batch_size, progress=progress)
    if cache_file is not None:
        statistics.save(cache_file)
    return statistics


def _npz_names(path: Path) -> set[str]:
    """The member names of the ``.npz`` at ``path``, without reading the arrays."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {name.removesuffix(".npy") for name in archive.namelist()}
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(
            f"{str(path)!r} is not a readable .npz file ({error}); expected {REFERENCE_SOURCES}"
        ) from error


def _checked_statistics(path: Path, fingerprint: str, cached_from: Path | None = None) -> FeatureStatistics:
    """:meth:`FeatureStatistics.load` of ``path``, refused if it records another extractor's fingerprint."""
    what = f"cached statistics of {str(cached_from)!r}" if cached_from else "statistics"
    try:
        statistics = FeatureStatistics.load(path)
    except ValueError as error:
        if cached_from is None:
            raise
        raise ValueError(f"{what} are damaged ({error}); delete {str(path)!r} to compute them again") from error
    if statistics.fingerprint is not None and statistics.fingerprint != fingerprint:
        raise ValueError(
            f"{what} in {str(path)!r} come from another feature extractor (fingerprint "
            f"{statistics.fingerprint[:12]}…, this one is {fingerprint[:12]}…); compute them again with this one"
        )
    return statistics


def _source_key(source: Path, fingerprint: str) -> str:
    """A hash of what the statistics of ``source`` depend on: its files' names, sizes and times, and the network."""
    files = image_files(source) if source.is_dir() else [source]
    listing = [(path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in files]
    key = json.dumps({"source": str(source.resolve()), "files": listing, "extractor": fingerprint})
    return hashlib.sha256(key.encode()).hexdigest()[:20]
