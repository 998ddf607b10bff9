"""Memory of the role layouts (docs/roles.md): bytes held, checkpoint size and measured peak over DMD iterations.

    python benchmarks/memory.py [--domains sd3 digits] [--layouts full/full full/shared_lora shared_lora/shared_lora]
                                [--iterations 5] [--batch-size 2] [--rank 16]

Domains:
- ``sd3``: an SD3-class pipeline scaled down to run on a CPU: ``SD3Transformer2DModel`` with 12 joint
  layers of width 384 (6 heads of 64), patch 2 on a 32×32 latent (256 image tokens), random weights,
  written in diffusers' folder layout with tiny CLIP text encoders and VAE (``tests/tiny_models.py``).
- ``digits``: the embedded digits denoiser (a random one of the shipped size when no teacher is cached).

Each layout (``GENERATOR/FAKE_SCORE``) runs in its own process: DMD with TTUR 1 for ``--iterations``
iterations (each updates both roles) at equal batch. Reported per layout:
- ``base MB``: the denoiser weights no role trains (the teacher, and a ``lora`` role's own frozen copy),
  each distinct tensor once;
- ``trainable MB`` and ``optimizer MB`` (AdamW's two moments, after the iterations);
- ``checkpoint MB``: the checkpoint ``Trainer.save_checkpoint`` writes (weights, optimizer state, loops),
  less the hyperparameters (the backbone object here; ``rdm fit`` saves a few lines of config);
- ``peak MB``: the process's resident memory at its highest during the iterations, less its resident
  memory before the module was built (imports, the data, the text encoders' and VAE's own folder reads
  excluded), sampled every 5 ms from ``/proc/self/statm``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from torch.utils.data import IterableDataset

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = ("full/full", "full/shared_lora", "shared_lora/shared_lora")
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2**20


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler(threading.Thread):
    """Highest resident memory seen while running (sampled every ``interval`` seconds)."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.peak, self.running = interval, resident_bytes(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak, resident_bytes())


def make_sd3_class(path: Path) -> Path:
    """The scaled-down SD3 pipeline folder (seeded, so every layout gets the same weights)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import tiny_clip_text_encoder, tiny_clip_tokenizer, tiny_vae

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=12, attention_head_dim=64,
        num_attention_heads=6, caption_projection_dim=384, joint_attention_dim=64, pooled_projection_dim=64,
    ).eval()
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.1, scaling_factor=1.5),
        text_encoder=tiny_clip_text_encoder(tokenizer, hidden=32, projection=32, seed=2),
        text_encoder_2=tiny_clip_text_encoder(tokenizer, hidden=32, projection=32, seed=3),
        text_encoder_3=None, tokenizer=tokenizer, tokenizer_2=tokenizer, tokenizer_3=None,
    ).save_pretrained(path)
    return path


def digits_teacher(path: Path) -> str | None:
    """The cached digits teacher, or a random denoiser of the shipped size written to ``path``."""
    from rdm_lightning.backbones.digits import DigitsConfig, DigitsDenoiser, DigitsTextEncoder, save_digits_model
    from rdm_lightning.backbones.digits import default_teacher_path

    cached = default_teacher_path()
    if (cached / "denoiser.safetensors").exists():
        return str(cached)
    import torch

    config = DigitsConfig()
    torch.manual_seed(0)
    save_digits_model(path, config, DigitsTextEncoder(config.text_dim, config.max_tokens),
                      DigitsDenoiser(config.channels, config.text_dim))
    return str(path)


class PromptBatches(IterableDataset):
    """Endless batches of one prompt repeated (the text never matters for memory)."""

    def __init__(self, prompt: str, batch_size: int):
        self.batch = {"prompts": [prompt] * batch_size}

    def __iter__(self):
        while True:
            yield self.batch


def measure(domain: str, layout: str, iterations: int, batch_size: int, rank: int, folder: Path) -> dict:
    """One layout's figures (runs in its own process)."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from rdm_lightning.methods import DMD, DMDConfig, OptimizerConfig, StudentConfig
    from rdm_lightning.methods.roles import RoleConfig, RolesConfig

    torch.set_num_threads(1)
    if domain == "sd3":
        from rdm_lightning.backbones import SD3Backbone

        backbone = SD3Backbone(str(make_sd3_class(folder / "sd3")))
    else:
        from rdm_lightning.backbones import DigitsBackbone

        backbone = DigitsBackbone(digits_teacher(folder / "digits"))
    layouts = [RoleConfig() if name == "full" else RoleConfig(layout=name, rank=rank) for name in layout.split("/")]
    prompt = "a photo of a cat" if domain == "sd3" else "a handwritten digit 3"
    data = DataLoader(PromptBatches(prompt, batch_size), batch_size=None)
    before = resident_bytes()
    sampler = PeakSampler()
    sampler.start()
    module = DMD(
        backbone, dmd=DMDConfig(guidance_scale=1.5, generator_update_ratio=1),
        generator_optimizer=OptimizerConfig(lr=1e-5), fake_score_optimizer=OptimizerConfig(lr=1e-5),
        student=StudentConfig(num_steps=1),
        roles=RolesConfig(generator=layouts[0], fake_score=layouts[1]), max_generator_updates=iterations,
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_epochs=-1)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=data)
    seconds = time.perf_counter() - start
    peak = sampler.stop()
    owned = {id(p) for ps in module.role_parameters().values() for p in ps}
    denoisers = [module.teacher, module.generator, module.fake_score]
    base = {p.data_ptr(): p.numel() * p.element_size() for m in denoisers for p in m.parameters() if id(p) not in owned}
    trainable = sum(p.numel() * p.element_size() for ps in module.role_parameters().values() for p in ps)
    optimizer = sum(t.numel() * t.element_size() for o in trainer.optimizers for s in o.state.values()
                    for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    path = folder / "module.ckpt"
    checkpoint = trainer._checkpoint_connector.dump_checkpoint()  # what Trainer.save_checkpoint writes
    # ... less the hyperparameters, here the backbone object itself (`rdm fit` saves its config instead).
    checkpoint.pop("hyper_parameters", None)
    torch.save(checkpoint, path)
    return {
        "domain": domain, "layout": layout, "base MB": sum(base.values()) / MB, "trainable MB": trainable / MB,
        "optimizer MB": optimizer / MB, "checkpoint MB": path.stat().st_size / MB, "peak MB": (peak - before) / MB,
        "s/iteration": seconds / iterations, "updates": dict(module.role_updates),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", nargs="+", default=["sd3", "digits"], choices=["sd3", "digits"])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--iterations", type=int, default=5, help="DMD iterations (TTUR 1: each updates both roles)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of every adapted role")
    parser.add_argument("--one", nargs=2, metavar=("DOMAIN", "LAYOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(measure(*args.one, args.iterations, args.batch_size, args.rank, Path(folder))))
        return
    rows = []
    for domain in args.domains:
        for layout in args.layouts:
            command = [sys.executable, __file__, "--one", domain, layout, "--iterations", str(args.iterations),
                       "--batch-size", str(args.batch_size), "--rank", str(args.rank)]
            print(f"{domain} {layout} ...", file=sys.stderr, flush=True)
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    keys = ("base MB", "trainable MB", "optimizer MB", "checkpoint MB", "peak MB", "s/iteration")
    lines = ["| domain | generator/fake score | " + " | ".join(keys) + " | peak vs full/full |",
             "|---" * (len(keys) + 3) + "|"]
    for row in rows:
        full = next((r for r in rows if r["domain"] == row["domain"] and r["layout"] == "full/full"), None)
        ratio = f"{row['peak MB'] / full['peak MB']:.2f}×" if full else ""
        lines.append(f"| {row['domain']} | {row['layout']} | " + " | ".join(f"{row[k]:.4g}" for k in keys) + f" | {ratio} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
