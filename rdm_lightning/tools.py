"""``rdm sample``, ``rdm evaluate`` and ``rdm export``: work on checkpoints and sample files."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rdm_lightning.data.prompts import load_prompts
from rdm_lightning.evaluation.grid import save_image_grid
from rdm_lightning.methods.lora import merged_copy


def load_module(checkpoint: str | Path):
    """The LightningModule saved in ``checkpoint`` (a ``rdm fit`` checkpoint), in eval mode."""
    import lightning as L

    from rdm_lightning.backbones.base import require_path

    path = require_path(checkpoint, "checkpoint")
    hparams = torch.load(path, map_location="cpu", weights_only=False).get("hyper_parameters", {})
    class_path = hparams.get("_class_path")
    if class_path is None:
        raise ValueError(f"checkpoint {str(path)!r} was not written by `rdm fit` (no '_class_path' in its hyperparameters)")
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(__import__(module_name, fromlist=[class_name]), class_name)
    if not issubclass(cls, L.LightningModule):
        raise TypeError(f"{class_path} in {str(path)!r} is not a LightningModule")
    return cls.load_from_checkpoint(path, map_location="cpu").eval()


def _prompts(args: argparse.Namespace) -> list[str]:
    base = load_prompts(args.prompts_file) if args.prompts_file else [args.prompt]
    return [p for p in base for _ in range(args.num_per_prompt)]


def sample(args: argparse.Namespace) -> Path:
    """Write ``samples.npz`` (images N×H×W×C float32 in [0, 1], prompts) and ``grid.png``."""
    module = load_module(args.checkpoint)
    if args.steps is not None:
        if args.role == "generator":
            module.student = dataclasses.replace(module.student, num_steps=args.steps, levels=None)
        else:
            module.teacher_sampling = dataclasses.replace(module.teacher_sampling, num_steps=args.steps)
    if args.guidance is not None:
        if args.role != "teacher":
            raise ValueError("--guidance applies to --role teacher only: the student samples without CFG")
        module.teacher_sampling = dataclasses.replace(module.teacher_sampling, guidance_scale=args.guidance)
    prompts = _prompts(args)
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((len(prompts), *module.backbone.latent_shape), generator=generator)
    batches = []
    start = time.perf_counter()
    for begin in tqdm(range(0, len(prompts), args.batch_size), desc=f"sampling ({args.role})", unit="batch"):
        chunk = slice(begin, begin + args.batch_size)
        latents = module.generate(prompts[chunk], noise[chunk], role=args.role, generator=generator)
        batches.append(module.backbone.decode(latents).cpu())
    seconds = time.perf_counter() - start
    images = torch.cat(batches)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    np.savez(output / "samples.npz", images=images.permute(0, 2, 3, 1).numpy().astype(np.float32), prompts=np.array(prompts))
    scale = max(1, 64 // images.shape[-1])
    save_image_grid(images, output / "grid.png", columns=args.num_per_prompt, scale=scale)
    info = {"role": args.role, "nfe": module.nfe(args.role), "num_images": len(prompts), "seconds_per_image": seconds / len(prompts)}
    (output / "sampling.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))
    return output


def evaluate(args: argparse.Namespace) -> dict:
    """Digits metrics of a ``samples.npz``; prints them as JSON and writes ``metrics.json`` beside it."""
    from rdm_lightning.backbones.base import require_path
    from rdm_lightning.evaluation.digits import DigitsEvaluator

    path = require_path(args.samples, "samples file")
    with np.load(path) as data:
        missing = {"images", "prompts"} - set(data.files)
        if missing:
            raise ValueError(f"{str(path)!r} lacks {sorted(missing)}; `rdm sample` writes 'images' and 'prompts'")
        images, prompts = torch.from_numpy(data["images"]), [str(p) for p in data["prompts"]]
    metrics = DigitsEvaluator.default().evaluate(images, prompts)
    sampling = path.parent / "sampling.json"
    if sampling.exists():
        metrics.update(json.loads(sampling.read_text()))
    (path.parent / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    return metrics


def export(args: argparse.Namespace) -> Path:
    """Write the (EMA) generator, its LoRA merged if it has one, as a model folder its family loads (diffusers for SD)."""
    module = load_module(args.checkpoint)
    generator = merged_copy(module.sampling_generator)
    output = module.backbone.export(generator, args.output, len(module.student_levels()), module.student_levels())
    print(f"exported the student to {output}")
    return output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdm", description="rdm_lightning tools")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("sample", help="few-step samples from a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--role", choices=("generator", "teacher"), default="generator")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts-file", help=".txt, .jsonl or .csv of prompts")
    source.add_argument("--prompt")
    p.add_argument("--num-per-prompt", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's)")
    p.add_argument("--guidance", type=float, default=None, help="teacher CFG scale (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--output", required=True)
    p.set_defaults(run=sample)

    p = commands.add_parser("evaluate", help="digits metrics of a samples.npz")
    p.add_argument("--samples", required=True)
    p.set_defaults(run=evaluate)

    p = commands.add_parser("export", help="export the student")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True)
    p.set_defaults(run=export)
    return parser


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "num_per_prompt", 1) < 1:
        raise SystemExit(f"rdm sample: --num-per-prompt must be >= 1, got {args.num_per_prompt}")
    args.run(args)
