"""Exact-teacher benchmark: few-step students of a 2-D Gaussian mixture whose teacher is exact.

    python benchmarks/exact_teacher.py [--steps 1 4] [--updates 300] [--lr 1e-3] [--seeds 0]
                                       [--methods dmd gndm] [--num-samples 4000]
                                       [--set KEY=VALUE ...] [--ema DECAY] [--train-step K] [--per-step]
                                       [--hidden WIDTH] [--depth LAYERS]

The teacher (:class:`~rdm_lightning.backbones.mixture.MixtureBackbone`) is the closed-form
posterior mean at every level, so every gap below is the method's. Each method trains a
``steps``-step student from the teacher (TTUR 5, batch 256, CFG 1, backward simulation, SDE
student sampler) and is scored on the same classes and noise as the untrained teacher's own
sampler at that step count (where the student starts), the 200-step teacher (SDE and ODE) and
an independent draw of real data (its NLL estimates the entropy; its sliced-W1 is the
finite-sample floor). Methods: ``dmd`` (:class:`~rdm_lightning.methods.DMD`) and ``gndm``
(:class:`~rdm_lightning.methods.GNDM`'s DM part, its default group settings, no rewards).
Prints a markdown table: mean ± std over seeds.

Variants (issue 11 part 2), one change against the settings above:

- ``--set KEY=VALUE`` (repeatable) overrides one field of ``dmd.*`` (``DMDConfig``),
  ``student.*`` (``StudentConfig``), ``generator_optimizer.*`` or ``fake_score_optimizer.*``
  (``OptimizerConfig``); VALUE is parsed as YAML (``dmd.dm_level_range=[0.5,0.98]``,
  ``student.step_rule=ode``, ``dmd.generator_samples=rollout``: the DM loss on the final output
  of the whole student rollout, gradient through every step). The student is sampled with its own
  step rule, beside the teacher's sampler with that rule.
- ``--ema DECAY``: also score the EMA of the generator (``GeneratorEMA(DECAY)``).
- ``--train-step K``: backward simulation always to step ``K`` (``K = steps − 1``: the DM loss
  and the fake score both on the final step's x̂0 only); benchmark-only.
- ``--per-step-critic``: one fake score per student step, each fit to (and compared with) only
  its own step's x̂0, so no critic sees the mixture of steps; benchmark-only.
- ``--oracle-fake-score``: the DM gradient's fake x̂0 is the exact posterior mean under a bank of
  fresh generator samples of the class (the empirical generator distribution), not the trained
  fake score: what the student reaches when the critic never lags; benchmark-only.
- ``--per-step``: score the x̂0 of every step k of the teacher's few-step sampler (the student
  at initialisation), i.e. what the fake score is fit to under backward simulation.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time

import lightning as L
import torch
import yaml
from torch import Tensor, nn

from rdm_lightning.backbones.base import Conditioning
from rdm_lightning.backbones.mixture import MixtureBackbone, MixtureDataModule
from rdm_lightning.callbacks.ema import GeneratorEMA
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


OVERRIDABLE = ("dmd", "student", "generator_optimizer", "fake_score_optimizer")


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """``["dmd.generator_update_ratio=10", ...]`` → ``{"dmd": {"generator_update_ratio": 10}, ...}``."""
    overrides: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        group, dot, field = key.partition(".")
        if not sep or not dot or group not in OVERRIDABLE:
            raise ValueError(f"--set {item!r}: expected GROUP.FIELD=VALUE with GROUP in {OVERRIDABLE}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        overrides.setdefault(group, {})[field] = tuple(parsed) if isinstance(parsed, list) else parsed
    return overrides


def make_module(
    method: str, backbone: MixtureBackbone, steps: int, lr: float, seed: int, updates: int,
    overrides: dict[str, dict] | None = None, train_step: int | None = None, per_step_critic: bool = False,
    oracle_fake_score: bool = False,
) -> DMD:
    """The method's module with the issue's DMD settings: TTUR 5, CFG 1, backward simulation,
    then ``overrides`` (``parse_overrides``) applied field by field."""
    overrides = overrides or {}
    if method == "dmd":
        dmd = DMDConfig(guidance_scale=1.0, generator_update_ratio=5)
    elif method == "gndm":
        dmd = DMDConfig(guidance_scale=1.0, generator_update_ratio=5, norm_eps=1e-8)
    else:
        raise ValueError(f"unknown method {method!r}; accepted: {METHODS}")
    configs = {
        "dmd": dmd, "student": StudentConfig(num_steps=steps, step_rule="sde"),
        "generator_optimizer": OptimizerConfig(lr=lr), "fake_score_optimizer": OptimizerConfig(lr=lr),
    }
    for group, fields in overrides.items():
        configs[group] = dataclasses.replace(configs[group], **fields)
    cls = {"dmd": DMD, "gndm": GNDM}[method]
    if train_step is not None:
        if not 0 <= train_step < steps:
            raise ValueError(f"train_step must lie in [0, {steps - 1}], got {train_step}")
        cls = type(f"{cls.__name__}Step{train_step}", (FixedTrainStep, cls), {"train_step": train_step})
    if per_step_critic and method != "dmd":
        raise ValueError(f"--per-step-critic is a DMD variant, got method {method!r}")
    if per_step_critic:
        cls = type(f"{cls.__name__}PerStepCritic", (PerStepCritic, cls), {})
    if oracle_fake_score:
        cls = type(f"{cls.__name__}OracleFakeScore", (OracleFakeScore, cls), {})
    return cls(backbone, **configs, seed=seed, max_generator_updates=updates)


class FixedTrainStep:
    """Mixin: backward simulation always to step ``train_step`` (the generator's and the fake
    score's x̂0 are then those of that one step)."""

    train_step = 0

    def shared_randint(self, high):
        super().shared_randint(high)  # keep the random stream aligned with the baseline
        return self.train_step


class StepFakeScores(nn.Module):
    """``num_steps`` fake scores behind one module: calls go to ``networks[active]``."""

    def __init__(self, networks: list[nn.Module]):
        super().__init__()
        self.networks = nn.ModuleList(networks)
        self.active = 0

    def forward(self, *args, **kwargs):
        return self.networks[self.active](*args, **kwargs)


class PerStepCritic:
    """Mixin: a fake score per student step; the iteration's backward-simulation step ``k`` picks
    the one that is fit to its x̂0 and that the DM gradient compares with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fake_score = StepFakeScores([copy.deepcopy(self.fake_score) for _ in range(self.student.num_steps)])

    def shared_randint(self, high):
        step = super().shared_randint(high)
        self.fake_score.active = step
        return step


class OracleFakeScore:
    """Mixin: the DM gradient's fake x̂0 is ``E[x0 | x_σ]`` under ``bank_size`` fresh generator
    samples of each class, drawn once per generator update, instead of the trained fake score."""

    bank_size = 2048

    def fake_x0(self, x_t: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        mixture = self.backbone.mixture
        classes = mixture.mode_class.to(x_t.device)[cond.tensors["weights"].argmax(dim=1)]
        sigma = level.double().to(x_t.device)[:, None]
        alpha = 1.0 - sigma
        x0 = torch.empty_like(x_t)
        for c in classes.unique().tolist():
            rows = classes == c
            bank = self.generate([f"class {c}"] * self.bank_size).double()
            squared = ((x_t[rows].double()[:, None, :] - alpha[rows, None] * bank[None]) ** 2).sum(-1)
            weights = torch.softmax(-0.5 * squared / sigma[rows] ** 2, dim=1)
            x0[rows] = (weights @ bank).to(x_t.dtype)
        return x0


def train(module: DMD, group_size: int, seed: int, ema: float | None = None) -> float:
    """Fit ``module`` on the mixture's batches until its generator-update budget; returns minutes."""
    data = MixtureDataModule(batch_size=BATCH_SIZE, seed=seed, group_size=group_size)
    trainer = L.Trainer(
        callbacks=[GeneratorEMA(ema)] if ema is not None else [],
        accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=True, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return (time.perf_counter() - start) / 60


@torch.no_grad()
def per_step_x0(backbone: MixtureBackbone, network: nn.Module, prompts: list[str], levels: Tensor, rule: str) -> list[Tensor]:
    """The x̂0 of every step of ``network``'s sampler through ``levels`` (same noise as :func:`sample`)."""
    generator = torch.Generator().manual_seed(EVAL_SEED)
    noise = torch.randn((len(prompts), *backbone.latent_shape), generator=generator)
    cond = backbone.encode_prompts(prompts)
    outputs = []

    def denoise(x, t):
        outputs.append(backbone.predict_x0(network, x, t, cond))
        return outputs[-1]

    few_step_sample(denoise, noise, levels, backbone.schedule, rule, generator)
    return outputs


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
    parser.add_argument("--set", action="append", default=[], metavar="GROUP.FIELD=VALUE",
                        help="override one config field (dmd, student, generator_optimizer, fake_score_optimizer)")
    parser.add_argument("--ema", type=float, default=None, help="also score the generator's EMA at this decay")
    parser.add_argument("--train-step", type=int, default=None, help="always train backward-simulation step K")
    parser.add_argument("--per-step-critic", action="store_true", help="one fake score per student step")
    parser.add_argument("--oracle-fake-score", action="store_true",
                        help="the DM gradient's fake x̂0 from fresh generator samples, not the fake score")
    parser.add_argument("--hidden", type=int, default=128, help="width of the denoiser's residual MLP (every role)")
    parser.add_argument("--depth", type=int, default=2, help="hidden layers of the denoiser's residual MLP (every role)")
    parser.add_argument("--per-step", action="store_true", help="score each step's x̂0 of the teacher sampler")
    parser.add_argument("--no-reference", action="store_true", help="skip the real-data and 200-step rows")
    args = parser.parse_args()
    if args.oracle_fake_score and args.ema is not None:
        # generate() samples the EMA once there is one: the bank would be the EMA's, not the generator's.
        parser.error("--oracle-fake-score draws its bank from the generator; it cannot be combined with --ema")
    overrides = parse_overrides(args.set)
    rule = overrides.get("student", {}).get("step_rule", "sde")
    # Batches of a few hundred 2-D points: thread hand-offs cost more than they save.
    torch.set_num_threads(1)

    backbone = MixtureBackbone(hidden=args.hidden, depth=args.depth)
    mixture = backbone.mixture
    classes = torch.arange(args.num_samples) % mixture.num_classes
    prompts = [f"class {c}" for c in classes.tolist()]
    reference = mixture.sample(classes, torch.Generator().manual_seed(EVAL_SEED + 1))

    def scores(samples: Tensor) -> dict:
        return mixture_metrics(samples, classes, reference, mixture)

    teacher = backbone.load_denoiser()
    schedule = backbone.schedule
    rows = {}
    if not args.no_reference:
        rows["real data (independent draw)"] = [scores(mixture.sample(classes, torch.Generator().manual_seed(EVAL_SEED + 2)))]
        for teacher_rule in ("sde", "ode"):
            rows[f"teacher {TEACHER_STEPS}-step {teacher_rule}"] = [
                scores(sample(backbone, teacher, prompts, schedule.generator_levels(TEACHER_STEPS), teacher_rule))
            ]
    variant = " ".join(args.set + ([f"ema {args.ema:g}"] if args.ema is not None else [])
                       + ([f"train step {args.train_step}"] if args.train_step is not None else [])
                       + (["per-step critic"] if args.per_step_critic else [])
                       + (["oracle fake score"] if args.oracle_fake_score else [])
                       + ([f"hidden {args.hidden}"] if args.hidden != 128 else [])
                       + ([f"depth {args.depth}"] if args.depth != 2 else []))
    for steps in args.steps:
        rows[f"teacher {steps}-step {rule} (student init)"] = [
            scores(sample(backbone, teacher, prompts, schedule.generator_levels(steps), rule))
        ]
        if args.per_step:
            for k, x0 in enumerate(per_step_x0(backbone, teacher, prompts, schedule.generator_levels(steps), rule)):
                rows[f"teacher {steps}-step {rule}, x̂0 of step k={k}"] = [scores(x0)]
        for method in args.methods:
            group_size = GNDMConfig().group_size if method == "gndm" else 1
            runs, ema_runs = [], []
            for seed in args.seeds:
                torch.manual_seed(seed)
                module = make_module(method, backbone, steps, args.lr, seed, args.updates, overrides, args.train_step,
                                     args.per_step_critic, args.oracle_fake_score)
                minutes = train(module, group_size, seed, args.ema)
                levels = module.student_levels()
                runs.append(scores(sample(backbone, module.generator, prompts, levels, module.student.step_rule)))
                print(f"{method} {steps}-step seed {seed}: {runs[-1]} ({minutes:.1f} min)", file=sys.stderr)
                if args.ema is not None:
                    ema_runs.append(scores(sample(backbone, module.generator_ema, prompts, levels, module.student.step_rule)))
                    print(f"  EMA: {ema_runs[-1]}", file=sys.stderr)
            name = f"{method} {steps}-step, {args.updates} updates, lr {args.lr:g}" + (f", {variant}" if variant else "")
            rows[name] = runs
            if ema_runs:
                rows[name + " (EMA)"] = ema_runs
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
