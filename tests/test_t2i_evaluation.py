"""T2IEvaluation on digits: sharding and gathering, metrics against an independent computation, DDP on CPU."""
from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import scipy.linalg
import torch
from lightning.pytorch.strategies import DDPStrategy

from rdm_lightning.backbones import DigitsBackbone
from rdm_lightning.callbacks import DigitsEvaluation, RewardHackingMonitor, SampleGrid, T2IEvaluation, TrainingCurves
from rdm_lightning.callbacks.hacking import hacking_signal
from rdm_lightning.callbacks.t2i_eval import batch_seed, build_extractor, merge_shards, shard_batches
from rdm_lightning.data import DigitsDataModule
from rdm_lightning.data.digits import digit_prompt, digits_split
from rdm_lightning.evaluation.fid import FeatureStatistics, extractor_fingerprint
from rdm_lightning.methods import DMD, DMDConfig, OptimizerConfig, StudentConfig
from rdm_lightning.rewards import DigitsClassifierReward, StrokeContrastReward

DIGIT_PROMPTS = [digit_prompt(i) for i in range(10)]
NUM_SAMPLES, BATCH_SIZE = 12, 5  # batches of 5, 5 and 2 images: uneven shards under 2 processes


def test_shards_cover_the_subset_once_and_merge_back_in_order():
    shards = [shard_batches(NUM_SAMPLES, BATCH_SIZE, rank, 2) for rank in range(2)]
    assert shards == [[(0, 0, 5), (2, 10, 12)], [(1, 5, 10)]]
    assert shard_batches(NUM_SAMPLES, BATCH_SIZE, 0, 1) == [(0, 0, 5), (1, 5, 10), (2, 10, 12)]
    # What all_gather hands back: each rank's indices padded with -1 to the longest shard, values alike.
    index = torch.tensor([[0, 1, 2, 3, 4, 10, 11], [5, 6, 7, 8, 9, -1, -1]])
    values = torch.where(index >= 0, index * 10.0, 0.0)
    merged = merge_shards({"index": index, "score": values, "features": torch.stack([values, -values], dim=-1)})
    torch.testing.assert_close(merged["score"], torch.arange(12) * 10.0)
    torch.testing.assert_close(merged["features"], torch.stack([torch.arange(12) * 10.0, -torch.arange(12) * 10.0], 1))
    with pytest.raises(ValueError, match="each image once"):
        merge_shards({"index": torch.tensor([[0, 1], [1, -1]]), "score": torch.zeros(2, 2)})
    assert batch_seed(0, 1) != batch_seed(1, 0) and batch_seed(3, 2) == batch_seed(3, 2)


def test_settings_are_checked(tiny_digits_teacher):
    with pytest.raises(ValueError, match="extractor computes the features"):
        T2IEvaluation(DIGIT_PROMPTS, fid_sd=True)
    with pytest.raises(ValueError, match="extractor computes the features"):
        T2IEvaluation(DIGIT_PROMPTS, extractor="digits")
    with pytest.raises(ValueError, match="never evaluates"):
        T2IEvaluation(DIGIT_PROMPTS, every_n_updates=0, evaluate_at_end=False)
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        T2IEvaluation(DIGIT_PROMPTS[:1])
    module = DMD(DigitsBackbone(str(tiny_digits_teacher)))
    with pytest.raises(ValueError, match="nothing to evaluate"):
        T2IEvaluation(DIGIT_PROMPTS).setup(L.Trainer(logger=False), module, "fit")
    clash = T2IEvaluation(DIGIT_PROMPTS, rewards=[StrokeContrastReward()])
    with pytest.raises(ValueError, match="DigitsEvaluation writes metrics.json"):
        clash.setup(L.Trainer(logger=False, callbacks=[DigitsEvaluation(), clash]), module, "fit")


def test_prompts_from_a_file_and_the_digits_extractor_by_name(tmp_path, digits_classifier, rdm_cache, monkeypatch):
    (tmp_path / "prompts.txt").write_text("\n".join(DIGIT_PROMPTS[:3]) + "\n")
    callback = T2IEvaluation(str(tmp_path / "prompts.txt"), num_samples=5)
    assert callback.prompts == [DIGIT_PROMPTS[i % 3] for i in range(5)]
    monkeypatch.setenv("RDM_CACHE", str(rdm_cache))
    body = build_extractor("digits")
    assert extractor_fingerprint(body) == extractor_fingerprint(digits_classifier[0].body)


def digits_stack(cache: Path) -> list:
    return [StrokeContrastReward(name="stroke_contrast"), DigitsClassifierReward(name="digit_logprob", cache=str(cache))]


def evaluation(classifier, cache: Path, reference: Path, **overrides) -> T2IEvaluation:
    settings = dict(num_samples=NUM_SAMPLES, batch_size=BATCH_SIZE, seed=3, every_n_updates=2, rewards=digits_stack(cache),
                    extractor=classifier.body, reference=str(reference), fid_sd=True, progress=False)
    return T2IEvaluation(DIGIT_PROMPTS, **{**settings, **overrides})


def tiny_dmd(teacher: Path, budget: int) -> DMD:
    return DMD(DigitsBackbone(str(teacher)), dmd=DMDConfig(generator_update_ratio=1),
               generator_optimizer=OptimizerConfig(lr=1e-3), fake_score_optimizer=OptimizerConfig(lr=1e-3),
               student=StudentConfig(num_steps=2), max_generator_updates=budget)


@pytest.fixture(scope="module")
def setting(digits_classifier, rdm_cache, tmp_path_factory):
    """The classifier's feature body and an .npz of the digits test split's statistics under it."""
    classifier, _ = digits_classifier
    with torch.no_grad():
        features = classifier.body(digits_split().test_images)
    reference = FeatureStatistics.from_features(features, fingerprint=extractor_fingerprint(classifier.body))
    path = reference.save(tmp_path_factory.mktemp("reference") / "test_split.npz")
    return classifier, path, features.double().numpy()


def independent_metrics(module: DMD, classifier, cache: Path, reference_features: np.ndarray, seed: int) -> dict:
    """Rewards, FID and FID-SD of the final generator recomputed by hand: the batches' noise, the rewards' own
    ``score``, the classifier's body, and the Fréchet distance with scipy's matrix square root."""
    rewards = {reward.name: reward for reward in digits_stack(cache)}
    prompts = [DIGIT_PROMPTS[i % 10] for i in range(NUM_SAMPLES)]
    images = {"generator": [], "teacher": []}
    for b, start in enumerate(range(0, NUM_SAMPLES, BATCH_SIZE)):
        batch = prompts[start:start + BATCH_SIZE]
        for role in images:
            generator = torch.Generator().manual_seed(batch_seed(seed, b))
            noise = torch.randn((len(batch), 1, 8, 8), generator=generator)
            images[role].append(module.backbone.decode(module.generate(batch, noise, role=role, generator=generator)))
    images = {role: torch.cat(parts) for role, parts in images.items()}
    with torch.no_grad():
        features = {role: classifier.body(x).double().numpy() for role, x in images.items()}

    def frechet(a: np.ndarray, b: np.ndarray) -> float:
        mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        root = scipy.linalg.sqrtm(cov_a @ cov_b).real
        return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))

    scores = {name: reward.score(images["generator"], prompts).double().numpy() for name, reward in rewards.items()}
    return {
        "rewards": {name: {"mean": s.mean(), "std": s.std(ddof=1), "n": len(s)} for name, s in scores.items()},
        "fid": frechet(features["generator"], reference_features),
        "fid_sd": frechet(features["generator"], features["teacher"]),
    }


def test_metrics_equal_an_independent_computation_and_reach_the_curves(tiny_digits_teacher, setting, rdm_cache, tmp_path):
    classifier, reference, reference_features = setting
    module = tiny_dmd(tiny_digits_teacher, budget=3)
    callback = evaluation(classifier, rdm_cache, reference)
    curves = TrainingCurves(every_n_updates=100)
    monitor = RewardHackingMonitor(["stroke_contrast"], ["digit_logprob"], window=2)  # an eval-only reward as gold
    trainer = L.Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0,
                        callbacks=[callback, curves, monitor])
    trainer.fit(module, DigitsDataModule(batch_size=8))

    report = json.loads((tmp_path / "metrics.json").read_text())
    assert [entry["generator_updates"] for entry in report["history"]] == [2, 3]  # every 2, and the end
    final = report["student"]
    assert final == report["history"][-1] and final["num_images"] == NUM_SAMPLES
    expected = independent_metrics(module, classifier, rdm_cache, reference_features, seed=3)
    for name, summary in expected["rewards"].items():
        got = final["rewards"][name]
        assert got["n"] == summary["n"]
        assert got["mean"] == pytest.approx(summary["mean"], rel=1e-5) and got["std"] == pytest.approx(summary["std"], rel=1e-4)
    assert final["fid"] == pytest.approx(expected["fid"], rel=1e-4)
    assert final["fid_sd"] == pytest.approx(expected["fid_sd"], rel=1e-4) and final["fid_sd"] > 0
    assert set(report["teacher"]) == {"num_images", "rewards", "fid"}  # the teacher's own figures, once
    # Logged per evaluation, so the curves hold a point at each evaluated update.
    for name in ("eval/fid", "eval/fid_sd", "eval/stroke_contrast/mean", "eval/digit_logprob/mean"):
        assert [u for u, _ in curves.curves[name]] == [2, 3], name
    assert curves.curves["eval/fid_sd"][-1][1] == pytest.approx(final["fid_sd"])
    # The monitor judged T2IEvaluation's entries, an eval-only reward as the gold one.
    means = {n: [e["rewards"][n]["mean"] for e in report["history"]] for n in ("stroke_contrast", "digit_logprob")}
    hacked = hacking_signal(means["stroke_contrast"], means["digit_logprob"], 2, positions=[2, 3]).hacking
    assert [e["generator_updates"] for e in monitor.events] == ([3] if hacked else [])
    # The history is checkpointed: a resumed run continues it.
    restored = evaluation(classifier, rdm_cache, reference)
    restored.load_state_dict(callback.state_dict())
    assert restored.history == report["history"]


WORLD_SIZE = 2


class SaveGenerator(L.Callback):
    """Rank 0 saves the trained generator at the end of fit, for a single-process evaluation of the same weights."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            torch.save({"world_size": trainer.world_size, "generator": pl_module.generator.state_dict()}, self.path)


def test_two_processes_gather_the_metrics_one_process_computes(tiny_digits_teacher, setting, rdm_cache, tmp_path):
    classifier, reference, _ = setting
    strategy = DDPStrategy(start_method="fork", find_unused_parameters=True, process_group_backend="gloo",
                           timeout=timedelta(seconds=120))
    trainer = L.Trainer(accelerator="cpu", devices=WORLD_SIZE, strategy=strategy, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path / "ddp",
                        callbacks=[evaluation(classifier, rdm_cache, reference, every_n_updates=0),
                                   SaveGenerator(tmp_path / "generator.pt"),
                                   # Rank 0 writes their files into the run folder every process resolved at setup.
                                   SampleGrid([digit_prompt(3)], num_per_prompt=2, every_n_updates=1),
                                   TrainingCurves(every_n_updates=1)])
    trainer.fit(tiny_dmd(tiny_digits_teacher, budget=2), DigitsDataModule(batch_size=8))
    gathered = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert {path.name for path in (tmp_path / "ddp" / "samples").iterdir()} == {
        "generator_u000001.png", "generator_u000002.png", "generator_final.png", "teacher.png"}
    assert (tmp_path / "ddp" / "curves.png").is_file()

    # One process, the same weights: a module at its budget evaluates them at the end of a fit of no iteration.
    module = tiny_dmd(tiny_digits_teacher, budget=2)
    saved = torch.load(tmp_path / "generator.pt")
    assert saved["world_size"] == WORLD_SIZE
    module.generator.load_state_dict(saved["generator"])
    module.role_updates["generator"] = 2
    single = L.Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path / "single",
                       callbacks=[evaluation(classifier, rdm_cache, reference, every_n_updates=0)])
    single.fit(module, DigitsDataModule(batch_size=8))
    alone = json.loads((tmp_path / "single" / "metrics.json").read_text())

    assert gathered["student"]["num_images"] == NUM_SAMPLES == alone["student"]["num_images"]
    assert gathered["student"]["generator_updates"] == 2 == alone["student"]["generator_updates"]
    for part in ("student", "teacher"):
        assert set(gathered[part]["rewards"]) == {"stroke_contrast", "digit_logprob"}
        for name, summary in alone[part]["rewards"].items():
            assert gathered[part]["rewards"][name] == pytest.approx(summary, rel=1e-6), (part, name)
        assert gathered[part]["fid"] == pytest.approx(alone[part]["fid"], rel=1e-6), part
    assert gathered["student"]["fid_sd"] == pytest.approx(alone["student"]["fid_sd"], rel=1e-6)
