"""Fréchet distance math, the digits classifier, and the digits evaluator."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rdm_lightning.data.digits import digit_prompt, digits_split
from rdm_lightning.evaluation import frechet
from rdm_lightning.evaluation.digits import (
    DigitsClassifier,
    DigitsEvaluator,
    PIXEL_COMPONENTS,
    PixelBasis,
    load_digits_classifier,
    random_shift,
    train_digits_classifier,
)
from rdm_lightning.evaluation.direction import DirectionConsistency
from rdm_lightning.evaluation.frechet import frechet_distance, gaussian_statistics


def random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
    factor = rng.normal(size=(dim, dim))
    return factor @ factor.T + 0.1 * np.eye(dim)


# --- Fréchet distance -------------------------------------------------------------------------


def test_gaussian_statistics_match_numpy_and_accept_tensors():
    features = np.random.default_rng(0).normal(size=(50, 4))
    mu, cov = gaussian_statistics(torch.from_numpy(features).float())
    np.testing.assert_allclose(mu, features.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(cov, np.cov(features, rowvar=False), atol=1e-6)


@pytest.mark.parametrize(
    ("features", "message"),
    [(np.zeros(5), r"2-D.*\(5,\)"), (np.zeros((1, 3)), "at least 2 samples, got 1"), (np.full((3, 2), np.nan), "NaN")],
)
def test_gaussian_statistics_rejects_bad_features(features, message):
    with pytest.raises(ValueError, match=message):
        gaussian_statistics(features)


def test_frechet_distance_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    mu, cov = rng.normal(size=8), random_covariance(rng, 8)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_diagonal_gaussians_has_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_symmetric_and_a_shift_adds_its_squared_norm():
    rng = np.random.default_rng(2)
    mu, cov1, cov2 = rng.normal(size=5), random_covariance(rng, 5), random_covariance(rng, 5)
    shift = rng.normal(size=5)
    base = frechet_distance(mu, cov1, mu, cov2)
    assert frechet_distance(mu, cov2, mu, cov1) == pytest.approx(base, rel=1e-9)
    assert frechet_distance(mu + shift, cov1, mu, cov2) == pytest.approx(base + shift @ shift, rel=1e-9)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"cov2 must have shape \(3, 3\).*\(2, 2\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


def test_singular_product_retries_with_eps_on_the_diagonals(monkeypatch):
    calls = []
    real_sqrtm = frechet.linalg.sqrtm

    def sqrtm_failing_once(matrix):
        calls.append(matrix.copy())
        return np.full_like(matrix, np.inf) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(frechet.linalg, "sqrtm", sqrtm_failing_once)
    a, b = np.array([1.0, 4.0]), np.array([9.0, 0.0])
    with pytest.warns(RuntimeWarning, match="singular"):
        distance = frechet_distance(np.zeros(2), np.diag(a), np.zeros(2), np.diag(b), eps=1e-2)
    np.testing.assert_allclose(calls[1], np.diag((a + 1e-2) * (b + 1e-2)))
    expected = np.sum(a + b - 2 * np.sqrt((a + 1e-2) * (b + 1e-2)))
    assert distance == pytest.approx(expected, rel=1e-9)


# --- classifier -------------------------------------------------------------------------------


def test_classifier_reaches_97_percent_test_accuracy(digits_classifier):
    model, accuracy = digits_classifier
    split = digits_split()
    with torch.no_grad():
        predictions = model(split.test_images).argmax(dim=1)
    assert accuracy == pytest.approx((predictions == split.test_labels).float().mean().item())
    assert accuracy >= 0.97
    assert not model.training


def test_classifier_shapes():
    model = DigitsClassifier()
    images = torch.rand(5, 1, 8, 8)
    assert model.features(images).shape == (5, 128)
    assert model(images).shape == (5, 10)


def test_random_shift_moves_each_image_by_at_most_one_pixel():
    images = torch.zeros(200, 1, 8, 8)
    images[:, :, 3:5, 3:5] = torch.rand(200, 1, 2, 2) + 0.1  # away from the border: shifts lose nothing
    shifted = random_shift(images, torch.Generator().manual_seed(0))
    offsets = set()
    for original, moved in zip(images, shifted):
        offsets_of_moved = [
            (dy, dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if torch.equal(torch.roll(original, (dy, dx), dims=(1, 2)), moved)
        ]
        assert len(offsets_of_moved) == 1
        offsets.add(offsets_of_moved[0])
    assert len(offsets) == 9  # every offset occurs


def test_training_is_seeded_and_leaves_the_global_rng_alone():
    split = digits_split()
    state = torch.get_rng_state()
    threads = torch.get_num_threads()
    first, _ = train_digits_classifier(split, seed=5, epochs=1)
    second, _ = train_digits_classifier(split, seed=5, epochs=1)
    other, _ = train_digits_classifier(split, seed=6, epochs=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    assert not torch.equal(first.head.weight, other.head.weight)


def test_training_rejects_bad_arguments():
    with pytest.raises(ValueError, match="epochs=0"):
        train_digits_classifier(digits_split(), epochs=0)


def test_cached_classifier_is_loaded_not_retrained(digits_classifier, rdm_cache, monkeypatch):
    path = rdm_cache / "digits" / "classifier-seed0.pt"
    assert path.is_file()
    modified = path.stat().st_mtime_ns
    monkeypatch.setenv("RDM_CACHE", str(rdm_cache))
    model, accuracy = load_digits_classifier(seed=0)  # the cache root comes from $RDM_CACHE
    assert path.stat().st_mtime_ns == modified
    assert accuracy == digits_classifier[1]
    for name, value in digits_classifier[0].state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    assert not model.training


def test_cached_classifier_below_97_percent_is_refused(tmp_path):
    path = tmp_path / "digits" / "classifier-seed3.pt"
    path.parent.mkdir()
    torch.save({"state_dict": DigitsClassifier().state_dict(), "test_accuracy": 0.5}, path)
    with pytest.raises(ValueError, match="classifier-seed3.pt.*0.5000.*0.97"):
        load_digits_classifier(seed=3, cache=tmp_path)


# --- evaluator --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluator(digits_classifier):
    split = digits_split()
    return DigitsEvaluator(digits_classifier[0], split.test_images, PixelBasis(split.train_images))


@pytest.fixture(scope="module")
def held_out():
    split = digits_split()
    return split.test_images, [digit_prompt(label) for label in split.test_labels.tolist()]


def test_real_test_images_score_near_perfect(evaluator, held_out):
    images, prompts = held_out
    metrics = evaluator.evaluate(images, prompts)
    assert metrics["num_samples"] == 360
    assert metrics["prompt_accuracy"] >= 0.97
    assert abs(metrics["digits_fd"]) < 1e-6 and abs(metrics["pixel_fd"]) < 1e-9
    assert evaluator.evaluate(images.permute(0, 2, 3, 1), prompts) == metrics  # channels-last


def test_noise_scores_far_worse_than_real_train_images(evaluator, held_out):
    _, prompts = held_out
    split = digits_split()
    train = evaluator.evaluate(split.train_images, [digit_prompt(label) for label in split.train_labels.tolist()])
    noise = evaluator.evaluate(torch.rand(360, 1, 8, 8, generator=torch.Generator().manual_seed(0)), prompts)
    assert train["prompt_accuracy"] >= 0.97
    assert noise["prompt_accuracy"] < 0.3
    assert noise["digits_fd"] > 10 * train["digits_fd"] > 0


def test_pixel_basis_is_the_leading_principal_components_of_the_train_split():
    from sklearn.decomposition import PCA

    train = digits_split().train_images
    basis = PixelBasis(train)
    reference = PCA(n_components=PIXEL_COMPONENTS).fit(train.flatten(1).double().numpy())
    # The same directions (up to sign) and the same share of variance as scikit-learn's PCA.
    np.testing.assert_allclose(np.abs(basis.components.numpy().T @ reference.components_.T), np.eye(PIXEL_COMPONENTS), atol=1e-8)
    assert basis.explained_variance == pytest.approx(reference.explained_variance_ratio_.sum(), rel=1e-10)
    assert 0.85 < basis.explained_variance < 0.95
    with pytest.raises(ValueError, match=r"components must be in \[1, 64\], got 65"):
        PixelBasis(train, components=65)


def test_pixel_fd_of_a_mean_shift_is_the_squared_projected_shift(digits_classifier):
    # Same covariance, means apart by δ on every pixel: d² = ‖δ·1ᵀVₖ‖² exactly.
    split = digits_split()
    basis = PixelBasis(split.train_images)
    darker = 0.8 * split.test_images
    evaluator = DigitsEvaluator(digits_classifier[0], darker, basis)
    prompts = [digit_prompt(label) for label in split.test_labels.tolist()]
    delta = 0.1
    expected = float(((delta * torch.ones(64, dtype=torch.float64)) @ basis.components).pow(2).sum())
    assert evaluator.evaluate(darker + delta, prompts)["pixel_fd"] == pytest.approx(expected, rel=1e-6)
    # Without truncation the basis is a rotation: pixel FD is the plain Fréchet distance of the pixels.
    full = DigitsEvaluator(digits_classifier[0], split.test_images, PixelBasis(split.train_images, components=64))
    images = split.train_images[:400]
    direct = frechet_distance(*gaussian_statistics(images.flatten(1)), *gaussian_statistics(split.test_images.flatten(1)))
    assert full.evaluate(images, [digit_prompt(0)] * 400)["pixel_fd"] == pytest.approx(direct, rel=1e-6)


def test_real_data_floor_is_the_train_split_against_the_test_split(evaluator):
    floor = evaluator.real_data_floor()
    split = digits_split()
    train = evaluator.evaluate(split.train_images, [digit_prompt(label) for label in split.train_labels.tolist()])
    assert floor == {"digits_fd": train["digits_fd"], "pixel_fd": train["pixel_fd"], "num_samples": 1437}
    noise = evaluator.evaluate(torch.rand(360, 1, 8, 8, generator=torch.Generator().manual_seed(0)), [digit_prompt(0)] * 360)
    assert noise["pixel_fd"] > 10 * floor["pixel_fd"] > 0


def test_prompt_accuracy_follows_the_prompts(evaluator, held_out):
    images, _ = held_out
    wrong = [digit_prompt((label + 1) % 10) for label in digits_split().test_labels.tolist()]
    assert evaluator.evaluate(images, wrong)["prompt_accuracy"] < 0.03


def test_default_evaluator_uses_the_cached_classifier(evaluator, digits_classifier, rdm_cache, monkeypatch):
    monkeypatch.setenv("RDM_CACHE", str(rdm_cache))
    default = DigitsEvaluator.default()
    np.testing.assert_allclose(default.reference_mu, evaluator.reference_mu, rtol=1e-6)
    np.testing.assert_allclose(default.reference_cov, evaluator.reference_cov, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(default.reference_pixel_cov, evaluator.reference_pixel_cov, rtol=1e-9)


@pytest.mark.parametrize(
    ("images", "count", "message"),
    [
        (torch.full((4, 1, 8, 8), 1.5), 4, r"\[0, 1\].*1.5"),
        (torch.full((4, 1, 8, 8), -0.5), 4, r"\[0, 1\].*-0.5"),
        (torch.full((4, 1, 8, 8), float("nan")), 4, r"\[0, 1\].*nan"),
        (torch.rand(4, 3, 8, 8), 4, r"\(N, 1, 8, 8\).*\(4, 3, 8, 8\)"),
        (torch.rand(4, 8, 8), 4, r"\(4, 8, 8\)"),
        (torch.rand(1, 1, 8, 8), 1, "at least 2 images for a covariance, got 1"),
        (np.random.rand(4, 1, 8, 8), 4, "torch.Tensor, got ndarray"),
        (torch.rand(4, 1, 8, 8), 3, "4 images but 3 prompts"),
    ],
)
def test_evaluate_rejects_bad_input(evaluator, images, count, message):
    with pytest.raises(ValueError, match=message):
        evaluator.evaluate(images, [digit_prompt(1)] * count)


def test_evaluate_rejects_a_prompt_without_a_digit(evaluator):
    with pytest.raises(ValueError, match="'a cat'"):
        evaluator.evaluate(torch.rand(2, 1, 8, 8), [digit_prompt(1), "a cat"])


# --- direction consistency --------------------------------------------------------------------


def consistency_of(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    statistics = DirectionConsistency()
    for draw in draws:
        statistics.update(draw)
    return statistics.compute()


def test_direction_consistency_has_closed_form_for_symmetric_orthogonal_noise():
    # g^(m) = v ± a·u with u ⟂ v, half the draws each sign: ḡ = v, every draw has
    # cos = |v| / sqrt(|v|² + a²|u|²) and the variance of one draw is a²|u|².
    v = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    u = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    a = torch.tensor([0.5, 2.0]).view(2, 1)
    draws = torch.stack([v + a * u, v - a * u, v - a * u, v + a * u]).view(4, 2, 1, 3)
    cosine, snr = consistency_of(draws)
    v_norm, noise_norm = v.norm(dim=1), (a * u).norm(dim=1)
    torch.testing.assert_close(cosine, (v_norm / (v_norm**2 + noise_norm**2).sqrt()).double())
    torch.testing.assert_close(snr, (v_norm**2 / noise_norm**2).double())


def test_direction_consistency_matches_the_two_pass_definition():
    draws = torch.randn(16, 3, 2, 5, generator=torch.Generator().manual_seed(0)).double() + 0.7
    cosine, snr = consistency_of(draws)
    flat = draws.flatten(2)
    mean = flat.mean(dim=0)
    expected_cosine = torch.nn.functional.cosine_similarity(flat, mean.expand_as(flat), dim=2).mean(dim=0)
    expected_snr = mean.pow(2).sum(dim=1) / (flat - mean).pow(2).sum(dim=2).mean(dim=0)
    torch.testing.assert_close(cosine, expected_cosine)
    torch.testing.assert_close(snr, expected_snr)
    torch.testing.assert_close(consistency_of(7.0 * draws), (cosine, snr))


def test_direction_consistency_rejects_one_draw_and_a_changed_shape():
    statistics = DirectionConsistency()
    statistics.update(torch.ones(2, 3))
    with pytest.raises(ValueError, match="at least 2 draws, got 1"):
        statistics.compute()
    with pytest.raises(ValueError, match=r"must hold \(2, 3\).*got \(2, 4\)"):
        statistics.update(torch.ones(2, 4))
