"""Tiny HPSv3 files in the public formats, shared by tests/test_rewards_hpsv3.py and benchmarks/rewards.py.

- :func:`write_qwen2_vl_folder`: a Qwen2-VL-7B-Instruct-like folder: ``config.json`` in the published flat
  layout (transformers 4.41's: text fields at the top level, ``vision_config`` with ``embed_dim``/``in_chans``,
  ``rope_scaling`` with ``mrope_section``) of a 2-layer model, and a byte-level ``Qwen2Tokenizer`` without
  merges holding Qwen2-VL's special tokens, saved by ``save_pretrained``.
- :func:`write_hpsv3_checkpoint`: ``HPSv3.safetensors``'s layout for it: a random transformers
  ``Qwen2VLForConditionalGeneration`` plus a random ``rm_head``, its keys renamed by hand to transformers
  4.45's layout (``model.visual.`` → ``visual.``, ``model.language_model.`` → ``model.``), the backbone in
  bfloat16 and ``rm_head`` in float32, with embedding rows = the tokenizer plus ``<|Reward|>``.
- :data:`QWEN2_VL_7B_CONFIG` and :func:`real_size_hpsv3`: the published model's config and networks at full size.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken
from tokenizers.pre_tokenizers import ByteLevel
from transformers import Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLModel

# Qwen2-VL's special tokens, in its tokenizer's order (ids 151643-151656 there).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
BYTES = len(ByteLevel.alphabet())  # 256
TOKEN_IDS = {token: BYTES + index for index, token in enumerate(SPECIAL_TOKENS)}
REWARD_TOKEN_ID = BYTES + len(SPECIAL_TOKENS)  # <|Reward|> is appended after them, as to Qwen2-VL's 151657 tokens

# Qwen/Qwen2-VL-7B-Instruct's config.json.
QWEN2_VL_7B_CONFIG = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
    "model_type": "qwen2_vl", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064,
}
HPSV3_VOCAB = 151657 + 1
"""HPSv3's embedding rows: Qwen2-VL-7B-Instruct's tokenizer (151643 tokens + 14 special) plus <|Reward|>."""
TEXT_WIDTH = 32
TINY_PIXELS = 6 * 28 * 28  # 56 × 84 images: a 4 × 6 patch grid, 6 image tokens


def tiny_config() -> dict:
    """``config.json`` of a 2-layer Qwen2-VL (head dim 16, M-RoPE sections 2+3+3 = 16/2) in the published
    flat layout; ``vocab_size`` is the base model's (larger than the tokenizer), as in Qwen2-VL-7B-Instruct's."""
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "bos_token_id": TOKEN_IDS["<|endoftext|>"], "eos_token_id": TOKEN_IDS["<|im_end|>"],
        "vision_start_token_id": TOKEN_IDS["<|vision_start|>"], "vision_end_token_id": TOKEN_IDS["<|vision_end|>"],
        "vision_token_id": TOKEN_IDS["<|vision_pad|>"], "image_token_id": TOKEN_IDS["<|image_pad|>"],
        "video_token_id": TOKEN_IDS["<|video_pad|>"], "hidden_act": "silu", "hidden_size": TEXT_WIDTH,
        "intermediate_size": 64, "max_position_embeddings": 32768, "num_attention_heads": 2, "num_hidden_layers": 2,
        "num_key_value_heads": 1, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 320,
        "vision_config": {"depth": 1, "embed_dim": 16, "mlp_ratio": 2, "num_heads": 2, "in_chans": 3,
                          "hidden_size": TEXT_WIDTH, "patch_size": 14, "spatial_merge_size": 2,
                          "spatial_patch_size": 14, "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    }


def write_qwen2_vl_folder(folder: Path) -> Path:
    """The tiny Qwen2-VL folder (``config.json`` and tokenizer files, no weights) at ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as source:
        Path(source, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(sorted(ByteLevel.alphabet()))}))
        Path(source, "merges.txt").write_text("#version: 0.2\n")
        tokenizer = Qwen2Tokenizer.from_pretrained(source, pad_token=None, unk_token=None, bos_token=None,
                                                   eos_token=None)
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS],
                         special_tokens=True)
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.eos_token = "<|im_end|>"
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS} == TOKEN_IDS
    tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(tiny_config(), indent=2))
    return folder


def public_layout(name: str) -> str:
    """A transformers 5 ``Qwen2VLForConditionalGeneration`` key in transformers 4.45's layout (the file's)."""
    if name.startswith("model.visual."):
        return name.removeprefix("model.")
    if name.startswith("model.language_model."):
        return "model." + name.removeprefix("model.language_model.")
    return name


def random_hpsv3_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random HPSv3 weights for :func:`tiny_config` in the file's keys and dtypes: weights ``N(0, 1)/√fan_in``
    (so activations keep their scale), norms ``1 + 0.1·N``, biases ``0.1·N``; ``rm_head.{0,3,5}`` in float32."""
    config = Qwen2VLConfig(**tiny_config())
    config.text_config.vocab_size = REWARD_TOKEN_ID + 1
    with torch.device("meta"):
        backbone = Qwen2VLForConditionalGeneration(config)
    shapes = {public_layout(key): tuple(value.shape) for key, value in backbone.state_dict().items()}
    shapes.update({"rm_head.0.weight": (1024, TEXT_WIDTH), "rm_head.0.bias": (1024,), "rm_head.3.weight": (16, 1024),
                   "rm_head.3.bias": (16,), "rm_head.5.weight": (2, 16), "rm_head.5.bias": (2,)})
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in sorted(shapes.items()):
        noise = torch.randn(shape, generator=generator)
        if "norm" in key or ".ln_q." in key:
            value = (1.0 if key.endswith("weight") else 0.0) + 0.1 * noise
        elif key.endswith("bias"):
            value = 0.1 * noise
        else:
            value = noise / math.sqrt(math.prod(shape[1:]))
        state[key] = value.float() if key.startswith("rm_head.") else value.to(torch.bfloat16)
    return state


def real_size_hpsv3() -> torch.nn.Module:
    """HPSv3's networks at full size (Qwen2-VL-7B without the LM head, and rm_head); build it on the meta device."""
    from rdm_lightning.rewards.hpsv3 import HPSv3Head

    config = Qwen2VLConfig(**QWEN2_VL_7B_CONFIG)
    config.text_config.vocab_size = HPSV3_VOCAB
    return torch.nn.ModuleList([Qwen2VLModel(config), HPSv3Head(config.text_config.hidden_size)])


def write_hpsv3_checkpoint(path: Path, seed: int = 0) -> Path:
    """``HPSv3.safetensors``'s layout (or, for a ``.pt``/``.pth`` path, a ``torch.save``'d bare state dict)."""
    state = random_hpsv3_state(seed)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path
