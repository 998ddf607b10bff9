"""FID: the FID InceptionV3 (layout, preprocessing, forward), feature statistics and their cache.

The network is checked at full size on random weights written in the published file's format:
its key layout against a list enumerated here from the reference architecture, its forward
against a functional re-computation from the same tensors.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from rdm_lightning.evaluation.fid import (
    FeatureStatistics,
    compute_statistics,
    extractor_fingerprint,
    fid,
    load_image_folder,
    reference_statistics,
)
from rdm_lightning.evaluation.frechet import frechet_distance
from rdm_lightning.evaluation.inception import FIDInceptionV3, resize_bilinear_tf1
from tiny_inception import published_layout, random_published_state


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Tensor], Path]:
    """The random published-format state and its file (a plain dict, no batch-norm counters, as published)."""
    state = random_published_state()
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return state, path


@pytest.fixture(scope="module")
def inception(weights) -> FIDInceptionV3:
    return FIDInceptionV3.from_file(weights[1])


@pytest.fixture(scope="module")
def images() -> Tensor:
    """Three 32×32 RGB images in [0, 1]."""
    generator = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 32, 32, generator=generator)


@pytest.fixture(scope="module")
def inception_features(inception: FIDInceptionV3, images: Tensor) -> Tensor:
    return inception(images)


# ---- closed forms and an independent functional forward ---------------------------------------------------------


def tf1_matrix(in_size: int, out_size: int) -> Tensor:
    """The (out, in) interpolation matrix of TF1 bilinear: output i reads i·in/out, weights split to floor and next."""
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        source = i * in_size / out_size
        low = math.floor(source)
        high = min(low + 1, in_size - 1)
        matrix[i, low] += 1 - (source - low)
        matrix[i, high] += source - low
    return matrix


def tf1_resize_reference(x: Tensor, size: tuple[int, int]) -> Tensor:
    rows, cols = tf1_matrix(x.shape[2], size[0]), tf1_matrix(x.shape[3], size[1])
    return (rows @ x.double() @ cols.T).to(x.dtype)


def basic(x: Tensor, state: dict[str, Tensor], name: str, stride: int = 1, padding=0) -> Tensor:
    x = F.conv2d(x, state[f"{name}.conv.weight"], stride=stride, padding=padding)
    mean, var = state[f"{name}.bn.running_mean"], state[f"{name}.bn.running_var"]
    scale = state[f"{name}.bn.weight"] / torch.sqrt(var + 0.001)
    return torch.relu((x - mean[:, None, None]) * scale[:, None, None] + state[f"{name}.bn.bias"][:, None, None])


def same(state, block, name, x, kh, kw):
    return basic(x, state, f"{block}.{name}", padding=(kh // 2, kw // 2))


def avg_pool_without_padding(x: Tensor) -> Tensor:
    """3×3 stride-1 mean over the in-image neighbours only (TensorFlow's SAME average pool)."""
    ones = torch.ones(1, 1, 3, 3)
    summed = F.conv2d(F.pad(x, (1, 1, 1, 1)), ones.expand(x.shape[1], 1, 3, 3), groups=x.shape[1])
    counts = F.conv2d(F.pad(torch.ones(1, 1, *x.shape[2:]), (1, 1, 1, 1)), ones)
    return summed / counts


def reference_a(state, b, x):
    y = same(state, b, "branch5x5_2", same(state, b, "branch5x5_1", x, 1, 1), 5, 5)
    z = same(state, b, "branch3x3dbl_2", same(state, b, "branch3x3dbl_1", x, 1, 1), 3, 3)
    z = same(state, b, "branch3x3dbl_3", z, 3, 3)
    pool = same(state, b, "branch_pool", avg_pool_without_padding(x), 1, 1)
    return torch.cat([same(state, b, "branch1x1", x, 1, 1), y, z, pool], 1)


def reference_b(state, b, x):
    dbl = same(state, b, "branch3x3dbl_2", same(state, b, "branch3x3dbl_1", x, 1, 1), 3, 3)
    branches = [basic(x, state, f"{b}.branch3x3", stride=2), basic(dbl, state, f"{b}.branch3x3dbl_3", stride=2)]
    return torch.cat([*branches, F.max_pool2d(x, 3, stride=2)], 1)


def reference_c(state, b, x):
    y = same(state, b, "branch7x7_1", x, 1, 1)
    y = same(state, b, "branch7x7_3", same(state, b, "branch7x7_2", y, 1, 7), 7, 1)
    z = same(state, b, "branch7x7dbl_1", x, 1, 1)
    for name, kh, kw in (("2", 7, 1), ("3", 1, 7), ("4", 7, 1), ("5", 1, 7)):
        z = same(state, b, f"branch7x7dbl_{name}", z, kh, kw)
    pool = same(state, b, "branch_pool", avg_pool_without_padding(x), 1, 1)
    return torch.cat([same(state, b, "branch1x1", x, 1, 1), y, z, pool], 1)


def reference_d(state, b, x):
    y = basic(same(state, b, "branch3x3_1", x, 1, 1), state, f"{b}.branch3x3_2", stride=2)
    z = same(state, b, "branch7x7x3_1", x, 1, 1)
    z = same(state, b, "branch7x7x3_3", same(state, b, "branch7x7x3_2", z, 1, 7), 7, 1)
    z = basic(z, state, f"{b}.branch7x7x3_4", stride=2)
    return torch.cat([y, z, F.max_pool2d(x, 3, stride=2)], 1)


def reference_e(state, b, x, max_pool: bool):
    y = same(state, b, "branch3x3_1", x, 1, 1)
    y = torch.cat([same(state, b, "branch3x3_2a", y, 1, 3), same(state, b, "branch3x3_2b", y, 3, 1)], 1)
    z = same(state, b, "branch3x3dbl_2", same(state, b, "branch3x3dbl_1", x, 1, 1), 3, 3)
    z = torch.cat([same(state, b, "branch3x3dbl_3a", z, 1, 3), same(state, b, "branch3x3dbl_3b", z, 3, 1)], 1)
    pooled = F.max_pool2d(x, 3, stride=1, padding=1) if max_pool else avg_pool_without_padding(x)
    return torch.cat([same(state, b, "branch1x1", x, 1, 1), y, z, same(state, b, "branch_pool", pooled, 1, 1)], 1)


def reference_stem(state, x):
    x = basic(x, state, "Conv2d_1a_3x3", stride=2)
    x = basic(x, state, "Conv2d_2a_3x3")
    return basic(x, state, "Conv2d_2b_3x3", padding=1)


def reference_features(state: dict[str, Tensor], images: Tensor) -> Tensor:
    """pool3 of TensorFlow's FID graph from ``state``: quantise, TF1 resize, (x − 128)/128, then the layers."""
    x = tf1_resize_reference(torch.round(images * 255), (299, 299))
    x = F.max_pool2d(reference_stem(state, (x - 128) / 128), 3, stride=2)
    x = basic(basic(x, state, "Conv2d_3b_1x1"), state, "Conv2d_4a_3x3")
    x = F.max_pool2d(x, 3, stride=2)
    for b in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = reference_a(state, b, x)
    x = reference_b(state, "Mixed_6a", x)
    for b in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = reference_c(state, b, x)
    x = reference_d(state, "Mixed_7a", x)
    x = reference_e(state, "Mixed_7c", reference_e(state, "Mixed_7b", x, max_pool=False), max_pool=True)
    return x.mean(dim=(2, 3))


# ---- the network --------------------------------------------------------------------------------------------------


def test_state_dict_layout_is_the_published_files():
    with torch.device("meta"):
        model = FIDInceptionV3()
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    counters = {key for key in shapes if key.endswith(".num_batches_tracked")}
    assert {key: shape for key, shape in shapes.items() if key not in counters} == published_layout()
    assert len(published_layout()) == 472 and len(counters) == 94  # 94 conv+bn layers, the classifier
    batch_norms = {key.removesuffix(".weight") for key in shapes if key.endswith(".bn.weight")}
    assert counters == {f"{name}.num_batches_tracked" for name in batch_norms}
    assert model.num_features == 2048


def test_from_file_loads_frozen_float32_weights(inception, weights):
    state, _ = weights
    loaded = inception.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())
    assert all(parameter.dtype == torch.float32 and not parameter.requires_grad for parameter in inception.parameters())
    assert not inception.train().training


def test_from_file_accepts_a_state_dict_with_batch_norm_counters(inception, tmp_path):
    # A file saved from a module's state_dict() (counters included) loads too.
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(inception.state_dict(), path)
    reloaded = FIDInceptionV3.from_file(path)
    assert torch.equal(reloaded.Mixed_7c.branch_pool.bn.running_var, inception.Mixed_7c.branch_pool.bn.running_var)


def test_from_file_errors_name_the_file_and_the_published_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        FIDInceptionV3.from_file(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable torch file.*pt_inception-2015-12-05"):
        FIDInceptionV3.from_file(garbage)
    wrong_keys = tmp_path / "wrong_keys.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3), "AuxLogits.fc.weight": torch.zeros(1)},
               wrong_keys)
    missing_and_unexpected = r"missing keys \[.*'Conv2d_2a_3x3.*, \.\.\.\], unexpected keys \['AuxLogits.fc.weight'\]"
    with pytest.raises(ValueError, match=missing_and_unexpected):
        FIDInceptionV3.from_file(wrong_keys)
    wrong_shapes = tmp_path / "wrong_shapes.pth"
    torch.save({key: torch.zeros(1) for key in published_layout()}, wrong_shapes)
    with pytest.raises(ValueError, match=r"wrong shape: \['Conv2d_1a_3x3.bn.bias \(1,\) \(expected \(32,\)\)'"):
        FIDInceptionV3.from_file(wrong_shapes)
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ValueError, match="does not hold a dict of tensors"):
        FIDInceptionV3.from_file(not_a_dict)


def test_tf1_resize_closed_forms():
    # Upsampling [0, 1] by 2 reads 0, 0.5, 1, 1.5 → the last clips to the edge pixel.
    assert resize_bilinear_tf1(torch.tensor([[[[0.0, 1.0]]]]), (1, 4)).flatten().tolist() == [0.0, 0.5, 1.0, 1.0]
    # Downsampling by 2 reads even pixels exactly (no half-pixel offset, no averaging).
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(resize_bilinear_tf1(x, (2, 2)), x[:, :, ::2, ::2])
    x = torch.rand(2, 3, 5, 4)
    for size in ((7, 3), (2, 9), (5, 4)):
        torch.testing.assert_close(resize_bilinear_tf1(x, size), tf1_resize_reference(x, size), rtol=0, atol=1e-6)


def test_preprocess_quantises_resizes_and_scales_like_the_tensorflow_graph(inception, images):
    expected = (tf1_resize_reference(torch.round(images * 255), (299, 299)) - 128) / 128
    torch.testing.assert_close(inception.preprocess(images), expected, rtol=0, atol=1e-5)
    # uint8 (torchmetrics' normalize=False input) and its float image agree; grey is repeated to RGB.
    as_uint8 = torch.round(images * 255).to(torch.uint8)
    torch.testing.assert_close(inception.preprocess(as_uint8), inception.preprocess(as_uint8 / 255), rtol=0, atol=0)
    grey = images[:, :1]
    assert torch.equal(inception.preprocess(grey), inception.preprocess(grey.expand(-1, 3, -1, -1)))


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.full((1, 3, 8, 8), 1.01), r"values in \[0, 1\]"),
        (torch.full((1, 3, 8, 8), float("nan")), r"values in \[0, 1\]"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.int32), "floating point in .0, 1. or uint8"),
        (torch.zeros(1, 4, 8, 8), r"\(B, 1 or 3, H, W\)"),
        (torch.zeros(3, 8, 8), r"\(B, 1 or 3, H, W\)"),
    ],
)
def test_preprocess_refuses_bad_images(inception, bad, message):
    with pytest.raises(ValueError, match=message):
        inception.preprocess(bad)


def test_stem_and_fid_specific_blocks_match_a_functional_computation(inception, weights, images):
    state, _ = weights
    x = inception.preprocess(images[:1])
    stem = inception.Conv2d_2b_3x3(inception.Conv2d_2a_3x3(inception.Conv2d_1a_3x3(x)))
    torch.testing.assert_close(stem, reference_stem(state, x), rtol=1e-4, atol=1e-4)
    # The blocks TensorFlow's graph changes: padding-free average pools (A, C, E_1), max pool in E_2.
    for block, reference, channels, size in (
        ("Mixed_5b", reference_a, 192, 7), ("Mixed_6b", reference_c, 768, 5),
        ("Mixed_7b", lambda s, b, y: reference_e(s, b, y, max_pool=False), 1280, 4),
        ("Mixed_7c", lambda s, b, y: reference_e(s, b, y, max_pool=True), 2048, 4),
    ):
        y = torch.randn(1, channels, size, size)
        torch.testing.assert_close(getattr(inception, block)(y), reference(state, block, y), rtol=1e-4, atol=1e-4)


def test_features_match_the_functional_network(inception_features, weights, images):
    state, _ = weights
    assert inception_features.shape == (3, 2048) and inception_features.dtype == torch.float32
    assert torch.isfinite(inception_features).all() and inception_features.std() > 0
    torch.testing.assert_close(inception_features[:1], reference_features(state, images[:1]), rtol=1e-3, atol=1e-4)


# ---- statistics, FID and the cache --------------------------------------------------------------------------------


class PooledPixels(nn.Module):
    """A linear stand-in extractor: 4×4 average pool of the pixels, flattened, times a fixed matrix."""

    def __init__(self, seed: int = 0, size: int = 16) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.projection = nn.Parameter(torch.randn(3 * (size // 4) ** 2, 6, generator=generator), requires_grad=False)
        self.num_features = 6
        self.calls = 0
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        self.calls += 1
        return F.avg_pool2d(images, 4).flatten(1) @ self.projection


def plain_statistics(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    features = features.double()
    centred = features - features.mean(0)
    return features.mean(0).numpy(), (centred.T @ centred / (len(features) - 1)).numpy()


@pytest.fixture
def pixel_images() -> Tensor:
    return torch.rand(12, 3, 16, 16) * 0.8


def test_compute_statistics_from_a_tensor_or_batches(pixel_images):
    extractor = PooledPixels()
    mu, sigma = plain_statistics(extractor(pixel_images))
    whole = compute_statistics(pixel_images, extractor, batch_size=5, progress=False)
    batches = compute_statistics([pixel_images[:7], pixel_images[7:]], extractor, batch_size=3, progress=False)
    for statistics in (whole, batches):
        np.testing.assert_allclose(statistics.mu, mu, rtol=1e-6)
        np.testing.assert_allclose(statistics.sigma, sigma, rtol=1e-5, atol=1e-9)
        assert statistics.count == 12 and statistics.fingerprint == extractor_fingerprint(extractor)


def test_fid_of_a_set_with_itself_is_zero_and_of_a_shift_is_the_mean_gap(pixel_images):
    extractor = PooledPixels()
    a = compute_statistics(pixel_images, extractor, progress=False)
    assert abs(fid(a, a)) < 1e-8
    shifted = compute_statistics(pixel_images + 0.1, extractor, progress=False)
    # A linear extractor shifts every feature by 0.1 · (column sums): covariances equal, FID = ‖Δμ‖².
    gap = 0.1 * extractor.projection.sum(0).double()
    assert fid(a, shifted) == pytest.approx(float(gap @ gap), rel=1e-6)
    mu_b, sigma_b = plain_statistics(extractor(pixel_images + 0.1))
    assert fid(a, shifted) == pytest.approx(frechet_distance(a.mu, a.sigma, mu_b, sigma_b), rel=1e-6)


def test_fid_refuses_statistics_of_different_extractors(pixel_images):
    a = compute_statistics(pixel_images, PooledPixels(seed=0), progress=False)
    b = compute_statistics(pixel_images, PooledPixels(seed=1), progress=False)
    with pytest.raises(ValueError, match="different feature extractors"):
        fid(a, b)
    assert fid(a, FeatureStatistics(b.mu, b.sigma)) > 0  # statistics of unknown origin are not checked


def test_fingerprint_follows_weights_and_options():
    assert extractor_fingerprint(PooledPixels(seed=0)) == extractor_fingerprint(PooledPixels(seed=0))
    assert extractor_fingerprint(PooledPixels(seed=0)) != extractor_fingerprint(PooledPixels(seed=1))
    with torch.device("meta"):
        assert "resize='antialias'" in repr(FIDInceptionV3(resize="antialias"))


def test_compute_statistics_errors(pixel_images):
    extractor = PooledPixels()
    with pytest.raises(ValueError, match="training mode"):
        compute_statistics(pixel_images, PooledPixels().train(), progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        compute_statistics(pixel_images, extractor, batch_size=0, progress=False)
    with pytest.raises(ValueError, match=r"iterable of such batches, got \(3, 16, 16\)"):
        compute_statistics([pixel_images[0]], extractor, progress=False)
    with pytest.raises(ValueError, match="is empty"):
        compute_statistics([], extractor, progress=False)
    with pytest.raises(ValueError, match=r"features \(B, D\) for a batch of B=12 images, got \(12, 3, 4, 4\)"):
        compute_statistics(pixel_images, nn.AvgPool2d(4).eval(), progress=False)


def test_statistics_save_load_and_other_tools_files(tmp_path, pixel_images):
    statistics = compute_statistics(pixel_images, PooledPixels(), progress=False)
    loaded = FeatureStatistics.load(statistics.save(tmp_path / "stats.npz"))
    assert np.array_equal(loaded.mu, statistics.mu) and np.array_equal(loaded.sigma, statistics.sigma)
    assert (loaded.count, loaded.fingerprint) == (12, statistics.fingerprint)
    np.savez(tmp_path / "pytorch_fid.npz", mu=statistics.mu.astype(np.float32), sigma=statistics.sigma)
    external = FeatureStatistics.load(tmp_path / "pytorch_fid.npz")
    assert external.count is None and external.fingerprint is None and external.mu.dtype == np.float64


def test_malformed_statistics_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="'mu' \\(D,\\) and 'sigma'"):
        FeatureStatistics.load(tmp_path / "missing.npz")
    (tmp_path / "garbage.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable .npz"):
        FeatureStatistics.load(tmp_path / "garbage.npz")
    np.savez(tmp_path / "no_sigma.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match=r"lacks \['sigma'\]"):
        FeatureStatistics.load(tmp_path / "no_sigma.npz")
    np.savez(tmp_path / "shapes.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"shapes.npz.*mu must be \(D,\) and sigma \(D, D\), got \(3,\) and \(4, 4\)"):
        FeatureStatistics.load(tmp_path / "shapes.npz")
    np.savez(tmp_path / "nan.npz", mu=np.array([np.nan, 0.0]), sigma=np.eye(2))
    with pytest.raises(ValueError, match="finite"):
        FeatureStatistics.load(tmp_path / "nan.npz")
    np.savez(tmp_path / "count.npz", mu=np.zeros(2), sigma=np.eye(2), count=1)
    with pytest.raises(ValueError, match="count must be an integer >= 2"):
        FeatureStatistics.load(tmp_path / "count.npz")


def write_pngs(folder, images: Tensor) -> None:
    folder.mkdir(exist_ok=True)
    for i, image in enumerate(images):
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"{i:03d}.png")


def test_reference_statistics_of_a_folder_are_cached(tmp_path, pixel_images):
    folder, cache = tmp_path / "real", tmp_path / "cache"
    write_pngs(folder, pixel_images)
    (folder / "notes.txt").write_text("not an image")
    torch.testing.assert_close(load_image_folder(folder), pixel_images, rtol=0, atol=0.5 / 255)
    extractor = PooledPixels()
    computed = reference_statistics(folder, extractor, cache, batch_size=5, progress=False)
    expected = compute_statistics(load_image_folder(folder), extractor, progress=False)
    np.testing.assert_allclose(computed.mu, expected.mu, rtol=1e-6)
    assert len(list(cache.iterdir())) == 1 and computed.count == 12

    extractor.calls = 0
    cached = reference_statistics(folder, extractor, cache, progress=False)
    assert extractor.calls == 0 and np.array_equal(cached.sigma, computed.sigma)  # hit

    write_pngs(folder, pixel_images.flip(0)[:1])  # a changed file: size or mtime differ → miss
    reference_statistics(folder, extractor, cache, progress=False)
    assert extractor.calls > 0 and len(list(cache.iterdir())) == 2

    other = reference_statistics(folder, PooledPixels(seed=1), cache, progress=False)  # other network → miss
    assert other.fingerprint == extractor_fingerprint(PooledPixels(seed=1)) and len(list(cache.iterdir())) == 3


def test_reference_statistics_of_samples_and_statistics_files(tmp_path, pixel_images):
    extractor = PooledPixels()
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=pixel_images.permute(0, 2, 3, 1).numpy(), prompts=np.array(["a"] * 12))
    from_samples = reference_statistics(samples, extractor, cache_dir=None, progress=False)
    expected = compute_statistics(pixel_images, extractor, progress=False)
    np.testing.assert_allclose(from_samples.sigma, expected.sigma, rtol=1e-6, atol=1e-12)

    saved = expected.save(tmp_path / "reference_stats.npz")
    assert np.array_equal(reference_statistics(saved, extractor, cache_dir=None).mu, expected.mu)
    with pytest.raises(ValueError, match="come from another feature extractor"):
        reference_statistics(saved, PooledPixels(seed=1), cache_dir=None)
    np.savez(tmp_path / "clean_fid.npz", mu=expected.mu, sigma=expected.sigma)
    assert reference_statistics(tmp_path / "clean_fid.npz", extractor, cache_dir=None).fingerprint is None


def test_reference_statistics_errors(tmp_path, pixel_images):
    extractor = PooledPixels()
    with pytest.raises(FileNotFoundError, match="reference set not found.*a folder of .png"):
        reference_statistics(tmp_path / "missing", extractor, None)
    (tmp_path / "list.txt").write_text("x")
    with pytest.raises(ValueError, match="not a folder or an .npz"):
        reference_statistics(tmp_path / "list.txt", extractor, None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .png/.jpg/.jpeg files"):
        reference_statistics(tmp_path / "empty", extractor, None)
    write_pngs(tmp_path / "mixed", pixel_images[:2])
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "mixed" / "small.png")
    with pytest.raises(ValueError, match="small.png' is 8×8 but .*000.png' is 16×16"):
        reference_statistics(tmp_path / "mixed", extractor, None, progress=False)
    folder, cache = tmp_path / "real", tmp_path / "cache"
    write_pngs(folder, pixel_images)
    reference_statistics(folder, extractor, cache, progress=False)
    next(cache.iterdir()).write_bytes(b"damaged")
    with pytest.raises(ValueError, match="cached statistics of .* are damaged .* delete"):
        reference_statistics(folder, extractor, cache, progress=False)


# ---- torchmetrics -------------------------------------------------------------------------------------------------


def frechet_inception_distance():
    module = pytest.importorskip("torchmetrics.image.fid", reason="torchmetrics is not installed")
    return module.FrechetInceptionDistance


def test_torchmetrics_fid_with_a_custom_extractor_equals_ours(pixel_images):
    extractor = PooledPixels()
    metric = frechet_inception_distance()(feature=extractor, normalize=True)
    real, fake = pixel_images, (pixel_images[:10] * 1.2).flip(1)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    ours = fid(compute_statistics(real, extractor, progress=False), compute_statistics(fake, extractor, progress=False))
    assert metric.compute().item() == pytest.approx(ours, rel=1e-4)


def test_torchmetrics_takes_the_inception_without_probing_it(inception, images, inception_features):
    calls = []
    hook = inception.register_forward_hook(lambda *_: calls.append(1))
    try:
        metric = frechet_inception_distance()(feature=inception, normalize=True)  # num_features: no probe
        assert not calls
        metric.update(images, real=True)
    finally:
        hook.remove()
    assert metric.real_features_num_samples.item() == 3
    torch.testing.assert_close(metric.real_features_sum, inception_features.double().sum(0), rtol=1e-6, atol=1e-6)
