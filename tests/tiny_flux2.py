"""Tiny random FLUX.2 pipelines (diffusers ``Flux2Pipeline`` and ``Flux2KleinPipeline``), for tests.

Real classes with a few channels: ``Flux2Transformer2DModel`` (one double- and one single-stream
block), ``AutoencoderKLFlux2`` (VAE scale factor 2, 4 latent channels, so 16 channels after its 2×2
patchify, with seeded batch-norm statistics), and the real text encoders with enough layers for the
pipelines' default hidden-state layers: a 30-layer ``Mistral3ForConditionalGeneration`` (tiny
Pixtral vision tower) for FLUX.2-dev's (10, 20, 30), a 27-layer ``Qwen3ForCausalLM`` for klein's
(9, 18, 27). Saved with the stock pipeline's ``save_pretrained``; weights are seeded.

FLUX.2-dev's ``tokenizer`` component is a ``PixtralProcessor``, which needs torchvision (not
installed here). The tiny dev pipeline holds the tokenizer that processor wraps instead: a
byte-level BPE tokenizer with Mistral's special tokens and the Mistral Small 3.1 chat template.
For text-only prompts the processor's ``apply_chat_template`` is that tokenizer's (render the
template, tokenize without adding special tokens again), so the stock pipeline encodes the same ids.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from diffusers.pipelines.flux2.pipeline_flux2 import format_input
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tiny_models import PROBE_PROMPT, _check_tokenizes
from tiny_z_image import tiny_qwen2_tokenizer

TEXT_HIDDEN = 16
LATENT_CHANNELS = 4  # the VAE's; the transformer sees 4× as many after the 2×2 patchify
MISTRAL_SPECIAL = (
    "<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[IMG]", "[IMG_BREAK]", "[IMG_END]",
)
# Mistral Small 3.1's (2503) chat template, without its default system message (FLUX.2 always sends
# one): message contents are lists of typed blocks, as the FLUX.2 pipeline formats them.
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' }}"
    "{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Only text and image blocks are supported in message content!') }}"
    "{%- endif %}{%- endfor %}{{- '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}"
    "{%- endif %}{%- endfor %}"
)


def tiny_mistral_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer (one token per byte) with Mistral's special tokens and chat template.

    Round-tripped through a folder with ``from_pretrained``, as the pipeline will load it.
    """
    vocab = {t: i for i, t in enumerate(MISTRAL_SPECIAL + tuple(sorted(ByteLevel.alphabet())))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(MISTRAL_SPECIAL))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=131072,
    )
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    assert len(tokenizer) == len(vocab), len(tokenizer)
    _check_tokenizes(tokenizer)
    text = tokenizer.apply_chat_template(format_input([PROBE_PROMPT], system_message="S"), tokenize=False)
    assert text == [f"<s>[SYSTEM_PROMPT]S[/SYSTEM_PROMPT][INST]{PROBE_PROMPT}[/INST]"], text
    return tokenizer


def tiny_mistral3_text_encoder(tokenizer: PreTrainedTokenizerFast) -> Mistral3ForConditionalGeneration:
    """30-layer Mistral text model (width 16) with a 1-layer Pixtral vision tower."""
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = Mistral3Config(
        text_config=dict(
            model_type="mistral", vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=32,
            num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
            max_position_embeddings=1024, rms_norm_eps=1e-5, sliding_window=None, **ids,
        ),
        vision_config=dict(
            model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=8, num_channels=3, head_dim=8,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=1,
        **ids,
    )
    torch.manual_seed(5)
    return Mistral3ForConditionalGeneration(config).eval()


def tiny_qwen3_causal_lm(tokenizer, width: int = TEXT_HIDDEN) -> Qwen3ForCausalLM:
    """27-layer ``Qwen3ForCausalLM`` (klein's text encoder class) of width 16, or ``width`` with heads of 64."""
    heads = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=8) if width == TEXT_HIDDEN else dict(
        num_attention_heads=width // 64, num_key_value_heads=width // 128, head_dim=64)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=27,
        max_position_embeddings=1024, **heads,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(6)
    return Qwen3ForCausalLM(config).eval()


def tiny_flux2_vae() -> AutoencoderKLFlux2:
    """Two-level ``AutoencoderKLFlux2`` (scale factor 2) with non-trivial batch-norm statistics."""
    torch.manual_seed(1)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32), layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=32,
        sample_size=16,
    ).eval()
    with torch.no_grad():
        # The real VAE's running statistics are far from (0, 1): make the normalisation visible.
        vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.num_features))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.num_features))
    return vae


def tiny_flux2_transformer(guidance_embeds: bool, seed: int = 0, text_width: int = TEXT_HIDDEN) -> Flux2Transformer2DModel:
    """One double- and one single-stream block of width 32 on the VAE's 16 patchified channels."""
    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * text_width, timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds,
    ).eval()


def flux2_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.2's scheduler config: exponential dynamic shifting (μ is the pipeline's empirical one)."""
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential", shift=3.0)


def make_tiny_flux2(path: str | Path) -> Path:
    """FLUX.2-dev-layout pipeline: guidance-embedding transformer, Mistral3 text encoder."""
    tokenizer = tiny_mistral_tokenizer()
    pipe = Flux2Pipeline(
        scheduler=flux2_scheduler(),
        vae=tiny_flux2_vae(),
        text_encoder=tiny_mistral3_text_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=tiny_flux2_transformer(guidance_embeds=True),
    )
    pipe.save_pretrained(path)
    return Path(path)


def make_tiny_flux2_klein(path: str | Path, distilled: bool = False, text_width: int = TEXT_HIDDEN) -> Path:
    """FLUX.2-klein-layout pipeline: the base (true CFG) or, with ``distilled``, the step-distilled
    variant (``is_distilled`` in model_index.json; other transformer weights, same architecture).
    ``text_width``: the Qwen3 encoder's width (the benchmark's larger encoder)."""
    tokenizer = tiny_qwen2_tokenizer()
    # Flux2KleinPipeline applies Qwen3's template with thinking disabled: an empty thinking block.
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROBE_PROMPT}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n"), text
    pipe = Flux2KleinPipeline(
        scheduler=flux2_scheduler(),
        vae=tiny_flux2_vae(),
        text_encoder=tiny_qwen3_causal_lm(tokenizer, text_width),
        tokenizer=tokenizer,
        transformer=tiny_flux2_transformer(guidance_embeds=False, seed=1 if distilled else 0, text_width=text_width),
        is_distilled=distilled,
    )
    pipe.save_pretrained(path)
    return Path(path)
