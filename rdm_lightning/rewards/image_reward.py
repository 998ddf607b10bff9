"""ImageReward v1.0: a BLIP text encoder that cross-attends to BLIP ViT-L/16 image features, and an MLP head.

- :class:`BLIPVisionTransformer`: BLIP's ViT (timm layout: ``patch_embed.proj``, ``cls_token``,
  ``pos_embed``, ``blocks.N.*``, ``norm``), the token features of a 224 px image.
- :class:`BLIPTextEncoder`: BLIP's ``med.py`` BERT encoder (no token-type embeddings, no pooler) with a
  cross-attention to the image features in every layer.
- :class:`ImageRewardModel`: the two towers under ``blip.`` and the head under ``mlp.``, with the exact
  ``state_dict`` keys of ``ImageReward.pt``; :func:`load_image_reward_model` loads the file into it.
- :class:`ImageReward`: the reward, ``(MLP(first text token) − mean) / std``; differentiable.

Written fresh on plain torch modules (the ``image-reward`` package needs torchvision and breaks on
transformers ≥ 4.56); only the BERT tokenizer comes from transformers. Preprocessing is tensor-only
(:func:`rdm_lightning.rewards.clip.clip_preprocess`). Formats, sources and the differences from the
reference code: docs/rewards.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdm_lightning.rewards.aesthetic import AestheticMLP
from rdm_lightning.rewards.base import RewardModel
from rdm_lightning.rewards.clip import clip_preprocess
from rdm_lightning.state_files import check_weights, config_from_spec, read_state_dict_file

IMAGE_REWARD_MEAN = 0.16717362830052426
"""Mean of the raw head output that ImageReward v1.0 subtracts (its ``self.mean``)."""
IMAGE_REWARD_STD = 1.0333394966054072
"""Standard deviation of the raw head output that ImageReward v1.0 divides by (its ``self.std``)."""
MAX_PROMPT_TOKENS = 35
"""Tokens per prompt, ``[CLS]`` and ``[SEP]`` included: the reference pads and truncates to 35."""
BLIP_ADDED_TOKENS = ("[DEC]", "[ENC]")
"""Special tokens BLIP adds to bert-base-uncased (ids 30522 and 30523): the decoder's bos and the encoder token."""

CHECKPOINT_SOURCE = (
    "ImageReward.pt from the Hugging Face repo THUDM/ImageReward (https://huggingface.co/THUDM/ImageReward), "
    "a torch-saved float32 state dict with keys blip.visual_encoder.*, blip.text_encoder.* and mlp.layers.*"
)
MED_CONFIG_SOURCE = (
    "med_config.json from the Hugging Face repo THUDM/ImageReward (https://huggingface.co/THUDM/ImageReward), "
    "BLIP's BERT config as JSON (hidden_size 768, 12 layers, vocab_size 30524, add_cross_attention true)"
)
TOKENIZER_SOURCE = (
    "a local copy of the Hugging Face repo google-bert/bert-base-uncased (https://huggingface.co/google-bert/"
    "bert-base-uncased) holding vocab.txt or tokenizer.json"
)
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")

# Keys of ImageReward.pt that the score does not use, and why; they are accepted and left out of the model.
UNUSED_CHECKPOINT_KEYS: dict[str, str] = {
    "blip.vision_proj.weight": "BLIP's image-text contrastive projection, not used by ImageReward's score",
    "blip.vision_proj.bias": "BLIP's image-text contrastive projection, not used by ImageReward's score",
    "blip.text_proj.weight": "BLIP's image-text contrastive projection, not used by ImageReward's score",
    "blip.text_proj.bias": "BLIP's image-text contrastive projection, not used by ImageReward's score",
    "blip.text_encoder.embeddings.position_ids": "BERT's buffer of position indices 0, 1, ...; computed here",
}


# --- architecture -------------------------------------------------------------------------------


def _positive_int(owner: str, name: str, value: Any) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class BLIPVisionConfig:
    """Dimensions of BLIP's ViT image tower (its ``create_vit``; ImageReward uses ``vit='large'`` at 224 px)."""

    image_size: int = 224
    """Side of the square input image in pixels."""
    patch_size: int = 16
    """Side of the square patches of ``patch_embed.proj``; divides ``image_size``."""
    width: int = 1024
    """Token width; also the width of the features the text encoder cross-attends to (BLIP's ``encoder_width``)."""
    layers: int = 24
    """Number of transformer blocks."""
    heads: int = 16
    """Number of attention heads; divides ``width``."""
    mlp_ratio: float = 4.0
    """MLP hidden width over ``width``."""

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "layers", "heads"):
            _positive_int("BLIPVisionConfig", name, getattr(self, name))
        if not (isinstance(self.mlp_ratio, (int, float)) and math.isfinite(self.mlp_ratio) and self.mlp_ratio > 0):
            raise ValueError(f"BLIPVisionConfig.mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        for whole, part in (("image_size", "patch_size"), ("width", "heads")):
            if getattr(self, whole) % getattr(self, part):
                raise ValueError(
                    f"BLIPVisionConfig.{part} ({getattr(self, part)}) must divide {whole} ({getattr(self, whole)})"
                )
        if int(self.width * self.mlp_ratio) < 1:
            raise ValueError(f"BLIPVisionConfig.mlp_ratio {self.mlp_ratio} leaves no MLP width")

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @classmethod
    def from_spec(cls, architecture: str | Mapping[str, Any]) -> BLIPVisionConfig:
        """A preset of :data:`BLIP_VISION_PRESETS` by name, or a config from a dict of its fields.

        Raises:
            ValueError: an unknown preset name, unknown fields, or invalid values.
        """
        return config_from_spec(cls, architecture, BLIP_VISION_PRESETS, "BLIP vision architecture", "vision_architecture")


BLIP_VISION_PRESETS: dict[str, BLIPVisionConfig] = {
    # BLIP's create_vit('large', 224): the image tower of ImageReward v1.0.
    "ViT-L/16": BLIPVisionConfig(),
}
"""BLIP image towers by name."""


@dataclass(frozen=True)
class BLIPTextConfig:
    """The fields of BLIP's ``med_config.json`` (a ``BertConfig``) that shape the text encoder.

    The file's ``encoder_width`` is not among them: BLIP overwrites it with the image tower's width
    (1024 for ViT-L), and so does :class:`ImageRewardModel`.
    """

    vocab_size: int
    """Rows of ``embeddings.word_embeddings``: bert-base-uncased's 30522 tokens plus BLIP's ``[DEC]`` and ``[ENC]``."""
    hidden_size: int
    """Token width."""
    num_hidden_layers: int
    """Number of BERT layers."""
    num_attention_heads: int
    """Attention heads of the self- and cross-attentions; divides ``hidden_size``."""
    intermediate_size: int
    """Hidden width of each layer's feed-forward block."""
    max_position_embeddings: int
    """Rows of ``embeddings.position_embeddings``: the longest token sequence."""
    layer_norm_eps: float
    """Epsilon of every LayerNorm of the text encoder."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if field.name != "layer_norm_eps":
                _positive_int("BLIPTextConfig", field.name, getattr(self, field.name))
        eps = self.layer_norm_eps
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"BLIPTextConfig.layer_norm_eps must be a positive number, got {eps!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BLIPTextConfig.num_attention_heads ({self.num_attention_heads}) must divide "
                f"hidden_size ({self.hidden_size})"
            )

    @classmethod
    def from_json_file(cls, path: str | Path) -> BLIPTextConfig:
        """The text encoder's config from a ``med_config.json``.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: not JSON, a field missing or invalid, or a setting the encoder does not implement
                (``add_cross_attention`` not true, ``hidden_act`` not ``"gelu"``, a relative
                ``position_embedding_type``).
        """
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"BLIP text config not found at {str(file)!r}; expected {MED_CONFIG_SOURCE}")
        try:
            config = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{str(file)!r} is not JSON ({error}); expected {MED_CONFIG_SOURCE}") from error
        if not isinstance(config, dict):
            raise ValueError(f"{str(file)!r} holds a {type(config).__name__}, not a JSON object; expected {MED_CONFIG_SOURCE}")
        names = [field.name for field in dataclasses.fields(cls)]
        missing = [name for name in names if name not in config]
        if missing:
            raise ValueError(f"{str(file)!r} lacks the fields {missing}; expected {MED_CONFIG_SOURCE}")
        # The reference builds its BertLayers with cross-attention from this flag; without it there is no
        # image in the score at all.
        unsupported = {
            "add_cross_attention": (config.get("add_cross_attention"), (True,)),
            "hidden_act": (config.get("hidden_act", "gelu"), ("gelu",)),
            "position_embedding_type": (config.get("position_embedding_type", "absolute"), ("absolute",)),
        }
        for name, (value, accepted) in unsupported.items():
            if value not in accepted:
                raise ValueError(
                    f"{str(file)!r} sets {name} to {value!r}; the BLIP text encoder here implements only "
                    f"{' or '.join(repr(option) for option in accepted)} (expected {MED_CONFIG_SOURCE})"
                )
        try:
            return cls(**{name: config[name] for name in names})
        except ValueError as error:
            raise ValueError(f"{str(file)!r}: {error}; expected {MED_CONFIG_SOURCE}") from error


def attend(query: Tensor, key: Tensor, value: Tensor, heads: int, key_mask: Tensor | None = None) -> Tensor:
    """Multi-head scaled dot-product attention ``softmax(q kᵀ / √d) v`` on ``(B, L, width)`` projections.

    Args:
        query: ``(B, Lq, width)``.
        key: ``(B, Lk, width)``.
        value: ``(B, Lk, width)``.
        heads: Number of heads; divides ``width``, each head has ``d = width / heads`` channels.
        key_mask: ``(B, Lk)``, true for the keys to attend to; ``None`` attends to all.

    The reference adds −10000 to the scores of masked keys; a boolean mask gives them weight 0,
    which in float32 is the same (``exp(−10000)`` underflows to 0).
    """
    batch, query_length, width = query.shape

    def split(tensor: Tensor) -> Tensor:
        return tensor.view(batch, -1, heads, width // heads).transpose(1, 2)

    mask = None if key_mask is None else key_mask[:, None, None, :].bool()
    attended = F.scaled_dot_product_attention(split(query), split(key), split(value), attn_mask=mask)
    return attended.transpose(1, 2).reshape(batch, query_length, width)


class ViTAttention(nn.Module):
    """timm's ViT self-attention: ``qkv`` stacks the query, key and value projections, ``proj`` the output.

    Args:
        width: Token width.
        heads: Number of heads.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        """Self-attention over tokens ``x`` ``(B, L, width)``, without a mask."""
        query, key, value = self.qkv(x).chunk(3, dim=-1)
        return self.proj(attend(query, key, value, self.heads))


class ViTMLP(nn.Module):
    """timm's ViT MLP: ``fc2(GELU(fc1(x)))`` with the exact (erf) GELU.

    Args:
        width: Token width.
        hidden: Hidden width.
    """

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        """The MLP applied to tokens ``x`` ``(B, L, width)``."""
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-norm ViT block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``; LayerNorm eps 1e-6 as BLIP's ViT.

    Args:
        width: Token width.
        heads: Number of attention heads.
        mlp_ratio: MLP hidden width over ``width``.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = ViTAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = ViTMLP(width, int(width * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        """The block applied to tokens ``x`` ``(B, L, width)``."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """timm's patch embedding: a ``proj`` convolution with stride = kernel = patch size, flattened to tokens.

    Args:
        patch_size: Side of the patches.
        width: Token width.
    """

    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixels: Tensor) -> Tensor:
        """Patch tokens ``(B, grid², width)`` of pixels ``(B, 3, S, S)``, row by row."""
        return self.proj(pixels).flatten(2).transpose(1, 2)


class BLIPVisionTransformer(nn.Module):
    """BLIP's ViT: class token and learned positions, pre-norm blocks, a final LayerNorm; all tokens out.

    Args:
        config: The architecture.
    """

    def __init__(self, config: BLIPVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config.patch_size, config.width)
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.empty(1, config.grid_size**2 + 1, config.width))
        self.blocks = nn.ModuleList(
            ViTBlock(config.width, config.heads, config.mlp_ratio) for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(config.width, eps=1e-6)

    def forward(self, pixels: Tensor) -> Tensor:
        """Token features ``(B, 1 + grid², width)`` (class token first) of normalised pixels ``(B, 3, S, S)``.

        Raises:
            ValueError: ``pixels`` is not ``(B, 3, image_size, image_size)``.
        """
        size = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
            raise ValueError(f"the BLIP image tower takes (B, 3, {size}, {size}) pixels, got {tuple(pixels.shape)}")
        patches = self.patch_embed(pixels)
        tokens = torch.cat([self.cls_token.expand(len(patches), -1, -1), patches], dim=1) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)


class BertEmbeddings(nn.Module):
    """BLIP's BERT embeddings: ``LayerNorm(word + position)``, without BERT's token-type embeddings.

    Args:
        config: The text encoder's dimensions.
    """

    def __init__(self, config: BLIPTextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Embeddings ``(B, L, hidden)`` of token ids ``(B, L)`` at positions ``0 … L−1``."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class BertProjections(nn.Module):
    """The query, key and value projections of a BERT attention (``attention.self`` in the checkpoints).

    Args:
        width: Token width of the queries and of the output.
        key_width: Width of the tokens the keys and values are computed from (the image width for
            cross-attention).
    """

    def __init__(self, width: int, key_width: int) -> None:
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(key_width, width)
        self.value = nn.Linear(key_width, width)


class BertResidualOutput(nn.Module):
    """Post-norm residual output of BERT: ``LayerNorm(dense(x) + residual)``.

    Args:
        in_width: Width of ``x``.
        width: Token width (of the residual and the output).
        eps: LayerNorm epsilon.
    """

    def __init__(self, in_width: int, width: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """``LayerNorm(dense(x) + residual)``."""
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    """A BERT attention with its residual output: self-attention, or cross-attention when ``key_width`` is the
    image width.

    Args:
        config: The text encoder's dimensions.
        key_width: Width of the key and value tokens.
    """

    def __init__(self, config: BLIPTextConfig, key_width: int) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.self = BertProjections(config.hidden_size, key_width)
        self.output = BertResidualOutput(config.hidden_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, x: Tensor, context: Tensor, key_mask: Tensor | None) -> Tensor:
        """Tokens ``x`` ``(B, L, hidden)`` attending to ``context`` ``(B, Lk, key_width)`` (``x`` itself for
        self-attention), ``key_mask`` ``(B, Lk)`` true for the keys to attend to."""
        projections = self.self
        attended = attend(projections.query(x), projections.key(context), projections.value(context), self.heads, key_mask)
        return self.output(attended, x)


class BertIntermediate(nn.Module):
    """The first half of BERT's feed-forward block: ``GELU(dense(x))`` with the exact (erf) GELU.

    Args:
        config: The text encoder's dimensions.
    """

    def __init__(self, config: BLIPTextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        """``GELU(dense(x))``."""
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    """BLIP's BERT layer in its multimodal mode: self-attention, cross-attention to the image, feed-forward,
    each with a post-norm residual.

    Args:
        config: The text encoder's dimensions.
        image_width: Width of the image features.
    """

    def __init__(self, config: BLIPTextConfig, image_width: int) -> None:
        super().__init__()
        self.attention = BertAttention(config, config.hidden_size)
        self.crossattention = BertAttention(config, image_width)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualOutput(config.intermediate_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, x: Tensor, attention_mask: Tensor, image_features: Tensor) -> Tensor:
        """The layer applied to text tokens ``x`` ``(B, L, hidden)`` with padding mask ``attention_mask``
        ``(B, L)`` (true for real tokens); every image token is attended to."""
        x = self.attention(x, x, attention_mask)
        x = self.crossattention(x, image_features, None)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    """The stack of :class:`BertLayer` (``encoder.layer.N``).

    Args:
        config: The text encoder's dimensions.
        image_width: Width of the image features.
    """

    def __init__(self, config: BLIPTextConfig, image_width: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, image_width) for _ in range(config.num_hidden_layers))

    def forward(self, x: Tensor, attention_mask: Tensor, image_features: Tensor) -> Tensor:
        """Tokens ``x`` through every layer."""
        for layer in self.layer:
            x = layer(x, attention_mask, image_features)
        return x


class BLIPTextEncoder(nn.Module):
    """BLIP's ``med.py`` ``BertModel(add_pooling_layer=False)`` run in its multimodal mode, as ImageReward runs it.

    Args:
        config: The text encoder's dimensions.
        image_width: Width of the image features (BLIP's ``encoder_width``).
    """

    def __init__(self, config: BLIPTextConfig, image_width: int) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config, image_width)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, image_features: Tensor) -> Tensor:
        """Last hidden states ``(B, L, hidden)`` of token ids ``(B, L)`` with padding mask ``attention_mask``
        ``(B, L)`` (1 for real tokens), cross-attending to ``image_features`` ``(B, N, image_width)``.

        Raises:
            ValueError: more tokens than ``max_position_embeddings``.
        """
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"token rows have {length} tokens; the text encoder takes at most {self.config.max_position_embeddings}"
            )
        return self.encoder(self.embeddings(input_ids), attention_mask, image_features)


class BLIPTowers(nn.Module):
    """The two BLIP towers ImageReward keeps (``blip.visual_encoder``, ``blip.text_encoder``).

    Args:
        vision: The image tower's architecture.
        text: The text encoder's dimensions.
    """

    def __init__(self, vision: BLIPVisionConfig, text: BLIPTextConfig) -> None:
        super().__init__()
        self.visual_encoder = BLIPVisionTransformer(vision)
        self.text_encoder = BLIPTextEncoder(text, image_width=vision.width)


class ImageRewardModel(nn.Module):
    """ImageReward v1.0's network with the ``state_dict`` keys of ``ImageReward.pt``: ``blip.visual_encoder.*``,
    ``blip.text_encoder.*`` and the head ``mlp.layers.{0,2,4,6,7}.*``.

    The head is the improved aesthetic predictor's MLP (:class:`AestheticMLP`, five linear maps without
    activations) on the text width, as ImageReward's ``MLP(768)``. Parameters are uninitialised
    (``torch.empty``): the model is for loading the checkpoint, see :func:`load_image_reward_model`.

    Args:
        vision: The image tower's architecture.
        text: The text encoder's dimensions (``med_config.json``).
    """

    def __init__(self, vision: BLIPVisionConfig, text: BLIPTextConfig) -> None:
        super().__init__()
        self.blip = BLIPTowers(vision, text)
        self.mlp = AestheticMLP(text.hidden_size)

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Raw (unnormalised) rewards ``(B,)``: the head on the first text token's last hidden state.

        Args:
            pixels: Normalised images ``(B, 3, S, S)``.
            input_ids: Prompt token ids ``(B, L)``, ``[CLS]`` first.
            attention_mask: ``(B, L)``, 1 for real tokens and 0 for padding.
        """
        image_features = self.blip.visual_encoder(pixels)
        hidden = self.blip.text_encoder(input_ids, attention_mask, image_features)
        return self.mlp(hidden[:, 0])


def normalize_image_reward(raw: Tensor) -> Tensor:
    """ImageReward's reported score ``(raw − IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD`` of raw head outputs."""
    return (raw - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD


def load_image_reward_model(
    vision: BLIPVisionConfig, text: BLIPTextConfig, state_dict: Mapping[str, Tensor], source: str
) -> ImageRewardModel:
    """An :class:`ImageRewardModel` holding ``state_dict`` in float32, built without a random init.

    Args:
        vision: The image tower's architecture.
        text: The text encoder's dimensions.
        state_dict: ``ImageReward.pt``'s weights: exactly the model's keys with its shapes, plus any of
            :data:`UNUSED_CHECKPOINT_KEYS`, which are checked (position ids) or left out.
        source: The file and what it should be, for the error messages.

    Raises:
        ValueError: missing or unexpected keys, a value that is not a floating tensor, a shape that does not fit
            ``vision`` and ``text``, or position ids other than ``0, 1, ...``.
    """
    # The meta device skips allocating and initialising ~450M parameters that the load replaces.
    with torch.device("meta"):
        model = ImageRewardModel(vision, text)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    check_weights(state_dict, expected, source, f"ImageReward's network (vision {vision}, text {text})",
                  ignored=UNUSED_CHECKPOINT_KEYS)
    position_ids = state_dict.get("blip.text_encoder.embeddings.position_ids")
    if position_ids is not None:
        # The reference embeds positions by this buffer; the model here embeds 0, 1, ... directly.
        expected_ids = torch.arange(text.max_position_embeddings)
        if not (position_ids.shape[-1:] == expected_ids.shape and torch.equal(position_ids.reshape(-1).long(), expected_ids)):
            raise ValueError(
                f"{source}: 'blip.text_encoder.embeddings.position_ids' must be 0 … {text.max_position_embeddings - 1}, "
                f"got shape {tuple(position_ids.shape)}"
            )
    model.load_state_dict({name: state_dict[name].to(torch.float32) for name in expected}, assign=True)
    return model


# --- tokenizer ----------------------------------------------------------------------------------


def load_blip_tokenizer(path: str | Path, vocab_size: int) -> Any:
    """bert-base-uncased's tokenizer from a local folder with BLIP's ``[DEC]`` and ``[ENC]`` tokens added, as
    BLIP's ``init_tokenizer`` builds it.

    Args:
        path: The tokenizer folder (:data:`TOKENIZER_SOURCE`).
        vocab_size: Rows of the text encoder's word embeddings, which the tokenizer's size must equal.

    Raises:
        FileNotFoundError: ``path`` is not a folder with ``vocab.txt`` or ``tokenizer.json``.
        ValueError: the tokenizer's size with the added tokens is not ``vocab_size``.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"BERT tokenizer folder not found at {str(folder)!r}; expected {TOKENIZER_SOURCE}")
    # Checked up front: without these files BertTokenizer.from_pretrained silently builds a 5-token vocabulary.
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"BERT tokenizer folder {str(folder)!r} has neither {' nor '.join(TOKENIZER_FILES)}; expected {TOKENIZER_SOURCE}"
        )
    # Imported here so that importing the rewards package does not load transformers.
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(folder, local_files_only=True)
    # BLIP's init_tokenizer: [DEC] as the bos token, [ENC] as an additional special token.
    tokenizer.add_special_tokens({"bos_token": BLIP_ADDED_TOKENS[0]})
    tokenizer.add_tokens([BLIP_ADDED_TOKENS[1]], special_tokens=True)
    if len(tokenizer) != vocab_size:
        raise ValueError(
            f"the tokenizer in {str(folder)!r} has {len(tokenizer)} tokens with BLIP's {' and '.join(BLIP_ADDED_TOKENS)} "
            f"added, but the text encoder has vocab_size {vocab_size} (bert-base-uncased's 30522 plus 2 is 30524); "
            f"expected {TOKENIZER_SOURCE}"
        )
    return tokenizer


# --- reward -------------------------------------------------------------------------------------


class ImageReward(RewardModel):
    """ImageReward v1.0, ``(MLP(h_[CLS]) − 0.16717…) / 1.03333…``; differentiable; tables report about 0.8–1.4.

    ``h_[CLS]`` is the last hidden state of the first token of BLIP's text encoder run on the prompt while
    cross-attending to the BLIP ViT-L/16 features of the image, as ImageReward's ``score`` /
    ``inference_rank`` compute it. Images are preprocessed as its ``_transform(224)`` does: shorter side to
    224 bicubically with antialiasing (PIL's filter), centre crop 224, OpenAI CLIP normalisation; prompts
    are tokenized by bert-base-uncased with BLIP's added tokens, padded and truncated to 35 tokens
    (docs/rewards.md). Weights load in float32, offline.

    Args:
        checkpoint_path: Local path of ``ImageReward.pt`` (:data:`CHECKPOINT_SOURCE`).
        med_config_path: Local path of ``med_config.json`` (:data:`MED_CONFIG_SOURCE`).
        tokenizer_path: Local folder of bert-base-uncased's tokenizer (:data:`TOKENIZER_SOURCE`).
        vision_architecture: A preset of :data:`BLIP_VISION_PRESETS` (``"ViT-L/16"``, ImageReward's) or a
            dict of :class:`BLIPVisionConfig` fields.
        name: Name in logs; ``None`` uses the class name.
        train_scale: Factor of the score in training objectives.
        report_scale: Factor of the score in reported tables.

    Raises:
        FileNotFoundError: a file or the tokenizer folder is missing.
        ValueError: a file is not in its expected format, or the files do not fit each other
            (see :func:`load_image_reward_model` and :func:`load_blip_tokenizer`).
    """

    differentiable = True

    def __init__(
        self,
        checkpoint_path: str,
        med_config_path: str,
        tokenizer_path: str,
        vision_architecture: str | dict[str, Any] = "ViT-L/16",
        name: str | None = None,
        train_scale: float = 1.0,
        report_scale: float = 1.0,
    ) -> None:
        super().__init__(name=name, train_scale=train_scale, report_scale=report_scale)
        vision = BLIPVisionConfig.from_spec(vision_architecture)
        text = BLIPTextConfig.from_json_file(med_config_path)
        if text.max_position_embeddings < MAX_PROMPT_TOKENS:
            raise ValueError(
                f"{med_config_path!r} has max_position_embeddings {text.max_position_embeddings}, fewer than the "
                f"{MAX_PROMPT_TOKENS} prompt tokens ImageReward pads to; expected {MED_CONFIG_SOURCE}"
            )
        checkpoint = Path(checkpoint_path).expanduser()
        # Checked before loading the tokenizer and reading the 1.8 GB checkpoint, so a wrong path fails at once.
        if not checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint not found at {str(checkpoint)!r}; expected {CHECKPOINT_SOURCE}")
        self.tokenizer = load_blip_tokenizer(tokenizer_path, text.vocab_size)
        state_dict = read_state_dict_file(checkpoint, nested=False, source=CHECKPOINT_SOURCE)
        self.model = load_image_reward_model(
            vision, text, state_dict, source=f"{str(checkpoint)!r} (expected {CHECKPOINT_SOURCE})"
        )

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask, each ``(N, 35)``, of ``prompts``: ``[CLS] … [SEP]`` padded with
        ``[PAD]`` and truncated to :data:`MAX_PROMPT_TOKENS`, as the reference tokenizes them."""
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
        )
        return tokens.input_ids, tokens.attention_mask

    def raw_scores(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Raw head outputs ``(B,)`` (before :func:`normalize_image_reward`) of images ``(B, 1 or 3, H, W)`` in
        ``[0, 1]`` on the reward's device and dtype."""
        pixels = clip_preprocess(images, self.model.blip.visual_encoder.config.image_size, mode="bicubic", antialias=True)
        input_ids, attention_mask = self.tokenize(prompts)
        device = pixels.device
        return self.model(pixels, input_ids.to(device), attention_mask.to(device))

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return normalize_image_reward(self.raw_scores(images, prompts))
