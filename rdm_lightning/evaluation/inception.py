"""The InceptionV3 of FID: TensorFlow's ``inception-2015-12-05`` graph, ported to PyTorch.

This is the network of the original TensorFlow FID, of torch-fidelity and of torchmetrics'
``FrechetInceptionDistance``, with the state-dict layout of their published weight file
(:data:`WEIGHTS_URLS`). It differs from torchvision's ImageNet InceptionV3: other weights,
1008 classes, average pools that leave the zero padding out of the mean, and a max pool in
the last block's pool branch.

Preprocessing follows torch-fidelity (the TensorFlow graph's own input path): images are
quantised to ``0..255``, resized to 299×299 by TensorFlow 1.x's bilinear rule
(:func:`resize_bilinear_tf1`), and mapped to ``[-1, 1)`` by ``(x − 128) / 128``. The features
are the 2048-d global average pool before the classifier ("pool3").
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdm_lightning.state_files import some_names

INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_LOGITS = 1008
BATCH_NORM_EPS = 1e-3
WEIGHTS_URLS = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
)
"""The two published copies of the weights. Both names carry torch.hub's sha256 prefix ``6726825d``,
and both projects load them strictly into this key layout."""
WEIGHTS_FORMAT = (
    "a torch.save'd dict of float32 tensors keyed like 'Conv2d_1a_3x3.conv.weight', "
    "'Mixed_7c.branch_pool.bn.running_var', 'fc.weight' (the FID InceptionV3 weights, published as "
    + " and ".join(WEIGHTS_URLS)
    + ")"
)
Resize = Literal["tensorflow1", "antialias"]
RESIZE_MODES = ("tensorflow1", "antialias")
MIXED_BLOCKS = tuple(f"Mixed_{name}" for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"))
"""The inception blocks after the stem, in the order they run."""


def resize_bilinear_tf1(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize as TensorFlow 1.x's ``resize_bilinear`` with ``align_corners=False``.

    Output pixel ``i`` samples the input at ``i · in / out`` (no half-pixel offset, unlike
    PyTorch's ``align_corners=False``), interpolating between ``floor`` of that and the next
    pixel, which is clipped to the last one. The float operations are those of torch-fidelity's
    ``interpolate_bilinear_2d_like_tensorflow1x`` (its exact "slow" method): source positions in
    float32, interpolation along the width, then the height.

    Args:
        images: ``(B, C, H, W)`` floating point.
        size: Output ``(height, width)``.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be floating point (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if len(size) != 2 or not all(isinstance(side, int) and side >= 1 for side in size):
        raise ValueError(f"size must be two positive integers (height, width), got {size!r}")
    out_height, out_width = size
    rows_low, rows_high, row_weight = _tf1_sample_positions(images.shape[2], out_height, images)
    cols_low, cols_high, col_weight = _tf1_sample_positions(images.shape[3], out_width, images)
    left = images[:, :, :, cols_low]
    across = left + (images[:, :, :, cols_high] - left) * col_weight.view(1, 1, 1, -1)
    top = across[:, :, rows_low, :]
    return top + (across[:, :, rows_high, :] - top) * row_weight.view(1, 1, -1, 1)


def _tf1_sample_positions(in_size: int, out_size: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Lower and upper input indices and the upper one's weight, for each of ``out_size`` outputs."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    source = torch.arange(out_size, dtype=like.dtype, device=like.device) * scale
    low = source.long()
    high = (low + 1).clamp_max(in_size - 1)
    return low, high, source - low.to(source.dtype)


def quantise_images(images: Tensor) -> Tensor:
    """``(B, 1 | 3, H, W)`` images as float ``0..255`` integers with three channels.

    Float images in ``[0, 1]`` are rounded to the nearest of 256 levels, as a PNG of them
    stores them (``rdm_lightning.evaluation.grid``), so features of samples in memory equal
    those of their saved files. uint8 images (what torchmetrics' ``FrechetInceptionDistance``
    is fed with ``normalize=False``) are taken as they are. Grey images are repeated to RGB.

    Raises:
        ValueError: not 4-D with 1 or 3 channels, neither floating point nor uint8, or float
            values that do not round into ``0..255`` (NaN included).
    """
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"images must be shaped (B, 1 or 3, H, W) with B >= 1, got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        levels = images.float()
    elif images.is_floating_point():
        levels = torch.round(images.float() * 255)
        low, high = levels.aminmax()
        # NaN fails both comparisons, so it is refused here too.
        if not (low.item() >= 0 and high.item() <= 255):
            raise ValueError(
                f"float images must have values in [0, 1], got range [{images.min().item()}, {images.max().item()}]"
            )
    else:
        raise ValueError(f"images must be floating point in [0, 1] or uint8 in 0..255, got {images.dtype}")
    return levels.expand(-1, 3, -1, -1)


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (TensorFlow's ``eps=0.001``) and ReLU.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Kernel size (an int or ``(height, width)``).
        stride: Stride.
        padding: Zero padding (an int or ``(height, width)``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BATCH_NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        """``relu(bn(conv(x)))``."""
        return F.relu(self.bn(self.conv(x)))


def _average_pool_3x3(x: Tensor) -> Tensor:
    """3×3 stride-1 average pool whose border means leave the zero padding out, as TensorFlow's."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35×35 block (``Mixed_5b..5d``): 1×1, 5×5, double 3×3 and average-pool branches.

    Args:
        in_channels: Input channels.
        pool_features: Output channels of the pool branch.
    """

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        """The four branches concatenated on channels (``224 + pool_features``)."""
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_average_pool_3x3(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], dim=1)


class InceptionB(nn.Module):
    """35→17 reduction (``Mixed_6a``): strided 3×3, double 3×3 and max-pool branches.

    Args:
        in_channels: Input channels.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """The three branches concatenated on channels (``480 + in_channels``)."""
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), branch3x3dbl, branch_pool], dim=1)


class FIDInceptionC(nn.Module):
    """17×17 block (``Mixed_6b..6e``): 1×1, factorised 7×7, double factorised 7×7 and average-pool branches.

    Args:
        in_channels: Input channels.
        channels_7x7: Inner channels of the 7×7 branches.
    """

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        """The four branches concatenated on channels (768)."""
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(_average_pool_3x3(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], dim=1)


class InceptionD(nn.Module):
    """17→8 reduction (``Mixed_7a``): 3×3, factorised 7×7 then 3×3, and max-pool branches.

    Args:
        in_channels: Input channels.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """The three branches concatenated on channels (``512 + in_channels``)."""
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], dim=1)


class FIDInceptionE(nn.Module):
    """8×8 block (``Mixed_7b``, ``Mixed_7c``): 1×1, split 3×3, double split 3×3 and pool branches.

    Args:
        in_channels: Input channels.
        max_pool: Pool branch by a 3×3 max pool (TensorFlow's ``Mixed_7c``, an oddity of this
            graph) instead of the padding-excluding average pool (``Mixed_7b``).
    """

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        """The four branches concatenated on channels (2048)."""
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], dim=1)
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _average_pool_3x3(x)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], dim=1)

    def extra_repr(self) -> str:
        return f"max_pool={self.max_pool}"


class FIDInceptionV3(nn.Module):
    """FID's InceptionV3: images in ``[0, 1]`` → 2048-d pool3 features.

    Build it with :meth:`from_file`; the constructor gives random weights. It stays frozen and
    in eval mode (its batch norms must use the stored statistics), and it is a valid
    ``feature`` of torchmetrics' ``FrechetInceptionDistance``: :attr:`num_features` spares the
    metric its probe, and the metric hands a custom module the images untouched, so pass
    float images in ``[0, 1]`` (or uint8).

    Args:
        resize: How images reach 299×299. ``"tensorflow1"``: TensorFlow 1.x bilinear
            (:func:`resize_bilinear_tf1`), as the original FID, torch-fidelity and torchmetrics
            with ``antialias=False``. ``"antialias"``: PyTorch's antialiased bilinear, as
            torchmetrics' built-in extractor by default (``antialias=True``) — it differs from
            ``"tensorflow1"`` only when downsampling.
    """

    num_features = NUM_FEATURES

    def __init__(self, resize: Resize = "tensorflow1") -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.resize = resize
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        # Unused by the features; kept so the published file loads strictly.
        self.fc = nn.Linear(NUM_FEATURES, NUM_LOGITS)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path, resize: Resize = "tensorflow1") -> FIDInceptionV3:
        """The network with the weights of ``path``, in float32 on the CPU.

        Args:
            path: The published weight file (either of :data:`WEIGHTS_URLS`), or any file in
                its format.
            resize: See the class.

        Raises:
            FileNotFoundError: ``path`` is not a file.
            ValueError: ``path`` is not a torch file holding a dict of tensors, or its keys or
                shapes differ from the FID InceptionV3's (the message names them).
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"FID InceptionV3 weights not found at {str(path)!r}; expected {WEIGHTS_FORMAT}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load raises many types for a file it cannot read
            # Only the first sentence: torch's advice to retry with weights_only=False does not apply.
            reason = str(error).split(". ")[0].splitlines()[0]
            raise ValueError(
                f"{str(path)!r} is not a readable torch file ({type(error).__name__}: {reason}); "
                f"expected {WEIGHTS_FORMAT}"
            ) from error
        if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
            raise ValueError(f"{str(path)!r} does not hold a dict of tensors; expected {WEIGHTS_FORMAT}")
        with torch.device("meta"):
            model = cls(resize=resize)
        model.load_state_dict(_complete_state(model, state, path), assign=True)
        return model

    def train(self, mode: bool = True) -> FIDInceptionV3:
        """Stay in eval mode whatever ``mode`` is: the batch norms must keep their stored statistics."""
        return super().train(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """``(B, 1 | 3, H, W)`` images in ``[0, 1]`` (or uint8) → the network input ``(B, 3, 299, 299)``.

        Quantised to ``0..255`` (:func:`quantise_images`), resized in that range, then
        ``(x − 128) / 128``, as the TensorFlow graph's input path.
        """
        parameter = self.Conv2d_1a_3x3.conv.weight
        levels = quantise_images(images).to(device=parameter.device, dtype=parameter.dtype)
        size = (INPUT_SIZE, INPUT_SIZE)
        if self.resize == "tensorflow1":
            resized = resize_bilinear_tf1(levels, size)
        else:
            resized = F.interpolate(levels, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (resized - 128) / 128

    def forward(self, images: Tensor) -> Tensor:
        """Pool3 features ``(B, 2048)`` in float32 of images ``(B, 1 | 3, H, W)`` in ``[0, 1]`` (or uint8)."""
        x = self.preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in MIXED_BLOCKS:
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3)).float()

    def extra_repr(self) -> str:
        return f"resize={self.resize!r}"


def _complete_state(model: FIDInceptionV3, state: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """``state`` checked against ``model``'s keys and shapes, in float32, with batch-norm counters added.

    The published file holds no ``num_batches_tracked`` (it was converted from TensorFlow);
    they only count training steps, so a missing one is zero.
    """
    expected = model.state_dict()
    counters = {key for key in expected if key.endswith(".num_batches_tracked")}
    missing = sorted(set(expected) - counters - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{str(path)!r} is not the FID InceptionV3's state dict: missing keys {some_names(missing, 8)}, "
            f"unexpected keys {some_names(unexpected, 8)}; expected {WEIGHTS_FORMAT}"
        )
    wrong_shapes = [
        f"{key} {tuple(state[key].shape)} (expected {tuple(expected[key].shape)})"
        for key in sorted(state)
        if state[key].shape != expected[key].shape
    ]
    if wrong_shapes:
        raise ValueError(
            f"{str(path)!r} has tensors of the wrong shape: {some_names(wrong_shapes, 8)}; expected {WEIGHTS_FORMAT}"
        )
    complete = {key: value.float() if value.is_floating_point() else value for key, value in state.items()}
    for key in counters - set(state):
        complete[key] = torch.zeros((), dtype=torch.long)
    return complete
