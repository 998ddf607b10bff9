"""Time per DMD iteration: the Lightning module against a plain PyTorch loop, same math, same models.

    python benchmarks/overhead.py [--iterations 60] [--repeats 3]

Both run DMD2 on the digits backbone (4-step student, backward simulation,
TTUR 5, batch 64) from the same initial weights. The plain loop calls the
same core functions and backbone adapter with two AdamW optimizers and no
Lightning. Runs alternate (Lightning, plain, …) and the median per-iteration
time of each, after warm-up, is compared. Target: ratio ≤ 1.10.
"""
from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

from rdm_lightning.backbones import DigitsBackbone
from rdm_lightning.core.dmd import dmd_gradient, dmd_loss
from rdm_lightning.core.sampling import backward_simulation_input
from rdm_lightning.data import DigitsDataModule
from rdm_lightning.methods import DMD, DMDConfig, OptimizerConfig, ensure_digits_teacher

WARMUP = 10
CONFIG = DMDConfig(guidance_scale=1.5, generator_update_ratio=5)
OPTIMIZER = OptimizerConfig(lr=1e-4)


class IterationTimer(L.Callback):
    def __init__(self):
        self.stamps: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.stamps.append(time.perf_counter())


def per_iteration(stamps: list[float]) -> float:
    return (stamps[-1] - stamps[WARMUP]) / (len(stamps) - 1 - WARMUP)


def lightning_run(iterations: int, batch_size: int) -> float:
    module = DMD(DigitsBackbone(), dmd=CONFIG, generator_optimizer=OPTIMIZER, fake_score_optimizer=OPTIMIZER)
    timer = IterationTimer()
    trainer = L.Trainer(
        max_epochs=-1, limit_train_batches=iterations + 1, max_steps=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], limit_val_batches=0,
    )
    module.max_generator_updates = (iterations + 1) // CONFIG.generator_update_ratio + 1
    trainer.fit(module, DigitsDataModule(batch_size=batch_size))
    return per_iteration(timer.stamps[: iterations + 1])


def plain_run(iterations: int, batch_size: int) -> float:
    """The same DMD2 iteration written as a plain loop."""
    backbone = DigitsBackbone()
    teacher = backbone.load_denoiser().requires_grad_(False).eval()
    generator, fake_score = backbone.load_denoiser(), backbone.load_denoiser()
    opt_g = torch.optim.AdamW(generator.parameters(), lr=OPTIMIZER.lr, betas=OPTIMIZER.betas, weight_decay=OPTIMIZER.weight_decay)
    opt_f = torch.optim.AdamW(fake_score.parameters(), lr=OPTIMIZER.lr, betas=OPTIMIZER.betas, weight_decay=OPTIMIZER.weight_decay)
    data = DigitsDataModule(batch_size=batch_size)
    data.setup()
    schedule, levels = backbone.schedule, backbone.schedule.generator_levels(4)
    stamps = []
    batches = iter(data.train_dataloader())
    for iteration in range(iterations + 1):
        stamps.append(time.perf_counter())
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(data.train_dataloader())
            batch = next(batches)
        prompts = batch["prompts"]
        cond, uncond = backbone.encode_prompts(prompts), backbone.empty_conditioning(len(prompts))
        step = int(torch.randint(len(levels), (1,)))
        x_in, level = backward_simulation_input(
            lambda x, t: backbone.predict_x0(generator, x, t, cond),
            torch.randn(len(prompts), 1, 8, 8), levels, step, schedule,
        )
        if iteration % CONFIG.generator_update_ratio == 0:
            fake_score.requires_grad_(False)
            x0 = backbone.predict_x0(generator, x_in, level, cond)
            dm_level = schedule.sample_levels(len(x0), *CONFIG.dm_level_range)
            x_noisy = schedule.add_noise(x0.detach(), torch.randn_like(x0), dm_level)
            with torch.no_grad():
                real = backbone.predict_x0(teacher, x_noisy, dm_level, cond, CONFIG.guidance_scale, uncond)
                fake = backbone.predict_x0(fake_score, x_noisy, dm_level, cond)
            loss = dmd_loss(x0, dmd_gradient(x0.detach(), real, fake))
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(generator.parameters(), OPTIMIZER.grad_clip)
            opt_g.step()
            fake_score.requires_grad_(True)
            x0 = x0.detach()
        else:
            with torch.no_grad():
                x0 = backbone.predict_x0(generator, x_in, level, cond)
        generator.requires_grad_(False)
        fake_level = schedule.sample_levels(len(x0), *CONFIG.fake_level_range)
        loss = backbone.denoising_loss(fake_score, x0, cond, fake_level, torch.randn_like(x0))
        opt_f.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(fake_score.parameters(), OPTIMIZER.grad_clip)
        opt_f.step()
        generator.requires_grad_(True)
        float(loss.detach())  # the module logs its losses, which synchronises the same way
    return per_iteration(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    ensure_digits_teacher()
    lightning_times, plain_times = [], []
    for _ in range(args.repeats):
        torch.manual_seed(0)
        lightning_times.append(lightning_run(args.iterations, args.batch_size))
        torch.manual_seed(0)
        plain_times.append(plain_run(args.iterations, args.batch_size))
    lit, plain = statistics.median(lightning_times), statistics.median(plain_times)
    print("| loop | ms / DMD iteration (median of %d) |" % args.repeats)
    print("|---|---|")
    print(f"| plain PyTorch | {1000 * plain:.1f} |")
    print(f"| rdm_lightning DMD (LightningModule) | {1000 * lit:.1f} |")
    print(f"\nratio: {lit / plain:.3f}× (target ≤ 1.10×)")


if __name__ == "__main__":
    main()
