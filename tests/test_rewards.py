"""Reward models: the interface, the digits rewards, weighted sums and config building."""
from __future__ import annotations

import pytest
import torch
from jsonargparse import ArgumentParser

from rdm_lightning.data.digits import digit_prompt, digits_split
from rdm_lightning.evaluation.digits import classifier_accuracy
from rdm_lightning.rewards import (
    DigitsClassifierReward,
    DigitsGoldReward,
    DigitsMLP,
    RewardModel,
    RewardTerm,
    StrokeContrastReward,
    WeightedRewards,
    build_reward,
)


@pytest.fixture(autouse=True)
def temporary_cache(rdm_cache, monkeypatch):
    monkeypatch.setenv("RDM_CACHE", str(rdm_cache))


@pytest.fixture(scope="module")
def test_digits():
    split = digits_split()
    return split.test_images, [digit_prompt(label) for label in split.test_labels.tolist()], split.test_labels


@pytest.fixture(scope="module")
def classifier_reward(digits_classifier, rdm_cache):
    # Module fixtures run before the autouse one sets $RDM_CACHE, so the cache is passed explicitly.
    return DigitsClassifierReward(cache=rdm_cache)  # loads the seed-0 classifier the fixture trained


@pytest.fixture(scope="module")
def gold_reward(digits_gold_classifier, rdm_cache):
    return DigitsGoldReward(cache=rdm_cache)


def binary_image(ink_value: float, background_value: float, ink_pixels: int = 16) -> torch.Tensor:
    image = torch.full((1, 1, 8, 8), background_value)
    image.view(-1)[torch.randperm(64, generator=torch.Generator().manual_seed(0))[:ink_pixels]] = ink_value
    return image


# --- stroke contrast --------------------------------------------------------------------------


@pytest.mark.parametrize(("ink", "background", "expected"), [(1.0, 0.0, 1.0), (0.9, 0.1, 0.8), (0.4, 0.4, 0.0)])
def test_stroke_contrast_of_a_binary_image_is_ink_minus_background(ink, background, expected):
    image = binary_image(ink, background)
    reward = StrokeContrastReward(ink_fraction=0.25)  # 16 of 64 pixels are ink
    assert reward.score(image, ["a digit 3"]).item() == pytest.approx(expected, abs=1e-6)
    # An RGB copy of the grey image scores the same (channels are averaged).
    assert reward.score(image.expand(1, 3, 8, 8), ["a digit 3"]).item() == pytest.approx(expected, abs=1e-6)


def test_stroke_contrast_gradient_is_one_over_k_on_ink_and_minus_one_over_n_minus_k_elsewhere():
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
    scores = StrokeContrastReward(ink_fraction=0.25).score(images, ["a 1"] * 3, with_grad=True)
    scores.sum().backward()
    flat = images.detach().flatten(1)
    is_ink = flat >= flat.topk(16, dim=1).values[:, -1:]
    expected = torch.where(is_ink, torch.tensor(1 / 16), torch.tensor(-1 / 48))
    torch.testing.assert_close(images.grad.flatten(1), expected)


def test_stroke_contrast_ranks_real_digits_above_blurred_ones(test_digits):
    images, prompts, _ = test_digits
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1)
    reward = StrokeContrastReward()
    assert reward.score(images, prompts).mean() > reward.score(blurred, prompts).mean() + 0.2


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_stroke_contrast_rejects_ink_fraction_outside_0_1(fraction):
    with pytest.raises(ValueError, match=rf"ink_fraction must be in \(0, 1\), got {fraction}"):
        StrokeContrastReward(ink_fraction=fraction)


# --- classifier reward ------------------------------------------------------------------------


def test_classifier_reward_is_the_log_softmax_of_the_prompted_digit(classifier_reward, digits_classifier, test_digits):
    images, _, labels = test_digits
    images = images[:20]
    prompts = [f"the number {(label + 3) % 10}" for label in labels[:20].tolist()]  # right and wrong digits
    targets = torch.tensor([(label + 3) % 10 for label in labels[:20].tolist()])
    with torch.no_grad():
        expected = digits_classifier[0](images).log_softmax(dim=1)[torch.arange(20), targets]
    torch.testing.assert_close(classifier_reward.score(images, prompts), expected, rtol=0, atol=1e-6)
    probability = DigitsClassifierReward(log_prob=False).score(images, prompts)
    torch.testing.assert_close(probability, expected.exp(), rtol=0, atol=1e-6)


def test_classifier_reward_is_near_zero_for_right_prompts_and_low_for_wrong_ones(classifier_reward, test_digits):
    images, prompts, labels = test_digits
    wrong = [digit_prompt((label + 1) % 10) for label in labels.tolist()]
    assert classifier_reward.score(images, prompts).mean() > -0.15
    assert classifier_reward.score(images, wrong).mean() < -5.0


def test_gradient_path_gives_the_same_values_and_finite_image_gradients(classifier_reward, test_digits):
    images, prompts, _ = test_digits
    images = images[:16].clone().requires_grad_()
    plain = classifier_reward.score(images, prompts[:16])
    tracked = classifier_reward.score(images, prompts[:16], with_grad=True)
    assert not plain.requires_grad and tracked.requires_grad
    assert torch.equal(plain, tracked.detach())
    tracked.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    # The reward is frozen: backpropagating into the images leaves its parameters untouched.
    for parameter in classifier_reward.parameters():
        assert not parameter.requires_grad and parameter.grad is None


def test_batching_does_not_change_scores(classifier_reward, test_digits):
    images, prompts, _ = test_digits
    images, prompts = images[:23], prompts[:23]
    whole = classifier_reward.score(images, prompts)
    torch.testing.assert_close(classifier_reward.score(images, prompts, batch_size=1), whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(classifier_reward.score(images, prompts, batch_size=5), whole, rtol=0, atol=1e-6)


def test_inputs_are_cast_to_the_reward_dtype_and_scores_are_float32(classifier_reward, test_digits):
    images, prompts, _ = test_digits
    images, prompts = images[:8], prompts[:8]
    reference = classifier_reward.score(images, prompts)
    from_double = classifier_reward.score(images.double(), prompts)
    assert from_double.dtype == torch.float32 and from_double.shape == (8,)
    torch.testing.assert_close(from_double, reference, rtol=0, atol=1e-6)
    half = DigitsClassifierReward().to(torch.bfloat16)
    from_bfloat16 = half.score(images, prompts)  # float32 images into a bfloat16 reward
    assert from_bfloat16.dtype == torch.float32
    torch.testing.assert_close(from_bfloat16, reference, rtol=0, atol=0.1)
    assert StrokeContrastReward().score(images.double(), prompts).dtype == torch.float32


def test_rewards_are_frozen_and_stay_in_eval_mode(classifier_reward):
    assert all(not parameter.requires_grad for parameter in classifier_reward.parameters())
    holder = torch.nn.Sequential(classifier_reward).train()  # as Lightning's module.train() would
    assert not any(module.training for module in holder[0].modules())


def test_reward_names_and_scales_come_from_init_args():
    reward = StrokeContrastReward(name="contrast", train_scale=0.5, report_scale=100.0)
    assert (reward.name, reward.train_scale, reward.report_scale) == ("contrast", 0.5, 100.0)
    assert StrokeContrastReward().name == "StrokeContrastReward"
    with pytest.raises(ValueError, match="train_scale must be a finite number, got nan"):
        StrokeContrastReward(train_scale=float("nan"))


@pytest.mark.parametrize(
    ("images", "prompts", "message"),
    [
        (torch.rand(1, 8, 8), ["a 1"], r"\(B, C, H, W\).*\(1, 8, 8\)"),
        (torch.full((2, 1, 8, 8), 1.5), ["a 1", "a 2"], r"values in \[0, 1\], got range \[1.5, 1.5\]"),
        (torch.full((1, 1, 8, 8), float("nan")), ["a 1"], r"values in \[0, 1\]"),
        (torch.ones(1, 1, 8, 8, dtype=torch.uint8), ["a 1"], "floating point.*torch.uint8"),
        (torch.rand(3, 1, 8, 8), ["a 1", "a 2"], "got 3 images but 2 prompts"),
        (torch.rand(1, 1, 16, 16), ["a 1"], r"\(B, 1, 8, 8\) or \(B, 3, 8, 8\), got \(1, 1, 16, 16\)"),
        (torch.rand(1, 1, 8, 8), ["a handwritten digit"], "names no digit"),
    ],
)
def test_bad_inputs_are_refused_naming_the_problem(classifier_reward, images, prompts, message):
    with pytest.raises(ValueError, match=message):
        classifier_reward.score(images, prompts)


def test_bad_batch_size_is_refused(classifier_reward):
    with pytest.raises(ValueError, match="batch_size must be a positive integer or None, got 0"):
        classifier_reward.score(torch.rand(2, 1, 8, 8), ["a 1", "a 2"], batch_size=0)


# --- gold reward ------------------------------------------------------------------------------


def test_gold_classifier_is_an_independent_accurate_mlp_cached_under_its_own_name(
    digits_gold_classifier, digits_classifier, rdm_cache, test_digits
):
    model, accuracy = digits_gold_classifier
    assert isinstance(model, DigitsMLP) and accuracy >= 0.97
    assert (rdm_cache / "digits" / "gold-classifier-seed1.pt").is_file()
    images, _, labels = test_digits
    assert classifier_accuracy(model, images, labels) == pytest.approx(accuracy)
    # Independent of the evaluation classifier: they disagree somewhere on random images.
    noise = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(noise).argmax(1) != digits_classifier[0](noise).argmax(1)).any()


def test_gold_reward_scores_probabilities_and_refuses_gradients(gold_reward, test_digits):
    images, prompts, labels = test_digits
    scores = gold_reward.score(images, prompts)
    assert ((scores >= 0) & (scores <= 1)).all() and scores.mean() > 0.9
    wrong = [digit_prompt((label + 1) % 10) for label in labels.tolist()]
    assert gold_reward.score(images, wrong).mean() < 0.05
    with pytest.raises(ValueError, match=r"'DigitsGoldReward'.*not differentiable.*digits_logprob, stroke_contrast, clip_score, pickscore, srpo, hpsv2, dfn_clip, aesthetic, image_reward\)"):
        gold_reward.score(images[:2], prompts[:2], with_grad=True)


# --- weighted rewards -------------------------------------------------------------------------


def test_weighted_sum_applies_weights_and_train_scales(classifier_reward, gold_reward, test_digits):
    images, prompts, _ = test_digits
    images, prompts = images[:10], prompts[:10]
    contrast = StrokeContrastReward(name="contrast", train_scale=0.5)
    rewards = WeightedRewards([RewardTerm(classifier_reward, 2.0, name="logprob"), RewardTerm(contrast, -3.0)])
    scores = rewards.score_all(images, prompts)
    assert list(scores) == ["logprob", "contrast"] == rewards.names
    expected = 2.0 * classifier_reward.score(images, prompts) - 3.0 * 0.5 * contrast.score(images, prompts)
    torch.testing.assert_close(rewards.weighted_sum(scores), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"lack reward terms \['contrast'\]"):
        rewards.weighted_sum({"logprob": scores["logprob"]})


def test_weighted_rewards_with_gradients_refuse_a_non_differentiable_term(classifier_reward, gold_reward):
    rewards = WeightedRewards([RewardTerm(classifier_reward), RewardTerm(gold_reward, 0.0, name="gold")])
    rewards.require_differentiable(["DigitsClassifierReward"])
    message = r"\['gold'\] are not differentiable.*differentiable terms here: \['DigitsClassifierReward'\]"
    with pytest.raises(ValueError, match=message):
        rewards.require_differentiable()
    with pytest.raises(ValueError, match=message):
        rewards.score_all(torch.rand(2, 1, 8, 8), ["a 1", "a 2"], with_grad=True)
    with pytest.raises(ValueError, match=r"unknown reward terms \['clip'\]"):
        rewards.require_differentiable(["clip"])
    with pytest.raises(ValueError, match=r"^Method X \(w=1\) differentiates every reward: reward terms \['gold'\].*"
                                         r"\['DigitsClassifierReward'\]\. Set w: 0$"):
        rewards.require_differentiable(needed_by="Method X (w=1)", remedy="Set w: 0")


def test_duplicate_term_names_are_refused():
    with pytest.raises(ValueError, match="duplicate reward name 'StrokeContrastReward'"):
        WeightedRewards([RewardTerm(StrokeContrastReward()), RewardTerm(StrokeContrastReward(ink_fraction=0.5))])
    with pytest.raises(ValueError, match="term name must be a non-empty string or None, got ''"):
        RewardTerm(StrokeContrastReward(), name="")
    with pytest.raises(TypeError, match="must be a RewardModel, got Linear"):
        RewardTerm(torch.nn.Linear(1, 1))


# --- building from configs --------------------------------------------------------------------


def test_build_reward_from_alias_class_path_and_dict(digits_classifier):
    assert isinstance(build_reward("digits_logprob"), DigitsClassifierReward)
    assert isinstance(build_reward("rdm_lightning.rewards.StrokeContrastReward"), StrokeContrastReward)
    built = build_reward({"class_path": "stroke_contrast", "init_args": {"ink_fraction": 0.5, "name": "c"}})
    assert (type(built), built.ink_fraction, built.name) == (StrokeContrastReward, 0.5, "c")
    built = build_reward({"class_path": "rdm_lightning.rewards.digits.DigitsClassifierReward",
                          "init_args": {"log_prob": False}})
    assert isinstance(built, DigitsClassifierReward) and not built.log_prob
    assert build_reward(built) is built


@pytest.mark.parametrize("name", ["pick_score", "rdm_lightning.rewards.NoSuchReward", "no_such_package.Reward"])
def test_build_reward_refuses_unknown_names_listing_the_aliases(name):
    with pytest.raises(ValueError, match=rf"unknown reward '{name}'.*digits_logprob, stroke_contrast, digits_gold, clip_score, pickscore"):
        build_reward(name)


def test_build_reward_refuses_classes_that_are_not_rewards_and_malformed_dicts():
    with pytest.raises(TypeError, match="torch.nn.Linear, which is not a RewardModel"):
        build_reward("torch.nn.Linear")
    with pytest.raises(ValueError, match=r"needs 'class_path'.*\['init_arg'\]"):
        build_reward({"init_arg": {}})
    with pytest.raises(TypeError, match="got int"):
        build_reward(3)


def test_lightning_cli_style_parsing_instantiates_rewards_by_class_path():
    # LightningCLI parses a module's ``list[RewardModel]`` init arg with jsonargparse like this.
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--rewards", type=list[RewardModel])
    config = parser.parse_args(
        ['--rewards=[{"class_path": "rdm_lightning.rewards.StrokeContrastReward", '
         '"init_args": {"ink_fraction": 0.5, "train_scale": 2.0}}]']
    )
    (reward,) = parser.instantiate(config).rewards
    assert isinstance(reward, StrokeContrastReward) and (reward.ink_fraction, reward.train_scale) == (0.5, 2.0)
    assert not reward.training
