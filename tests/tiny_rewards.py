"""Tiny random reward checkpoints written in the public files' formats, shared by the reward tests and the
configs matrix (tests/test_t2i_configs.py).

The open_clip layout (HPSv2's ``HPS_v2.1_compressed.pt``, DFN5B's ``open_clip_pytorch_model.bin``) and the
LAION aesthetic MLP (``sac+logos+ava1-l14-linearMSE.pth``) are enumerated by hand here, independently of the
library (from open_clip's model.py / transformer.py / tokenizer.py and improved-aesthetic-predictor).
"""
from __future__ import annotations

import gzip
import math
from pathlib import Path

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
