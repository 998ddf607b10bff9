"""CLIP score and the SRPO-style reward on a tiny random CLIPModel saved to a local folder."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from iterations import loss_state
from jsonargparse import ArgumentParser
from tiny_models import CLIP_VOCAB_SIZE, MAX_TOKENS, make_tiny_clip

from rdm_lightning.rewards import (
    CLIPScoreReward,
    RewardModel,
    SRPOReward,
    StrokeContrastReward,
    build_reward,
    clip_preprocess,
)
from rdm_lightning.rewards.clip import (
    CLIP_MEAN,
    CLIP_STD,
    SRPO_NEGATIVE_WORDS,
    SRPO_POSITIVE_WORDS,
    resize_shortest_side,
)

IMAGE_SIZE = 32
# Different lengths, so that batched tokenisation pads.
PROMPTS = ["a photo of a cat", "a red car", "two dogs playing in the snow"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer CLIPModel (32 px, patch 8, projection 16) and its byte-level tokenizer in one folder."""
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def clip_reward(clip_folder: Path) -> CLIPScoreReward:
    return CLIPScoreReward(str(clip_folder))


def normalised(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def triangle_halving(images: torch.Tensor) -> torch.Tensor:
    """Antialiased bilinear downscaling by exactly 2 in closed form (torchvision's tensor Resize, PIL's
    bilinear): the triangle filter stretched to the scale gives taps [1, 3, 3, 1] / 8 around each
    output pixel, renormalised over the taps inside the image at the borders; separable."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])

    def along_width(values: torch.Tensor) -> torch.Tensor:
        # Window k of the once-padded row holds pixels 2k-1 .. 2k+2.
        windows = F.pad(values, (1, 1)).unfold(-1, 4, 2)
        inside = F.pad(torch.ones_like(values), (1, 1)).unfold(-1, 4, 2)
        return (windows * taps).sum(-1) / (inside * taps).sum(-1)

    return along_width(along_width(images).transpose(-1, -2)).transpose(-1, -2)


def srpo_by_hand(scorer: CLIPScoreReward, images, prompts, pairs, positive_scale=1.1) -> torch.Tensor:
    """f_img · (k·f_txt(pos. prompt) − f_txt(neg. prompt)), with each text set embedded on its own."""
    with torch.no_grad():
        positive = scorer.embed_texts([f"{pos}. {prompt}" for (pos, _), prompt in zip(pairs, prompts)])
        negative = scorer.embed_texts([f"{neg}. {prompt}" for (_, neg), prompt in zip(pairs, prompts)])
        return (scorer.embed_images(images) * (positive_scale * positive - negative)).sum(dim=-1)


# --- loading ------------------------------------------------------------------------------------


def test_loads_the_folder_offline_with_its_full_vocabulary(clip_reward):
    # Guards transformers 5's silent 2-token vocabulary.
    assert len(clip_reward.tokenizer) == CLIP_VOCAB_SIZE
    assert (clip_reward.image_size, clip_reward.max_tokens) == (IMAGE_SIZE, MAX_TOKENS)
    assert clip_reward.model.dtype == torch.float32


def test_missing_model_path_names_the_path(tmp_path):
    missing = tmp_path / "no_clip_here"
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*CLIPModel.save_pretrained"):
        CLIPScoreReward(str(missing))


def test_folder_without_a_tokenizer_is_refused(clip_folder, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(clip_folder / name, tmp_path / name)
    with pytest.raises(FileNotFoundError, match=r"lacks tokenizer.json \(or vocab.json and merges.txt\)"):
        CLIPScoreReward(str(tmp_path))


def test_folder_without_weights_is_refused(clip_folder, tmp_path):
    for path in clip_folder.iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, tmp_path / path.name)
    with pytest.raises(FileNotFoundError, match=r"lacks weights \(model.safetensors or .* pytorch_model.bin"):
        CLIPScoreReward(str(tmp_path))


# --- preprocessing ------------------------------------------------------------------------------


def test_preprocessing_leaves_an_image_at_the_model_size_unresized():
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(clip_preprocess(images, IMAGE_SIZE), normalised(images))


@pytest.mark.parametrize(
    ("height", "width", "rows", "cols"),
    [(32, 48, slice(0, 32), slice(8, 40)), (50, 32, slice(9, 41), slice(0, 32))],
)
def test_preprocessing_centre_crops_a_non_square_image(height, width, rows, cols):
    images = torch.rand(2, 3, height, width)
    torch.testing.assert_close(clip_preprocess(images, IMAGE_SIZE), normalised(images[:, :, rows, cols]))


def test_preprocessing_without_antialias_halves_a_double_size_image_by_2x2_averages():
    # Bilinear downscaling by exactly 2 without antialias (align_corners=False) samples midway
    # between pixel pairs: 2×2 block means. 64×96 → 32×48, then the centre 32 columns.
    images = torch.rand(2, 3, 64, 96)
    expected = normalised(F.avg_pool2d(images, 2)[:, :, :, 8:40])
    torch.testing.assert_close(clip_preprocess(images, IMAGE_SIZE, antialias=False), expected)


def test_preprocessing_by_default_halves_with_the_antialiasing_triangle_filter():
    # RTDMD's transform: torchvision's tensor Resize, bilinear, antialiased (its default since 0.17).
    images = torch.rand(2, 3, 64, 96)
    expected = normalised(triangle_halving(images)[:, :, :, 8:40])
    torch.testing.assert_close(clip_preprocess(images, IMAGE_SIZE), expected)
    torch.testing.assert_close(clip_preprocess(images, IMAGE_SIZE, mode="bilinear", antialias=True), expected)


@pytest.mark.parametrize(("height", "width", "resized"), [(64, 96, (32, 48)), (100, 37, (86, 32)), (20, 24, (32, 38))])
def test_resize_sets_the_shorter_side_and_truncates_the_longer(height, width, resized):
    # torchvision's and transformers' rounding: the longer side is int(size * long / short).
    for mode in ("bilinear", "bicubic"):
        assert resize_shortest_side(torch.rand(1, 3, height, width), IMAGE_SIZE, mode=mode).shape[-2:] == resized


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"mode": "nearest"}, r"interpolation must be one of \('bilinear', 'bicubic'\), got 'nearest'"),
     ({"antialias": 1}, r"antialias must be True or False, got 1")],
)
def test_preprocessing_refuses_other_resize_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        clip_preprocess(torch.rand(1, 3, 40, 40), IMAGE_SIZE, **kwargs)


def test_preprocessing_repeats_a_grey_channel_to_rgb(clip_reward):
    grey = torch.rand(2, 1, 40, 40)
    rgb = grey.repeat(1, 3, 1, 1)
    torch.testing.assert_close(clip_preprocess(grey, IMAGE_SIZE), clip_preprocess(rgb, IMAGE_SIZE))
    torch.testing.assert_close(clip_reward.score(grey, PROMPTS[:2]), clip_reward.score(rgb, PROMPTS[:2]))


def test_preprocessing_refuses_other_channel_counts():
    with pytest.raises(ValueError, match=r"RGB \(B, 3, H, W\) or grey \(B, 1, H, W\).*\(1, 4, 32, 32\)"):
        clip_preprocess(torch.rand(1, 4, 32, 32), IMAGE_SIZE)


# --- CLIP score ---------------------------------------------------------------------------------


def test_clip_score_is_the_diagonal_of_clip_logits_over_the_logit_scale(clip_reward, clip_folder):
    images = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    tokens = clip_reward.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        output = clip_reward.model(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=normalised(images)
        )
    logit_scale = clip_reward.model.logit_scale.exp()
    scores = clip_reward.score(images, PROMPTS)
    torch.testing.assert_close(scores, output.logits_per_image.diagonal() / logit_scale, atol=1e-5, rtol=0)
    assert scores.abs().max() <= 1.0
    # PickScore's form is the diagonal of the logits itself.
    scaled = CLIPScoreReward(str(clip_folder), logit_scale=True)
    torch.testing.assert_close(scaled.score(images, PROMPTS), output.logits_per_image.diagonal(), atol=1e-4, rtol=1e-5)


def test_embeddings_are_unit_vectors_of_the_projection_size(clip_reward):
    with torch.no_grad():
        images = clip_reward.embed_images(torch.rand(2, 3, 40, 56))
        texts = clip_reward.embed_texts(PROMPTS)
    assert images.shape == (2, 16) and texts.shape == (3, 16)
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(3))


def test_clip_gradient_and_no_grad_paths_agree(clip_reward):
    # Off-size, so the gradient also runs through the resize and the crop.
    images = torch.rand(3, 3, 40, 56, requires_grad=True)
    plain = clip_reward.score(images, PROMPTS)
    traced = clip_reward.score(images, PROMPTS, with_grad=True)
    torch.testing.assert_close(traced.detach(), plain, atol=1e-5, rtol=0)
    traced.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_clip_score_resizes_as_rtdmd_by_default(clip_reward):
    # Off-size images score as their closed-form antialiased halving, centre-cropped, at the model size.
    assert (clip_reward.interpolation, clip_reward.antialias) == ("bilinear", True)
    images = torch.rand(2, 3, 64, 96)
    expected = clip_reward.score(triangle_halving(images)[:, :, :, 8:40], PROMPTS[:2])
    torch.testing.assert_close(clip_reward.score(images, PROMPTS[:2]), expected, atol=1e-5, rtol=0)


def test_clip_score_takes_the_resize_options(clip_folder):
    images = torch.rand(2, 3, 40, 56)
    for interpolation, antialias in (("bicubic", True), ("bicubic", False), ("bilinear", False)):
        reward = CLIPScoreReward(str(clip_folder), interpolation=interpolation, antialias=antialias)
        resized = F.interpolate(images, size=(32, 44), mode=interpolation, antialias=antialias, align_corners=False)
        # Embeddings, not scores: bicubic overshoots [0, 1], which score() refuses.
        with torch.no_grad():
            expected = reward.embed_images(resized[:, :, :, 6:38])
            torch.testing.assert_close(reward.embed_images(images), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"interpolation": "area"}, r"interpolation must be one of \('bilinear', 'bicubic'\), got 'area'"),
     ({"antialias": "yes"}, r"antialias must be True or False, got 'yes'")],
)
def test_clip_score_refuses_other_resize_options(clip_folder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CLIPScoreReward(str(clip_folder), **kwargs)


# --- SRPO ---------------------------------------------------------------------------------------


def test_srpo_with_single_words_matches_the_closed_form(clip_reward):
    srpo = SRPOReward(clip_reward, positive_words=["Realistic"], negative_words=["CG Render"])
    images = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    expected = srpo_by_hand(clip_reward, images, PROMPTS, [("Realistic", "CG Render")] * 3)
    torch.testing.assert_close(srpo.score(images, PROMPTS), expected, atol=1e-5, rtol=0)


def test_srpo_scores_the_words_it_draws(clip_reward):
    images = torch.rand(3, 3, 48, 48)
    pairs = SRPOReward(clip_reward, seed=7).draw_control_words(3)
    expected = srpo_by_hand(clip_reward, images, PROMPTS, pairs)
    torch.testing.assert_close(SRPOReward(clip_reward, seed=7).score(images, PROMPTS), expected, atol=1e-5, rtol=0)


def test_srpo_with_equal_words_and_unit_scale_is_zero(clip_reward):
    srpo = SRPOReward(clip_reward, positive_words=["Oil"], negative_words=["Oil"], positive_scale=1.0)
    torch.testing.assert_close(srpo.score(torch.rand(3, 3, 40, 40), PROMPTS), torch.zeros(3), atol=1e-6, rtol=0)


def test_srpo_draws_are_reproducible_per_seed_and_cover_the_default_words(clip_reward):
    first, second = SRPOReward(clip_reward, seed=3), SRPOReward(clip_reward, seed=3)
    pairs = first.draw_control_words(30)
    assert pairs == second.draw_control_words(30)
    assert pairs != SRPOReward(clip_reward, seed=4).draw_control_words(30)
    assert {pos for pos, _ in pairs} == set(SRPO_POSITIVE_WORDS)
    assert {neg for _, neg in pairs} == set(SRPO_NEGATIVE_WORDS)
    # Same seed, same scores; and the words depend on the image order, not on batch_size.
    images = torch.rand(3, 3, 40, 40)
    batched, one_by_one = first.score(images, PROMPTS), second.score(images, PROMPTS, batch_size=1)
    torch.testing.assert_close(batched, one_by_one, atol=1e-6, rtol=0)


def test_srpo_gradient_and_no_grad_paths_agree(clip_reward):
    # Two rewards with one seed, as every score call draws fresh words.
    images = torch.rand(3, 3, 40, 56, requires_grad=True)
    plain = SRPOReward(clip_reward, seed=1).score(images, PROMPTS)
    traced = SRPOReward(clip_reward, seed=1).score(images, PROMPTS, with_grad=True)
    torch.testing.assert_close(traced.detach(), plain, atol=1e-5, rtol=0)
    traced.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_srpo_refuses_a_scorer_without_embeddings():
    with pytest.raises(TypeError, match=r"got StrokeContrastReward, which lacks embed_images and embed_texts"):
        SRPOReward(StrokeContrastReward())


@pytest.mark.parametrize(
    ("label", "kwargs"),
    [("positive_words", {"positive_words": []}), ("negative_words", {"negative_words": []}),
     ("positive_words", {"positive_words": "Realistic"}), ("negative_words", {"negative_words": ["Oil", ""]})],
)
def test_srpo_refuses_bad_word_lists(clip_reward, label, kwargs):
    with pytest.raises(ValueError, match=rf"{label} must be a non-empty list of non-empty strings"):
        SRPOReward(clip_reward, **kwargs)


def test_srpo_builds_from_nested_alias_specs(clip_reward, clip_folder):
    spec = {
        "class_path": "srpo",
        "init_args": {"scorer": {"class_path": "clip_score", "init_args": {"model_path": str(clip_folder)}}, "seed": 2},
    }
    srpo = build_reward(spec)
    assert isinstance(srpo, SRPOReward) and isinstance(srpo.scorer, CLIPScoreReward)
    assert build_reward(srpo) is srpo
    images = torch.rand(2, 3, 40, 40)
    expected = SRPOReward(clip_reward, seed=2).score(images, PROMPTS[:2])
    torch.testing.assert_close(srpo.score(images, PROMPTS[:2]), expected, atol=1e-6, rtol=0)


def test_srpo_parses_from_a_method_config(clip_folder):
    # The shape of docs/methods/dmdr.md's snippet, parsed as LightningCLI parses `rewards:`.
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--rewards", type=list[RewardModel])
    scorer = {"class_path": "rdm_lightning.rewards.CLIPScoreReward", "init_args": {"model_path": str(clip_folder)}}
    srpo = {"class_path": "rdm_lightning.rewards.SRPOReward", "init_args": {"name": "srpo", "scorer": scorer}}
    config = parser.parse_args([f"--rewards={json.dumps([srpo])}"])
    (reward,) = parser.instantiate(config).rewards
    assert isinstance(reward, SRPOReward) and isinstance(reward.scorer, CLIPScoreReward) and reward.name == "srpo"


# --- frozen -------------------------------------------------------------------------------------


def test_rewards_are_frozen_with_the_scorer_as_a_submodule(clip_reward):
    srpo = SRPOReward(clip_reward)
    for reward in (clip_reward, srpo):
        reward.train()
        assert not any(parameter.requires_grad for parameter in reward.parameters())
        assert not any(module.training for module in reward.modules())
    assert dict(srpo.named_children())["scorer"] is clip_reward


def test_srpo_moves_its_scorer_with_to(clip_folder):
    srpo = SRPOReward({"class_path": "clip_score", "init_args": {"model_path": str(clip_folder)}})
    srpo.to(torch.float64)
    assert srpo.scorer.model.dtype == torch.float64
    scores = srpo.score(torch.rand(2, 3, 40, 40), PROMPTS[:2])
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()


def test_importing_the_rewards_loads_neither_clip_modeling_nor_torchvision():
    code = (
        "import sys, rdm_lightning.rewards, rdm_lightning.rewards.aesthetic; "
        "print([m for m in ('torchvision', 'transformers.models.clip.modeling_clip') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_dmdr_trains_on_the_srpo_reward_through_its_hinge(clip_reward, tiny_digits_teacher):
    """DMDR's ``reward_algo: srpo``: after the cold start the loss is L_DM + w·mean(ReLU(0.7 − r_srpo)),
    and the reward's gradient reaches the generator's samples."""
    from rdm_lightning.backbones.digits import DigitsBackbone
    from rdm_lightning.core.schedules_training import hinge_reward_loss
    from rdm_lightning.methods import DMDR, DMDRConfig

    srpo = SRPOReward(clip_reward, positive_words=["Detailed"], negative_words=["Painting"], name="srpo")
    module = DMDR(DigitsBackbone(str(tiny_digits_teacher)), rewards=[srpo],
                  dmdr=DMDRConfig(cold_start_updates=0, reward_weights={"srpo": 0.5}))
    prompts = ["a handwritten digit 3", "a handwritten digit 7"]
    cond, uncond = module.backbone.encode_prompts(prompts), module.backbone.empty_conditioning(2)
    x0 = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_(True)
    state = module.rng.get_state()
    loss, logs = module.generator_loss(x0, loss_state(x0, cond, uncond, {"prompts": prompts}))
    module.rng.set_state(state)
    dm_loss, _, _ = module.distribution_matching_loss(x0, cond, uncond)
    hinge = hinge_reward_loss(srpo.score(module.backbone.decode(x0), prompts, with_grad=True), 0.5, 0.7)
    torch.testing.assert_close(loss, dm_loss + hinge)
    assert "reward/srpo" in logs
    (grad,) = torch.autograd.grad(loss - dm_loss, x0)
    assert grad.abs().sum() > 0
