"""Tiny random Z-Image pipeline (diffusers ``ZImagePipeline``) in diffusers folder layout, for tests.

Real classes with a few channels: ``ZImageTransformer2DModel``, the tiny ``AutoencoderKL`` of
tiny_models.py, a 2-layer ``Qwen3Model`` text encoder and a byte-level BPE ``Qwen2Tokenizer``
with a Qwen3-style chat template (the pipeline calls ``apply_chat_template`` with
``enable_thinking=True``). Saved with ``ZImagePipeline.save_pretrained``; weights are seeded.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

from tiny_models import PROBE_PROMPT, _check_tokenizes, tiny_vae

TEXT_HIDDEN = 16  # Qwen3 hidden size = the transformer's cap_feat_dim
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# A few merges, so that the BPE model is exercised beyond single bytes.
QWEN_MERGES = (("Ġ", "a"), ("a", "t"), ("c", "at"), ("Ġ", "c"))
# The generation-prompt part of Qwen3's chat template: with enable_thinking false it appends an
# empty <think> block, with enable_thinking true (what ZImagePipeline passes) nothing.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def tiny_qwen2_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE ``Qwen2Tokenizer`` (256 byte tokens, a few merges, Qwen's special tokens).

    Built from vocab.json/merges.txt in a folder with ``from_pretrained`` (the way that round-trips
    under transformers 5); pad is ``<|endoftext|>`` and eos ``<|im_end|>`` as in Qwen3's tokenizer.
    """
    tokens = sorted(ByteLevel.alphabet()) + [a + b for a, b in QWEN_MERGES]
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        Path(folder, "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in QWEN_MERGES))
        tokenizer = Qwen2Tokenizer.from_pretrained(
            folder,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            extra_special_tokens=list(QWEN_SPECIAL[1:]),
            model_max_length=131072,
        )
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    assert len(tokenizer) == len(tokens) + len(QWEN_SPECIAL), len(tokenizer)
    _check_tokenizes(tokenizer)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROBE_PROMPT}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert text == f"<|im_start|>user\n{PROBE_PROMPT}<|im_end|>\n<|im_start|>assistant\n", text
    return tokenizer


def tiny_qwen3_text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen3Model:
    """2-layer ``Qwen3Model`` of width :data:`TEXT_HIDDEN` (the class the real checkpoint saves)."""
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(5)
    return Qwen3Model(config).eval()


def tiny_z_image_transformer() -> ZImageTransformer2DModel:
    """1 + 1 + 1-layer transformer of width 32 on 4-channel latents, patch 2."""
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=TEXT_HIDDEN,
        axes_dims=[8, 4, 4],
        # Axis 0 holds caption positions (up to the 512 tokens of max_sequence_length) then the image frame.
        axes_lens=[1024, 64, 64],
    ).eval()
    with torch.no_grad():
        # The pad tokens are created with torch.empty: give them seeded values.
        transformer.x_pad_token.copy_(torch.randn(transformer.x_pad_token.shape))
        transformer.cap_pad_token.copy_(torch.randn(transformer.cap_pad_token.shape))
    return transformer


def make_tiny_z_image(path: str | Path, dynamic_shift: bool = False) -> Path:
    """Z-Image-layout pipeline: static shift 3 (Z-Image-Turbo's scheduler), or FLUX dynamic shifting.

    VAE scale factor 2 with Z-Image's (FLUX VAE) scaling 0.3611 and shift 0.1159.
    """
    tokenizer = tiny_qwen2_tokenizer()
    if dynamic_shift:
        scheduler = FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=4, max_image_seq_len=64
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = ZImagePipeline(
        scheduler=scheduler,
        vae=tiny_vae(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=tiny_qwen3_text_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=tiny_z_image_transformer(),
    )
    pipe.save_pretrained(path)
    return Path(path)
