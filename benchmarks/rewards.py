#!/usr/bin/env python
"""Scoring throughput and memory of every text-to-image reward, as a markdown table.

Each reward is loaded through its real loader from random files in its public format (the builders of
``tests/tiny_rewards.py`` and ``tests/tiny_models.py``) and scores ``--images`` images of ``--resolution``
pixels against prompts, in batches of ``--batch``, twice per path after a warm-up call:

- ``no-grad img/s``: ``reward.score(images, prompts)`` (evaluation, logging);
- ``grad img/s``: ``reward.score(images, prompts, with_grad=True)`` and the backward pass to the pixels
  (reward back-propagation), for differentiable rewards;
- ``peak MB``: on CPU the process's resident memory at its highest while scoring, less its resident memory
  before the reward was loaded (weights, activations and the allocator's slack); on CUDA the peak allocated
  memory less the allocated memory before loading;
- ``params (M)`` of the tiny model scored here, and ``real params (M)`` / ``real bf16 MB``: the parameter
  count and bf16 weight memory of the published model, counted on the meta device (no file is read).

``--size tiny`` (the default, what a 2-core CPU runs) scores tiny random models of the real classes, so its
images/s measure the preprocessing and the code path rather than the real networks; the real networks'
throughput needs a GPU and the published files (``--size real`` is not offered: no weights can be fetched
here). Usage::

    python benchmarks/rewards.py                       # CPU, tiny models, the table on stdout
    python benchmarks/rewards.py --device cuda --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
from memory import MB, PeakSampler, resident_bytes  # noqa: E402

PROMPTS = ["a photo of a cat", "an astronaut riding a horse", "a bowl of ramen, studio lighting", "two dogs"]


# ---- builders: (tiny reward from files in a folder, the published model on the meta device) -------------
def tiny_clip_folder(folder: Path) -> Path:
    from tiny_models import make_tiny_clip

    path = folder / "clip"
    if not path.exists():
        make_tiny_clip(path)
    return path


def build_clip(folder: Path):
    from rdm_lightning.rewards import CLIPScoreReward

    return CLIPScoreReward(str(tiny_clip_folder(folder)), name="clip_score")


def build_pickscore(folder: Path):
    from rdm_lightning.rewards import PickScoreReward

    return PickScoreReward(str(tiny_clip_folder(folder)), name="pickscore")


def build_open_clip(alias: str) -> Callable[[Path], object]:
    def build(folder: Path):
        from tiny_rewards import TINY, TINY_QUICK, write_bpe, write_dfn_checkpoint, write_hps_checkpoint

        from rdm_lightning.rewards import DFNCLIPReward, HPSv2Reward

        bpe = write_bpe(folder / "bpe_simple_vocab_16e6.txt.gz")
        if alias == "hpsv2":
            return HPSv2Reward(str(write_hps_checkpoint(folder / "hps.pt")), bpe_path=str(bpe), architecture=TINY)
        return DFNCLIPReward(str(write_dfn_checkpoint(folder / "dfn.bin")), bpe_path=str(bpe), architecture=TINY_QUICK)

    return build


def build_aesthetic(folder: Path):
    from tiny_rewards import write_aesthetic_mlp

    from rdm_lightning.rewards import AestheticReward

    clip = tiny_clip_folder(folder)
    width = json.loads((clip / "config.json").read_text())["projection_dim"]
    return AestheticReward(str(clip), str(write_aesthetic_mlp(folder / "mlp.pth", width)))


def build_image_reward(folder: Path):
    from tiny_rewards import TINY_BLIP_VISION, write_image_reward_files

    from rdm_lightning.rewards import ImageReward

    files = write_image_reward_files(folder / "image_reward")
    return ImageReward(**{key: str(path) for key, path in files.items()}, vision_architecture=TINY_BLIP_VISION)


def build_hpsv3(folder: Path):
    from tiny_hpsv3 import write_hpsv3_checkpoint, write_qwen2_vl_folder

    from rdm_lightning.rewards import HPSv3Reward

    base = write_qwen2_vl_folder(folder / "Qwen2-VL-7B-Instruct")
    return HPSv3Reward(str(write_hpsv3_checkpoint(folder / "HPSv3.safetensors")), str(base))


def meta_parameters(build: Callable[[], torch.nn.Module]) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def clip_l() -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel

    # openai/clip-vit-large-patch14's config.json.
    return CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                           patch_size=14, image_size=224),
        projection_dim=768))


def clip_h() -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel

    # yuvalkirstain/PickScore_v1's config.json (laion/CLIP-ViT-H-14-laion2B-s32B-b79K's architecture).
    return CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                         hidden_act="gelu"),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                           patch_size=14, image_size=224, hidden_act="gelu"),
        projection_dim=1024))


def open_clip_vit_h() -> torch.nn.Module:
    from rdm_lightning.rewards.open_clip import OpenCLIPConfig, OpenCLIPModel

    return OpenCLIPModel(OpenCLIPConfig.from_spec("ViT-H-14"))


def aesthetic_real() -> torch.nn.Module:
    from rdm_lightning.rewards.aesthetic import AestheticMLP

    clip = clip_l()
    return torch.nn.ModuleList([clip.vision_model, clip.visual_projection, AestheticMLP(768)])


def image_reward_real() -> torch.nn.Module:
    from tiny_rewards import REAL_MED_CONFIG

    from rdm_lightning.rewards.image_reward import BLIPTextConfig, BLIPVisionConfig, ImageRewardModel

    text = BLIPTextConfig(**{field: REAL_MED_CONFIG[field] for field in BLIPTextConfig.__dataclass_fields__})
    return ImageRewardModel(BLIPVisionConfig.from_spec("ViT-L/16"), text)


def hpsv3_real() -> torch.nn.Module:
    from tiny_hpsv3 import real_size_hpsv3

    return real_size_hpsv3()


REWARDS: dict[str, tuple[Callable[[Path], object], Callable[[], torch.nn.Module]]] = {
    "clip_score": (build_clip, clip_l),
    "pickscore": (build_pickscore, clip_h),
    "hpsv2": (build_open_clip("hpsv2"), open_clip_vit_h),
    "dfn_clip": (build_open_clip("dfn_clip"), open_clip_vit_h),
    "aesthetic": (build_aesthetic, aesthetic_real),
    "image_reward": (build_image_reward, image_reward_real),
    "hpsv3": (build_hpsv3, hpsv3_real),
}


# ---- measurement ------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(reward, images: torch.Tensor, prompts: list[str], batch: int, with_grad: bool) -> float:
    """Images scored per second over two passes (after a warm-up batch), with the backward pass when ``with_grad``."""
    def one_pass() -> None:
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            if with_grad:
                chunk = chunk.detach().requires_grad_(True)
                reward.score(chunk, prompts[start:start + batch], with_grad=True).sum().backward()
            else:
                reward.score(chunk, prompts[start:start + batch])

    device = images.device
    reward.score(images[:batch], prompts[:batch], with_grad=with_grad)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(2):
        one_pass()
    synchronize(device)
    return 2 * len(images) / (time.perf_counter() - start)


def measure(name: str, folder: Path, device: torch.device, dtype: torch.dtype, images: torch.Tensor,
            prompts: list[str], batch: int) -> dict:
    build, real = REWARDS[name]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = resident_bytes()
    sampler = PeakSampler() if device.type == "cpu" else None
    if sampler is not None:
        sampler.start()
    reward = build(folder).to(device=device, dtype=dtype)
    no_grad = images_per_second(reward, images, prompts, batch, with_grad=False)
    grad = images_per_second(reward, images, prompts, batch, with_grad=True) if reward.differentiable else None
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else sampler.stop()) - before
    real_parameters = meta_parameters(real)
    return {"reward": name, "class": type(reward).__name__, "differentiable": reward.differentiable,
            "no_grad_images_per_s": no_grad, "grad_images_per_s": grad, "peak_mb": peak / MB,
            "parameters_m": sum(p.numel() for p in reward.parameters()) / 1e6,
            "real_parameters_m": real_parameters / 1e6, "real_bf16_mb": 2 * real_parameters / MB}


def table(rows: list[dict]) -> str:
    lines = ["| reward | class | no-grad img/s | grad img/s | peak MB | params (M) | real params (M) | real bf16 MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        grad = "—" if row["grad_images_per_s"] is None else f"{row['grad_images_per_s']:.1f}"
        lines.append(f"| {row['reward']} | {row['class']} | {row['no_grad_images_per_s']:.1f} | {grad} | "
                     f"{row['peak_mb']:.0f} | {row['parameters_m']:.3f} | {row['real_parameters_m']:.0f} | "
                     f"{row['real_bf16_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rewards", nargs="+", choices=list(REWARDS), default=list(REWARDS))
    parser.add_argument("--images", type=int, default=32, help="images per pass")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256, help="side of the square images scored, in pixels")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.images < args.batch or args.batch < 1:
        parser.error(f"--images ({args.images}) must be at least --batch ({args.batch}) and --batch at least 1")
    # Imported before the first measurement, so that no reward's peak counts the libraries' import.
    import transformers.models.clip  # noqa: F401

    import rdm_lightning.rewards  # noqa: F401

    torch.manual_seed(0)
    device = torch.device(args.device)
    images = torch.rand(args.images, 3, args.resolution, args.resolution, device=device)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.images)]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        # One reward built and scored first, unmeasured: lazily imported modules and the allocator's first
        # arenas would otherwise count in the first reward's peak.
        (Path(folder) / "warm_up").mkdir()
        build_clip(Path(folder) / "warm_up").score(images[:1], prompts[:1])
        for name in args.rewards:
            (Path(folder) / name).mkdir()
            rows.append(measure(name, Path(folder) / name, device, getattr(torch, args.dtype), images, prompts,
                                args.batch))
    print(f"{args.images} images of {args.resolution}² px, batch {args.batch}, {args.device}, {args.dtype}, "
          f"{torch.get_num_threads()} threads; tiny random models of the real classes")
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
