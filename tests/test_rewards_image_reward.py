"""ImageReward on a tiny random checkpoint written in ImageReward.pt's format.

The forward pass below is written out independently of the library, from ImageReward's ``score_gard``
and BLIP's timm ViT and ``med.py`` BERT: explicit attention with the additive −10000 padding mask,
post-norm BERT layers with a cross-attention to every image token, pre-norm ViT blocks with LayerNorm
eps 1e-6, the exact (erf) GELU, the head on the first ([CLS]) token, then (raw − mean) / std.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rdm_lightning.rewards import RewardModel, build_reward
from rdm_lightning.rewards.clip import CLIP_MEAN, CLIP_STD
from rdm_lightning.rewards.image_reward import (
    IMAGE_REWARD_MEAN,
    IMAGE_REWARD_STD,
    UNUSED_CHECKPOINT_KEYS,
    BLIPTextConfig,
    BLIPVisionConfig,
    ImageReward,
    ImageRewardModel,
)
from tiny_rewards import (
    BERT_VOCAB,
    REAL_MED_CONFIG,
    TINY_BLIP_VISION,
    TINY_MED_CONFIG,
    image_reward_shapes,
    import_or_skip,
    random_image_reward_state,
    write_image_reward_files,
)

PROMPTS = ["a photo of a cat", "a red car", "two dogs playing in the snow"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_image_reward_files(tmp_path_factory.mktemp("image_reward"))


@pytest.fixture(scope="module")
def reward(files) -> ImageReward:
    return ImageReward(**{key: str(path) for key, path in files.items()}, vision_architecture=TINY_BLIP_VISION)


# --- the reference computation, by hand ---------------------------------------------------------


def linear(x, state, name):
    return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]


def layer_norm(x, state, name, eps):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps)


def attention(query, key, value, heads, additive_mask=None):
    batch, length, width = query.shape
    split = lambda t: t.reshape(batch, -1, heads, width // heads).permute(0, 2, 1, 3)  # noqa: E731
    scores = split(query) @ split(key).transpose(-1, -2) / math.sqrt(width // heads)
    if additive_mask is not None:
        scores = scores + additive_mask
    return (scores.softmax(-1) @ split(value)).permute(0, 2, 1, 3).reshape(batch, length, width)


def vit_by_hand(pixels, state, vision):
    prefix = "blip.visual_encoder"
    weight = state[f"{prefix}.patch_embed.proj.weight"]
    patch = vision["patch_size"]
    # The patch embedding as an unfold and a matrix product (the convolution with stride = kernel).
    patches = F.unfold(pixels, patch, stride=patch).transpose(1, 2)
    x = patches @ weight.reshape(len(weight), -1).T + state[f"{prefix}.patch_embed.proj.bias"]
    x = torch.cat([state[f"{prefix}.cls_token"].expand(len(x), -1, -1), x], dim=1) + state[f"{prefix}.pos_embed"]
    for index in range(vision["layers"]):
        block = f"{prefix}.blocks.{index}"
        query, key, value = linear(layer_norm(x, state, f"{block}.norm1", 1e-6), state, f"{block}.attn.qkv").chunk(3, -1)
        x = x + linear(attention(query, key, value, vision["heads"]), state, f"{block}.attn.proj")
        h = linear(layer_norm(x, state, f"{block}.norm2", 1e-6), state, f"{block}.mlp.fc1")
        x = x + linear(0.5 * h * (1 + torch.erf(h / math.sqrt(2))), state, f"{block}.mlp.fc2")
    return layer_norm(x, state, f"{prefix}.norm", 1e-6)


def bert_by_hand(input_ids, attention_mask, image_tokens, state, med):
    prefix, eps, heads = "blip.text_encoder", med["layer_norm_eps"], med["num_attention_heads"]
    x = state[f"{prefix}.embeddings.word_embeddings.weight"][input_ids]
    x = x + state[f"{prefix}.embeddings.position_embeddings.weight"][state[f"{prefix}.embeddings.position_ids"][0, : input_ids.shape[1]]]
    x = layer_norm(x, state, f"{prefix}.embeddings.LayerNorm", eps)
    additive = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # med.py's extended attention mask
    for index in range(med["num_hidden_layers"]):
        layer = f"{prefix}.encoder.layer.{index}"
        for kind, context, mask in (("attention", None, additive), ("crossattention", image_tokens, None)):
            source = x if context is None else context
            attended = attention(linear(x, state, f"{layer}.{kind}.self.query"), linear(source, state, f"{layer}.{kind}.self.key"),
                                 linear(source, state, f"{layer}.{kind}.self.value"), heads, mask)
            x = layer_norm(linear(attended, state, f"{layer}.{kind}.output.dense") + x, state, f"{layer}.{kind}.output.LayerNorm", eps)
        h = linear(x, state, f"{layer}.intermediate.dense")
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = layer_norm(linear(h, state, f"{layer}.output.dense") + x, state, f"{layer}.output.LayerNorm", eps)
    return x


def head_by_hand(features, state):
    for index in (0, 2, 4, 6, 7):  # linear maps only: the Dropouts between them are identities at eval
        features = linear(features, state, f"mlp.layers.{index}")
    return features[:, 0]


def token_ids_by_hand(prompt: str) -> tuple[list[int], list[int]]:
    """[CLS] words [SEP], then [PAD] up to 35, on the tiny vocabulary (every test word is one token)."""
    ids = [BERT_VOCAB.index("[CLS]"), *(BERT_VOCAB.index(word) for word in prompt.lower().split()), BERT_VOCAB.index("[SEP]")]
    return ids + [0] * (35 - len(ids)), [1] * len(ids) + [0] * (35 - len(ids))


def preprocess_by_hand(images: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to ``size`` (bicubic, antialiased; the longer side truncated as torchvision's ``Resize``
    computes it), centre crop, OpenAI CLIP normalisation."""
    height, width = images.shape[-2:]
    short, long = sorted((height, width))
    new_long = int(size * long / short)
    target = (size, new_long) if height <= width else (new_long, size)
    resized = F.interpolate(images, size=target, mode="bicubic", align_corners=False, antialias=True)
    top, left = (resized.shape[-2] - size) // 2, (resized.shape[-1] - size) // 2
    cropped = resized[..., top : top + size, left : left + size]
    return (cropped - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def score_by_hand(images: torch.Tensor, prompts: list[str], state: dict[str, torch.Tensor]) -> torch.Tensor:
    pixels = preprocess_by_hand(images, TINY_BLIP_VISION["image_size"])
    tokens = [token_ids_by_hand(prompt) for prompt in prompts]
    input_ids = torch.tensor([ids for ids, _ in tokens])
    mask = torch.tensor([mask for _, mask in tokens])
    hidden = bert_by_hand(input_ids, mask, vit_by_hand(pixels, state, TINY_BLIP_VISION), state, TINY_MED_CONFIG)
    return (head_by_hand(hidden[:, 0], state) - 0.16717362830052426) / 1.0333394966054072


# --- architecture and files ---------------------------------------------------------------------


def test_real_size_model_has_the_published_keys_and_shapes():
    with torch.device("meta"):
        model = ImageRewardModel(BLIPVisionConfig.from_spec("ViT-L/16"), BLIPTextConfig(**{
            key: REAL_MED_CONFIG[key] for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "intermediate_size", "max_position_embeddings", "layer_norm_eps")}))
    vision = dict(image_size=224, patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4.0)
    published = image_reward_shapes(vision, REAL_MED_CONFIG, embed_dim=256)
    assert len(published) == 625
    used = {key: shape for key, shape in published.items() if key not in UNUSED_CHECKPOINT_KEYS}
    assert {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()} == used
    assert sum(tensor.numel() for tensor in model.state_dict().values()) == pytest.approx(446.2e6, rel=1e-3)


def test_tiny_checkpoint_round_trips_in_float32(reward, files):
    state = torch.load(files["checkpoint_path"], weights_only=True)
    loaded = reward.model.state_dict()
    assert set(loaded) == set(state) - set(UNUSED_CHECKPOINT_KEYS)
    for key, tensor in loaded.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, state[key]), key
    assert not any(parameter.requires_grad for parameter in reward.parameters())
    assert isinstance(reward, RewardModel) and reward.differentiable


def test_tokenizer_is_bert_with_blip_tokens_padded_to_35(reward):
    input_ids, mask = reward.tokenize(PROMPTS)
    expected = [token_ids_by_hand(prompt) for prompt in PROMPTS]
    assert input_ids.tolist() == [ids for ids, _ in expected]
    assert mask.tolist() == [m for _, m in expected]
    vocab = len(BERT_VOCAB)
    assert reward.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [vocab, vocab + 1]
    long_ids, long_mask = reward.tokenize(["snow " * 50])
    assert long_ids.shape == (1, 35) and long_mask.sum() == 35 and long_ids[0, -1] == BERT_VOCAB.index("[SEP]")


def test_score_is_the_reference_formula_on_the_same_weights(reward):
    state = random_image_reward_state()
    images = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    expected = score_by_hand(images, PROMPTS, state)
    torch.testing.assert_close(reward.score(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)
    # The published normalisation, applied to the raw head output.
    raw = reward.raw_scores(images, PROMPTS)
    torch.testing.assert_close(reward.score(images, PROMPTS), (raw - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD)
    assert (IMAGE_REWARD_MEAN, IMAGE_REWARD_STD) == (0.16717362830052426, 1.0333394966054072)


def test_score_depends_on_the_image_and_on_the_prompt(reward):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    same_prompt = reward.score(images, ["a photo of a cat"] * 2)
    assert not torch.allclose(same_prompt[0], same_prompt[1])
    swapped = reward.score(images[:1].expand(2, -1, -1, -1), ["a photo of a cat", "a red car"])
    assert not torch.allclose(swapped[0], swapped[1])


def test_gradient_and_no_grad_paths_agree(reward):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    with_grad = reward.score(images, PROMPTS[:2], with_grad=True)
    torch.testing.assert_close(with_grad.detach(), reward.score(images.detach(), PROMPTS[:2]), atol=1e-5, rtol=0)
    with_grad.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_builds_from_the_alias(files):
    spec = {"class_path": "image_reward", "init_args": {
        **{key: str(path) for key, path in files.items()}, "vision_architecture": TINY_BLIP_VISION, "name": "gold_ir"}}
    built = build_reward(spec)
    assert isinstance(built, ImageReward) and built.name == "gold_ir"


# --- errors -------------------------------------------------------------------------------------


def arguments(files, **changes):
    return {**{key: str(path) for key, path in files.items()}, "vision_architecture": TINY_BLIP_VISION, **changes}


def test_missing_files_name_the_file_and_where_it_is_published(files, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pt.*ImageReward\.pt.*THUDM/ImageReward"):
        ImageReward(**arguments(files, checkpoint_path=str(tmp_path / "missing.pt")))
    with pytest.raises(FileNotFoundError, match=r"med_config\.json.*THUDM/ImageReward"):
        ImageReward(**arguments(files, med_config_path=str(tmp_path / "med_config.json")))
    with pytest.raises(FileNotFoundError, match=r"tokenizer folder.*google-bert/bert-base-uncased"):
        ImageReward(**arguments(files, tokenizer_path=str(tmp_path / "bert")))
    (tmp_path / "empty_bert").mkdir()
    with pytest.raises(FileNotFoundError, match=r"neither vocab\.txt nor tokenizer\.json"):
        ImageReward(**arguments(files, tokenizer_path=str(tmp_path / "empty_bert")))


def test_files_that_do_not_fit_are_refused(files, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"not a readable torch checkpoint.*ImageReward\.pt"):
        ImageReward(**arguments(files, checkpoint_path=str(garbage)))
    state = random_image_reward_state()
    wrong_keys = tmp_path / "wrong_keys.pt"
    torch.save({**{k: v for k, v in state.items() if k != "mlp.layers.7.bias"}, "itm_head.weight": torch.zeros(2, 32)},
               wrong_keys)
    with pytest.raises(ValueError, match=r"1 keys missing \['mlp.layers.7.bias'\], 1 unexpected \['itm_head.weight'\]"):
        ImageReward(**arguments(files, checkpoint_path=str(wrong_keys)))
    with pytest.raises(ValueError, match=r"'blip.visual_encoder.pos_embed' has shape \(1, 5, 32\) but ImageReward's "
                                         r"network .* needs \(1, 17, 32\)"):
        ImageReward(**arguments(files, vision_architecture={**TINY_BLIP_VISION, "patch_size": 8}))
    shifted = tmp_path / "shifted_positions.pt"
    torch.save({**state, "blip.text_encoder.embeddings.position_ids": torch.arange(1, 41)[None]}, shifted)
    with pytest.raises(ValueError, match=r"position_ids' must be 0 … 39"):
        ImageReward(**arguments(files, checkpoint_path=str(shifted)))


def test_med_configs_the_encoder_does_not_implement_are_refused(files, tmp_path):
    for change, message in (({"add_cross_attention": False}, "add_cross_attention to False"),
                            ({"hidden_act": "relu"}, "hidden_act to 'relu'"),
                            ({"position_embedding_type": "relative_key"}, "position_embedding_type to 'relative_key'"),
                            ({"max_position_embeddings": 20}, "max_position_embeddings 20, fewer than the 35")):
        path = tmp_path / "med_config.json"
        path.write_text(json.dumps({**TINY_MED_CONFIG, **change}))
        with pytest.raises(ValueError, match=message):
            ImageReward(**arguments(files, med_config_path=str(path)))
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text(json.dumps({key: value for key, value in TINY_MED_CONFIG.items() if key != "hidden_size"}))
    with pytest.raises(ValueError, match=r"lacks the fields \['hidden_size'\]"):
        ImageReward(**arguments(files, med_config_path=str(incomplete)))


def test_a_tokenizer_of_another_size_is_refused(files, tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(BERT_VOCAB[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"has 20 tokens with BLIP's \[DEC\] and \[ENC\] added, but the text encoder "
                                         r"has vocab_size 21"):
        ImageReward(**arguments(files, tokenizer_path=str(folder)))


def test_unknown_vision_architecture_lists_the_presets(files):
    with pytest.raises(ValueError, match=r"unknown BLIP vision architecture 'ViT-B/16'; presets: ViT-L/16"):
        ImageReward(**arguments(files, vision_architecture="ViT-B/16"))
    with pytest.raises(ValueError, match=r"unknown fields \['depth'\]"):
        ImageReward(**arguments(files, vision_architecture={"depth": 2}))


# --- optional parity with the reference package -------------------------------------------------

PARITY_FILES = "RDM_IMAGE_REWARD_FILES"
"""A folder holding the public ImageReward.pt, med_config.json and a bert-base-uncased/ tokenizer folder."""


def test_parity_with_the_image_reward_package():
    package = import_or_skip("ImageReward")
    folder = os.environ.get(PARITY_FILES)
    if not folder:
        reason = f"{PARITY_FILES} is not set to a folder with the public ImageReward files; parity is not checked"
        print(reason)
        pytest.skip(reason)
    folder = Path(folder)
    reference = package.ImageReward.ImageReward(med_config=str(folder / "med_config.json"), device="cpu").eval()
    reference.load_state_dict(torch.load(folder / "ImageReward.pt", map_location="cpu"), strict=False)
    ours = ImageReward(str(folder / "ImageReward.pt"), str(folder / "med_config.json"), str(folder / "bert-base-uncased"))
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    pixels = (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    input_ids, mask = ours.tokenize(PROMPTS[:2])
    with torch.no_grad():
        expected = reference.score_gard(input_ids, mask, pixels).reshape(-1)
    torch.testing.assert_close(ours.score(images, PROMPTS[:2]), expected, rtol=1e-3, atol=1e-4)
