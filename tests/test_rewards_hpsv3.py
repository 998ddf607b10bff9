"""HPSv3 on a tiny random Qwen2-VL and reward head written in HPSv3.safetensors' layout (tests/tiny_hpsv3.py).

The expectations are computed independently of the library: the published key layout enumerated by hand,
the chat text rendered by transformers from Qwen2-VL-7B-Instruct's Jinja chat template around HPSv3's
instruction (both copied here verbatim from the published files), the patches made by transformers'
``Qwen2VLImageProcessorPil`` and the resize by PIL, and the score by transformers' ``Qwen2VLForConditionalGeneration``
run as HPSv3's ``Qwen2VLRewardModelBT.forward`` runs it, with the reward head applied by hand.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_hpsv3 import (
    HPSV3_VOCAB,
    QWEN2_VL_7B_CONFIG,
    REWARD_TOKEN_ID,
    TINY_PIXELS,
    TOKEN_IDS,
    public_layout,
    random_hpsv3_state,
    tiny_config,
    write_hpsv3_checkpoint,
    write_qwen2_vl_folder,
)
from tiny_rewards import import_or_skip
from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from rdm_lightning.rewards import HPSv3Reward, build_reward
from rdm_lightning.rewards.clip import CLIP_MEAN, CLIP_STD
from rdm_lightning.rewards.hpsv3 import (
    HPSV3_PIXELS,
    hpsv3_checkpoint_shapes,
    hpsv3_pixels,
    hpsv3_text,
    qwen2_vl_patches,
    read_base_config,
    smart_resize,
)

PROMPTS = ["a cat", "a red car parked on a wet street at night", "two {dogs} & a ball"]

# Qwen/Qwen2-VL-7B-Instruct's chat_template.json.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
# MizzenAI/HPSv3 hpsv3/dataset/data_collator_qwen.py, INSTRUCTION and prompt_with_special_token (trailing spaces kept).
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""  # noqa: W291
PROMPT_WITH_SPECIAL_TOKEN = """
Please provide the overall ratings of this image: <|Reward|>

END
"""



def hpsv3_keys_by_hand(vocab: int) -> dict[str, tuple[int, ...]]:
    """HPSv3.safetensors' keys and shapes (transformers 4.45's Qwen2VLForConditionalGeneration + rm_head)."""
    shapes: dict[str, tuple[int, ...]] = {"visual.patch_embed.proj.weight": (1280, 3, 2, 14, 14)}
    for i in range(32):
        block = f"visual.blocks.{i}"
        for name, shape in (("norm1", (1280,)), ("norm2", (1280,)), ("attn.qkv", (3840, 1280)),
                            ("attn.proj", (1280, 1280)), ("mlp.fc1", (5120, 1280)), ("mlp.fc2", (1280, 5120))):
            shapes[f"{block}.{name}.weight"] = shape
            shapes[f"{block}.{name}.bias"] = shape[:1]
    shapes.update({"visual.merger.ln_q.weight": (1280,), "visual.merger.ln_q.bias": (1280,),
                   "visual.merger.mlp.0.weight": (5120, 5120), "visual.merger.mlp.0.bias": (5120,),
                   "visual.merger.mlp.2.weight": (3584, 5120), "visual.merger.mlp.2.bias": (3584,),
                   "model.embed_tokens.weight": (vocab, 3584), "model.norm.weight": (3584,),
                   "lm_head.weight": (vocab, 3584)})
    for i in range(28):
        layer = f"model.layers.{i}"
        for name, out in (("q_proj", 3584), ("k_proj", 512), ("v_proj", 512)):
            shapes[f"{layer}.self_attn.{name}.weight"] = (out, 3584)
            shapes[f"{layer}.self_attn.{name}.bias"] = (out,)
        shapes.update({f"{layer}.self_attn.o_proj.weight": (3584, 3584), f"{layer}.mlp.gate_proj.weight": (18944, 3584),
                       f"{layer}.mlp.up_proj.weight": (18944, 3584), f"{layer}.mlp.down_proj.weight": (3584, 18944),
                       f"{layer}.input_layernorm.weight": (3584,), f"{layer}.post_attention_layernorm.weight": (3584,)})
    for index, shape in ((0, (1024, 3584)), (3, (16, 1024)), (5, (2, 16))):
        shapes[f"rm_head.{index}.weight"] = shape
        shapes[f"rm_head.{index}.bias"] = shape[:1]
    return shapes


# --- fixtures and the reference computation ------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hpsv3")
    return {"base": write_qwen2_vl_folder(folder / "Qwen2-VL-7B-Instruct"),
            "checkpoint": write_hpsv3_checkpoint(folder / "HPSv3.safetensors")}


def make_reward(files, **kwargs) -> HPSv3Reward:
    options = {"min_pixels": TINY_PIXELS, "max_pixels": TINY_PIXELS, **kwargs}
    return HPSv3Reward(str(files["checkpoint"]), str(files["base"]), **options)


@pytest.fixture(scope="module")
def reward(files) -> HPSv3Reward:
    return make_reward(files)


@pytest.fixture(scope="module")
def reference_tokenizer(files):
    tokenizer = AutoTokenizer.from_pretrained(files["base"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})  # as HPSv3's create_model_and_processor
    tokenizer.padding_side = "right"
    return tokenizer


def reference_model(files, dtype: torch.dtype) -> Qwen2VLForConditionalGeneration:
    """transformers' Qwen2-VL with the file's backbone weights (keys renamed back by hand), cast to ``dtype`` as
    HPSv3 casts its model (buffers included)."""
    config = Qwen2VLConfig.from_pretrained(files["base"])
    config.text_config.vocab_size = REWARD_TOKEN_ID + 1
    model = Qwen2VLForConditionalGeneration(config).eval()
    state = load_file(str(files["checkpoint"]))
    renamed = {public_layout(key): key for key in model.state_dict()}
    model.load_state_dict({key: state[name] for name, key in renamed.items()})
    return model.to(dtype)


def reference_text(prompt: str, tokenizer, image_tokens: int) -> str:
    messages = [{"role": "user", "content": [{"type": "image", "image": None, "min_pixels": HPSV3_PIXELS,
                                              "max_pixels": HPSV3_PIXELS},
                                             {"type": "text", "text": INSTRUCTION.format(text_prompt=prompt)
                                              + PROMPT_WITH_SPECIAL_TOKEN}]}]
    text = tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True)
    return text.replace("<|image_pad|>", "<|image_pad|>" * image_tokens)  # the processor's expansion


def processor_pixels(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2VLImageProcessorPil's patches of images already at the target size (no resize), normalised by it."""
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 12845056})
    arrays = [image.permute(1, 2, 0).numpy() for image in images]
    out = processor(images=arrays, do_rescale=False, do_resize=False, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def reference_head_outputs(files, images, prompts, tokenizer, dtype=torch.bfloat16, mrope=False) -> torch.Tensor:
    """HPSv3's Qwen2VLRewardModelBT.forward on transformers' modules: image features scattered into the token
    embeddings, the language model with ``position_ids=None`` (or, with ``mrope``, Qwen2-VL's 3-D positions),
    then rm_head by hand in float32 at the <|Reward|> token."""
    model = reference_model(files, dtype)
    pixel_values, grid = processor_pixels(images)
    image_tokens = int(grid[0].prod()) // 4
    batch = tokenizer([reference_text(p, tokenizer, image_tokens) for p in prompts], padding=True, return_tensors="pt")
    ids = batch.input_ids
    with torch.no_grad():
        if mrope:
            hidden = model.model(input_ids=ids, attention_mask=batch.attention_mask, pixel_values=pixel_values,
                                 image_grid_thw=grid, mm_token_type_ids=(ids == TOKEN_IDS["<|image_pad|>"]).int()
                                 ).last_hidden_state
        else:
            embeds = model.model.get_input_embeddings()(ids)
            features = torch.cat(model.model.get_image_features(pixel_values.to(dtype), grid).pooler_output)
            embeds = embeds.masked_scatter((ids == TOKEN_IDS["<|image_pad|>"]).unsqueeze(-1).expand_as(embeds), features)
            hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch.attention_mask).last_hidden_state
    state = load_file(str(files["checkpoint"]))
    x = hidden[ids == REWARD_TOKEN_ID].float()
    x = torch.relu(x @ state["rm_head.0.weight"].T + state["rm_head.0.bias"])
    x = torch.relu(x @ state["rm_head.3.weight"].T + state["rm_head.3.bias"])
    return x @ state["rm_head.5.weight"].T + state["rm_head.5.bias"]


def tiny_images(count: int, seed: int = 0) -> torch.Tensor:
    """Images at the tiny target size 56 × 84 (not resized), quantised to uint8 levels."""
    return (torch.rand(count, 3, 56, 84, generator=torch.Generator().manual_seed(seed)) * 255).round() / 255


# --- the checkpoint layout -----------------------------------------------------------------------


def test_real_size_checkpoint_has_hpsv3_s_published_keys_and_shapes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_VL_7B_CONFIG))
    config = read_base_config(tmp_path, vocab_rows=HPSV3_VOCAB)
    shapes = hpsv3_checkpoint_shapes(config)
    assert shapes == hpsv3_keys_by_hand(HPSV3_VOCAB)
    assert len(shapes) == 32 * 12 + 7 + 28 * 12 + 3 + 6
    # 8.29B parameters: 16.6 GB in bfloat16, the size of the public HPSv3.safetensors.
    assert round(sum(math.prod(shape) for shape in shapes.values()) / 1e9, 2) == 8.29


def test_the_tiny_checkpoint_is_in_the_published_layout_and_dtypes(files):
    state = load_file(str(files["checkpoint"]))
    assert {"visual.patch_embed.proj.weight", "model.embed_tokens.weight", "lm_head.weight", "rm_head.5.bias"} <= set(state)
    assert not any(key.startswith(("model.visual.", "model.language_model.")) for key in state)
    assert {value.dtype for key, value in state.items() if not key.startswith("rm_head.")} == {torch.bfloat16}
    assert {value.dtype for key, value in state.items() if key.startswith("rm_head.")} == {torch.float32}
    assert state["model.embed_tokens.weight"].shape[0] == REWARD_TOKEN_ID + 1 != tiny_config()["vocab_size"]


def test_loads_every_backbone_and_head_tensor_and_drops_the_lm_head(reward, files):
    state = load_file(str(files["checkpoint"]))
    loaded = reward.state_dict()
    renamed = {("model." + key if key.startswith("visual.") else
                "model.language_model." + key.removeprefix("model.") if key.startswith("model.") else key): key
               for key in state if key != "lm_head.weight"}
    assert set(loaded) == set(renamed)
    for ours, theirs in renamed.items():
        assert loaded[ours].dtype == state[theirs].dtype and torch.equal(loaded[ours], state[theirs]), ours
    assert not reward.differentiable and not any(p.requires_grad for p in reward.parameters())


def test_a_pt_checkpoint_nested_under_model_in_the_new_layout_scores_the_same(reward, files, tmp_path):
    state = load_file(str(files["checkpoint"]))
    newer = {("model." + key if key.startswith("visual.") else
              "model.language_model." + key.removeprefix("model.") if key.startswith("model.") else key): value
             for key, value in state.items()}
    torch.save({"model": newer}, tmp_path / "final_model.pth")
    other = HPSv3Reward(str(tmp_path / "final_model.pth"), str(files["base"]), min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS)
    images = tiny_images(2)
    torch.testing.assert_close(other.score(images, PROMPTS[:2]), reward.score(images, PROMPTS[:2]), rtol=0, atol=0)


# --- inputs --------------------------------------------------------------------------------------


def test_text_is_qwen2_vl_s_chat_template_around_hpsv3_s_instruction(reward, reference_tokenizer):
    for prompt in PROMPTS:
        assert hpsv3_text(prompt, 6) == reference_text(prompt, reference_tokenizer, 6)
    inputs = reward.inputs(tiny_images(3), PROMPTS)
    expected = reference_tokenizer([reference_text(p, reference_tokenizer, 6) for p in PROMPTS], padding=True,
                                   return_tensors="pt")
    assert torch.equal(inputs["input_ids"], expected.input_ids)
    assert torch.equal(inputs["attention_mask"], expected.attention_mask)
    # Right padding with <|endoftext|>; one <|Reward|> per row, followed by the end of the template.
    lengths = inputs["attention_mask"].sum(1)
    assert inputs["attention_mask"][0, : lengths[0]].all() and not inputs["attention_mask"][0, lengths[0]:].any()
    assert inputs["input_ids"][0, lengths[0]:].eq(TOKEN_IDS["<|endoftext|>"]).all()
    assert (inputs["input_ids"] == REWARD_TOKEN_ID).sum(1).tolist() == [1, 1, 1]
    reward_at = (inputs["input_ids"] == REWARD_TOKEN_ID).int().argmax(1)
    for row, start, end in zip(inputs["input_ids"], reward_at.tolist(), lengths.tolist()):
        assert reference_tokenizer.decode(row[start + 1 : end]) == "\n\nEND\n<|im_end|>\n<|im_start|>assistant\n"


def test_patches_are_qwen2_vl_image_processor_s(reward):
    images = tiny_images(2)
    pixel_values, grid = hpsv3_pixels(images, TINY_PIXELS, TINY_PIXELS)
    expected_values, expected_grid = processor_pixels(images)
    assert grid.tolist() == expected_grid.tolist() == [[1, 4, 6]] * 2
    torch.testing.assert_close(pixel_values, expected_values, rtol=0, atol=1e-6)
    # The patch layout itself: patch (0, 1) of the first 2 × 2 window is the 14 × 14 block at columns 14-27,
    # its channel-0 rows repeated for both frames.
    mean, std = CLIP_MEAN[0], CLIP_STD[0]
    block = (images[0, 0, :14, 14:28] - mean) / std
    raw, _ = qwen2_vl_patches(torch.arange(2 * 3 * 56 * 84.0).view(2, 3, 56, 84), 14, 2, 2)
    assert raw.shape == (2 * 24, 3 * 2 * 14 * 14)
    torch.testing.assert_close(pixel_values[1, : 14 * 14], block.flatten(), rtol=0, atol=1e-5)
    torch.testing.assert_close(pixel_values[1, 14 * 14 : 2 * 14 * 14], block.flatten(), rtol=0, atol=1e-5)
    # The third patch is the first of the second window row inside window (0, 0): rows 14-27, columns 0-13.
    assert raw[2, 0].item() == 14 * 84 and raw[4, 0].item() == 28


def test_resize_is_pil_s_bicubic_up_to_uint8_rounding():
    pytest.importorskip("PIL", reason="PIL is not installed; the resize is not compared with PIL's")
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(size={"shortest_edge": TINY_PIXELS, "longest_edge": TINY_PIXELS})
    smooth = torch.linspace(0, 1, 130).view(1, 1, 130) * torch.linspace(0, 1, 100).view(1, 100, 1)
    images = torch.cat([smooth, smooth.flip(-1), 0.5 + 0.4 * torch.sin(smooth * 9)]).unsqueeze(0)
    uint8 = (images * 255).round().to(torch.uint8)
    expected = processor(images=[uint8[0].permute(1, 2, 0).numpy()], return_tensors="pt")
    pixel_values, grid = hpsv3_pixels(uint8.float() / 255, TINY_PIXELS, TINY_PIXELS)
    assert grid.tolist() == expected["image_grid_thw"].tolist() == [[1, 4, 4]]
    # PIL rounds its output to uint8: at most half a level, plus filter rounding, in normalised units.
    assert (pixel_values - expected["pixel_values"]).abs().max() <= 1.5 / 255 / min(CLIP_STD)


@pytest.mark.parametrize(("size", "expected"), [((1024, 1024), (448, 448)), ((512, 512), (448, 448)),
                                                ((768, 1344), (336, 588)), ((1024, 768), (504, 364)),
                                                ((448, 448), (448, 448)), ((300, 200), (560, 392))])
def test_smart_resize_gives_hpsv3_s_sizes(size, expected):
    assert smart_resize(*size, 28, HPSV3_PIXELS, HPSV3_PIXELS) == expected


def test_smart_resize_agrees_with_transformers_where_both_apply():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as transformers_resize

    for height in range(40, 1600, 37):
        for width in range(40, 1600, 53):
            assert smart_resize(height, width, 28, HPSV3_PIXELS, HPSV3_PIXELS) == transformers_resize(
                height, width, 28, HPSV3_PIXELS, HPSV3_PIXELS), (height, width)
    with pytest.raises(ValueError, match=r"aspect ratio at most 200, got 10 × 2010"):
        smart_resize(10, 2010, 28, HPSV3_PIXELS, HPSV3_PIXELS)


# --- scores --------------------------------------------------------------------------------------


def test_score_is_mu_of_the_head_at_the_reward_token(reward, files, reference_tokenizer):
    images = tiny_images(3)
    expected = reference_head_outputs(files, images, PROMPTS, reference_tokenizer)
    outputs = reward.head_outputs(images, PROMPTS)
    torch.testing.assert_close(outputs, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(reward.score(images, PROMPTS), expected[:, 0], rtol=0, atol=1e-5)
    assert outputs[:, 0].unique().numel() == 3  # the images and prompts matter


def test_float32_backbone_matches_the_reference_in_float32(files, reference_tokenizer):
    reward = make_reward(files, dtype="float32")
    assert {p.dtype for p in reward.parameters()} == {torch.float32}
    images = tiny_images(2, seed=1)
    expected = reference_head_outputs(files, images, PROMPTS[:2], reference_tokenizer, dtype=torch.float32)
    torch.testing.assert_close(reward.score(images, PROMPTS[:2]), expected[:, 0], rtol=0, atol=1e-5)


def test_positions_are_sequential_not_qwen2_vl_s_3d_mrope(files, reference_tokenizer):
    reward = make_reward(files, dtype="float32")
    images = tiny_images(2, seed=2)
    mrope = reference_head_outputs(files, images, PROMPTS[:2], reference_tokenizer, torch.float32, mrope=True)
    assert (reward.score(images, PROMPTS[:2]) - mrope[:, 0]).abs().min() > 1e-4


def test_batched_scores_equal_scores_one_at_a_time(files):
    reward = make_reward(files, dtype="float32")
    images = tiny_images(3, seed=3)
    alone = torch.cat([reward.score(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(reward.score(images, PROMPTS), alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(reward.score(images, PROMPTS, batch_size=2), alone, rtol=0, atol=1e-5)


def test_other_sizes_are_resized_to_the_smart_resize_size(reward):
    # 100 × 130 has too many pixels for 4704: floored to 56 × 56. 56 × 56 has too few: ceiled to 84 × 84.
    for size, target in (((100, 130), (56, 56)), ((56, 56), (84, 84))):
        images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(4))
        resized = F.interpolate(images, size=target, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        normalised = (resized - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        expected, grid = qwen2_vl_patches(normalised, 14, 2, 2)
        inputs = reward.inputs(images, PROMPTS[:2])
        assert inputs["image_grid_thw"].tolist() == grid.tolist() == [[1, target[0] // 14, target[1] // 14]] * 2
        torch.testing.assert_close(inputs["pixel_values"], expected, rtol=0, atol=1e-6)
        assert (inputs["input_ids"] == TOKEN_IDS["<|image_pad|>"]).sum(1).tolist() == [target[0] * target[1] // 28**2] * 2


def test_is_evaluation_only(reward):
    with pytest.raises(ValueError, match=r"is not differentiable, so it cannot be scored with_grad=True"):
        reward.score(tiny_images(1), PROMPTS[:1], with_grad=True)


def test_builds_from_the_alias(files):
    spec = {"class_path": "hpsv3", "init_args": {"checkpoint_path": str(files["checkpoint"]),
                                                 "base_model_path": str(files["base"]), "name": "hpsv3",
                                                 "min_pixels": TINY_PIXELS, "max_pixels": TINY_PIXELS}}
    built = build_reward(spec)
    assert isinstance(built, HPSv3Reward) and built.name == "hpsv3" and built.min_pixels == TINY_PIXELS


# --- errors --------------------------------------------------------------------------------------


def test_a_missing_checkpoint_names_the_file_and_where_it_is_published(files, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not found at .*none.safetensors.*HPSv3.safetensors.*huggingface.co/MizzenAI/HPSv3"):
        HPSv3Reward(str(tmp_path / "none.safetensors"), str(files["base"]))


def test_a_file_that_is_not_a_checkpoint_is_refused(files, tmp_path):
    (tmp_path / "HPSv3.safetensors").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"not a readable safetensors file .*MizzenAI/HPSv3"):
        HPSv3Reward(str(tmp_path / "HPSv3.safetensors"), str(files["base"]))
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"does not hold a state dict of tensors \(got list\)"):
        HPSv3Reward(str(tmp_path / "list.pt"), str(files["base"]))


def test_wrong_keys_and_shapes_are_named(files, tmp_path):
    state = random_hpsv3_state()
    state["rm_head.7.weight"] = state.pop("rm_head.5.weight")
    save_file(state, str(tmp_path / "keys.safetensors"))
    with pytest.raises(ValueError, match=r"1 keys missing \['rm_head.5.weight'\], 1 unexpected \['rm_head.7.weight'\]"):
        make_reward({"checkpoint": tmp_path / "keys.safetensors", "base": files["base"]})
    state = random_hpsv3_state()
    state["rm_head.0.weight"] = torch.zeros(512, 32)
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"rm_head.0.weight \(512, 32\) \(expected \(1024, 32\)\)"):
        make_reward({"checkpoint": tmp_path / "shape.safetensors", "base": files["base"]})
    state = random_hpsv3_state()
    del state["model.embed_tokens.weight"]
    save_file(state, str(tmp_path / "embeddings.safetensors"))
    with pytest.raises(ValueError, match=r"has no token embeddings \(model.embed_tokens.weight\)"):
        make_reward({"checkpoint": tmp_path / "embeddings.safetensors", "base": files["base"]})


def test_a_checkpoint_for_another_tokenizer_is_refused(files, tmp_path):
    state = random_hpsv3_state()
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = state[key][:-1].contiguous()
    save_file(state, str(tmp_path / "vocab.safetensors"))
    with pytest.raises(ValueError, match=r"has 271 tokens with <\|Reward\|>, but the checkpoint's embeddings have 270 rows"):
        make_reward({"checkpoint": tmp_path / "vocab.safetensors", "base": files["base"]})


def test_an_incomplete_base_model_folder_is_refused(files, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Qwen2-VL folder not found .*Qwen/Qwen2-VL-7B-Instruct"):
        HPSv3Reward(str(files["checkpoint"]), str(tmp_path / "none"))
    (tmp_path / "tokenizer.json").write_text((files["base"] / "tokenizer.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"config not found at .*config.json.*Qwen2-VL-7B-Instruct"):
        HPSv3Reward(str(files["checkpoint"]), str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**tiny_config(), "model_type": "qwen2_5_vl"}))
    with pytest.raises(ValueError, match=r"has model_type 'qwen2_5_vl', not 'qwen2_vl'"):
        HPSv3Reward(str(files["checkpoint"]), str(tmp_path))
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    with pytest.raises(FileNotFoundError, match=r"no Qwen2 tokenizer in .*neither tokenizer.json nor vocab.json"):
        HPSv3Reward(str(files["checkpoint"]), str(tmp_path))


def test_a_config_whose_image_token_differs_from_the_tokenizer_s_is_refused(files, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((files["base"] / name).read_text())
    (tmp_path / "config.json").write_text(json.dumps({**tiny_config(), "image_token_id": 5}))
    with pytest.raises(ValueError, match=r"gives <\|image_pad\|> the id 268 but config.json's image_token_id is 5"):
        HPSv3Reward(str(files["checkpoint"]), str(tmp_path))


@pytest.mark.parametrize(("options", "message"), [
    ({"dtype": "float16"}, r"dtype must be one of \('bfloat16', 'float32'\), got 'float16'"),
    ({"min_pixels": 1000}, r"min_pixels must be an integer in \[3136, 12845056\].*got 1000"),
    ({"max_pixels": 2.5e7}, r"max_pixels must be an integer in \[3136, 12845056\]"),
    ({"min_pixels": 8000, "max_pixels": 4000}, r"min_pixels \(8000\) must not exceed max_pixels \(4000\)"),
])
def test_bad_options_are_refused(files, options, message):
    with pytest.raises(ValueError, match=message):
        make_reward(files, **options)


def test_prompts_with_special_token_text_and_bad_images_are_refused(reward):
    with pytest.raises(ValueError, match=r"prompt 'rate <\|Reward\|> high' gives 2 <\|Reward\|> and 6 <\|image_pad\|>"):
        reward.score(tiny_images(1), ["rate <|Reward|> high"])
    with pytest.raises(ValueError, match=r"HPSv3 takes RGB images \(B, 3, H, W\), got \(1, 1, 56, 84\)"):
        reward.score(torch.rand(1, 1, 56, 84), ["a cat"])


# --- optional parity with the reference package -------------------------------------------------

PARITY_FILES = "RDM_HPSV3_FILES"
"""A folder holding the public HPSv3.safetensors and a Qwen2-VL-7B-Instruct/ snapshot (config and tokenizer)."""


def test_parity_with_the_hpsv3_package():
    package = import_or_skip("hpsv3")
    folder = os.environ.get(PARITY_FILES)
    if not folder:
        reason = f"{PARITY_FILES} is not set to a folder with HPSv3.safetensors and Qwen2-VL-7B-Instruct/; parity is not checked"
        print(reason)
        pytest.skip(reason)
    if not torch.cuda.is_available():
        pytest.skip("the hpsv3 package's inferencer runs the 7B model on CUDA; parity is not checked on CPU")
    from PIL import Image

    folder = Path(folder)
    reference = package.HPSv3RewardInferencer(checkpoint_path=str(folder / "HPSv3.safetensors"), device="cuda")
    ours = HPSv3Reward(str(folder / "HPSv3.safetensors"), str(folder / "Qwen2-VL-7B-Instruct")).to("cuda")
    # 448 × 448 uint8 images: no resize on either side, so only the arithmetic may differ.
    images = (torch.rand(2, 3, 448, 448, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    pil = [Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()) for image in images]
    expected = reference.reward(prompts=PROMPTS[:2], image_paths=pil)[:, 0].float().cpu()
    torch.testing.assert_close(ours.score(images.cuda(), PROMPTS[:2]).cpu(), expected, rtol=1e-2, atol=5e-2)
