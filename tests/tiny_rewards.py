"""Tiny random reward checkpoints written in the public files' formats, shared by the reward tests and the
configs matrix (tests/test_t2i_configs.py).

The open_clip layout (HPSv2's ``HPS_v2.1_compressed.pt``, DFN5B's ``open_clip_pytorch_model.bin``), the LAION
aesthetic MLP (``sac+logos+ava1-l14-linearMSE.pth``) and ImageReward's ``ImageReward.pt`` are enumerated by hand
here, independently of the library (from open_clip's model.py / transformer.py / tokenizer.py,
improved-aesthetic-predictor, and ImageReward's BLIP code).
"""
from __future__ import annotations

import gzip
import importlib
import json
import math
from pathlib import Path

import pytest
import torch

BPE_HEADER = "bpe_simple_vocab_16e6.txt#version: 0.2"  # the first line of open_clip's file
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o</w>"), ("w", "o"), ("wo", "r"), ("l", "d</w>"),
          ("wor", "ld</w>")]
BYTE_TOKENS = 256
START_ID = 2 * BYTE_TOKENS + len(MERGES)
END_ID = START_ID + 1
VOCAB_SIZE = END_ID + 1
CONTEXT = 77
TINY = dict(embed_dim=16, image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_head_width=16,
            text_width=32, text_heads=2, text_layers=2, context_length=CONTEXT, vocab_size=VOCAB_SIZE)
TINY_QUICK = {**TINY, "quick_gelu": True}


def expected_open_clip_shapes(embed, image, patch, vision_width, vision_layers, text_width, text_layers,
                              context, vocab, mlp_ratio=4) -> dict[str, tuple[int, ...]]:
    """open_clip CLIP's state_dict (ViT image tower, text tower at the top level), enumerated by hand."""
    shapes = {
        "visual.conv1.weight": (vision_width, 3, patch, patch),
        "visual.class_embedding": (vision_width,),
        "visual.positional_embedding": ((image // patch) ** 2 + 1, vision_width),
        "visual.ln_pre.weight": (vision_width,), "visual.ln_pre.bias": (vision_width,),
        "visual.ln_post.weight": (vision_width,), "visual.ln_post.bias": (vision_width,),
        "visual.proj": (vision_width, embed),
        "token_embedding.weight": (vocab, text_width),
        "positional_embedding": (context, text_width),
        "ln_final.weight": (text_width,), "ln_final.bias": (text_width,),
        "text_projection": (text_width, embed),
        "logit_scale": (),
    }
    for prefix, width, layers in (("visual.transformer", vision_width, vision_layers),
                                  ("transformer", text_width, text_layers)):
        hidden = width * mlp_ratio
        for index in range(layers):
            block = f"{prefix}.resblocks.{index}"
            shapes.update({
                f"{block}.ln_1.weight": (width,), f"{block}.ln_1.bias": (width,),
                f"{block}.attn.in_proj_weight": (3 * width, width), f"{block}.attn.in_proj_bias": (3 * width,),
                f"{block}.attn.out_proj.weight": (width, width), f"{block}.attn.out_proj.bias": (width,),
                f"{block}.ln_2.weight": (width,), f"{block}.ln_2.bias": (width,),
                f"{block}.mlp.c_fc.weight": (hidden, width), f"{block}.mlp.c_fc.bias": (hidden,),
                f"{block}.mlp.c_proj.weight": (width, hidden), f"{block}.mlp.c_proj.bias": (width,),
            })
    return shapes


TINY_SHAPES = expected_open_clip_shapes(16, 32, 8, 32, 2, 32, 2, CONTEXT, VOCAB_SIZE)


def random_state_dict(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in TINY_SHAPES.items():
        noise = torch.randn(shape, generator=generator)
        if key == "logit_scale":
            state[key] = torch.tensor(math.log(100.0))
        elif ".ln_" in key or key.startswith("ln_"):
            state[key] = (1.0 if key.endswith("weight") else 0.0) + 0.1 * noise
        else:
            state[key] = 0.2 * noise
    return {key: value.to(dtype) for key, value in state.items()}


def published_shapes(embedding_dim: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of sac+logos+ava1-l14-linearMSE.pth (improved-aesthetic-predictor's MLP: an
    nn.Sequential ``layers`` whose linear layers sit at indices 0, 2, 4, 6 and 7), for ``embedding_dim``."""
    linears = {0: (1024, embedding_dim), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    shapes: dict[str, tuple[int, ...]] = {}
    for index, (outputs, inputs) in linears.items():
        shapes[f"layers.{index}.weight"] = (outputs, inputs)
        shapes[f"layers.{index}.bias"] = (outputs,)
    return shapes


def random_mlp_state(embedding_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the published layout, scaled so that scores stay near the 1–10 range."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in published_shapes(embedding_dim).items():
        fan_in = shape[1] if key.endswith("weight") else shape[0]
        state[key] = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    state["layers.7.bias"] += 5.0
    return state


def write_bpe(path: Path) -> Path:
    """A tiny open_clip ``bpe_simple_vocab_16e6.txt.gz``: the header line, then :data:`MERGES`."""
    path.write_bytes(gzip.compress("\n".join([BPE_HEADER, *(" ".join(m) for m in MERGES)]).encode()))
    return path


def write_hps_checkpoint(path: Path, seed: int = 0) -> Path:
    """HPSv2's published layout, ``{"state_dict": weights}`` in float16, of the :data:`TINY` architecture."""
    torch.save({"state_dict": random_state_dict(seed, torch.float16)}, path)
    return path


def write_dfn_checkpoint(path: Path, seed: int = 1) -> Path:
    """DFN5B's ``open_clip_pytorch_model.bin`` layout: the bare state dict, of the :data:`TINY` architecture."""
    torch.save(random_state_dict(seed), path)
    return path


def write_aesthetic_mlp(path: Path, embedding_dim: int, seed: int = 0) -> Path:
    """``sac+logos+ava1-l14-linearMSE.pth``'s layout for CLIP embeddings of width ``embedding_dim``."""
    torch.save(random_mlp_state(embedding_dim, seed), path)
    return path


# --- ImageReward (THUDM/ImageReward: ImageReward.pt, med_config.json, a bert-base-uncased tokenizer folder) ---

BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BERT_WORDS = ["a", "photo", "of", "cat", "dog", "red", "car", "two", "dogs", "playing", "in", "the", "snow", "##s"]
BERT_VOCAB = BERT_SPECIAL + BERT_WORDS
TINY_BLIP_VISION = dict(image_size=32, patch_size=16, width=32, layers=2, heads=2, mlp_ratio=4.0)
TINY_MED_CONFIG = {
    # med_config.json's fields, at tiny sizes; vocab_size is the BERT vocabulary plus BLIP's [DEC] and [ENC].
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
    "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(BERT_VOCAB) + 2,
    "encoder_width": 32, "add_cross_attention": True,
}
REAL_MED_CONFIG = {**TINY_MED_CONFIG, "hidden_size": 768, "intermediate_size": 3072, "max_position_embeddings": 512,
                   "num_attention_heads": 12, "num_hidden_layers": 12, "vocab_size": 30524, "encoder_width": 768}


def image_reward_shapes(vision: dict, med: dict, embed_dim: int) -> dict[str, tuple[int, ...]]:
    """ImageReward.pt's keys and shapes, enumerated by hand from ImageReward's BLIP_Pretrain (timm ViT as
    ``blip.visual_encoder``, med.py's BertModel without pooler as ``blip.text_encoder``, the contrastive
    ``vision_proj``/``text_proj``) and its ``MLP(768)`` head ``mlp.layers``."""
    width, text, grid = vision["width"], med["hidden_size"], vision["image_size"] // vision["patch_size"]
    hidden = int(width * vision["mlp_ratio"])
    shapes: dict[str, tuple[int, ...]] = {
        "blip.visual_encoder.cls_token": (1, 1, width),
        "blip.visual_encoder.pos_embed": (1, grid * grid + 1, width),
        "blip.visual_encoder.patch_embed.proj.weight": (width, 3, vision["patch_size"], vision["patch_size"]),
        "blip.visual_encoder.patch_embed.proj.bias": (width,),
        "blip.visual_encoder.norm.weight": (width,), "blip.visual_encoder.norm.bias": (width,),
        "blip.vision_proj.weight": (embed_dim, width), "blip.vision_proj.bias": (embed_dim,),
        "blip.text_proj.weight": (embed_dim, text), "blip.text_proj.bias": (embed_dim,),
        "blip.text_encoder.embeddings.position_ids": (1, med["max_position_embeddings"]),
        "blip.text_encoder.embeddings.word_embeddings.weight": (med["vocab_size"], text),
        "blip.text_encoder.embeddings.position_embeddings.weight": (med["max_position_embeddings"], text),
        "blip.text_encoder.embeddings.LayerNorm.weight": (text,), "blip.text_encoder.embeddings.LayerNorm.bias": (text,),
    }
    for index in range(vision["layers"]):
        block = f"blip.visual_encoder.blocks.{index}"
        shapes.update({
            f"{block}.norm1.weight": (width,), f"{block}.norm1.bias": (width,),
            f"{block}.attn.qkv.weight": (3 * width, width), f"{block}.attn.qkv.bias": (3 * width,),
            f"{block}.attn.proj.weight": (width, width), f"{block}.attn.proj.bias": (width,),
            f"{block}.norm2.weight": (width,), f"{block}.norm2.bias": (width,),
            f"{block}.mlp.fc1.weight": (hidden, width), f"{block}.mlp.fc1.bias": (hidden,),
            f"{block}.mlp.fc2.weight": (width, hidden), f"{block}.mlp.fc2.bias": (width,),
        })
    for index in range(med["num_hidden_layers"]):
        layer = f"blip.text_encoder.encoder.layer.{index}"
        for attention, key_width in (("attention", text), ("crossattention", width)):
            shapes.update({
                f"{layer}.{attention}.self.query.weight": (text, text), f"{layer}.{attention}.self.query.bias": (text,),
                f"{layer}.{attention}.self.key.weight": (text, key_width), f"{layer}.{attention}.self.key.bias": (text,),
                f"{layer}.{attention}.self.value.weight": (text, key_width),
                f"{layer}.{attention}.self.value.bias": (text,),
                f"{layer}.{attention}.output.dense.weight": (text, text),
                f"{layer}.{attention}.output.dense.bias": (text,),
                f"{layer}.{attention}.output.LayerNorm.weight": (text,),
                f"{layer}.{attention}.output.LayerNorm.bias": (text,),
            })
        shapes.update({
            f"{layer}.intermediate.dense.weight": (med["intermediate_size"], text),
            f"{layer}.intermediate.dense.bias": (med["intermediate_size"],),
            f"{layer}.output.dense.weight": (text, med["intermediate_size"]), f"{layer}.output.dense.bias": (text,),
            f"{layer}.output.LayerNorm.weight": (text,), f"{layer}.output.LayerNorm.bias": (text,),
        })
    shapes.update({f"mlp.{key}": shape for key, shape in published_shapes(text).items()})
    return shapes


def random_image_reward_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 weights (int64 position ids) in ImageReward.pt's layout at the tiny sizes."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in image_reward_shapes(TINY_BLIP_VISION, TINY_MED_CONFIG, embed_dim=8).items():
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[1]).expand(shape).clone()
        elif "norm" in key.lower():
            state[key] = (1.0 if key.endswith("weight") else 0.0) + 0.1 * torch.randn(shape, generator=generator)
        else:
            fan_in = shape[1] if len(shape) == 2 else (math.prod(shape[1:]) if len(shape) > 2 else 4)
            state[key] = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    return state


def write_image_reward_files(folder: Path, seed: int = 0) -> dict[str, Path]:
    """A tiny ``ImageReward.pt`` (bare float32 state dict), ``med_config.json`` and BERT tokenizer folder
    (``vocab.txt``, ``tokenizer_config.json``) under ``folder``; returns the reward's three path arguments."""
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "ImageReward.pt"
    torch.save(random_image_reward_state(seed), checkpoint)
    med_config = folder / "med_config.json"
    med_config.write_text(json.dumps(TINY_MED_CONFIG, indent=2))
    tokenizer = folder / "bert-base-uncased"
    tokenizer.mkdir(exist_ok=True)
    (tokenizer / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    return {"checkpoint_path": checkpoint, "med_config_path": med_config, "tokenizer_path": tokenizer}


def import_or_skip(name: str):
    """The module ``name``, or a skipped test saying that parity with the reference package is not checked."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        reason = f"{name} is not importable ({error}); parity with the reference package is not checked"
        print(reason)
        pytest.skip(reason)
