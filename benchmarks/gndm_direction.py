"""Does A1's group normaliser give a more robust DM direction than DMD's per-sample one?

    python benchmarks/gndm_direction.py CHECKPOINT [CHECKPOINT ...] [--draws 128] [--batch-size 64]
                                        [--group-sizes K ...] [--prompts-file FILE] [--seed 0]

For each `rdm fit` checkpoint of a GNDM-family module (GNDM, GNDMR, or any module with
``gndm`` settings) and each K of ``--group-sizes`` (default: the checkpoint's), the
generator draws one K-repeated batch of ``--batch-size`` samples (B/K prompts × K) by
backward simulation, as in training. Then ``--draws`` re-noisings (σ, ε) of that batch are
drawn by the module's own rule (one level per group under ``gndm.group_level``) and each is
turned into a direction with both normalisers: DMD's per-sample ``n_i`` and A1's group
mean ``n̄``, then into the gradient of the DM loss over the generator's trainable weights,
the update the optimizer sees. A normaliser gives the more robust direction when one
draw's gradient agrees better with the many-draw mean: the table gives the mean cosine of
a draw's gradient to that mean and the signal-to-noise ratio ‖ḡ‖² / E‖g − ḡ‖²
(``rdm_lightning.evaluation.direction``), and the within-group spread of ``n_i`` (the
coefficient of variation; A1 equals DMD when it is 0; ``docs/methods/gndm.md``,
"Group size and the direction of one update").

Prompts: the first B/K lines of ``--prompts-file``, or the digits 0-9 in turn. With one level
per group, a smaller K gives the batch more distinct levels; the SNR shows what that buys.
Prints a markdown table; works on any backbone the checkpoint was trained with.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from tqdm import tqdm

from rdm_lightning.callbacks.digits_eval import balanced_digit_prompts
from rdm_lightning.core.advantages import check_group_size
from rdm_lightning.core.dmd import dmd_gradient, dmd_normalizer
from rdm_lightning.core.group_dmd import group_dmd_gradient, weighted_dmd_loss
from rdm_lightning.data.prompts import load_prompts
from rdm_lightning.evaluation.direction import DirectionConsistency
from rdm_lightning.tools import load_module


def group_prompts(groups: int, group_size: int, prompts_file: Path | None) -> list[str]:
    """``groups`` prompts, each repeated K times in a row (a K-repeated batch)."""
    if prompts_file is None:
        base = balanced_digit_prompts(groups)
    else:
        base = load_prompts(prompts_file)[:groups]
        if len(base) < groups:
            raise ValueError(f"--prompts-file {str(prompts_file)!r} holds {len(base)} prompts, the batch needs {groups}")
    return [prompt for prompt in base for _ in range(group_size)]


def parameter_gradient(module, x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``[1, P]``: the gradient of the DM loss ``½·mean((x − sg(x − g))²)`` over the generator's trainable weights."""
    weights = [p for p in module.generator.parameters() if p.requires_grad]
    grads = torch.autograd.grad(weighted_dmd_loss(x, direction), weights, retain_graph=True)
    return torch.cat([g.flatten() for g in grads]).unsqueeze(0)


def measure(module, prompts: list[str], draws: int) -> dict[str, float]:
    """Parameter-space direction consistency of both normalisers, and the within-group CV of ``n_i``, on one batch."""
    group_size = module.gndm.group_size
    cond = module.backbone.encode_prompts(prompts)
    uncond = module.backbone.empty_conditioning(len(prompts))
    with torch.no_grad():
        x_in, level = module.generator_input(cond, len(prompts))
    x = module.backbone.predict_x0(module.generator, x_in, level, cond)
    samples = x.detach()
    statistics = {"per_sample": DirectionConsistency(), "group_mean": DirectionConsistency()}
    spreads = []
    for _ in tqdm(range(draws), desc="DM draws", unit="draw"):
        x0_real, x0_fake, _ = module.dm_estimates(samples, cond, uncond)
        directions = {
            "per_sample": dmd_gradient(samples, x0_real, x0_fake, module.dmd.norm_eps),
            "group_mean": group_dmd_gradient(samples, x0_real, x0_fake, group_size, module.dmd.norm_eps),
        }
        for name, direction in directions.items():
            statistics[name].update(parameter_gradient(module, x, direction))
        norms = dmd_normalizer(samples, x0_real).flatten().view(-1, group_size)
        spreads.append(norms.std(dim=1, correction=0) / norms.mean(dim=1))
    result = {"n_cv": torch.cat(spreads).mean().item()}
    for name, statistic in statistics.items():
        cosine, snr = statistic.compute()
        result[f"{name}_cosine"], result[f"{name}_snr"] = cosine.item(), snr.item()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--draws", type=int, default=128, help="re-noisings (σ, ε) per sample (>= 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="B, samples in the batch (B/K prompts, each K times)")
    parser.add_argument("--group-sizes", type=int, nargs="+", help="the K to measure at (default: the checkpoint's)")
    parser.add_argument("--prompts-file", type=Path, help=".txt/.jsonl/.csv prompts (default: the digits 0-9)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch and the draws")
    args = parser.parse_args()
    if args.draws < 2:
        parser.error(f"need --draws >= 2, got {args.draws}")

    print("| checkpoint | K | within-group CV of n_i | gradient cos, per-sample n_i | gradient cos, A1 n̄ | "
          "gradient SNR, per-sample n_i | gradient SNR, A1 n̄ |")
    print("|---|---|---|---|---|---|---|")
    for checkpoint in args.checkpoints:
        module = load_module(checkpoint)
        if not hasattr(module, "gndm"):
            raise ValueError(f"{str(checkpoint)!r} holds a {type(module).__name__}, not a GNDM-family module "
                             "(no 'gndm' settings: group size and levels)")
        for group_size in args.group_sizes or [module.gndm.group_size]:
            check_group_size(args.batch_size, group_size)
            module.gndm = dataclasses.replace(module.gndm, group_size=group_size)
            module.rng.manual_seed(args.seed)
            prompts = group_prompts(args.batch_size // group_size, group_size, args.prompts_file)
            r = measure(module, prompts, args.draws)
            print(f"| {checkpoint} | {group_size} | {r['n_cv']:.3f} | {r['per_sample_cosine']:.3f} | "
                  f"{r['group_mean_cosine']:.3f} | {r['per_sample_snr']:.3f} | {r['group_mean_snr']:.3f} |")


if __name__ == "__main__":
    main()
