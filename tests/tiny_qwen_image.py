"""Tiny random Qwen-Image pipeline in diffusers folder layout, for tests.

Real classes with a few channels: ``QwenImageTransformer2DModel``, the video VAE
``AutoencoderKLQwenImage`` (scale factor 2), ``Qwen2_5_VLForConditionalGeneration`` (2 text layers,
a 1-block vision tower the pipeline never runs) and a byte-level BPE ``Qwen2Tokenizer`` whose merges
make the words of the pipeline's chat template whole tokens, so that the template's system prefix
is 34 tokens, the ``prompt_template_encode_start_idx`` the pipeline drops, as with the real
tokenizer. Saved with the stock pipeline's ``save_pretrained``; weights are seeded.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from tokenizers import AddedToken
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from tiny_models import PROBE_PROMPT, _check_tokenizes

PAD_TOKEN = "<|endoftext|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
TEXT_WIDTH = 32  # Qwen2.5-VL hidden size = the transformer's joint_attention_dim
Z_DIM = 4
# Qwen-Image's scheduler_config.json (dynamic shift, exponential, stretched to 0.02).
QWEN_IMAGE_SCHEDULER = dict(
    base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5, max_shift=0.9, shift=1.0, shift_terminal=0.02,
    use_dynamic_shifting=True, time_shift_type="exponential", num_train_timesteps=1000,
)


def _template() -> tuple[str, int]:
    """The pipeline's prompt template and the number of prefix tokens it drops (set in its ``__init__``)."""
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    return pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx


def tiny_qwen2_tokenizer() -> Qwen2Tokenizer:
    """Byte-level ``Qwen2Tokenizer``: 256 byte tokens, merge chains that make each template word
    (with its leading space) one token, and the special tokens ``<|endoftext|>`` (pad),
    ``<|im_start|>``, ``<|im_end|>``; round-trips through ``save_pretrained``/``from_pretrained``."""
    template, drop = _template()
    words = re.findall(r" ?[A-Za-z]+", re.sub(r"<\|im_(start|end)\|>", "\n", template))
    byte_level = {ord(" "): "Ġ"}  # ByteLevel's form of the space
    merges: list[str] = []
    pieces: list[str] = []
    for word in sorted({"".join(byte_level.get(ord(c), c) for c in w) for w in words}, key=len):
        for end in range(2, len(word) + 1):
            merge = f"{word[:end - 1]} {word[end - 1]}"
            if merge not in merges:
                merges.append(merge)
                pieces.append(word[:end])
    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [p for p in dict.fromkeys(pieces) if p not in alphabet] + [PAD_TOKEN, *CHAT_TOKENS]
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        Path(folder, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = Qwen2Tokenizer.from_pretrained(folder)
        tokenizer.add_tokens([AddedToken(t, special=True) for t in CHAT_TOKENS], special_tokens=True)
        tokenizer.save_pretrained(folder)
        reloaded = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == len(tokens), (len(tokenizer), len(tokens))
    _check_tokenizes(tokenizer)
    probe = template.format(PROBE_PROMPT)
    assert type(reloaded) is Qwen2Tokenizer and reloaded(probe).input_ids == tokenizer(probe).input_ids
    prefix = tokenizer(template.split("{}")[0]).input_ids
    assert len(prefix) == drop, f"template prefix is {len(prefix)} tokens, the pipeline drops {drop}"
    return tokenizer


def tiny_qwen25_vl(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    """2-layer Qwen2.5-VL of width 32 (head dim 16, M-RoPE sections 2+3+3 = 16/2)."""
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids(CHAT_TOKENS[1]),
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TEXT_WIDTH,
                           fullatt_block_indexes=[0]),
    )
    torch.manual_seed(2)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_image_vae() -> AutoencoderKLQwenImage:
    """One-downsampling video VAE (scale factor 2), 4 latent channels with non-trivial mean/std."""
    torch.manual_seed(1)
    return AutoencoderKLQwenImage(
        base_dim=16, z_dim=Z_DIM, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 2.0, 1.2],
    ).eval()


def make_tiny_qwen_image(path: str | Path, scheduler: dict | None = None) -> Path:
    """Qwen-Image-layout pipeline: 2-block transformer on 2×2-packed 4-channel latents (16 token channels).

    ``scheduler``: FlowMatchEulerDiscreteScheduler settings replacing Qwen-Image's.
    """
    tokenizer = tiny_qwen2_tokenizer()
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * Z_DIM, out_channels=Z_DIM, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_WIDTH, axes_dims_rope=(4, 6, 6),
    ).eval()
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(QWEN_IMAGE_SCHEDULER if scheduler is None else scheduler)),
        vae=tiny_qwen_image_vae(),
        text_encoder=tiny_qwen25_vl(tokenizer),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(path)
    return Path(path)
