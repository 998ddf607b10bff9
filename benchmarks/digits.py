"""Digits benchmark: the teacher's default sampler against DMD students, as a markdown table.

    python benchmarks/digits.py [--updates 400] [--one-step-updates ONE_STEP_UPDATES] [--output runs/benchmarks/digits]

Each student is trained with `configs/digits/dmd.yaml` through the same CLI as
`rdm fit` (only the number of student steps and of generator updates differ) and scored by the
DigitsEvaluation callback on 1,000 class-balanced samples against the
held-out test split, in two distances: digits-FD (classifier features) and pixel FD
(the train split's leading principal components), each beside its real-data floor.
Targets (issues 2 and 11) are checked and printed beside the table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rdm_lightning.cli import RDMLightningCLI

CONFIG = "configs/digits/dmd.yaml"
ONE_STEP_UPDATES = 800
"""The 1-step student's budget: it needs more updates than the 4-step one (docs/methods/dmd.md)."""


def train_student(num_steps: int, updates: int, output: Path) -> dict:
    """Fit the DMD config with ``num_steps`` student steps; returns its metrics.json."""
    cli = RDMLightningCLI(
        args=[
            "fit",
            "--config", CONFIG,
            f"--model.init_args.student.num_steps={num_steps}",
            f"--model.init_args.max_generator_updates={updates}",
            f"--trainer.logger.init_args.save_dir={output}",
            f"--trainer.logger.init_args.name=dmd_{num_steps}step",
        ]
    )
    return json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())


def row(name: str, metrics: dict, teacher: dict) -> str:
    speedup = teacher["sampling_seconds_per_image"] / metrics["sampling_seconds_per_image"]
    return (
        f"| {name} | {metrics['nfe']} | {100 * metrics['prompt_accuracy']:.1f} | {metrics['digits_fd']:.2f} "
        f"| {metrics['digits_fd'] / teacher['digits_fd']:.2f}× | {metrics['pixel_fd']:.4f} "
        f"| {metrics['pixel_fd'] / teacher['pixel_fd']:.2f}× | {1000 * metrics['sampling_seconds_per_image']:.3f} "
        f"| {speedup:.1f}× |"
    )


def floor_row(floor: dict) -> str:
    """The real-data floor: the train split scored against the test split."""
    return f"| real digits (train split) | | | {floor['digits_fd']:.2f} | | {floor['pixel_fd']:.4f} | | | |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=400, help="generator updates of the 4-step student")
    parser.add_argument("--one-step-updates", type=int, default=ONE_STEP_UPDATES, help="generator updates of the 1-step student")
    parser.add_argument("--output", type=Path, default=Path("runs/benchmarks/digits"))
    args = parser.parse_args()

    four = train_student(4, args.updates, args.output)
    one = train_student(1, args.one_step_updates, args.output)
    teacher = four["teacher"]
    lines = [
        "| sampler | NFE | prompt acc. (%) | digits-FD | FD / teacher | pixel FD | pixel FD / teacher | ms / image | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
        floor_row(four["real_data_floor"]),
        row("teacher (50 Euler steps, CFG 1.5)", teacher, teacher),
        row(f"DMD 4-step ({four['student']['generator_updates']} updates)", four["student"], teacher),
        row(f"DMD 1-step ({one['student']['generator_updates']} updates)", one["student"], teacher),
    ]
    student = four["student"]
    checks = {
        "teacher prompt accuracy >= 95%": teacher["prompt_accuracy"] >= 0.95,
        "4-step prompt accuracy >= teacher - 2 points": student["prompt_accuracy"] >= teacher["prompt_accuracy"] - 0.02,
        "4-step digits-FD <= 1.25x teacher": student["digits_fd"] <= 1.25 * teacher["digits_fd"],
        **{
            f"{name} {label} <= {bound}x teacher": metrics[key] <= bound * teacher[key]
            for name, metrics, bound in (("4-step", student, 1.10), ("1-step", one["student"], 1.25))
            for key, label in (("digits_fd", "digits-FD"), ("pixel_fd", "pixel FD"))
        },
        "4-step sampling >= 20x faster than teacher": teacher["sampling_seconds_per_image"]
        >= 20 * student["sampling_seconds_per_image"],
    }
    table = "\n".join(lines + [""] + [f"- [{'x' if ok else ' '}] {name}" for name, ok in checks.items()])
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
