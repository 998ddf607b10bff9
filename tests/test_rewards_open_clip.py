"""HPSv2 and DFN5B-CLIP rewards on tiny random open_clip checkpoints written in the published formats.

The expected state-dict layout, the BPE vocabulary ids and the forward pass are written out
here independently of the library (from open_clip's model.py / transformer.py / tokenizer.py).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from jsonargparse import ArgumentParser

import rdm_lightning.rewards.open_clip as open_clip_rewards
from rdm_lightning.rewards import RewardModel, SRPOReward
from rdm_lightning.rewards.clip import CLIP_MEAN, CLIP_STD
from tiny_rewards import (
    BYTE_TOKENS,
    CONTEXT,
    END_ID,
    START_ID,
    TINY,
    TINY_QUICK,
    TINY_SHAPES,
    VOCAB_SIZE,
    expected_open_clip_shapes,
    import_or_skip,
    random_state_dict,
    write_bpe,
    write_dfn_checkpoint,
    write_hps_checkpoint,
)

from rdm_lightning.rewards.open_clip import (
    OPEN_CLIP_PRESETS,
    DFNCLIPReward,
    HPSv2Reward,
    OpenCLIPConfig,
    OpenCLIPModel,
    OpenCLIPTokenizer,
    open_clip_preprocess,
)

pytestmark = pytest.mark.filterwarnings("ignore:ftfy is not installed")

PROMPTS = ["hello world", "a red car", "two dogs playing in the snow"]


# --- independent expectations --------------------------------------------------------------------


def byte_token_id(byte: int) -> int:
    """Vocabulary id of a byte: printable Latin-1 bytes first in order (33-126, 161-172, 174-255)."""
    for start, stop, offset in ((33, 126, 0), (161, 172, 94), (174, 255, 106)):
        if start <= byte <= stop:
            return offset + byte - start
    raise AssertionError(f"byte {byte} is not printable")


def word_ids(word: str) -> list[int]:
    """Ids of an unmerged ASCII-or-Latin-1 word: one token per byte, the last with </w>."""
    ids = [byte_token_id(byte) for byte in word.encode("utf-8")]
    return [*ids[:-1], BYTE_TOKENS + ids[-1]]


def layer_norm(x, state, key):
    return F.layer_norm(x, x.shape[-1:], state[f"{key}.weight"], state[f"{key}.bias"], eps=1e-5)


def block_by_hand(x, state, block, heads, causal, quick_gelu):
    """x + softmax(QKᵀ/√d + mask)V·Woᵀ, then x + W2·act(W1·ln(x)), with explicit matrices."""
    batch, length, width = x.shape
    head = width // heads
    h = layer_norm(x, state, f"{block}.ln_1")
    qkv = h @ state[f"{block}.attn.in_proj_weight"].T + state[f"{block}.attn.in_proj_bias"]
    q, k, v = (part.reshape(batch, length, heads, head).transpose(1, 2) for part in qkv.chunk(3, dim=-1))
    logits = q @ k.transpose(-1, -2) / math.sqrt(head)
    if causal:
        logits = logits + torch.full((length, length), float("-inf")).triu(1)
    attended = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, width)
    x = x + attended @ state[f"{block}.attn.out_proj.weight"].T + state[f"{block}.attn.out_proj.bias"]
    h = layer_norm(x, state, f"{block}.ln_2") @ state[f"{block}.mlp.c_fc.weight"].T + state[f"{block}.mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h) if quick_gelu else 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return x + h @ state[f"{block}.mlp.c_proj.weight"].T + state[f"{block}.mlp.c_proj.bias"]


def image_features_by_hand(state, pixels, quick_gelu=False):
    patches = F.conv2d(pixels, state["visual.conv1.weight"], stride=8).flatten(2).transpose(1, 2)
    cls = state["visual.class_embedding"].expand(len(pixels), 1, -1)
    x = layer_norm(torch.cat([cls, patches], 1) + state["visual.positional_embedding"], state, "visual.ln_pre")
    for index in range(2):
        x = block_by_hand(x, state, f"visual.transformer.resblocks.{index}", 2, False, quick_gelu)
    return F.normalize(layer_norm(x[:, 0], state, "visual.ln_post") @ state["visual.proj"], dim=-1)


def text_features_by_hand(state, token_ids, quick_gelu=False):
    x = state["token_embedding.weight"][token_ids] + state["positional_embedding"]
    for index in range(2):
        x = block_by_hand(x, state, f"transformer.resblocks.{index}", 2, True, quick_gelu)
    x = layer_norm(x, state, "ln_final")
    end = (token_ids == END_ID).int().argmax(dim=-1)  # the first end-of-text token
    return F.normalize(x[torch.arange(len(x)), end] @ state["text_projection"], dim=-1)


def normalised(pixels):
    return (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("open_clip")
    bpe = write_bpe(folder / "bpe_simple_vocab_16e6.txt.gz")
    hps = write_hps_checkpoint(folder / "HPS_v2.1_compressed.pt")
    dfn = write_dfn_checkpoint(folder / "open_clip_pytorch_model.bin")
    return {"bpe": bpe, "hps": hps, "dfn": dfn, "folder": folder}


@pytest.fixture(scope="module")
def hps(files) -> HPSv2Reward:
    return HPSv2Reward(str(files["hps"]), bpe_path=str(files["bpe"]), architecture=TINY)


@pytest.fixture(scope="module")
def dfn(files) -> DFNCLIPReward:
    return DFNCLIPReward(str(files["dfn"]), bpe_path=str(files["bpe"]), architecture=TINY_QUICK)


@pytest.fixture(scope="module")
def tokenizer(files) -> OpenCLIPTokenizer:
    return OpenCLIPTokenizer(files["bpe"])


# --- architecture -------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["ViT-H-14", "ViT-H-14-quickgelu"])
def test_real_size_state_dict_has_open_clip_vit_h_14_keys_and_shapes(preset):
    with torch.device("meta"):
        model = OpenCLIPModel(OPEN_CLIP_PRESETS[preset])
    shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    assert shapes == expected_open_clip_shapes(1024, 224, 14, 1280, 32, 1024, 24, 77, 49408)
    assert len(shapes) == 686
    # open_clip's model profile: ViT-H-14 has 632.08M image and 986.11M parameters in all.
    assert round(sum(math.prod(shape) for key, shape in shapes.items() if key.startswith("visual.")) / 1e6, 2) == 632.08
    assert round(sum(math.prod(shape) for shape in shapes.values()) / 1e6, 2) == 986.11


def test_presets_differ_only_in_the_activation():
    gelu, quick = OPEN_CLIP_PRESETS["ViT-H-14"], OPEN_CLIP_PRESETS["ViT-H-14-quickgelu"]
    assert (gelu.quick_gelu, quick.quick_gelu) == (False, True)
    assert (gelu.vision_heads, gelu.grid_size, gelu.text_heads, gelu.context_length) == (16, 16, 16, 77)


@pytest.mark.parametrize(
    ("architecture", "message"),
    [("ViT-Z-99", r"unknown OpenCLIP architecture 'ViT-Z-99'; presets: ViT-H-14, ViT-H-14-quickgelu"),
     ({**TINY, "depth": 3}, r"unknown fields \['depth'\]"),
     ({key: value for key, value in TINY.items() if key != "embed_dim"}, r"lacks \['embed_dim'\]"),
     ({**TINY, "patch_size": 5}, r"patch_size \(5\) must divide image_size \(32\)"),
     ({**TINY, "text_layers": 0}, r"text_layers must be a positive integer, got 0"),
     ({**TINY, "quick_gelu": 1}, r"quick_gelu must be a bool"),
     (3, r"architecture must be a preset name")],
)
def test_bad_architectures_are_refused(architecture, message):
    with pytest.raises(ValueError, match=message):
        OpenCLIPConfig.from_spec(architecture)


# --- tokenizer ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("hello world", [512 + 3, 512 + 7]),
        # Cleaning lowercases and collapses whitespace; punctuation runs are one word.
        ("  Hello,\n\t WORLD!!  ", [512 + 3, *word_ids(","), 512 + 7, *word_ids("!!")]),
        # Contractions and single digits split off.
        ("it's 42", [*word_ids("it"), *word_ids("'s"), *word_ids("4"), *word_ids("2")]),
        # HTML entities are unescaped; non-ASCII letters are UTF-8 bytes (é = c3 a9).
        ("café &amp; tea", [*word_ids("café"), *word_ids("&"), *word_ids("tea")]),
        # The special tokens are recognised in the text, as by open_clip.
        ("hello <end_of_text>", [512 + 3, END_ID]),
    ],
)
def test_tokenizer_encodes_as_open_clip_s_simple_tokenizer(tokenizer, text, ids):
    assert tokenizer.encode(text) == ids


def test_tokenizer_rows_are_start_ids_end_and_zero_padding(tokenizer):
    rows = tokenizer(["hello world", "a " * 100])
    assert rows.shape == (2, CONTEXT) and rows.dtype == torch.long
    assert rows[0, :4].tolist() == [START_ID, 512 + 3, 512 + 7, END_ID] and rows[0, 4:].eq(0).all()
    # Truncated to the context length with the end token kept last.
    assert rows[1].tolist() == [START_ID, *[BYTE_TOKENS + byte_token_id(ord("a"))] * (CONTEXT - 2), END_ID]
    assert tokenizer.vocab_size == VOCAB_SIZE


def test_tokenizer_keeps_only_open_clip_s_number_of_merges(files, monkeypatch):
    monkeypatch.setattr(open_clip_rewards, "BPE_MERGE_COUNT", 3)
    short = OpenCLIPTokenizer(files["bpe"])
    assert short.vocab_size == 2 * BYTE_TOKENS + 3 + 2
    assert short.encode("hello") == [2 * BYTE_TOKENS + 2, BYTE_TOKENS + byte_token_id(ord("o"))]


def test_tokenizer_finds_the_bpe_file_in_an_installed_package_without_importing_it(files, tmp_path, monkeypatch):
    package = tmp_path / "fake_open_clip_package"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (package / "bpe_simple_vocab_16e6.txt.gz").write_bytes(files["bpe"].read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(open_clip_rewards, "BPE_PACKAGES", (("fake_open_clip_package", ""),))
    found = OpenCLIPTokenizer()
    assert found.bpe_path == package / "bpe_simple_vocab_16e6.txt.gz" and found.vocab_size == VOCAB_SIZE
    assert "fake_open_clip_package" not in sys.modules


def test_missing_bpe_file_says_where_to_get_it(files, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"no_vocab.txt.gz.*bpe_simple_vocab_16e6.txt.gz from https://github"):
        OpenCLIPTokenizer(tmp_path / "no_vocab.txt.gz")
    monkeypatch.setattr(open_clip_rewards, "BPE_PACKAGES", (("no_such_package_here", ""),))
    with pytest.raises(FileNotFoundError, match=r"pass bpe_path=.*pip install --no-deps open_clip_torch"):
        HPSv2Reward(str(files["hps"]), architecture=TINY)


def test_malformed_bpe_files_are_refused(tmp_path):
    plain = tmp_path / "plain.txt.gz"
    plain.write_text("not gzip")
    with pytest.raises(ValueError, match=r"not a gzip-compressed BPE text file"):
        OpenCLIPTokenizer(plain)
    headless = tmp_path / "headless.txt.gz"
    headless.write_bytes(gzip.compress(b"h e\nl l"))
    with pytest.raises(ValueError, match=r"does not start with a BPE '#version' header"):
        OpenCLIPTokenizer(headless)


@pytest.mark.filterwarnings("default:ftfy is not installed")
def test_tokenizer_warns_when_it_cannot_apply_ftfy(files):
    if importlib.util.find_spec("ftfy") is not None:
        pytest.skip("ftfy is installed, so the tokenizer applies ftfy.fix_text as open_clip does")
    with pytest.warns(UserWarning, match=r"ftfy is not installed.*pip install ftfy"):
        OpenCLIPTokenizer(files["bpe"])


# --- preprocessing ------------------------------------------------------------------------------


def test_pad_mode_centre_pads_with_black_before_normalising():
    # Longer side already 32: no resize, 4 black rows above and below.
    images = torch.rand(2, 3, 24, 32)
    canvas = torch.zeros(2, 3, 32, 32)
    canvas[:, :, 4:28] = images
    torch.testing.assert_close(open_clip_preprocess(images, 32, "pad"), normalised(canvas))


def test_pad_mode_rounds_the_resized_side_and_splits_odd_padding_low_first():
    # 50×64 → 25×32 (scale 0.5); 7 rows of padding: 3 above, 4 below. A constant image stays constant.
    value = 0.6
    out = open_clip_preprocess(torch.full((1, 3, 50, 64), value), 32, "pad")
    expected = torch.zeros(1, 3, 32, 32)
    expected[:, :, 3:28] = value
    torch.testing.assert_close(out, normalised(expected), atol=1e-5, rtol=0)


def test_squash_mode_resizes_both_sides_and_keeps_a_model_size_image():
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(open_clip_preprocess(images, 32, "squash"), normalised(images))
    out = open_clip_preprocess(torch.full((1, 1, 40, 64), 0.3), 32, "squash")
    torch.testing.assert_close(out, normalised(torch.full((1, 3, 32, 32), 0.3)), atol=1e-5, rtol=0)


def test_preprocessing_refuses_bad_inputs():
    with pytest.raises(ValueError, match=r"RGB \(B, 3, H, W\) or grey \(B, 1, H, W\).*\(1, 4, 32, 32\)"):
        open_clip_preprocess(torch.rand(1, 4, 32, 32), 32, "pad")
    with pytest.raises(ValueError, match=r"resize_mode must be one of \('pad', 'squash'\), got 'crop'"):
        open_clip_preprocess(torch.rand(1, 3, 32, 32), 32, "crop")


# --- scores -------------------------------------------------------------------------------------


def test_hps_loads_the_nested_float16_checkpoint_in_float32(hps, files):
    state = torch.load(files["hps"], weights_only=True)["state_dict"]
    loaded = hps.model.state_dict()
    assert set(loaded) == set(TINY_SHAPES)
    assert all(tensor.dtype == torch.float32 for tensor in loaded.values())
    torch.testing.assert_close(loaded["visual.proj"], state["visual.proj"].float())
    assert hps.report_scale == 100.0 and hps.differentiable


def test_hps_score_is_the_cosine_of_the_reference_embeddings(hps, files, tokenizer):
    state = {key: value.float() for key, value in torch.load(files["hps"], weights_only=True)["state_dict"].items()}
    images = torch.rand(3, 3, 32, 32)
    text = text_features_by_hand(state, tokenizer(PROMPTS))
    expected = (image_features_by_hand(state, normalised(images)) * text).sum(-1)
    scores = hps.score(images, PROMPTS)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert scores.abs().max() <= 1.0


def test_hps_pads_non_square_images_in_its_score(hps, files, tokenizer):
    state = {key: value.float() for key, value in torch.load(files["hps"], weights_only=True)["state_dict"].items()}
    images = torch.rand(2, 3, 32, 24)
    canvas = torch.zeros(2, 3, 32, 32)
    canvas[..., 4:28] = images
    text = text_features_by_hand(state, tokenizer(PROMPTS[:2]))
    expected = (image_features_by_hand(state, normalised(canvas)) * text).sum(-1)
    torch.testing.assert_close(hps.score(images, PROMPTS[:2]), expected, atol=1e-5, rtol=0)


def test_dfn_score_uses_quick_gelu_on_the_bare_state_dict(dfn, files, tokenizer):
    state = torch.load(files["dfn"], weights_only=True)
    images = torch.rand(3, 3, 32, 32)
    text = text_features_by_hand(state, tokenizer(PROMPTS), quick_gelu=True)
    expected = (image_features_by_hand(state, normalised(images), quick_gelu=True) * text).sum(-1)
    torch.testing.assert_close(dfn.score(images, PROMPTS), expected, atol=1e-5, rtol=0)
    gelu = DFNCLIPReward(str(files["dfn"]), bpe_path=str(files["bpe"]), architecture=TINY)
    assert not torch.allclose(gelu.score(images, PROMPTS), expected, atol=1e-4)


def test_prompt_prefix_is_joined_with_a_space_when_scoring_only(hps, files):
    prefixed = HPSv2Reward(str(files["hps"]), bpe_path=str(files["bpe"]), architecture=TINY,
                           prompt_prefix="Realistic photo")
    images = torch.rand(3, 3, 32, 32)
    expected = hps.score(images, [f"Realistic photo {prompt}" for prompt in PROMPTS])
    torch.testing.assert_close(prefixed.score(images, PROMPTS), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(prefixed.embed_texts(PROMPTS), hps.embed_texts(PROMPTS))


@pytest.mark.parametrize("resize_mode", ["pad", "squash"])
def test_gradient_and_no_grad_paths_agree(files, resize_mode):
    reward = HPSv2Reward(str(files["hps"]), bpe_path=str(files["bpe"]), architecture=TINY, resize_mode=resize_mode)
    images = torch.rand(3, 3, 40, 56, requires_grad=True)
    plain = reward.score(images, PROMPTS)
    traced = reward.score(images, PROMPTS, with_grad=True)
    torch.testing.assert_close(traced.detach(), plain, atol=1e-5, rtol=0)
    traced.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_hps_is_an_srpo_scorer(hps):
    images = torch.rand(3, 3, 32, 32)
    srpo = SRPOReward(hps, positive_words=["Realistic"], negative_words=["Oil"])
    with torch.no_grad():
        positive = hps.embed_texts([f"Realistic. {prompt}" for prompt in PROMPTS])
        negative = hps.embed_texts([f"Oil. {prompt}" for prompt in PROMPTS])
        expected = (hps.embed_images(images) * (1.1 * positive - negative)).sum(-1)
    torch.testing.assert_close(srpo.score(images, PROMPTS), expected, atol=1e-5, rtol=0)
    embeddings = hps.embed_images(torch.rand(2, 1, 40, 40))
    assert embeddings.shape == (2, 16)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))


def test_rewards_are_frozen(hps):
    hps.train()
    assert not any(parameter.requires_grad for parameter in hps.parameters())
    assert not any(module.training for module in hps.modules())


# --- checkpoint errors --------------------------------------------------------------------------


def test_missing_checkpoint_names_the_file_and_where_it_is_published(files, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent.pt.*HPS_v2.1_compressed.pt .*xswu/HPSv2"):
        HPSv2Reward(str(tmp_path / "absent.pt"), bpe_path=str(files["bpe"]), architecture=TINY)
    with pytest.raises(FileNotFoundError, match=r"absent.bin.*open_clip_pytorch_model.bin .*apple/DFN5B-CLIP-ViT-H-14"):
        DFNCLIPReward(str(tmp_path / "absent.bin"), bpe_path=str(files["bpe"]), architecture=TINY_QUICK)


def test_hps_refuses_a_file_without_state_dict(files):
    # The bare DFN state dict is not HPSv2's format.
    with pytest.raises(ValueError, match=r"has no 'state_dict' entry.*xswu/HPSv2"):
        HPSv2Reward(str(files["dfn"]), bpe_path=str(files["bpe"]), architecture=TINY)


def test_dfn_refuses_a_nested_checkpoint(files):
    with pytest.raises(ValueError, match=r"does not hold a state dict of tensors.*a bare state dict"):
        DFNCLIPReward(str(files["hps"]), bpe_path=str(files["bpe"]), architecture=TINY_QUICK)


def test_wrong_keys_are_named(files, tmp_path):
    state = random_state_dict(2)
    del state["visual.proj"]
    state["visual.attn_pool.query"] = torch.zeros(1)
    path = tmp_path / "wrong_keys.bin"
    torch.save(state, path)
    message = r"1 keys missing \['visual.proj'\], 1 unexpected \['visual.attn_pool.query'\]"
    with pytest.raises(ValueError, match=message):
        DFNCLIPReward(str(path), bpe_path=str(files["bpe"]), architecture=TINY_QUICK)


def test_wrong_shapes_and_unreadable_files_are_refused(files, tmp_path):
    state = random_state_dict(3)
    state["text_projection"] = torch.zeros(32, 8)
    path = tmp_path / "wrong_shape.bin"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"'text_projection' has shape \(32, 8\) but .* needs \(32, 16\)"):
        DFNCLIPReward(str(path), bpe_path=str(files["bpe"]), architecture=TINY_QUICK)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match=r"not a readable torch checkpoint"):
        HPSv2Reward(str(garbage), bpe_path=str(files["bpe"]), architecture=TINY)


def test_other_bad_arguments_are_refused(files):
    common = dict(bpe_path=str(files["bpe"]), architecture=TINY)
    with pytest.raises(ValueError, match=r"gives 522 tokens but the architecture has vocab_size 49408"):
        HPSv2Reward(str(files["hps"]), bpe_path=str(files["bpe"]), architecture={**TINY, "vocab_size": 49408})
    with pytest.raises(ValueError, match=r"prompt_prefix must be a non-empty string or None"):
        HPSv2Reward(str(files["hps"]), prompt_prefix=" ", **common)
    with pytest.raises(ValueError, match=r"resize_mode must be one of"):
        HPSv2Reward(str(files["hps"]), resize_mode="crop", **common)


# --- optional parity with the reference packages ------------------------------------------------


def test_parity_with_open_clip_model_and_tokenizer(hps, files):
    open_clip = import_or_skip("open_clip")
    reference = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8),
        text_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB_SIZE, width=32, heads=2, layers=2),
        quick_gelu=False,
    ).eval()
    state = torch.load(files["hps"], weights_only=True)["state_dict"]
    reference.load_state_dict({key: value.float() for key, value in state.items()})
    reference_tokenizer = open_clip.tokenizer.SimpleTokenizer(bpe_path=str(files["bpe"]))
    tokens = reference_tokenizer(PROMPTS)
    assert torch.equal(tokens, hps.tokenizer(PROMPTS))
    pixels = normalised(torch.rand(3, 3, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(hps.model.encode_image(pixels), reference.encode_image(pixels), atol=1e-5, rtol=0)
        torch.testing.assert_close(hps.model.encode_text(tokens), reference.encode_text(tokens), atol=1e-5, rtol=0)


def test_parity_with_open_clip_tokenize_on_the_real_vocabulary():
    open_clip = import_or_skip("open_clip")
    texts = ["A photo of a cat", "Don't   stop &amp; smile!!", "café 1234 naïve", "x " * 120]
    assert torch.equal(OpenCLIPTokenizer()(texts), open_clip.tokenize(texts))


def test_parity_with_open_clip_resize_max_size():
    transform = import_or_skip("open_clip.transform")
    functional = import_or_skip("torchvision.transforms.functional")
    image = (torch.rand(3, 60, 90) * 255).round().to(torch.uint8)
    reference = functional.to_tensor(transform.ResizeMaxSize(32)(functional.to_pil_image(image)))
    ours = open_clip_preprocess(image[None].float() / 255, 32, "pad")[0] * torch.tensor(CLIP_STD).view(3, 1, 1)
    ours = ours + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    # PIL resizes uint8 and clamps; the tensor path does neither.
    torch.testing.assert_close(ours.clamp(0, 1), reference, atol=3 / 255, rtol=0)


def test_rewards_parse_from_a_method_config(files):
    # As LightningCLI parses `rewards:`; the architecture dict is how a config names a custom size.
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--rewards", type=list[RewardModel])
    common = {"bpe_path": str(files["bpe"])}
    specs = [
        {"class_path": "rdm_lightning.rewards.open_clip.HPSv2Reward",
         "init_args": {"checkpoint_path": str(files["hps"]), "architecture": TINY, "prompt_prefix": "Realistic photo",
                       "name": "hps", **common}},
        {"class_path": "rdm_lightning.rewards.open_clip.DFNCLIPReward",
         "init_args": {"checkpoint_path": str(files["dfn"]), "architecture": TINY_QUICK, **common}},
    ]
    hps_reward, dfn_reward = parser.instantiate(parser.parse_args([f"--rewards={json.dumps(specs)}"])).rewards
    assert isinstance(hps_reward, HPSv2Reward) and hps_reward.name == "hps"
    assert hps_reward.prompt_prefix == "Realistic photo" and hps_reward.model.config == OpenCLIPConfig(**TINY)
    assert isinstance(dfn_reward, DFNCLIPReward) and dfn_reward.model.config.quick_gelu
