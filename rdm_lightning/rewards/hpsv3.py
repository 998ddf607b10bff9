"""HPSv3: a Qwen2-VL-7B-Instruct fine-tuned to read a human-preference score off a ``<|Reward|>`` token.

- :class:`HPSv3Reward`: the reward, ``μ`` of ``rm_head(h_<|Reward|>)`` where ``h`` is the last hidden state
  of transformers' ``Qwen2VLModel`` run on HPSv3's chat prompt with the image; evaluation only.
- :func:`smart_resize`, :func:`qwen2_vl_patches`, :func:`hpsv3_pixels`: the image side of the reference's
  Qwen2-VL processing on tensors (no PIL, no torchvision).
- :func:`hpsv3_text`: the chat text the reference tokenizes.
- :func:`hpsv3_checkpoint_shapes`, :func:`read_hpsv3_checkpoint`: the layout of ``HPSv3.safetensors`` and its loader.

The reference is the ``hpsv3`` package's ``HPSv3RewardInferencer`` (MizzenAI/HPSv3); the facts, their
sources and the differences are in docs/rewards.md. transformers and safetensors are imported when a
model is loaded, not when this module is.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdm_lightning.rewards.base import RewardModel
from rdm_lightning.rewards.clip import CLIP_MEAN, CLIP_STD
from rdm_lightning.state_files import first_sentence, some_names

CHECKPOINT_SOURCE = (
    "HPSv3.safetensors from the Hugging Face repo MizzenAI/HPSv3 (https://huggingface.co/MizzenAI/HPSv3): the "
    "state dict of HPSv3's Qwen2VLRewardModelBT in transformers 4.45's key layout (visual.*, model.*, "
    "lm_head.weight, rm_head.{0,3,5}.*), the backbone in bfloat16 and rm_head in float32; a torch-saved "
    ".pt/.pth of the same state dict, bare or under 'model', is read too"
)
BASE_MODEL_SOURCE = (
    "a local snapshot of the Hugging Face repo Qwen/Qwen2-VL-7B-Instruct "
    "(https://huggingface.co/Qwen/Qwen2-VL-7B-Instruct) holding config.json and the tokenizer files "
    "(tokenizer.json, or vocab.json and merges.txt, with tokenizer_config.json); its weights are not needed"
)
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))

REWARD_TOKEN = "<|Reward|>"
"""The special token HPSv3 adds to Qwen2-VL's tokenizer; the score is read at its last hidden state."""
HPSV3_PIXELS = 256 * 28 * 28
"""``min_pixels`` and ``max_pixels`` of HPSv3's inference: images are resized to about 448 × 448."""
PROCESSOR_MIN_PIXELS = 56 * 56
PROCESSOR_MAX_PIXELS = 16384 * 28 * 28
"""The pixel range of Qwen2-VL-7B-Instruct's image processor, which resizes HPSv3's images a second time."""
MAX_ASPECT_RATIO = 200
"""The longest side over the shortest that Qwen2-VL's ``smart_resize`` accepts."""
HEAD_WIDTHS = (1024, 16)
"""Hidden widths of HPSv3's ``rm_head`` (its ``"ranknet"`` head without ``rm_head_kwargs``)."""
HEAD_OUTPUTS = 2
"""Outputs of ``rm_head``: ``μ``, the score, and the parameter of its uncertainty ``σ``."""

SYSTEM_PROMPT = "You are a helpful assistant."
"""The system turn Qwen2-VL-7B-Instruct's chat template inserts when a conversation has none."""
# HPSv3's INSTRUCTION and prompt_with_special_token (hpsv3/dataset/data_collator_qwen.py), verbatim: the
# trailing spaces and blank lines are part of the text the model was trained on.
INSTRUCTION = (
    "\n"
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a "
    "overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the "
    "worst and 10 being the best. \n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual "
    "elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense "
    "of harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, "
    "or adult material. If such content is present, the image quality and satisfaction score should be the "
    "lowest possible. \n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, "
    "object) align with the textual description. The subject should match the description in terms of number, "
    "appearance, and behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well "
    "the image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the "
    "image logically fit the scenario described in the prompt. The environment should support and enhance the "
    "subject without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be "
    "acceptable, but critical attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in "
    "the image. The generated content should not introduce elements that conflict with or distort the "
    "original description.\n"
    "Textual prompt - {text_prompt}\n"
    "\n"
    "\n"
)
REWARD_REQUEST = f"\nPlease provide the overall ratings of this image: {REWARD_TOKEN}\n\nEND\n"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
"""Special tokens of Qwen2-VL's chat template that the tokenizer must hold as single tokens."""

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
"""Backbone dtypes: the reference's bfloat16 (the public file's) or float32."""


# --- preprocessing ------------------------------------------------------------------------------


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size qwen-vl-utils' (and HPSv3's vendored copy's) ``smart_resize`` gives a ``height × width`` image.

    Both sides become multiples of ``factor`` (at least ``factor``), rounded to the nearest; if that has more
    than ``max_pixels`` pixels the sides are scaled by ``1/β``, ``β = √(h·w / max_pixels)``, and floored to
    multiples, if fewer than ``min_pixels`` scaled by ``β = √(min_pixels / (h·w))`` and ceiled. Computed in
    Python floats as the reference computes it, so that the floors and ceilings fall identically.

    Raises:
        ValueError: the aspect ratio exceeds :data:`MAX_ASPECT_RATIO`.
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"HPSv3 (Qwen2-VL) takes images of aspect ratio at most {MAX_ASPECT_RATIO}, got {height} × {width}"
        )
    resized_height = max(factor, round(height / factor) * factor)
    resized_width = max(factor, round(width / factor) * factor)
    if resized_height * resized_width > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        resized_height = math.floor(height / beta / factor) * factor
        resized_width = math.floor(width / beta / factor) * factor
    elif resized_height * resized_width < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        resized_height = math.ceil(height * beta / factor) * factor
        resized_width = math.ceil(width * beta / factor) * factor
    return resized_height, resized_width


def qwen2_vl_patches(pixels: Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> tuple[Tensor, Tensor]:
    """Qwen2-VL's flattened patches of normalised images, as its image processors lay them out.

    Each image is one frame, repeated ``temporal_patch_size`` times; its ``(H/p) × (W/p)`` patches are ordered
    by ``merge_size × merge_size`` window (row-major), then row-major inside the window, and each patch is
    flattened as ``(channel, frame, row, column)``.

    Args:
        pixels: ``(B, C, H, W)``, ``H`` and ``W`` multiples of ``patch_size · merge_size``.
        patch_size: Side of a patch (14 for Qwen2-VL).
        merge_size: Side of the window of patches merged into one LLM token (2).
        temporal_patch_size: Frames per patch (2).

    Returns:
        ``pixel_values`` ``(B · H/p · W/p, C · temporal_patch_size · p²)`` and ``image_grid_thw`` ``(B, 3)``
        of ``(1, H/p, W/p)``.
    """
    batch, channels, height, width = pixels.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    windows = pixels.reshape(
        batch, channels, grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size, patch_size
    )
    # (B, window row, window column, row in window, column in window, C, patch row, patch column)
    windows = windows.permute(0, 2, 5, 3, 6, 1, 4, 7)
    frames = windows.unsqueeze(6).expand(*windows.shape[:6], temporal_patch_size, patch_size, patch_size)
    pixel_values = frames.reshape(batch * grid_h * grid_w, channels * temporal_patch_size * patch_size**2)
    grid = torch.tensor([[1, grid_h, grid_w]], dtype=torch.long, device=pixels.device).expand(batch, 3)
    return pixel_values, grid


def hpsv3_pixels(
    images: Tensor,
    min_pixels: int = HPSV3_PIXELS,
    max_pixels: int = HPSV3_PIXELS,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
) -> tuple[Tensor, Tensor]:
    """Qwen2-VL ``pixel_values`` and ``image_grid_thw`` of images ``(B, 3, H, W)`` in ``[0, 1]``, as HPSv3 makes them.

    The image is resized to :func:`smart_resize`'s size (factor ``patch_size · merge_size``) by antialiased
    bicubic interpolation (PIL's bicubic filter, which qwen-vl-utils' ``fetch_image`` uses), clamped to
    ``[0, 1]`` as PIL's uint8 output is, normalised with OpenAI CLIP's mean and std and cut into patches by
    :func:`qwen2_vl_patches`. An image already of that size is not resampled (PIL returns a copy). The
    processor's second ``smart_resize`` keeps that size (a multiple of 28 within its pixel range), so it is
    not repeated here.

    Raises:
        ValueError: ``images`` is not ``(B, 3, H, W)``, or its aspect ratio is beyond :data:`MAX_ASPECT_RATIO`.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"HPSv3 takes RGB images (B, 3, H, W), got {tuple(images.shape)}")
    size = smart_resize(*images.shape[-2:], patch_size * merge_size, min_pixels, max_pixels)
    if size != tuple(images.shape[-2:]):
        images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean = images.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return qwen2_vl_patches((images - mean) / std, patch_size, merge_size, temporal_patch_size)


def hpsv3_text(prompt: str, image_tokens: int) -> str:
    """The text HPSv3 tokenizes for ``prompt``: Qwen2-VL-7B-Instruct's chat template applied to one user turn
    (the image, then :data:`INSTRUCTION` with the prompt and :data:`REWARD_REQUEST`) with the generation
    prompt, and ``<|image_pad|>`` repeated ``image_tokens`` times, as the processor expands it."""
    turn = INSTRUCTION.format(text_prompt=prompt) + REWARD_REQUEST
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|>{'<|image_pad|>' * image_tokens}<|vision_end|>{turn}<|im_end|>\n"
        f"<|im_start|>assistant\n"
    )


# --- weights ------------------------------------------------------------------------------------


class HPSv3Head(nn.Sequential):
    """HPSv3's ``rm_head``: ``Linear(D, 1024) ReLU Dropout(0.05) Linear(1024, 16) ReLU Linear(16, 2)``.

    The indices of the linear layers (0, 3, 5) are those of the checkpoint's ``rm_head.*`` keys; the dropout
    is the identity in eval mode, where rewards always are.

    Args:
        hidden_size: Width ``D`` of the language model's hidden states (3584 for Qwen2-VL-7B).
    """

    def __init__(self, hidden_size: int) -> None:
        first, second = HEAD_WIDTHS
        super().__init__(
            nn.Linear(hidden_size, first), nn.ReLU(), nn.Dropout(0.05), nn.Linear(first, second), nn.ReLU(),
            nn.Linear(second, HEAD_OUTPUTS),
        )


def public_key(name: str) -> str:
    """A checkpoint key in the public file's layout, transformers 4.45's (``visual.*`` for the vision tower,
    ``model.*`` for the language model): a checkpoint saved under transformers ≥ 4.52 has ``model.visual.*``
    and ``model.language_model.*`` instead; both load."""
    if name.startswith("model.visual."):
        return name.removeprefix("model.")
    if name.startswith("model.language_model."):
        return f"model.{name.removeprefix('model.language_model.')}"
    return name


def reward_key(name: str) -> str | None:
    """The key of :class:`HPSv3Reward`'s state dict that the public checkpoint key ``name`` loads, ``None`` for
    ``lm_head.weight`` (the language-model head, which the score does not use)."""
    if name == "lm_head.weight":
        return None
    if name.startswith("visual."):
        return f"model.{name}"
    if name.startswith("model."):
        return f"model.language_model.{name.removeprefix('model.')}"
    return name


def hpsv3_checkpoint_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of ``HPSv3.safetensors`` for a ``Qwen2VLConfig``: the vision tower under ``visual.``,
    the language model under ``model.``, ``lm_head.weight`` and ``rm_head.*`` (transformers 4.45's layout)."""
    from transformers import Qwen2VLModel

    with torch.device("meta"):
        backbone = Qwen2VLModel(config)
        head = HPSv3Head(config.text_config.hidden_size)
    shapes = {f"visual.{name}": tuple(tensor.shape) for name, tensor in backbone.visual.state_dict().items()}
    shapes.update({f"model.{name}": tuple(t.shape) for name, t in backbone.language_model.state_dict().items()})
    shapes["lm_head.weight"] = (config.text_config.vocab_size, config.text_config.hidden_size)
    shapes.update({f"rm_head.{name}": tuple(tensor.shape) for name, tensor in head.state_dict().items()})
    return shapes


def read_checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of the checkpoint ``path``, read without loading its tensors: a ``.safetensors`` file
    by its header, any other file as a torch-saved state dict (bare or under ``"model"``), memory-mapped.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a readable safetensors file or torch checkpoint of a state dict of tensors.
    """
    if not path.is_file():
        raise FileNotFoundError(f"HPSv3 checkpoint not found at {str(path)!r}; expected {CHECKPOINT_SOURCE}")
    if path.suffix != ".safetensors":
        return {key: tuple(value.shape) for key, value in _torch_state_dict(path).items()}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except SafetensorError as error:
        raise ValueError(
            f"{str(path)!r} is not a readable safetensors file ({first_sentence(error)}); expected {CHECKPOINT_SOURCE}"
        ) from error


def read_hpsv3_checkpoint(path: Path, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype) -> dict[str, Tensor]:
    """The tensors of the checkpoint ``path`` under :class:`HPSv3Reward`'s keys (:func:`reward_key`): the
    backbone in ``dtype``, ``rm_head`` in float32; ``lm_head.weight`` is checked and dropped.

    The keys and shapes are checked against ``shapes`` (:func:`hpsv3_checkpoint_shapes`) before any tensor is
    read (:func:`read_checkpoint_shapes`).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a safetensors or torch file of a state dict, keys or shapes that differ from ``shapes``
            (the message names some of the missing, unexpected and mis-shaped keys), or a tensor that is not
            floating point.
    """
    _check_checkpoint_shapes(path, read_checkpoint_shapes(path), shapes)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    else:
        tensors = dict(_torch_state_dict(path))
    converted = {}
    for name in list(tensors):
        tensor = tensors.pop(name)  # popped so that a conversion to float32 does not hold both copies
        if not tensor.is_floating_point():
            raise ValueError(f"{str(path)!r}: {name!r} must be a floating point tensor, got {tensor.dtype}")
        key = reward_key(public_key(name))
        if key is not None:
            converted[key] = tensor.to(torch.float32 if key.startswith("rm_head.") else dtype)
    return converted


def _torch_state_dict(path: Path) -> Mapping[str, Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch.load reports unreadable files with several exception types.
        raise ValueError(
            f"{str(path)!r} is neither a .safetensors file nor a readable torch checkpoint "
            f"({type(error).__name__}: {first_sentence(error)}); expected {CHECKPOINT_SOURCE}"
        ) from error
    if isinstance(loaded, Mapping) and "model" in loaded:
        loaded = loaded["model"]
    if not (isinstance(loaded, Mapping) and all(isinstance(value, Tensor) for value in loaded.values())):
        found = list(loaded)[:5] if isinstance(loaded, Mapping) else type(loaded).__name__
        raise ValueError(f"{str(path)!r} does not hold a state dict of tensors (got {found}); expected {CHECKPOINT_SOURCE}")
    return loaded


def _check_checkpoint_shapes(
    path: Path, found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
) -> None:
    # A file in the newer layout is compared in the public one, so that both are checked alike.
    public = {public_key(key): shape for key, shape in found.items()}
    if len(public) < len(found):
        raise ValueError(f"{str(path)!r} mixes the two key layouts (visual.* and model.visual.*); expected {CHECKPOINT_SOURCE}")
    found = public
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{str(path)!r} does not fit HPSv3's Qwen2-VL: {len(missing)} keys missing {some_names(missing)}, "
            f"{len(unexpected)} unexpected {some_names(unexpected)}; expected {CHECKPOINT_SOURCE}"
        )
    wrong = [f"{key} {found[key]} (expected {shape})" for key, shape in expected.items() if found[key] != shape]
    if wrong:
        raise ValueError(
            f"{str(path)!r} has tensors of shapes the Qwen2-VL config does not give: {', '.join(wrong[:5])}"
            f"{', ...' if len(wrong) > 5 else ''}; the config must be Qwen2-VL-7B-Instruct's, with vocab_size "
            f"set by the checkpoint's embedding rows (expected {CHECKPOINT_SOURCE})"
        )


def read_base_config(folder: Path, vocab_rows: int | None = None) -> Any:
    """The ``Qwen2VLConfig`` of ``folder/config.json`` (Qwen2-VL-7B-Instruct's, flat or nested), with
    ``vocab_size`` set to ``vocab_rows`` when given (HPSv3 resized the embeddings to its tokenizer).

    Raises:
        FileNotFoundError: no ``config.json`` in ``folder``.
        ValueError: the config is not JSON or not a ``qwen2_vl`` config.
    """
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"Qwen2-VL config not found at {str(file)!r}; expected {BASE_MODEL_SOURCE}")
    try:
        model_type = json.loads(file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ValueError(f"{str(file)!r} is not a JSON object ({error}); expected {BASE_MODEL_SOURCE}") from error
    if model_type != "qwen2_vl":
        raise ValueError(f"{str(file)!r} has model_type {model_type!r}, not 'qwen2_vl'; expected {BASE_MODEL_SOURCE}")
    from transformers import Qwen2VLConfig

    config = Qwen2VLConfig.from_pretrained(folder, local_files_only=True)
    if vocab_rows is not None:
        config.text_config.vocab_size = vocab_rows
    return config


def load_hpsv3_tokenizer(folder: Path, config: Any) -> Any:
    """Qwen2-VL's tokenizer from ``folder`` with HPSv3's :data:`REWARD_TOKEN` added as a special token (as the
    reference's ``add_special_tokens``; kept if the folder's tokenizer has it), padding on the right.

    Raises:
        FileNotFoundError: ``folder`` has no tokenizer files.
        ValueError: a chat-template token is not one token, ``<|image_pad|>``, ``<|vision_start|>`` or
            ``<|vision_end|>`` has another id than the config's, no pad token, or the vocabulary with the
            reward token does not fit the embedding rows ``config.text_config.vocab_size``.
    """
    if not any(all((folder / name).is_file() for name in files) for files in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no Qwen2 tokenizer in {str(folder)!r} (neither tokenizer.json nor vocab.json and merges.txt); "
            f"expected {BASE_MODEL_SOURCE}"
        )
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.padding_side = "right"
    if REWARD_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(REWARD_TOKEN, special=True, normalized=False)], special_tokens=True)
    vocab = tokenizer.get_vocab()
    missing = [token for token in CHAT_TOKENS if token not in vocab]
    if missing:
        raise ValueError(f"the tokenizer in {str(folder)!r} lacks the chat tokens {missing}; expected {BASE_MODEL_SOURCE}")
    for token, name in (("<|image_pad|>", "image_token_id"), ("<|vision_start|>", "vision_start_token_id"),
                        ("<|vision_end|>", "vision_end_token_id")):
        if vocab[token] != getattr(config, name):
            raise ValueError(
                f"the tokenizer in {str(folder)!r} gives {token} the id {vocab[token]} but config.json's {name} is "
                f"{getattr(config, name)}; the tokenizer and config.json must both be {BASE_MODEL_SOURCE}"
            )
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer in {str(folder)!r} has no pad token; expected {BASE_MODEL_SOURCE}")
    rows = config.text_config.vocab_size
    if len(tokenizer) != rows:
        raise ValueError(
            f"the tokenizer in {str(folder)!r} has {len(tokenizer)} tokens with {REWARD_TOKEN}, but the checkpoint's "
            f"embeddings have {rows} rows (HPSv3 resized them to Qwen2-VL-7B-Instruct's tokenizer plus {REWARD_TOKEN}); "
            f"expected {BASE_MODEL_SOURCE}"
        )
    return tokenizer


def build_backbone(config: Any, state_dict: Mapping[str, Tensor], dtype: torch.dtype) -> Any:
    """transformers' ``Qwen2VLModel`` (vision tower and language model, no LM head) holding the ``model.*``
    entries of ``state_dict``, built on the meta device and assigned the tensors, then cast to ``dtype``. Its
    attention is transformers' default, SDPA: the reference's choice without flash-attention.

    The cast includes the rotary frequency buffers, as the reference's ``model.to(torch.bfloat16)`` casts them.
    """
    from transformers import Qwen2VLModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, Qwen2VLVisionRotaryEmbedding

    with torch.device("meta"):
        backbone = Qwen2VLModel(config)
    # The rotary frequencies are computed, not loaded: rebuilt off the meta device.
    backbone.visual.rotary_pos_emb = Qwen2VLVisionRotaryEmbedding(config.vision_config)
    backbone.language_model.rotary_emb = Qwen2VLRotaryEmbedding(config=config.text_config)
    backbone.load_state_dict({key.removeprefix("model."): value for key, value in state_dict.items()
                              if key.startswith("model.")}, strict=True, assign=True)
    left = [name for name, tensor in (*backbone.named_parameters(), *backbone.named_buffers()) if tensor.is_meta]
    if left:
        raise RuntimeError(f"Qwen2VLModel tensors not loaded from the checkpoint: {some_names(left)}")
    return backbone.to(dtype)


# --- reward -------------------------------------------------------------------------------------


class HPSv3Reward(RewardModel):
    """HPSv3 (MizzenAI, ICCV 2025), ``μ`` of the reward head at the ``<|Reward|>`` token; tables report about 10–15.

    The image and :func:`hpsv3_text` (Qwen2-VL's chat template around HPSv3's instruction, the prompt and
    "Please provide the overall ratings of this image: <|Reward|>") go through Qwen2-VL-7B-Instruct as HPSv3's
    ``Qwen2VLRewardModelBT.forward`` runs it: the vision tower's merged patch embeddings replace the
    ``<|image_pad|>`` embeddings, the language model runs with sequential positions ``0 … L−1`` in all three
    M-RoPE sections (the reference calls it with ``position_ids=None``; this is not Qwen2-VL's 3-D M-RoPE),
    and :class:`HPSv3Head` maps the final hidden state at ``<|Reward|>`` to ``(μ, σ)``; the score is ``μ``.
    Images are resized to about 448 × 448 (:func:`hpsv3_pixels`). Prompts of a batch are padded on the right.

    Evaluation only (``differentiable = False``): the reference scores under ``torch.inference_mode`` and uses
    HPSv3 as an evaluation metric; back-propagating through a 7B VLM per step is beyond the methods' budget,
    and its bfloat16 activations would give noisy pixel gradients. The forward pass itself is differentiable.

    Args:
        checkpoint_path: ``HPSv3.safetensors`` (:data:`CHECKPOINT_SOURCE`).
        base_model_path: Local folder of Qwen2-VL-7B-Instruct's ``config.json`` and tokenizer (:data:`BASE_MODEL_SOURCE`).
        dtype: ``"bfloat16"`` (the reference's and the file's) or ``"float32"`` for the backbone; the head and the
            preprocessing are float32 (on ``reward.to(dtype)`` the head follows).
        min_pixels: Fewest pixels of the resized image (:func:`smart_resize`); HPSv3's is 256 · 28².
        max_pixels: Most pixels of the resized image; HPSv3's is 256 · 28².
        name: Name in logs; ``None`` uses the class name.
        train_scale: Factor of the score in training objectives.
        report_scale: Factor of the score in reported tables.

    Raises:
        FileNotFoundError: the checkpoint, ``config.json`` or the tokenizer files are missing.
        ValueError: a file is not in its expected format or the files do not fit each other, or an argument
            is invalid.
    """

    differentiable = False

    def __init__(
        self,
        checkpoint_path: str,
        base_model_path: str,
        dtype: str = "bfloat16",
        min_pixels: int = HPSV3_PIXELS,
        max_pixels: int = HPSV3_PIXELS,
        name: str | None = None,
        train_scale: float = 1.0,
        report_scale: float = 1.0,
    ) -> None:
        super().__init__(name=name, train_scale=train_scale, report_scale=report_scale)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        for label, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if not (isinstance(value, int) and PROCESSOR_MIN_PIXELS <= value <= PROCESSOR_MAX_PIXELS):
                raise ValueError(
                    f"{label} must be an integer in [{PROCESSOR_MIN_PIXELS}, {PROCESSOR_MAX_PIXELS}] (the range of "
                    f"Qwen2-VL-7B-Instruct's image processor, which would resize again outside it), got {value!r}"
                )
        if min_pixels > max_pixels:
            raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
        checkpoint = Path(checkpoint_path).expanduser()
        folder = Path(base_model_path).expanduser()
        # The header and the small files are checked first, so that a wrong file fails before 16 GB are read.
        rows = _embedding_rows(checkpoint, read_checkpoint_shapes(checkpoint))
        if not folder.is_dir():
            raise FileNotFoundError(f"Qwen2-VL folder not found at {str(folder)!r}; expected {BASE_MODEL_SOURCE}")
        config = read_base_config(folder, vocab_rows=rows)
        self.tokenizer = load_hpsv3_tokenizer(folder, config)
        state_dict = read_hpsv3_checkpoint(checkpoint, hpsv3_checkpoint_shapes(config), DTYPES[dtype])
        self.model = build_backbone(config, state_dict, DTYPES[dtype])
        self.rm_head = HPSv3Head(config.text_config.hidden_size)
        head = {key.removeprefix("rm_head."): value for key, value in state_dict.items() if key.startswith("rm_head.")}
        self.rm_head.load_state_dict(head)
        self.image_token_id = config.image_token_id
        self.reward_token_id = self.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        vision = config.vision_config
        self.patching = (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels

    def _placement(self, images: Tensor) -> tuple[torch.device, torch.dtype]:
        # Preprocessed in float32, as the reference's processor; the vision tower casts the patches to its dtype.
        return self.rm_head[0].weight.device, torch.float32

    def inputs(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """The model inputs of images ``(B, 3, H, W)`` in ``[0, 1]`` and their prompts: ``pixel_values``,
        ``image_grid_thw``, ``input_ids`` and ``attention_mask`` (padded on the right), as the reference's
        processor makes them, on the images' device.

        Raises:
            ValueError: a prompt contains the text of a special token, so that its row has another number of
                ``<|Reward|>`` or ``<|image_pad|>`` tokens than one and the image's.
        """
        patch_size, merge_size, temporal = self.patching
        pixel_values, grid = hpsv3_pixels(images, self.min_pixels, self.max_pixels, patch_size, merge_size, temporal)
        image_tokens = int(grid[0].prod()) // merge_size**2
        tokens = self.tokenizer([hpsv3_text(prompt, image_tokens) for prompt in prompts], padding=True,
                                return_tensors="pt")
        for prompt, row in zip(prompts, tokens.input_ids):
            counts = (int((row == self.reward_token_id).sum()), int((row == self.image_token_id).sum()))
            if counts != (1, image_tokens):
                raise ValueError(
                    f"prompt {prompt!r} gives {counts[0]} {REWARD_TOKEN} and {counts[1]} <|image_pad|> tokens instead "
                    f"of 1 and {image_tokens}: it contains the text of a special token; remove it from the prompt"
                )
        device = images.device
        return {"pixel_values": pixel_values, "image_grid_thw": grid, "input_ids": tokens.input_ids.to(device),
                "attention_mask": tokens.attention_mask.to(device)}

    def head_outputs(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """``(μ, σ)`` ``(B, 2)`` of the reward head, float32, for images ``(B, 3, H, W)`` in ``[0, 1]`` on the
        reward's device; the score is column 0."""
        inputs = self.inputs(images, prompts)
        input_ids = inputs["input_ids"]
        visual = self.model.visual
        image_embeds = visual(inputs["pixel_values"].to(visual.dtype), grid_thw=inputs["image_grid_thw"]).pooler_output
        language_model = self.model.language_model
        embeds = language_model.embed_tokens(input_ids)
        image_mask = (input_ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))
        # Sequential positions in the three M-RoPE sections: what the reference's position_ids=None gives.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(3, *input_ids.shape)
        hidden = language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], position_ids=positions,
                                use_cache=False).last_hidden_state
        at_reward = hidden[input_ids == self.reward_token_id]
        return self.rm_head(at_reward.to(self.rm_head[0].weight.dtype)).float()

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.head_outputs(images, prompts)[:, 0]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, min_pixels={self.min_pixels}, max_pixels={self.max_pixels}"


def _embedding_rows(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Rows of the checkpoint's token embeddings: HPSv3's vocabulary, Qwen2-VL's tokenizer plus ``<|Reward|>``."""
    names = [name for name in ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight") if name in shapes]
    if len(names) != 1:
        raise ValueError(
            f"{str(path)!r} has {len(names) or 'no'} token embeddings (model.embed_tokens.weight); expected {CHECKPOINT_SOURCE}"
        )
    return int(shapes[names[0]][0])
