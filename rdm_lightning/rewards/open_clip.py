"""OpenCLIP-format rewards: HPSv2 / HPSv2.1 and DFN5B-CLIP, without the open_clip package.

- :class:`OpenCLIPModel`: the ViT image tower and causal text tower of open_clip's ``CLIP``,
  with the same ``state_dict`` keys and shapes, so open_clip checkpoints load as they are.
- :class:`OpenCLIPTokenizer`: open_clip's ``SimpleTokenizer`` (byte-level BPE from
  ``bpe_simple_vocab_16e6.txt.gz``, 77 tokens, zero padding), implemented here.
- :class:`HPSv2Reward`: HPSv2 / HPSv2.1, the cosine of an OpenCLIP ViT-H-14's image and prompt
  embeddings with the weights of ``HPS_v2.1_compressed.pt``; differentiable.
- :class:`DFNCLIPReward`: the CLIP score of DFN5B-CLIP-ViT-H-14 (DMDR's CLIP reward) from
  ``open_clip_pytorch_model.bin``; differentiable.

Preprocessing is tensor-only (:func:`open_clip_preprocess`), so gradients reach the pixels.
Formats, sources and the differences from the reference code: docs/rewards.md.
"""
from __future__ import annotations

import dataclasses
import gzip
import html
import importlib.util
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdm_lightning.rewards.base import RewardModel
from rdm_lightning.state_files import check_weights, config_from_spec, read_state_dict_file
from rdm_lightning.rewards.clip import CLIP_MEAN, CLIP_STD

HPS_CHECKPOINT_SOURCE = (
    "HPS_v2.1_compressed.pt (HPSv2.1) or HPS_v2_compressed.pt (HPSv2.0) from the Hugging Face "
    "repo xswu/HPSv2 (https://huggingface.co/xswu/HPSv2)"
)
DFN_CHECKPOINT_SOURCE = (
    "open_clip_pytorch_model.bin from the Hugging Face repo apple/DFN5B-CLIP-ViT-H-14 "
    "(https://huggingface.co/apple/DFN5B-CLIP-ViT-H-14)"
)

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_SOURCE = (
    "https://github.com/mlfoundations/open_clip/blob/main/src/open_clip/bpe_simple_vocab_16e6.txt.gz "
    "(the same file as OpenAI CLIP's clip/bpe_simple_vocab_16e6.txt.gz)"
)
# Installed packages that ship the BPE file, and the folder inside each that holds it; looked
# up with importlib.util.find_spec, which locates a package without importing it.
BPE_PACKAGES: tuple[tuple[str, str], ...] = (("open_clip", ""), ("hpsv2", "src/open_clip"))
# open_clip keeps the first 49152 − 256 − 2 merges of the file: 256 byte tokens, their
# end-of-word forms, the merges and 2 special tokens make its 49408-token vocabulary.
BPE_MERGE_COUNT = 49152 - 256 - 2
START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
END_OF_WORD = "</w>"

RESIZE_MODES = ("pad", "squash")


# --- architecture -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenCLIPConfig:
    """Dimensions of an open_clip ``CLIP`` with a ViT image tower and a causal text transformer.

    Field names follow open_clip's model configs (``model_configs/ViT-H-14.json``): ``vision_*``
    are its ``vision_cfg``, ``text_*`` / ``context_length`` / ``vocab_size`` its ``text_cfg``.
    """

    embed_dim: int
    """Width of the shared image-text embedding (output of ``visual.proj`` and ``text_projection``)."""
    image_size: int
    """Side of the square input image in pixels."""
    patch_size: int
    """Side of the square patches of the patch convolution ``visual.conv1``; divides ``image_size``."""
    vision_width: int
    """Token width of the image transformer."""
    vision_layers: int
    """Number of image transformer blocks."""
    vision_head_width: int
    """Width of one image attention head; divides ``vision_width`` (heads = width / head width)."""
    text_width: int
    """Token width of the text transformer."""
    text_heads: int
    """Number of text attention heads; divides ``text_width``."""
    text_layers: int
    """Number of text transformer blocks."""
    context_length: int = 77
    """Tokens per prompt, including the start and end tokens (rows of ``positional_embedding``)."""
    vocab_size: int = 49408
    """Rows of ``token_embedding``; must equal the tokenizer's vocabulary size."""
    mlp_ratio: float = 4.0
    """Hidden width of every MLP over its token width (both towers)."""
    quick_gelu: bool = False
    """MLP activation ``x·sigmoid(1.702·x)`` (OpenAI CLIP, DFN) instead of the exact GELU."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "quick_gelu":
                if not isinstance(value, bool):
                    raise ValueError(f"OpenCLIPConfig.quick_gelu must be a bool, got {value!r}")
            elif field.name == "mlp_ratio":
                if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                    raise ValueError(f"OpenCLIPConfig.mlp_ratio must be a positive number, got {value!r}")
            elif not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"OpenCLIPConfig.{field.name} must be a positive integer, got {value!r}")
        divisions = (
            ("image_size", "patch_size"), ("vision_width", "vision_head_width"), ("text_width", "text_heads")
        )
        for whole, part in divisions:
            if getattr(self, whole) % getattr(self, part):
                raise ValueError(
                    f"OpenCLIPConfig.{part} ({getattr(self, part)}) must divide {whole} ({getattr(self, whole)})"
                )
        for width in (self.vision_width, self.text_width):
            if int(width * self.mlp_ratio) < 1:
                raise ValueError(f"OpenCLIPConfig.mlp_ratio {self.mlp_ratio} leaves no MLP width for width {width}")

    @property
    def vision_heads(self) -> int:
        """Number of image attention heads."""
        return self.vision_width // self.vision_head_width

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @classmethod
    def from_spec(cls, architecture: str | Mapping[str, Any]) -> OpenCLIPConfig:
        """A preset of :data:`OPEN_CLIP_PRESETS` by name, or a config from a dict of its fields.

        Raises:
            ValueError: an unknown preset name, unknown or missing fields, or invalid values.
        """
        return config_from_spec(cls, architecture, OPEN_CLIP_PRESETS, "OpenCLIP architecture", "architecture")


_VIT_H_14 = OpenCLIPConfig(
    embed_dim=1024,
    image_size=224,
    patch_size=14,
    vision_width=1280,
    vision_layers=32,
    vision_head_width=80,
    text_width=1024,
    text_heads=16,
    text_layers=24,
)
OPEN_CLIP_PRESETS: dict[str, OpenCLIPConfig] = {
    # open_clip's ViT-H-14.json (exact GELU): LAION-2B ViT-H-14, fine-tuned by HPSv2 / HPSv2.1.
    "ViT-H-14": _VIT_H_14,
    # open_clip's ViT-H-14-quickgelu.json: DFN5B-CLIP-ViT-H-14.
    "ViT-H-14-quickgelu": dataclasses.replace(_VIT_H_14, quick_gelu=True),
}
"""open_clip architectures by their open_clip model names."""


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation ``x · sigmoid(1.702 · x)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names.

    ``in_proj_weight`` stacks the query, key and value projections (``(3·width, width)``),
    as open_clip's checkpoints store them.

    Args:
        width: Token width.
        heads: Number of heads; divides ``width``.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, causal: bool) -> Tensor:
        """Attend over tokens ``x`` ``(B, L, width)``; ``causal`` masks later tokens."""
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        query, key, value = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(query, key, value, is_causal=causal)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``.

    Args:
        width: Token width.
        heads: Number of attention heads.
        mlp_ratio: MLP hidden width over ``width``.
        quick_gelu: Use :class:`QuickGELU` instead of the exact GELU.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, hidden),
                gelu=QuickGELU() if quick_gelu else nn.GELU(),
                c_proj=nn.Linear(hidden, width),
            )
        )

    def forward(self, x: Tensor, causal: bool) -> Tensor:
        """The block applied to tokens ``x`` ``(B, L, width)``."""
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock` (open_clip's ``Transformer``: ``resblocks.N``).

    Args:
        width: Token width.
        layers: Number of blocks.
        heads: Number of attention heads.
        mlp_ratio: MLP hidden width over ``width``.
        quick_gelu: Use :class:`QuickGELU` instead of the exact GELU.
    """

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)
        )

    def forward(self, x: Tensor, causal: bool) -> Tensor:
        """Tokens ``x`` ``(B, L, width)`` through every block."""
        for block in self.resblocks:
            x = block(x, causal)
        return x


class VisionTransformer(nn.Module):
    """open_clip's ViT image tower (class-token pooling, no patch dropout, no attentional pool).

    Args:
        config: The architecture.
    """

    def __init__(self, config: OpenCLIPConfig) -> None:
        super().__init__()
        width = config.vision_width
        self.image_size = config.image_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(config.grid_size**2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(
            width, config.vision_layers, config.vision_heads, config.mlp_ratio, config.quick_gelu
        )
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, config.embed_dim))

    def forward(self, pixels: Tensor) -> Tensor:
        """Projected (unnormalised) embeddings ``(B, embed_dim)`` of normalised pixels ``(B, 3, S, S)``.

        Raises:
            ValueError: ``pixels`` is not ``(B, 3, image_size, image_size)``.
        """
        if pixels.ndim != 4 or pixels.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"the OpenCLIP image tower takes (B, 3, {self.image_size}, {self.image_size}) pixels, "
                f"got {tuple(pixels.shape)}"
            )
        patches = self.conv1(pixels).flatten(2).transpose(1, 2)
        class_token = self.class_embedding.to(patches.dtype).expand(len(patches), 1, -1)
        tokens = torch.cat([class_token, patches], dim=1) + self.positional_embedding
        tokens = self.transformer(self.ln_pre(tokens), causal=False)
        return self.ln_post(tokens[:, 0]) @ self.proj


class OpenCLIPModel(nn.Module):
    """open_clip's ``CLIP`` (ViT image tower, causal text transformer) with its exact ``state_dict`` layout.

    Keys: ``visual.*`` (``conv1.weight``, ``class_embedding``, ``positional_embedding``,
    ``ln_pre``, ``transformer.resblocks.N.*``, ``ln_post``, ``proj``), then the text tower at the
    top level (``token_embedding.weight``, ``positional_embedding``, ``transformer.resblocks.N.*``,
    ``ln_final``, ``text_projection``) and ``logit_scale``. open_clip's causal ``attn_mask`` is a
    non-persistent buffer, so it is not in checkpoints; here the mask is built by attention.

    Parameters are uninitialised (``torch.empty``): the model is for loading checkpoints, see
    :func:`load_open_clip_model`.

    Args:
        config: The architecture.
    """

    def __init__(self, config: OpenCLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config)
        self.transformer = Transformer(
            config.text_width, config.text_layers, config.text_heads, config.mlp_ratio, config.quick_gelu
        )
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.text_width))
        self.ln_final = nn.LayerNorm(config.text_width)
        self.text_projection = nn.Parameter(torch.empty(config.text_width, config.embed_dim))
        # Unused by the scores; kept so that the checkpoints' keys load exactly.
        self.logit_scale = nn.Parameter(torch.empty(()))

    def encode_image(self, pixels: Tensor) -> Tensor:
        """Projected (unnormalised) image embeddings ``(B, embed_dim)`` of normalised pixels."""
        return self.visual(pixels)

    def encode_text(self, token_ids: Tensor) -> Tensor:
        """Projected (unnormalised) text embeddings ``(N, embed_dim)`` of token ids ``(N, L)``.

        The feature is read at the end-of-text token, the largest id of each row (open_clip's
        ``argmax`` pooling); the causal mask makes it independent of the padding after it.
        """
        length = token_ids.shape[1]
        if length > self.config.context_length:
            raise ValueError(f"token rows have {length} tokens; the model takes at most {self.config.context_length}")
        tokens = self.token_embedding(token_ids) + self.positional_embedding[:length]
        tokens = self.ln_final(self.transformer(tokens, causal=True))
        pooled = tokens[torch.arange(len(tokens), device=tokens.device), token_ids.argmax(dim=-1)]
        return pooled @ self.text_projection


def load_open_clip_model(config: OpenCLIPConfig, state_dict: Mapping[str, Tensor], source: str) -> OpenCLIPModel:
    """An :class:`OpenCLIPModel` holding ``state_dict`` in float32, built without a random init.

    Args:
        config: The architecture.
        state_dict: open_clip ``CLIP`` weights: exactly the model's keys, with its shapes.
        source: What the weights are (file and expected format), for the error messages.

    Raises:
        ValueError: missing or unexpected keys, a value that is not a floating tensor, or a shape mismatch.
    """
    # The meta device skips allocating and initialising ~1B parameters that the load replaces.
    with torch.device("meta"):
        model = OpenCLIPModel(config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    check_weights(state_dict, expected, source, f"the OpenCLIP architecture {config}")
    model.load_state_dict({name: state_dict[name].to(torch.float32) for name in expected}, assign=True)
    return model


# --- tokenizer ----------------------------------------------------------------------------------


def find_open_clip_bpe(bpe_path: str | Path | None = None) -> Path:
    """The BPE vocabulary file: ``bpe_path``, else the copy in an installed ``open_clip`` (or ``hpsv2``).

    The packages are located with ``importlib.util.find_spec``, which does not import them.

    Raises:
        FileNotFoundError: ``bpe_path`` is not a file, or it is ``None`` and no installed package ships the file.
    """
    if bpe_path is not None:
        path = Path(bpe_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"BPE vocabulary not found at {str(path)!r}; expected {BPE_FILENAME} from {BPE_SOURCE}"
            )
        return path
    for package, subfolder in BPE_PACKAGES:
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            candidate = Path(folder, subfolder, BPE_FILENAME)
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"open_clip's BPE vocabulary {BPE_FILENAME} was not found: pass bpe_path=<its path>, or install "
        f"the open_clip_torch wheel without its dependencies (`pip install --no-deps open_clip_torch`), which "
        f"ships it as open_clip/{BPE_FILENAME}; the file is published at {BPE_SOURCE}"
    )


def byte_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves and come first; the others map to ``chr(256 + n)``
    in increasing byte order. The order is the order of the first 256 vocabulary ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    for offset, byte in enumerate(byte for byte in range(256) if byte not in table):
        table[byte] = chr(256 + offset)
    return table


def read_bpe_merges(path: Path) -> list[tuple[str, str]]:
    """The merges open_clip uses from a BPE file: lines 2 to ``BPE_MERGE_COUNT + 1``, as pairs.

    Raises:
        ValueError: the file is not gzip text with a ``#version`` header and ``a b`` merge lines.
    """
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{str(path)!r} is not a gzip-compressed BPE text file ({error}); expected {BPE_FILENAME}"
        ) from error
    # A trailing newline is not a merge (open_clip would read an empty one in a file this short).
    header, *lines = text.rstrip("\n").split("\n")
    if "#version" not in header:
        raise ValueError(
            f"{str(path)!r} does not start with a BPE '#version' header line (got {header[:60]!r}); "
            f"expected {BPE_FILENAME} from {BPE_SOURCE}"
        )
    merges = []
    for number, line in enumerate(lines[:BPE_MERGE_COUNT], start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{str(path)!r} line {number} is not a merge 'first second': {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


class OpenCLIPTokenizer:
    """open_clip's ``SimpleTokenizer`` + ``tokenize``: prompts to ``(N, context_length)`` token ids.

    Text is cleaned as open_clip cleans it (``ftfy.fix_text`` when ftfy is installed, HTML
    unescaped twice, whitespace runs collapsed, stripped, lowercased), split with open_clip's
    regular expression, byte-encoded and merged by byte-level BPE. Each row is
    ``<start_of_text> tokens <end_of_text>``, truncated to ``context_length`` with the end token
    kept last, and padded with id 0.

    Args:
        bpe_path: ``bpe_simple_vocab_16e6.txt.gz``; ``None`` finds it in an installed open_clip
            (see :func:`find_open_clip_bpe`).
        context_length: Tokens per row.

    Raises:
        FileNotFoundError: no BPE file is found.
        ValueError: the BPE file is malformed, or ``context_length < 2``.
    """

    def __init__(self, bpe_path: str | Path | None = None, context_length: int = 77) -> None:
        if not (isinstance(context_length, int) and context_length >= 2):
            raise ValueError(f"context_length must be an integer >= 2 (start and end tokens), got {context_length!r}")
        self.bpe_path = find_open_clip_bpe(bpe_path)
        self.context_length = context_length
        self.byte_encoder = byte_to_unicode()
        merges = read_bpe_merges(self.bpe_path)
        characters = list(self.byte_encoder.values())
        vocabulary = [
            *characters,
            *(character + END_OF_WORD for character in characters),
            *(first + second for first, second in merges),
            START_OF_TEXT,
            END_OF_TEXT,
        ]
        # Later duplicates win, as in open_clip's dict(zip(vocab, range(len(vocab)))).
        self.encoder = {token: index for index, token in enumerate(vocabulary)}
        self.vocab_size = len(vocabulary)
        self.merge_ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.start_id = self.encoder[START_OF_TEXT]
        self.end_id = self.encoder[END_OF_TEXT]
        self.pattern = regex.compile(
            rf"{START_OF_TEXT}|{END_OF_TEXT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
            regex.IGNORECASE,
        )
        self._cache: dict[str, list[str]] = {}
        self._fix_text = _ftfy_fix_text()

    def clean(self, text: str) -> str:
        """``text`` as open_clip cleans it before splitting."""
        if self._fix_text is not None:
            text = self._fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        return regex.sub(r"\s+", " ", text).strip().lower()

    def bpe(self, word: str) -> list[str]:
        """The BPE pieces of one byte-encoded word: repeatedly merge its best-ranked adjacent pair."""
        if word in self._cache:
            return self._cache[word]
        pieces = [*word[:-1], word[-1] + END_OF_WORD]
        while len(pieces) > 1:
            pairs = {(first, second) for first, second in zip(pieces, pieces[1:])}
            best = min(pairs, key=lambda pair: self.merge_ranks.get(pair, math.inf))
            if best not in self.merge_ranks:
                break
            merged, index = [], 0
            while index < len(pieces):
                if index + 1 < len(pieces) and (pieces[index], pieces[index + 1]) == best:
                    merged.append(pieces[index] + pieces[index + 1])
                    index += 2
                else:
                    merged.append(pieces[index])
                    index += 1
            pieces = merged
        self._cache[word] = pieces
        return pieces

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without the start and end tokens."""
        ids = []
        for token in self.pattern.findall(self.clean(text)):
            if token in (START_OF_TEXT, END_OF_TEXT):
                ids.append(self.encoder[token])
                continue
            word = "".join(self.byte_encoder[byte] for byte in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(word))
        return ids

    def __call__(self, texts: Sequence[str]) -> Tensor:
        """Token ids ``(N, context_length)`` (int64) of ``texts``."""
        rows = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.start_id, *self.encode(text), self.end_id]
            if len(ids) > self.context_length:
                ids = [*ids[: self.context_length - 1], self.end_id]
            rows[row, : len(ids)] = torch.tensor(ids)
        return rows


def _ftfy_fix_text() -> Callable[[str], str] | None:
    """``ftfy.fix_text`` if ftfy is installed, else ``None`` with a warning (open_clip always applies it)."""
    if importlib.util.find_spec("ftfy") is None:
        warnings.warn(
            "ftfy is not installed, so OpenCLIPTokenizer skips ftfy.fix_text: prompts with mojibake, curly "
            "quotes or full-width characters tokenize differently from open_clip; `pip install ftfy` for parity",
            stacklevel=3,
        )
        return None
    import ftfy

    return ftfy.fix_text


# --- preprocessing ------------------------------------------------------------------------------


def resize_longest_side_and_pad(images: Tensor, size: int) -> Tensor:
    """open_clip's ``ResizeMaxSize`` on tensors: longer side to ``size``, then centre-pad to ``size × size`` with 0.

    The resized sides are ``round(side · size / longer)`` (Python rounding, as open_clip) by
    antialiased bicubic interpolation (PIL's kernel); the padding splits as ``pad // 2`` before
    and the rest after. An image whose longer side already is ``size`` is padded only.
    """
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    resized = (round(height * scale), round(width * scale))
    if resized != (height, width):
        images = F.interpolate(images, size=resized, mode="bicubic", align_corners=False, antialias=True)
    pad_height, pad_width = size - resized[0], size - resized[1]
    padding = (pad_width // 2, pad_width - pad_width // 2, pad_height // 2, pad_height - pad_height // 2)
    return F.pad(images, padding, value=0.0)


def squash_resize(images: Tensor, size: int) -> Tensor:
    """``images`` resized to ``size × size`` ignoring the aspect ratio (open_clip's ``squash``), by
    antialiased bicubic interpolation; an image already that size is returned as is."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def open_clip_preprocess(images: Tensor, size: int, resize_mode: str) -> Tensor:
    """OpenCLIP input ``(B, 3, size, size)`` from images ``(B, 1 or 3, H, W)`` in ``[0, 1]``.

    ``resize_mode`` ``"pad"``: :func:`resize_longest_side_and_pad` (HPSv2's evaluation);
    ``"squash"``: :func:`squash_resize` (DFN5B's open_clip config; DMDR's training for both
    rewards). A grey channel is repeated to RGB; the OpenAI CLIP normalisation comes last, so
    padding is black in pixel space. Every step is a tensor op, differentiable in ``images``.

    Raises:
        ValueError: ``images`` is not 4-d with 1 or 3 channels, or ``resize_mode`` is unknown.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"OpenCLIP rewards take RGB (B, 3, H, W) or grey (B, 1, H, W) images, got {tuple(images.shape)}"
        )
    images = images.expand(-1, 3, -1, -1)
    if resize_mode == "pad":
        images = resize_longest_side_and_pad(images, size)
    elif resize_mode == "squash":
        images = squash_resize(images, size)
    else:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    mean = images.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


# --- rewards ------------------------------------------------------------------------------------


class _OpenCLIPCosineReward(RewardModel):
    """Cosine of an OpenCLIP model's L2-normalised image and prompt embeddings; differentiable.

    Args:
        checkpoint_path: The weights file.
        nested: The file holds the state dict under ``"state_dict"`` (else it is the state dict).
        source: The expected file and where it is published, for error messages.
        bpe_path: The BPE vocabulary; ``None`` finds it in an installed open_clip.
        architecture: A preset of :data:`OPEN_CLIP_PRESETS` or a dict of :class:`OpenCLIPConfig` fields.
        resize_mode: ``"pad"`` or ``"squash"`` (see :func:`open_clip_preprocess`).
        prompt_prefix: Text put before every prompt in :meth:`_score`, joined by a space.
        name: Name in logs; ``None`` uses the class name.
        train_scale: Factor of the score in training objectives.
        report_scale: Factor of the score in reported tables.
    """

    differentiable = True

    def __init__(
        self,
        checkpoint_path: str,
        *,
        nested: bool,
        source: str,
        bpe_path: str | None,
        architecture: str | dict[str, Any],
        resize_mode: str,
        prompt_prefix: str | None,
        name: str | None,
        train_scale: float,
        report_scale: float,
    ) -> None:
        super().__init__(name=name, train_scale=train_scale, report_scale=report_scale)
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if prompt_prefix is not None and not (isinstance(prompt_prefix, str) and prompt_prefix.strip()):
            raise ValueError(f"prompt_prefix must be a non-empty string or None, got {prompt_prefix!r}")
        config = OpenCLIPConfig.from_spec(architecture)
        self.tokenizer = OpenCLIPTokenizer(bpe_path, context_length=config.context_length)
        if self.tokenizer.vocab_size != config.vocab_size:
            raise ValueError(
                f"the BPE file {str(self.tokenizer.bpe_path)!r} gives {self.tokenizer.vocab_size} tokens but the "
                f"architecture has vocab_size {config.vocab_size}; use open_clip's {BPE_FILENAME} ({BPE_SOURCE})"
            )
        state_dict = read_state_dict_file(checkpoint_path, nested=nested, source=source)
        self.model = load_open_clip_model(config, state_dict, source=f"{checkpoint_path!r} (expected {source})")
        self.resize_mode = resize_mode
        self.prompt_prefix = prompt_prefix

    def embed_images(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings ``(B, embed_dim)`` of images ``(B, 1 or 3, H, W)`` in ``[0, 1]``
        on the reward's device and dtype."""
        pixels = open_clip_preprocess(images, self.model.config.image_size, self.resize_mode)
        return F.normalize(self.model.encode_image(pixels), dim=-1)

    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings ``(N, embed_dim)`` of ``texts`` as given (no ``prompt_prefix``),
        on the reward's device."""
        token_ids = self.tokenizer(list(texts)).to(self.model.token_embedding.weight.device)
        return F.normalize(self.model.encode_text(token_ids), dim=-1)

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        if self.prompt_prefix is not None:
            prompts = [f"{self.prompt_prefix} {prompt}" for prompt in prompts]
        return (self.embed_images(images) * self.embed_texts(prompts)).sum(dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, resize_mode={self.resize_mode!r}, prompt_prefix={self.prompt_prefix!r}"


class HPSv2Reward(_OpenCLIPCosineReward):
    """HPSv2 / HPSv2.1: cosine of the fine-tuned OpenCLIP ViT-H-14's image and prompt embeddings.

    The score is ``diag(f_img · f_txtᵀ)`` of the L2-normalised embeddings, as the hpsv2 package
    computes it, typically 0.25–0.35; papers report it × 100 (the default ``report_scale``).
    Images are preprocessed as hpsv2 evaluates them: longer side to 224 (antialiased bicubic),
    centre-padded with black to 224 × 224, OpenAI CLIP normalisation (``resize_mode="pad"``);
    DMDR's training squashes to 224 × 224 instead (``resize_mode="squash"``). Prompts are
    tokenized by :class:`OpenCLIPTokenizer`. Weights load in float32, offline.

    :meth:`embed_images` and :meth:`embed_texts` make it a scorer of :class:`~rdm_lightning.rewards.SRPOReward`
    (DMDR's SRPO reward takes its embeddings from HPSv2.1).

    Args:
        checkpoint_path: ``HPS_v2.1_compressed.pt`` or ``HPS_v2_compressed.pt`` (Hugging Face
            ``xswu/HPSv2``): a ``torch.save``'d dict whose ``"state_dict"`` holds the open_clip
            weights. A bare state dict is refused, so that a wrong file (e.g. the LAION base
            ``open_clip_pytorch_model.bin``) is not mistaken for HPS.
        bpe_path: open_clip's ``bpe_simple_vocab_16e6.txt.gz``; ``None`` finds it in an installed open_clip.
        architecture: ``"ViT-H-14"`` (HPSv2's) or a dict of :class:`OpenCLIPConfig` fields.
        prompt_prefix: Text put before each prompt with a space when scoring (DMDR's ReFL HPS
            reward uses ``"Realistic photo"``); ``None`` scores the prompts as given. Not applied
            by :meth:`embed_texts`.
        resize_mode: ``"pad"`` (hpsv2's evaluation) or ``"squash"`` (DMDR's training).
        name: Name in logs; ``None`` uses the class name.
        train_scale: Factor of the score in training objectives.
        report_scale: Factor of the score in reported tables (HPS is reported × 100).

    Raises:
        FileNotFoundError: the checkpoint or the BPE file is missing.
        ValueError: the checkpoint is not in HPSv2's format or does not fit the architecture, or
            another argument is invalid.
    """

    def __init__(
        self,
        checkpoint_path: str,
        bpe_path: str | None = None,
        architecture: str | dict[str, Any] = "ViT-H-14",
        prompt_prefix: str | None = None,
        resize_mode: str = "pad",
        name: str | None = None,
        train_scale: float = 1.0,
        report_scale: float = 100.0,
    ) -> None:
        super().__init__(
            checkpoint_path,
            nested=True,
            source=HPS_CHECKPOINT_SOURCE,
            bpe_path=bpe_path,
            architecture=architecture,
            resize_mode=resize_mode,
            prompt_prefix=prompt_prefix,
            name=name,
            train_scale=train_scale,
            report_scale=report_scale,
        )


class DFNCLIPReward(_OpenCLIPCosineReward):
    """CLIP score of DFN5B-CLIP-ViT-H-14 (DMDR's CLIP reward): cosine of its image and prompt embeddings.

    Typically 0.2–0.4 for matching pairs. Images are preprocessed per open_clip's pretrained
    config for ``dfn5b``: squashed to 224 × 224 (antialiased bicubic), OpenAI CLIP normalisation.
    The architecture is ViT-H-14 with QuickGELU, as DFN5B was trained and as open_clip loads it;
    DMDR's code builds it as ``ViT-H-14`` with the exact GELU (``architecture="ViT-H-14"``
    reproduces that). Weights load in float32, offline.

    Args:
        checkpoint_path: ``open_clip_pytorch_model.bin`` of the Hugging Face repo
            ``apple/DFN5B-CLIP-ViT-H-14``: a bare open_clip state dict.
        bpe_path: open_clip's ``bpe_simple_vocab_16e6.txt.gz``; ``None`` finds it in an installed open_clip.
        architecture: ``"ViT-H-14-quickgelu"`` (DFN5B's), or a preset / dict of :class:`OpenCLIPConfig` fields.
        resize_mode: ``"squash"`` (open_clip's DFN5B config and DMDR) or ``"pad"``.
        name: Name in logs; ``None`` uses the class name.
        train_scale: Factor of the score in training objectives.
        report_scale: Factor of the score in reported tables (some papers report CLIP × 100).

    Raises:
        FileNotFoundError: the checkpoint or the BPE file is missing.
        ValueError: the checkpoint is not a state dict that fits the architecture, or another
            argument is invalid.
    """

    def __init__(
        self,
        checkpoint_path: str,
        bpe_path: str | None = None,
        architecture: str | dict[str, Any] = "ViT-H-14-quickgelu",
        resize_mode: str = "squash",
        name: str | None = None,
        train_scale: float = 1.0,
        report_scale: float = 1.0,
    ) -> None:
        super().__init__(
            checkpoint_path,
            nested=False,
            source=DFN_CHECKPOINT_SOURCE,
            bpe_path=bpe_path,
            architecture=architecture,
            resize_mode=resize_mode,
            prompt_prefix=None,
            name=name,
            train_scale=train_scale,
            report_scale=report_scale,
        )
