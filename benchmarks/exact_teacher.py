"""Exact-teacher benchmark: few-step students of a 2-D Gaussian mixture whose teacher is exact.

    python benchmarks/exact_teacher.py [--steps 1 4] [--updates 300] [--lr 1e-3] [--seeds 0]
                                       [--methods dmd gndm] [--num-samples 4000]

The teacher (:class:`~rdm_lightning.backbones.mixture.MixtureBackbone`) is the closed-form
posterior mean at every level, so every gap below is the method's. Each method trains a
``steps``-step student from the teacher (TTUR 5, batch 256, CFG 1, backward simulation, SDE
student sampler) and is scored on the same classes and noise as the untrained teacher's own
sampler at that step count (where the student starts), the 200-step teacher (SDE and ODE) and
an independent draw of real data (its NLL estimates the entropy; its sliced-W1 is the
finite-sample floor). Methods: ``dmd`` (:class:`~rdm_lightning.methods.DMD`) and ``gndm``
(:class:`~rdm_lightning.methods.GNDM`'s DM part, its default group settings, no rewards).
Prints a markdown table: mean ± std over seeds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import lightning as L
import torch
from torch import Tensor, nn

from rdm_lightning.backbones.mixture import MixtureBackbone, MixtureDataModule
from rdm_lightning.core.sampling import few_step_sample
from rdm_lightning.evaluation.mixture import mixture_metrics
from rdm_lightning.methods import DMD, GNDM
from rdm_lightning.methods.base import StudentConfig
from rdm_lightning.methods.dmd import DMDConfig
from rdm_lightning.methods.gndm import GNDMConfig
from rdm_lightning.methods.optim import OptimizerConfig

METHODS = ("dmd", "gndm")
EVAL_SEED = 1234
TEACHER_STEPS = 200
BATCH_SIZE = 256
METRICS = ("nll", "sliced_w1", "coverage", "near_modes")


def make_module(method: str, backbone: MixtureBackbone, steps: int, lr: float, seed: int, updates: int) -> DMD:
    """The method's module with the issue's DMD settings: TTUR 5, CFG 1, backward simulation."""
    dmd = DMDConfig(guidance_scale=1.0, generator_update_ratio=5, backward_simulation=True)
    common = dict(
        generator_optimizer=OptimizerConfig(lr=lr), fake_score_optimizer=OptimizerConfig(lr=lr),
        student=StudentConfig(num_steps=steps, step_rule="sde"), seed=seed, max_generator_updates=updates,
    )
    if method == "dmd":
        return DMD(backbone, dmd=dmd, **common)
    if method == "gndm":
        return GNDM(backbone, dmd=DMDConfig(guidance_scale=1.0, generator_update_ratio=5, norm_eps=1e-8), **common)
    raise ValueError(f"unknown method {method!r}; accepted: {METHODS}")


def train(module: DMD, group_size: int, seed: int) -> float:
    """Fit ``module`` on the mixture's batches until its generator-update budget; returns minutes."""
    data = MixtureDataModule(batch_size=BATCH_SIZE, seed=seed, group_size=group_size)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return (time.perf_counter() - start) / 60


@torch.no_grad()
def sample(backbone: MixtureBackbone, network: nn.Module, prompts: list[str], levels: Tensor, rule: str) -> Tensor:
    """Samples of ``network``'s sampler through ``levels``, from the benchmark's fixed noise."""
    generator = torch.Generator().manual_seed(EVAL_SEED)
    noise = torch.randn((len(prompts), *backbone.latent_shape), generator=generator)
    cond = backbone.encode_prompts(prompts)
    return few_step_sample(
        lambda x, t: backbone.predict_x0(network, x, t, cond), noise, levels, backbone.schedule, rule, generator
    )


def markdown_table(rows: dict[str, list[dict]]) -> str:
    """One row per sampler: mean ± std of each metric over its runs."""
    lines = ["| sampler | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, runs in rows.items():
        cells = []
        for key in METRICS:
            values = [run[key] for run in runs]
            std = f" ± {statistics.stdev(values):.2g}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.3f}{std}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--updates", type=int, default=300, help="generator updates of each student")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW lr of the generator and the fake score")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--methods", nargs="+", default=["dmd"], choices=METHODS)
    parser.add_argument("--num-samples", type=int, default=4000)
    args = parser.parse_args()
    # Batches of a few hundred 2-D points: thread hand-offs cost more than they save.
    torch.set_num_threads(1)

    backbone = MixtureBackbone()
    mixture = backbone.mixture
    classes = torch.arange(args.num_samples) % mixture.num_classes
    prompts = [f"class {c}" for c in classes.tolist()]
    reference = mixture.sample(classes, torch.Generator().manual_seed(EVAL_SEED + 1))

    def scores(samples: Tensor) -> dict:
        return mixture_metrics(samples, classes, reference, mixture)

    teacher = backbone.load_denoiser()
    schedule = backbone.schedule
    rows = {"real data (independent draw)": [scores(mixture.sample(classes, torch.Generator().manual_seed(EVAL_SEED + 2)))]}
    for rule in ("sde", "ode"):
        rows[f"teacher {TEACHER_STEPS}-step {rule}"] = [
            scores(sample(backbone, teacher, prompts, schedule.generator_levels(TEACHER_STEPS), rule))
        ]
    for steps in args.steps:
        rows[f"teacher {steps}-step sde (student init)"] = [
            scores(sample(backbone, teacher, prompts, schedule.generator_levels(steps), "sde"))
        ]
        for method in args.methods:
            group_size = GNDMConfig().group_size if method == "gndm" else 1
            runs = []
            for seed in args.seeds:
                torch.manual_seed(seed)
                module = make_module(method, backbone, steps, args.lr, seed, args.updates)
                minutes = train(module, group_size, seed)
                runs.append(scores(sample(backbone, module.generator, prompts, module.student_levels(), "sde")))
                print(f"{method} {steps}-step seed {seed}: {runs[-1]} ({minutes:.1f} min)", file=sys.stderr)
            rows[f"{method} {steps}-step, {args.updates} updates, lr {args.lr:g}"] = runs
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
