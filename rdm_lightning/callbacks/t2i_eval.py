"""Text-to-image evaluation during fit: rewards, FID and FID-SD of the (EMA) generator on fixed prompts.

Every evaluation samples the same prompt subset from the same noise, so evaluations differ only
by the generator. The subset is cut into batches of ``batch_size`` in order; batch ``b`` is
sampled from the noise of :func:`batch_seed` ``(seed, b)`` (its initial noise, then the noise the
sampler draws between steps, :func:`~rdm_lightning.callbacks.samples.fixed_noise_samples`). Under
several processes rank ``r`` samples the batches ``b ≡ r (mod world_size)`` and the per-image scores
and features are gathered back into subset order, so the metrics do not depend on the number of
processes (nor on which process computes them: every process does, from the same gathered set).
The metrics themselves are :func:`~rdm_lightning.evaluation.t2i.t2i_metrics`'s.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from rdm_lightning.cache import cache_dir
from rdm_lightning.callbacks.checkpoint import ends_training
from rdm_lightning.callbacks.digits_eval import DigitsEvaluation
from rdm_lightning.callbacks.rewards import RewardEvaluationCallback
from rdm_lightning.callbacks.samples import fixed_noise_samples, run_dir
from rdm_lightning.data.prompts import load_prompts
from rdm_lightning.evaluation.fid import FeatureStatistics, extractor_fingerprint, reference_statistics
from rdm_lightning.evaluation.t2i import feature_extractor, image_features, reward_scores, t2i_metrics
from rdm_lightning.methods.base import DistillationModule
from rdm_lightning.rewards.base import RewardModel

ROLES = ("generator", "teacher")


def batch_seed(seed: int, index: int) -> int:
    """The noise seed of batch ``index`` of an evaluation seeded ``seed``: distinct for every pair
    (numpy's ``SeedSequence([seed, index])``), so no two batches of any two seeds share noise."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


def shard_batches(num_images: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """``(batch index, start, end)`` of the batches of ``num_images`` that process ``rank`` of ``world_size`` samples:
    batch ``b`` covers images ``[b·batch_size, min((b+1)·batch_size, num_images))`` and goes to rank ``b mod world_size``."""
    starts = range(0, num_images, batch_size)
    return [(b, start, min(start + batch_size, num_images)) for b, start in enumerate(starts) if b % world_size == rank]


def merge_shards(gathered: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-image values of every process back in subset order.

    Args:
        gathered: ``"index"`` ``(W, M)``, each process's image indices padded with ``-1`` to the longest
            shard ``M``, and any number of values ``(W, M, ...)`` padded alike.

    Returns:
        Each value but ``"index"`` with the padding dropped, rows ordered by image index.

    Raises:
        ValueError: the indices are not each of ``0 … N−1`` exactly once.
    """
    index = gathered["index"].reshape(-1)
    kept = index >= 0
    order = torch.argsort(index[kept])
    if not torch.equal(index[kept][order].cpu(), torch.arange(int(kept.sum()))):
        raise ValueError(f"the gathered shards must cover each image once, got indices {sorted(index[kept].tolist())}")
    return {
        name: values.reshape(-1, *values.shape[2:])[kept][order]
        for name, values in gathered.items() if name != "index"
    }


class T2IEvaluation(RewardEvaluationCallback):
    """Rewards, FID and FID-SD of the (EMA) generator on a fixed prompt subset, during fit and at its end.

    Each evaluation scores the samples with every reward of ``pl_module.reward_models()`` (the
    optimized ones by name, the gold ones as ``gold/<name>``) and the eval-only ``rewards``, each
    times its ``report_scale``; with an ``extractor``, their features give the FID against
    ``reference`` and, with ``fid_sd``, the FID-SD against the teacher's default sampler on the same
    prompts and noise (sampled once, at the first evaluation, and kept in memory).

    Logged per evaluation (``pl_module.log_dict``, so :class:`~rdm_lightning.callbacks.curves.TrainingCurves`
    draws them): ``eval/<reward>/mean``, ``eval/fid``, ``eval/fid_sd``. Written by rank 0 after each
    evaluation, at the end of fit and when fit stops on an error: ``metrics.json`` in the run folder,
    ``{"history": [{"generator_updates", "num_images", "rewards": {name: {mean, std, ci95, n}}, "fid"?,
    "fid_sd"?}, …], "teacher"?: the teacher's metrics, "student"?: the final entry, "stopped"?}``.
    The history is checkpointed; a resumed run continues it.

    Args:
        prompts: the prompts, or a prompt file (``.txt``, ``.jsonl``, ``.csv``; ``data.prompts.load_prompts``).
        num_samples: images per evaluation: the first prompts, cycled when there are fewer; ``None``: one per prompt.
        every_n_updates: interval in generator updates; 0 evaluates only at the end of fit.
        seed: seed of the fixed noise (:func:`batch_seed`).
        batch_size: images per sampling batch (and per reward and extractor call).
        rewards: eval-only rewards besides the module's (e.g. a gold reward the method does not hold).
        extractor: the feature network of FID and FID-SD: a module mapping ``(B, C, H, W)`` images in
            ``[0, 1]`` to ``(B, D)``, the path of the FID InceptionV3 weights (``FIDInceptionV3.from_file``),
            or ``"digits"``, the digits classifier's 128-d body on 8×8 digits.
        reference: the FID reference set: a folder of images, a ``samples.npz`` or an ``.npz`` of statistics
            (``evaluation.fid.reference_statistics``).
        reference_cache: where the reference statistics are cached; ``None``: ``<rdm cache>/fid_statistics``.
        fid_sd: also report FID-SD against the teacher's samples.
        evaluate_at_end: also evaluate the final generator (at the last iteration, or at the end of fit
            when it ends by another limit).
        filename: the report's name in the run folder.
        progress: show a progress bar over the sampling batches (rank 0).
    """

    def __init__(
        self,
        prompts: list[str] | str,
        num_samples: int | None = None,
        every_n_updates: int = 0,
        seed: int = 0,
        batch_size: int = 16,
        rewards: list[RewardModel] | None = None,
        extractor: nn.Module | str | None = None,
        reference: str | None = None,
        reference_cache: str | None = None,
        fid_sd: bool = False,
        evaluate_at_end: bool = True,
        filename: str = "metrics.json",
        progress: bool = True,
    ):
        super().__init__()
        prompts = load_prompts(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
        if not prompts:
            raise ValueError("T2IEvaluation needs at least one prompt")
        num_samples = len(prompts) if num_samples is None else num_samples
        if num_samples < 2 or batch_size < 1 or every_n_updates < 0 or seed < 0:
            raise ValueError(
                f"num_samples must be >= 2, batch_size >= 1, every_n_updates >= 0 and seed >= 0, "
                f"got {num_samples}, {batch_size}, {every_n_updates}, {seed}"
            )
        if every_n_updates == 0 and not evaluate_at_end:
            raise ValueError("T2IEvaluation with every_n_updates=0 and evaluate_at_end=False never evaluates")
        if (extractor is not None) != (reference is not None or fid_sd):
            raise ValueError(
                "extractor computes the features of FID (reference) and FID-SD (fid_sd=True): "
                f"give it together with at least one of them (got extractor={extractor!r}, reference={reference!r}, "
                f"fid_sd={fid_sd})"
            )
        for reward in rewards or []:
            if not isinstance(reward, RewardModel):
                raise TypeError(f"T2IEvaluation rewards must be RewardModels, got {type(reward).__name__}")
        self.prompts = [prompts[i % len(prompts)] for i in range(num_samples)]
        self.every_n_updates = every_n_updates
        self.seed = seed
        self.batch_size = batch_size
        self.extra_rewards = list(rewards or [])
        self.extractor_spec = extractor
        self.reference_source = reference
        self.reference_cache = reference_cache
        self.fid_sd = fid_sd
        self.evaluate_at_end = evaluate_at_end
        self.filename = filename
        self.progress = progress
        self.extractor: nn.Module | None = None
        self.fingerprint: str | None = None
        self.reference: FeatureStatistics | None = None
        self.teacher: dict | None = None
        """The teacher's gathered ``{"scores", "features"}`` and ``"metrics"``, once sampled (FID-SD)."""
        self.final: dict | None = None
        self.folder: Path | None = None
        """The run folder, resolved at the start of fit."""

    # ---- setup ------------------------------------------------------------------------------
    def reward_names(self, pl_module: DistillationModule) -> list[str]:
        """The module's reward names (``pl_module.reward_models()``), then the eval-only rewards'."""
        return list(self.rewards(pl_module))

    def rewards(self, pl_module: DistillationModule) -> dict[str, RewardModel]:
        """Every reward scored, by report name: the module's, then the eval-only ones."""
        rewards = dict(pl_module.reward_models())
        for reward in self.extra_rewards:
            if reward.name in rewards:
                raise ValueError(
                    f"T2IEvaluation reward {reward.name!r} clashes with a reward of {type(pl_module).__name__} "
                    f"({list(pl_module.reward_models())}); give it another name"
                )
            rewards[reward.name] = reward
        return rewards

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, DistillationModule):
            raise TypeError(f"T2IEvaluation needs a DistillationModule, got {type(pl_module).__name__}")
        if not self.rewards(pl_module) and self.extractor_spec is None:
            raise ValueError(
                f"T2IEvaluation has nothing to evaluate: {type(pl_module).__name__} has no rewards, and neither "
                "eval-only rewards nor an extractor (FID, FID-SD) are given"
            )
        if self.filename == "metrics.json" and any(isinstance(c, DigitsEvaluation) for c in trainer.callbacks):
            raise ValueError("DigitsEvaluation writes metrics.json in the run folder too: give T2IEvaluation "
                             "another filename (e.g. t2i_metrics.json)")

    def on_fit_start(self, trainer: L.Trainer, pl_module: DistillationModule) -> None:
        # Resolved on every process (``trainer.log_dir`` is a collective), for rank 0's writes later.
        self.folder = run_dir(trainer)
        # After the strategy placed the module: the networks go to its device.
        for reward in self.extra_rewards:
            reward.to(pl_module.device)
        if self.extractor_spec is None:
            return
        self.extractor = build_extractor(self.extractor_spec).to(pl_module.device).eval()
        self.fingerprint = extractor_fingerprint(self.extractor)
        if self.reference_source is not None:
            cache = Path(self.reference_cache) if self.reference_cache is not None else cache_dir() / "fid_statistics"
            # Rank 0 computes (and caches) the statistics; the others then read the cache.
            if trainer.is_global_zero:
                self.reference = self.reference_statistics(cache)
            trainer.strategy.barrier("T2IEvaluation.reference")
            if not trainer.is_global_zero:
                self.reference = self.reference_statistics(cache)

    def reference_statistics(self, cache: Path) -> FeatureStatistics:
        """The statistics of ``reference`` under the extractor, cached under ``cache``."""
        return reference_statistics(self.reference_source, self.extractor, cache, self.batch_size, progress=self.progress)

    # ---- measuring --------------------------------------------------------------------------
    def measure(self, pl_module: DistillationModule, role: str = "generator", rank: int = 0,
                world_size: int = 1) -> tuple[dict[str, Tensor], Tensor | None]:
        """Per-image reward scores ``{name: (N,)}`` and features ``(N, D)`` (``None`` without an extractor) of
        ``role``'s samples of the subset, in subset order; under several processes every one must call it
        (it gathers). ``extractor`` is what :meth:`on_fit_start` built."""
        if role not in ROLES:
            raise ValueError(f"unknown sampling role {role!r}; accepted: {ROLES}")
        rewards = self.rewards(pl_module)
        shard = shard_batches(len(self.prompts), self.batch_size, rank, world_size)
        values: dict[str, list[Tensor]] = {"index": []}
        bar = tqdm(shard, desc=f"T2I evaluation ({role})", unit="batch", disable=not (self.progress and rank == 0))
        for b, start, end in bar:
            prompts = self.prompts[start:end]
            images = fixed_noise_samples(pl_module, prompts, batch_seed(self.seed, b), role)
            values["index"].append(torch.arange(start, end))
            for name, scores in reward_scores(images, prompts, rewards, batch_size=len(prompts), progress=False).items():
                values.setdefault(f"reward/{name}", []).append(scores)
            if self.extractor is not None:
                features = image_features(images, self.extractor, batch_size=len(prompts), progress=False)
                values.setdefault("features", []).append(features.float())
        # A sharded network's forward (FSDP2, ZeRO-3) needs every process: a rank with fewer batches than another
        # samples throwaway ones (never scored) until all have run as many forwards.
        if world_size > 1:
            rounds = math.ceil(math.ceil(len(self.prompts) / self.batch_size) / world_size)
            for _ in range(rounds - len(shard)):
                fixed_noise_samples(pl_module, self.prompts[: self.batch_size], batch_seed(self.seed, 0), role)
        local = {name: torch.cat(parts) for name, parts in values.items()}
        merged = merge_shards(self._gather(pl_module, local, world_size))
        scores = {name: merged[f"reward/{name}"].cpu() for name in rewards}
        return scores, merged["features"].cpu() if "features" in merged else None

    def _gather(self, pl_module: DistillationModule, local: dict[str, Tensor], world_size: int) -> dict[str, Tensor]:
        """``local`` of every process, padded to the longest shard (:func:`merge_shards`' input)."""
        if world_size == 1:
            return {name: values[None] for name, values in local.items()}
        longest = int(pl_module.all_gather(torch.tensor(len(local["index"]))).max())
        padded = {}
        for name, values in local.items():
            pad = values.new_full((longest - len(values), *values.shape[1:]), -1 if name == "index" else 0)
            padded[name] = torch.cat([values, pad]).to(pl_module.device)
        return {name: values.cpu() for name, values in pl_module.all_gather(padded).items()}

    def metrics(self, scores: dict[str, Tensor], features: Tensor | None, teacher_features: Tensor | None) -> dict:
        """:func:`t2i_metrics` of one sampled set against the reference and the teacher's features."""
        if features is None or (self.reference is None and teacher_features is None):
            return t2i_metrics(scores)
        return t2i_metrics(scores, features=features, reference=self.reference, teacher_features=teacher_features,
                           fingerprint=self.fingerprint)

    def evaluate(self, trainer: L.Trainer, pl_module: DistillationModule, log: bool = True) -> dict:
        """Measure the generator (and once the teacher, for FID-SD), record and log the entry, write the report."""
        rank, world_size = trainer.global_rank, trainer.world_size
        if self.fid_sd and self.teacher is None:
            scores, features = self.measure(pl_module, "teacher", rank, world_size)
            # The teacher's own figures (rewards, FID), when there are any besides the features FID-SD needs.
            own = bool(scores) or self.reference is not None
            self.teacher = {"scores": scores, "features": features, "metrics": self.metrics(scores, features, None) if own else None}
        scores, features = self.measure(pl_module, "generator", rank, world_size)
        teacher_features = self.teacher["features"] if self.teacher is not None else None
        entry = {"generator_updates": pl_module.generator_updates, **self.metrics(scores, features, teacher_features)}
        if log:
            pl_module.log_dict(logged_metrics(entry))
        self.record(trainer, pl_module, entry)
        if trainer.is_global_zero:
            self.write()
        return entry

    # ---- when -------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module: DistillationModule, outputs, batch, batch_idx) -> None:
        updates = pl_module.generator_updates
        due = self.every_n_updates and updates % self.every_n_updates == 0
        ends = self.evaluate_at_end and ends_training(trainer, pl_module)
        if (due or ends) and (not self.history or self.history[-1]["generator_updates"] != updates):
            self.evaluate(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: DistillationModule) -> None:
        if self.evaluate_at_end:
            # A fit that ended by a limit the last iteration could not foresee (max_epochs, max_time):
            # evaluated here, unlogged (Lightning takes no logs after training).
            if not self.history or self.history[-1]["generator_updates"] != pl_module.generator_updates:
                self.evaluate(trainer, pl_module, log=False)
            self.final = self.history[-1]
        if trainer.is_global_zero:
            self.write()

    def on_exception(self, trainer: L.Trainer, pl_module: DistillationModule, exception: BaseException) -> None:
        """A stopped run (signal, numeric stop, crash) still writes the evaluations it made, without a final one."""
        if trainer.is_global_zero and self.folder is not None:  # not when fit failed before it started
            self.write(stopped=f"{type(exception).__name__}: {exception}")

    def report(self, stopped: str | None = None) -> dict:
        """What ``metrics.json`` holds (see the class)."""
        report: dict = {"history": self.history}
        if self.teacher is not None and self.teacher["metrics"] is not None:
            report["teacher"] = self.teacher["metrics"]
        if self.final is not None:
            report["student"] = self.final
        if stopped is not None:
            report["stopped"] = stopped
        return report

    def write(self, stopped: str | None = None) -> Path:
        """Write :meth:`report` to ``filename`` in the run folder (rank 0 calls it)."""
        path = self.folder / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.report(stopped), indent=2))
        return path


def logged_metrics(entry: dict) -> dict[str, float]:
    """``eval/<reward>/mean``, ``eval/fid``, ``eval/fid_sd`` of one evaluation entry."""
    logged = {f"eval/{name}/mean": float(summary["mean"]) for name, summary in entry["rewards"].items()}
    logged.update({f"eval/{key}": float(entry[key]) for key in ("fid", "fid_sd") if key in entry})
    return logged


def build_extractor(spec: nn.Module | str) -> nn.Module:
    """The feature network of ``spec``: a module as it is, ``"digits"`` (the digits classifier's body), or the
    path of the FID InceptionV3 weights (:func:`~rdm_lightning.evaluation.t2i.feature_extractor`)."""
    if isinstance(spec, nn.Module):
        return spec
    if spec == "digits":
        return feature_extractor("digits", None, torch.device("cpu"))
    return feature_extractor("inception", spec, torch.device("cpu"))
