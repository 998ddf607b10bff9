"""Random weights in the layout of the published FID InceptionV3 file (``weights-inception-2015-12-05``),
for tests that need the real network without downloading it."""
from __future__ import annotations

import math

import torch
from torch import Tensor

# The published weight file, layer by layer: (name, in, out, kernel height, kernel width) of
# each conv+bn, from the TensorFlow graph's layout (torch-fidelity's converter and pytorch-fid).
STEM = [
    ("Conv2d_1a_3x3", 3, 32, 3, 3),
    ("Conv2d_2a_3x3", 32, 32, 3, 3),
    ("Conv2d_2b_3x3", 32, 64, 3, 3),
    ("Conv2d_3b_1x1", 64, 80, 1, 1),
    ("Conv2d_4a_3x3", 80, 192, 3, 3),
]


def block_a(cin: int, pool: int) -> list[tuple]:
    return [
        ("branch1x1", cin, 64, 1, 1), ("branch5x5_1", cin, 48, 1, 1), ("branch5x5_2", 48, 64, 5, 5),
        ("branch3x3dbl_1", cin, 64, 1, 1), ("branch3x3dbl_2", 64, 96, 3, 3), ("branch3x3dbl_3", 96, 96, 3, 3),
        ("branch_pool", cin, pool, 1, 1),
    ]


def block_b(cin: int) -> list[tuple]:
    return [
        ("branch3x3", cin, 384, 3, 3), ("branch3x3dbl_1", cin, 64, 1, 1), ("branch3x3dbl_2", 64, 96, 3, 3),
        ("branch3x3dbl_3", 96, 96, 3, 3),
    ]


def block_c(cin: int, c7: int) -> list[tuple]:
    return [
        ("branch1x1", cin, 192, 1, 1),
        ("branch7x7_1", cin, c7, 1, 1), ("branch7x7_2", c7, c7, 1, 7), ("branch7x7_3", c7, 192, 7, 1),
        ("branch7x7dbl_1", cin, c7, 1, 1), ("branch7x7dbl_2", c7, c7, 7, 1), ("branch7x7dbl_3", c7, c7, 1, 7),
        ("branch7x7dbl_4", c7, c7, 7, 1), ("branch7x7dbl_5", c7, 192, 1, 7),
        ("branch_pool", cin, 192, 1, 1),
    ]


def block_d(cin: int) -> list[tuple]:
    return [
        ("branch3x3_1", cin, 192, 1, 1), ("branch3x3_2", 192, 320, 3, 3),
        ("branch7x7x3_1", cin, 192, 1, 1), ("branch7x7x3_2", 192, 192, 1, 7), ("branch7x7x3_3", 192, 192, 7, 1),
        ("branch7x7x3_4", 192, 192, 3, 3),
    ]


def block_e(cin: int) -> list[tuple]:
    return [
        ("branch1x1", cin, 320, 1, 1),
        ("branch3x3_1", cin, 384, 1, 1), ("branch3x3_2a", 384, 384, 1, 3), ("branch3x3_2b", 384, 384, 3, 1),
        ("branch3x3dbl_1", cin, 448, 1, 1), ("branch3x3dbl_2", 448, 384, 3, 3),
        ("branch3x3dbl_3a", 384, 384, 1, 3), ("branch3x3dbl_3b", 384, 384, 3, 1),
        ("branch_pool", cin, 192, 1, 1),
    ]


MIXED = {
    "Mixed_5b": block_a(192, 32), "Mixed_5c": block_a(256, 64), "Mixed_5d": block_a(288, 64),
    "Mixed_6a": block_b(288),
    "Mixed_6b": block_c(768, 128), "Mixed_6c": block_c(768, 160), "Mixed_6d": block_c(768, 160),
    "Mixed_6e": block_c(768, 192),
    "Mixed_7a": block_d(768), "Mixed_7b": block_e(1280), "Mixed_7c": block_e(2048),
}


def published_layout() -> dict[str, tuple[int, ...]]:
    """Key → shape of the published ``weights-inception-2015-12-05-6726825d.pth``."""
    convs = STEM + [(f"{block}.{name}", *rest) for block, layers in MIXED.items() for name, *rest in layers]
    layout = {}
    for name, cin, cout, kh, kw in convs:
        layout[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{name}.bn.{stat}"] = (cout,)
    layout["fc.weight"] = (1008, 2048)
    layout["fc.bias"] = (1008,)
    return layout


def random_published_state(seed: int = 0) -> dict[str, Tensor]:
    """Random float32 tensors in the published layout, scaled so activations stay O(1) through the network."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in published_layout().items():
        if key.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)
        elif key.endswith(("bn.weight", "running_var")):
            state[key] = 0.5 + torch.rand(shape, generator=generator)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=generator)
    return state
