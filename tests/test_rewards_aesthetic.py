"""The LAION aesthetic predictor on a tiny random CLIPModel folder and an MLP file in the published layout."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_tiny_clip
from tiny_rewards import published_shapes, random_mlp_state, write_aesthetic_mlp
from transformers import CLIPModel

from rdm_lightning.rewards import build_reward
from rdm_lightning.rewards.aesthetic import AestheticMLP, AestheticReward
from rdm_lightning.rewards.clip import CLIP_MEAN, CLIP_STD

IMAGE_SIZE = 32
EMBEDDING_DIM = 16  # the tiny CLIP's projection width; ViT-L/14's is 768
PROMPTS = ["a photo of a cat", "a red car", "two dogs playing in the snow"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIPModel snapshot without tokenizer files: the aesthetic score needs none."""
    full = make_tiny_clip(tmp_path_factory.mktemp("tiny_clip_full"), image_size=IMAGE_SIZE, projection_dim=EMBEDDING_DIM)
    folder = tmp_path_factory.mktemp("tiny_clip_vision")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(full / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("aesthetic") / "sac+logos+ava1-l14-linearMSE.pth"
    return write_aesthetic_mlp(path, EMBEDDING_DIM)


@pytest.fixture(scope="module")
def aesthetic(clip_folder: Path, mlp_path: Path) -> AestheticReward:
    return AestheticReward(str(clip_folder), str(mlp_path))


def aesthetic_by_hand(clip_folder: Path, mlp_path: Path, images: torch.Tensor, resized: tuple[int, int], left: int):
    """The reference on the same weights, in plain ops: antialiased bicubic resize, centre crop at
    column ``left``, OpenAI normalisation, vision tower, projection, L2 norm, then the five affine maps."""
    model = CLIPModel.from_pretrained(clip_folder, local_files_only=True, dtype=torch.float32).eval()
    state = torch.load(mlp_path, weights_only=True)
    pixels = F.interpolate(images, size=resized, mode="bicubic", antialias=True, align_corners=False)
    pixels = pixels[..., left : left + IMAGE_SIZE]
    pixels = (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        embedding = pooled @ model.visual_projection.weight.T
        hidden = embedding / embedding.norm(dim=-1, keepdim=True)
        for index in (0, 2, 4, 6, 7):
            hidden = hidden @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    return hidden.squeeze(-1)


# --- the MLP layout -----------------------------------------------------------------------------


def test_real_size_mlp_has_the_published_keys_and_shapes():
    with torch.device("meta"):
        mlp = AestheticMLP()
    assert {key: tuple(tensor.shape) for key, tensor in mlp.state_dict().items()} == published_shapes(768)


# --- the score ----------------------------------------------------------------------------------


def test_score_is_the_mlp_on_the_normalised_clip_embedding(aesthetic, clip_folder, mlp_path):
    images = torch.rand(3, 3, 40, 56)
    # 40×56 → 32×44, then the centre 32 columns from column 6.
    expected = aesthetic_by_hand(clip_folder, mlp_path, images, (32, 44), 6)
    torch.testing.assert_close(aesthetic.score(images, PROMPTS), expected, atol=1e-4, rtol=1e-5)


def test_score_ignores_the_prompts(aesthetic):
    images = torch.rand(2, 3, 48, 48)
    torch.testing.assert_close(aesthetic.score(images, PROMPTS[:2]), aesthetic.score(images, ["", "anything else"]))


def test_gradient_and_no_grad_paths_agree(aesthetic):
    images = torch.rand(2, 3, 40, 56, requires_grad=True)
    plain = aesthetic.score(images, PROMPTS[:2])
    traced = aesthetic.score(images, PROMPTS[:2], with_grad=True)
    torch.testing.assert_close(traced.detach(), plain, atol=1e-5, rtol=0)
    traced.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_keeps_only_the_image_side_of_clip_frozen_in_float32(aesthetic):
    prefixes = {key.split(".")[0] for key in aesthetic.state_dict()}
    assert prefixes == {"vision_model", "visual_projection", "mlp"}
    assert all(parameter.dtype == torch.float32 and not parameter.requires_grad for parameter in aesthetic.parameters())
    assert not any(module.training for module in aesthetic.modules())


def test_builds_from_a_config(clip_folder, mlp_path):
    spec = {
        "class_path": "rdm_lightning.rewards.aesthetic.AestheticReward",
        "init_args": {"clip_model_path": str(clip_folder), "mlp_path": str(mlp_path), "name": "aesthetic"},
    }
    reward = build_reward(spec)
    assert isinstance(reward, AestheticReward) and reward.name == "aesthetic" and reward.differentiable


# --- errors -------------------------------------------------------------------------------------


def test_missing_mlp_file_names_it_and_where_it_is_published(clip_folder, tmp_path):
    missing = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    with pytest.raises(FileNotFoundError, match=r"not found at .*linearMSE\.pth.*github\.com/christophschuhmann"):
        AestheticReward(str(clip_folder), str(missing))


def test_missing_or_incomplete_clip_folder_is_refused(clip_folder, mlp_path, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not found at .*openai/clip-vit-large-patch14"):
        AestheticReward(str(tmp_path / "none"), str(mlp_path))
    shutil.copy(clip_folder / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"lacks config.json; expected a snapshot of .*clip-vit-large-patch14"):
        AestheticReward(str(tmp_path), str(mlp_path))


def test_a_vision_only_config_is_refused(clip_folder, mlp_path, tmp_path):
    config = json.loads((clip_folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "clip_vision_model"}))
    shutil.copy(clip_folder / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"has model_type 'clip_vision_model', not 'clip'"):
        AestheticReward(str(tmp_path), str(mlp_path))


def test_wrong_keys_are_named(clip_folder, tmp_path):
    state = random_mlp_state(EMBEDDING_DIM)
    state["model.layers.0.weight"] = state.pop("layers.0.weight")
    del state["layers.7.bias"]
    torch.save(state, tmp_path / "mlp.pth")
    message = r"lack keys \['layers.0.weight', 'layers.7.bias'\] and have unexpected keys \['model.layers.0.weight'\]"
    with pytest.raises(ValueError, match=message):
        AestheticReward(str(clip_folder), str(tmp_path / "mlp.pth"))


def test_embedding_width_mismatch_is_explained(clip_folder, tmp_path):
    torch.save(random_mlp_state(768), tmp_path / "mlp.pth")
    message = r"width \(768,\) \(layers.0.weight \(1024, 768\)\).*have width 16.*CLIP ViT-L/14"
    with pytest.raises(ValueError, match=message):
        AestheticReward(str(clip_folder), str(tmp_path / "mlp.pth"))


def test_a_wrong_inner_shape_is_named(clip_folder, tmp_path):
    state = random_mlp_state(EMBEDDING_DIM)
    state["layers.4.weight"] = torch.zeros(64, 100)
    torch.save(state, tmp_path / "mlp.pth")
    with pytest.raises(ValueError, match=r"wrong shapes: layers.4.weight \(64, 100\) \(expected \(64, 128\)\)"):
        AestheticReward(str(clip_folder), str(tmp_path / "mlp.pth"))


def test_files_that_are_not_state_dicts_are_refused(clip_folder, tmp_path):
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"(?s)torch.load cannot read .*text.pth.*sac\+logos\+ava1-l14-linearMSE.pth"):
        AestheticReward(str(clip_folder), str(tmp_path / "text.pth"))
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"holds a list, not a state dict of tensors"):
        AestheticReward(str(clip_folder), str(tmp_path / "list.pth"))
