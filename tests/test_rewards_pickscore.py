"""PickScore on a tiny random CLIPModel folder: logit_scale.exp() · cosine, with its processor's bicubic resize."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import MAX_TOKENS, make_tiny_clip
from transformers import AutoTokenizer, CLIPModel

from rdm_lightning.rewards import CLIPScoreReward, build_reward
from rdm_lightning.rewards.clip import CLIP_MEAN, CLIP_STD, PickScoreReward, clip_preprocess, resize_shortest_side

IMAGE_SIZE = 32
PROMPTS = ["a photo of a cat", "a red car", "two dogs playing in the snow"]


@pytest.fixture(scope="module")
def pick_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIPModel with PickScore's temperature (logit_scale = log 100) and the tokenizer copied in."""
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_pickscore"), image_size=IMAGE_SIZE, logit_scale=math.log(100.0))


@pytest.fixture(scope="module")
def pick_reward(pick_folder: Path) -> PickScoreReward:
    return PickScoreReward(str(pick_folder))


@pytest.fixture(scope="module")
def reference_model(pick_folder: Path) -> CLIPModel:
    """The same folder loaded straight with transformers, for independent scores."""
    return CLIPModel.from_pretrained(pick_folder, local_files_only=True, dtype=torch.float32).eval()


def normalised(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def keys_cubic(distance: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel; ``a = -0.5`` is PIL's bicubic."""
    t = distance.abs()
    inner = (a + 2) * t**3 - (a + 3) * t**2 + 1
    outer = a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return torch.where(t < 1, inner, torch.where(t < 2, outer, torch.zeros_like(t)))


def bicubic_halving_interior(images: torch.Tensor) -> torch.Tensor:
    """PIL's antialiased bicubic downscaling by exactly 2, away from the borders: output pixel i
    (centre 2i + 1 in source pixels) weighs pixels 2i-3 .. 2i+4 by the kernel stretched to the
    scale, keys_cubic(offset / 2), normalised; outputs 2 .. n/2 - 3 of each axis."""
    weights = keys_cubic(torch.arange(-3.5, 4.0, 1.0, dtype=images.dtype) / 2)
    weights = weights / weights.sum()

    def along_width(values: torch.Tensor) -> torch.Tensor:
        # Window k of the row from pixel 1 holds pixels 2k+1 .. 2k+8, those of output k + 2.
        return (values[..., 1:].unfold(-1, 8, 2) * weights).sum(-1)

    return along_width(along_width(images).transpose(-1, -2)).transpose(-1, -2)


def pickscore_by_hand(model: CLIPModel, pick_folder: Path, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """PickScore's formula on preprocessed pixels: logit_scale.exp() · cosine, as the diagonal of CLIP's logits."""
    tokenizer = AutoTokenizer.from_pretrained(pick_folder, local_files_only=True)
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        output = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
    return output.logits_per_image.diagonal()


# --- loading and options ------------------------------------------------------------------------


def test_pickscore_is_a_clip_score_with_the_processors_resize_and_77_tokens(pick_reward):
    assert isinstance(pick_reward, CLIPScoreReward) and pick_reward.name == "PickScoreReward"
    assert (pick_reward.logit_scale, pick_reward.interpolation, pick_reward.antialias) == (True, "bicubic", True)
    assert pick_reward.max_tokens == MAX_TOKENS == 77
    assert (pick_reward.train_scale, pick_reward.report_scale) == (1.0, 1.0)


def test_pickscore_builds_from_a_config_with_rtdmds_train_scale(pick_folder):
    spec = {
        "class_path": "rdm_lightning.rewards.clip.PickScoreReward",
        "init_args": {"model_path": str(pick_folder), "name": "pickscore", "train_scale": 1 / 26},
    }
    reward = build_reward(spec)
    assert isinstance(reward, PickScoreReward) and reward.name == "pickscore"
    assert reward.train_scale == pytest.approx(1 / 26)


def test_missing_folder_names_pickscore_and_the_laion_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"yuvalkirstain/PickScore_v1.*laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        PickScoreReward(str(tmp_path / "missing"))


def test_folder_without_a_tokenizer_says_to_copy_the_laion_one(pick_folder, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(pick_folder / name, tmp_path / name)
    with pytest.raises(FileNotFoundError, match=r"lacks tokenizer.json.*tokenizer files of laion/CLIP-ViT-H-14"):
        PickScoreReward(str(tmp_path))


# --- preprocessing ------------------------------------------------------------------------------


def test_antialiased_bicubic_resize_is_pils_kernel_in_closed_form():
    images = torch.rand(2, 3, 64, 96, dtype=torch.float64)
    resized = resize_shortest_side(images, IMAGE_SIZE, mode="bicubic", antialias=True)
    assert resized.shape[-2:] == (32, 48)
    torch.testing.assert_close(resized[..., 2:30, 2:46], bicubic_halving_interior(images))


def test_resize_matches_pil_bicubic_on_float_images():
    """Parity with PIL's bicubic resize on 32-bit float ("F") images, where PIL neither rounds nor clamps."""
    try:
        import numpy as np
        from PIL import Image
    except ImportError as error:
        pytest.skip(f"PIL parity check skipped: PIL is not installed ({error})")
    for height, width, resized in ((64, 96, (48, 32)), (37, 53, (45, 32)), (20, 24, (38, 32))):
        image = torch.rand(height, width)
        expected = np.asarray(Image.fromarray(image.numpy(), mode="F").resize(resized, Image.BICUBIC))
        ours = resize_shortest_side(image[None, None], IMAGE_SIZE, mode="bicubic", antialias=True)[0, 0]
        torch.testing.assert_close(ours, torch.from_numpy(expected.copy()), atol=1e-5, rtol=0)


def test_preprocessing_matches_the_clip_image_processor_on_uint8_images():
    """Parity with transformers' PIL-backed CLIPImageProcessor (PickScore's processor class, shrunk to
    32 px) on smooth uint8 images: equal up to its two uint8 roundings (one per resize pass)."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    except ImportError as error:
        pytest.skip(f"processor parity check skipped: transformers' PIL CLIP image processor is unavailable ({error})")
    processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": 32, "width": 32})
    # Smooth and inside [0.2, 0.8], so that no bicubic overshoot is clamped to the uint8 range.
    smooth = F.interpolate(torch.rand(2, 3, 6, 8), size=(60, 84), mode="bilinear", align_corners=False) * 0.6 + 0.2
    uint8 = (smooth * 255).round().to(torch.uint8)
    expected = processor(images=[image.permute(1, 2, 0).numpy() for image in uint8], return_tensors="pt").pixel_values
    ours = clip_preprocess(uint8.float() / 255, IMAGE_SIZE, mode="bicubic", antialias=True)
    torch.testing.assert_close(ours, expected, atol=1.01 / 255 / min(CLIP_STD), rtol=0)


# --- the score ----------------------------------------------------------------------------------


def test_pickscore_is_the_logit_scaled_cosine_on_bicubically_resized_images(pick_reward, reference_model, pick_folder):
    images = torch.rand(3, 3, 40, 56)
    # 40×56 → 32×44 (antialiased bicubic), then the centre 32 columns from column 6.
    resized = F.interpolate(images, size=(32, 44), mode="bicubic", antialias=True, align_corners=False)
    expected = pickscore_by_hand(reference_model, pick_folder, normalised(resized[..., 6:38]), PROMPTS)
    torch.testing.assert_close(pick_reward.score(images, PROMPTS), expected, atol=1e-4, rtol=1e-5)


def test_pickscore_is_100_times_the_cosine(pick_reward, pick_folder):
    # PickScore_v1's logit_scale.exp() is 100 (CLIP's clamp), as in the tiny model.
    cosine = CLIPScoreReward(str(pick_folder), interpolation="bicubic", antialias=True)
    images = torch.rand(3, 3, 48, 48)
    scale = pick_reward.model.logit_scale.exp()
    torch.testing.assert_close(scale, torch.tensor(100.0))
    scores, cosines = pick_reward.score(images, PROMPTS), cosine.score(images, PROMPTS)
    torch.testing.assert_close(scores, scale * cosines, atol=1e-4, rtol=1e-5)
    assert scores.abs().max() <= 100.0


def test_prompts_are_truncated_to_77_tokens(pick_reward):
    # One token per single-character word: 200 words keep the first 75 between <start> and <end>.
    images = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    long, cut = " ".join(["x"] * 200), " ".join(["x"] * 75)
    torch.testing.assert_close(pick_reward.score(images, [long]), pick_reward.score(images, [cut]), atol=1e-5, rtol=0)


def test_pickscore_gradient_and_no_grad_paths_agree(pick_reward):
    images = torch.rand(2, 3, 40, 56, requires_grad=True)
    plain = pick_reward.score(images, PROMPTS[:2])
    traced = pick_reward.score(images, PROMPTS[:2], with_grad=True)
    torch.testing.assert_close(traced.detach(), plain, atol=1e-4, rtol=0)
    traced.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
