"""Image grids people look at."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def image_grid(images: Tensor, columns: int | None = None, padding: int = 1, scale: int = 1) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images in ``[0, 1]`` into one ``uint8`` array ``(H', W', C)``.

    ``scale`` enlarges each image by pixel repetition (8×8 digits are tiny).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, C, H, W) with C in (1, 3), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    images = images.detach().float().clamp(0, 1).cpu()
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        h, w = h * scale, w * scale
    grid = torch.ones(c, rows * (h + padding) + padding, columns * (w + padding) + padding)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = image
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def save_image_grid(images: Tensor, path: str | Path, columns: int | None = None, scale: int = 1) -> Path:
    """Save :func:`image_grid` as a PNG and return its path."""
    array = image_grid(images, columns=columns, scale=scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)
    return path
