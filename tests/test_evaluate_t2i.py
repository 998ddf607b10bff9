"""Text-to-image evaluation: reward scores, FID and FID-SD against independent computations, the report
files, and `rdm evaluate` end to end on digits (classifier features) and on RGB images (a FID InceptionV3)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from scipy import stats
from torch import Tensor, nn

from reward_doubles import CountingReward
from rdm_lightning.cli import main
from rdm_lightning.evaluation.fid import FeatureStatistics, extractor_fingerprint
from rdm_lightning.evaluation.statistics import score_summary
from rdm_lightning.evaluation.t2i import evaluate_t2i, image_features, reward_scores, t2i_metrics, write_report
from rdm_lightning.rewards import RewardModel, StrokeContrastReward
from tiny_inception import random_published_state


def frechet_of_rows(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance of Gaussians fitted to the rows of ``a`` (n×D) and ``b`` (m×D), from the centred rows
    alone: with ``Ca = AᵀA/(n−1)`` and ``Cb = BᵀB/(m−1)``, the non-zero eigenvalues of ``Ca·Cb`` are the squared
    singular values of ``A·Bᵀ`` over ``(n−1)(m−1)``, so ``Tr (Ca·Cb)^½ = Σ σ(A·Bᵀ) / √((n−1)(m−1))`` (exact, and
    cheap when n, m ≪ D: no D×D matrix root)."""
    centred_a, centred_b = a - a.mean(0), b - b.mean(0)
    n, m = len(a), len(b)
    cross = np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum() / math.sqrt((n - 1) * (m - 1))
    gap = a.mean(0) - b.mean(0)
    return float(gap @ gap + (centred_a**2).sum() / (n - 1) + (centred_b**2).sum() / (m - 1) - 2 * cross)


def flat(report: dict, prefix: str = "") -> dict:
    """A nested report as one level of ``"a/b": value``, for ``pytest.approx``."""
    items = {}
    for key, value in report.items():
        items.update(flat(value, f"{prefix}{key}/") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return items


class PromptLengthReward(RewardModel):
    """Mean pixel times the prompt's length: wrong if scores and prompts are paired across batches."""

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return images.mean(dim=(1, 2, 3)) * torch.tensor([float(len(p)) for p in prompts], device=images.device)


class LinearFeatures(nn.Module):
    """A linear stand-in extractor: 4×4 average pool of the pixels times a fixed matrix, 5 features."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.projection = nn.Parameter(torch.randn(3 * 4 * 4, 5, generator=generator), requires_grad=False)
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        return F.avg_pool2d(images, 4).flatten(1) @ self.projection


def test_reward_scores_are_the_rewards_scores_times_report_scale_in_batches():
    images = torch.rand(7, 3, 8, 8)
    prompts = [f"prompt {'x' * i}" for i in range(7)]
    counting = CountingReward()
    rewards = {"length": PromptLengthReward(report_scale=100.0), "contrast": counting}
    scores = reward_scores(images, prompts, rewards, batch_size=3, progress=False)
    assert list(scores) == ["length", "contrast"] and counting.calls == 3  # ⌈7 / 3⌉ calls
    expected_length = images.mean(dim=(1, 2, 3)) * torch.tensor([float(len(p)) for p in prompts]) * 100
    torch.testing.assert_close(scores["length"], expected_length)
    torch.testing.assert_close(scores["contrast"], StrokeContrastReward().score(images, prompts))
    assert all(s.dtype == torch.float32 and s.device.type == "cpu" for s in scores.values())
    with pytest.raises(ValueError, match="got 7 images but 6 prompts"):
        reward_scores(images, prompts[:6], rewards, progress=False)
    with pytest.raises(TypeError, match="reward 'bad' must be a RewardModel, got Linear"):
        reward_scores(images, prompts, {"bad": nn.Linear(1, 1)}, progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        reward_scores(images, prompts, rewards, batch_size=0, progress=False)


def test_t2i_metrics_fid_and_fid_sd_match_an_independent_frechet_distance():
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(40, 5, generator=generator, dtype=torch.float64)
    teacher = 0.7 * torch.randn(40, 5, generator=generator, dtype=torch.float64) + 0.3
    real = 1.3 * torch.randn(60, 5, generator=generator, dtype=torch.float64) - 0.2
    scores = {"hps": 20 + torch.rand(40, generator=generator)}
    reference = FeatureStatistics.from_features(real, fingerprint="net")
    report = t2i_metrics(scores, features=student, reference=reference, teacher_features=teacher, fingerprint="net")
    assert set(report) == {"num_images", "rewards", "fid", "fid_sd"} and report["num_images"] == 40
    assert report["fid"] == pytest.approx(frechet_of_rows(student.numpy(), real.numpy()), rel=1e-9)
    assert report["fid_sd"] == pytest.approx(frechet_of_rows(student.numpy(), teacher.numpy()), rel=1e-9)
    summary = report["rewards"]["hps"]
    assert summary == score_summary(scores["hps"])
    values = scores["hps"].numpy().astype(np.float64)
    low, high = stats.t.interval(0.95, 39, loc=values.mean(), scale=values.std(ddof=1) / math.sqrt(40))
    assert summary["mean"] - summary["ci95"] == pytest.approx(low) and summary["mean"] + summary["ci95"] == pytest.approx(high)
    assert set(t2i_metrics(scores)) == {"num_images", "rewards"}
    assert set(t2i_metrics({}, features=student, teacher_features=teacher)) == {"num_images", "rewards", "fid_sd"}


def test_t2i_metrics_errors():
    features, scores = torch.randn(6, 3), {"hps": torch.rand(6)}
    reference = FeatureStatistics.from_features(torch.randn(9, 3), fingerprint="inception")
    with pytest.raises(ValueError, match="different feature extractors"):
        t2i_metrics(scores, features=features, reference=reference, fingerprint="digits")
    with pytest.raises(ValueError, match=r"got lengths \{\"scores\['hps'\]\": 6, 'features': 5\}"):
        t2i_metrics(scores, features=features[:5], reference=reference)
    with pytest.raises(ValueError, match="'features': 6, 'teacher_features': 4"):
        t2i_metrics({}, features=features, teacher_features=features[:4])
    with pytest.raises(ValueError, match="at least 2 images.*got 1"):
        t2i_metrics({"hps": torch.rand(1)})
    with pytest.raises(ValueError, match="pass features too"):
        t2i_metrics(scores, reference=reference)
    with pytest.raises(ValueError, match="compared with a reference or teacher_features"):
        t2i_metrics(scores, features=features)
    with pytest.raises(ValueError, match="nothing to report"):
        t2i_metrics({})


def test_evaluate_t2i_composes_features_scores_and_metrics():
    images, teacher = torch.rand(6, 3, 16, 16), torch.rand(6, 3, 16, 16) * 0.5
    prompts = ["a cat", "a dog", "a bird", "a fish", "a cow", "a car"]
    extractor, rewards = LinearFeatures(), {"length": PromptLengthReward()}
    reference = FeatureStatistics.from_features(extractor(torch.rand(10, 3, 16, 16)), fingerprint=extractor_fingerprint(extractor))
    report = evaluate_t2i(images, prompts, rewards=rewards, extractor=extractor, reference=reference,
                          teacher_images=teacher, batch_size=4, progress=False)
    features = image_features([images[:1], images[1:]], extractor, batch_size=2, progress=False)
    torch.testing.assert_close(features, extractor(images))
    expected = t2i_metrics(reward_scores(images, prompts, rewards, progress=False), features=extractor(images),
                           reference=reference, teacher_features=extractor(teacher))
    assert flat(report) == pytest.approx(flat(expected))
    with pytest.raises(ValueError, match="got 6 images but 5 teacher_images"):
        evaluate_t2i(images, prompts, extractor=extractor, teacher_images=teacher[:5], progress=False)
    with pytest.raises(ValueError, match="pass it together with at least one of them"):
        evaluate_t2i(images, prompts, rewards=rewards, extractor=extractor, progress=False)
    with pytest.raises(ValueError, match="pass it together with at least one of them"):
        evaluate_t2i(images, prompts, reference=reference, progress=False)
    with pytest.raises(ValueError, match=r"images must be a \(N, C, H, W\) tensor in \[0, 1\], got \(3, 16, 16\)"):
        evaluate_t2i(images[0], prompts, rewards=rewards, progress=False)


def test_write_report_writes_json_a_markdown_table_and_one_chart_per_metric(tmp_path):
    student = t2i_metrics({"hpsv2": torch.tensor([20.0, 22.0, 24.0]), "clip": torch.tensor([0.25, 0.25, 0.25])},
                          features=torch.randn(3, 2), teacher_features=torch.randn(3, 2) + 1,
                          reference=FeatureStatistics(np.zeros(2), np.eye(2)))
    teacher = t2i_metrics({"hpsv2": torch.tensor([25.0, 26.0, 27.0])}, features=torch.randn(3, 2),
                          reference=FeatureStatistics(np.zeros(2), np.eye(2)))
    paths = write_report({"student": student, "teacher": teacher}, tmp_path / "report")
    folder = tmp_path / "report"
    assert [p.name for p in paths] == ["evaluation.json", "evaluation.md", "evaluation_hpsv2.png", "evaluation_clip.png",
                                       "evaluation_fid.png", "evaluation_fid_sd.png"]
    assert json.loads((folder / "evaluation.json").read_text()) == {"student": student, "teacher": teacher}
    half = float(stats.t.ppf(0.975, 2)) * 2 / math.sqrt(3)  # std 2 of [20, 22, 24]
    lines = (folder / "evaluation.md").read_text().splitlines()
    assert lines[:4] == ["# Evaluation", "", "## student", ""]
    assert lines[4] == "| metric | value | ± std | 95% CI | n |"
    assert lines[6] == f"| hpsv2 | 22 | 2 | [{22 - half:.5g}, {22 + half:.5g}] | 3 |"
    assert lines[7] == "| clip | 0.25 | 0 | [0.25, 0.25] | 3 |"
    assert lines[8] == f"| FID | {student['fid']:.5g} | – | – | 3 |"
    assert lines[9] == f"| FID-SD | {student['fid_sd']:.5g} | – | – | 3 |"
    assert lines[11:15] == ["## teacher", "", "| metric | value | ± std | 95% CI | n |", "|---|---|---|---|---|"]
    assert lines[15].startswith("| hpsv2 | 26 | 1 | [") and lines[16].startswith("| FID | ")
    for path in paths[2:]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    two_bars, one_bar = Image.open(folder / "evaluation_hpsv2.png").size, Image.open(folder / "evaluation_fid_sd.png").size
    assert two_bars[0] > one_bar[0]  # the student's and the teacher's bars side by side; FID-SD is the student's only
    single = write_report(teacher, tmp_path / "single")
    assert (tmp_path / "single" / "evaluation.md").read_text().splitlines()[2] == "| metric | value | ± std | 95% CI | n |"
    assert len(single) == 4
    with pytest.raises(ValueError, match="report entry 'student' is not a t2i_metrics report"):
        write_report({"student": {"fid": 1.0}}, tmp_path / "bad")


# ---- `rdm evaluate` end to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory, tiny_digits_teacher, rdm_cache) -> Path:
    """A DMD checkpoint on the tiny digits teacher after one generator update."""
    tmp_path = tmp_path_factory.mktemp("t2i_fit")
    config = {
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(tmp_path), "logger": False, "max_epochs": -1, "limit_val_batches": 0,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [{"class_path": "rdm_lightning.callbacks.RunCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt")}}]},
        "model": {"class_path": "rdm_lightning.methods.DMD", "init_args": {
            "backbone": {"class_path": "rdm_lightning.backbones.DigitsBackbone", "init_args": {"path": str(tiny_digits_teacher)}},
            "max_generator_updates": 1, "dmd": {"generator_update_ratio": 1},
            "student": {"num_steps": 2}, "teacher_sampling": {"num_steps": 2, "guidance_scale": 1.5}}},
        "data": {"class_path": "rdm_lightning.data.DigitsDataModule", "init_args": {"batch_size": 8}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RDM_CACHE", str(rdm_cache))
        main(["fit", "--config", str(path)])
    return tmp_path / "ckpt" / "last.ckpt"


def test_evaluate_digits_students_and_teachers_rewards_fid_and_fid_sd(
    digits_checkpoint, digits_classifier, digits_gold_classifier, tmp_path, rdm_cache, monkeypatch, capsys
):
    from rdm_lightning.rewards import DigitsGoldReward

    monkeypatch.setenv("RDM_CACHE", str(rdm_cache))
    metadata = tmp_path / "evaluation_metadata.jsonl"
    metadata.write_text("".join(json.dumps({"tag": "digit", "include": [], "prompt": f"a handwritten digit {k}"}) + "\n"
                                for k in (0, 3, 7)))
    for role in ("generator", "teacher"):
        main(["sample", "--checkpoint", str(digits_checkpoint), "--role", role, "--prompt-set", f"geneval:{metadata}",
              "--num-per-prompt", "4", "--output", str(tmp_path / role)])
    student, teacher = tmp_path / "generator" / "samples.npz", tmp_path / "teacher" / "samples.npz"
    capsys.readouterr()
    main(["evaluate", "--samples", str(student), "--teacher-samples", str(teacher), "--reward", "digits_gold",
          "--features", "digits", "--reference", str(teacher), "--batch-size", "5"])
    report = json.loads((tmp_path / "generator" / "evaluation.json").read_text())
    assert json.loads(capsys.readouterr().out.split("\nwrote ")[0]) == report

    arrays = {role: np.load(path) for role, path in (("student", student), ("teacher", teacher))}
    images = {role: torch.from_numpy(data["images"]).permute(0, 3, 1, 2) for role, data in arrays.items()}
    assert list(arrays["student"]["prompts"]) == [f"a handwritten digit {k}" for k in (0, 3, 7) for _ in range(4)]
    classifier, _ = digits_classifier
    with torch.no_grad():
        features = {role: classifier.features(batch).double().numpy() for role, batch in images.items()}
    fid_sd = frechet_of_rows(features["student"], features["teacher"])
    assert report["student"]["fid_sd"] == pytest.approx(fid_sd, rel=1e-6) and fid_sd > 0
    assert report["student"]["fid"] == pytest.approx(fid_sd, rel=1e-6)  # the reference is the teacher's samples
    # A set against itself: 0 up to the round-off of sqrtm on a rank-11 product of 128-d covariances.
    assert abs(report["teacher"]["fid"]) < 1e-3 < fid_sd and "fid_sd" not in report["teacher"]
    gold = DigitsGoldReward(cache=str(rdm_cache))
    prompts = [str(p) for p in arrays["student"]["prompts"]]
    for role in ("student", "teacher"):
        entry = report[role]
        assert entry["num_images"] == 12 and entry["rewards"]["DigitsGoldReward"]["n"] == 12
        expected = gold.score(images[role], prompts).double().mean().item()
        assert entry["rewards"]["DigitsGoldReward"]["mean"] == pytest.approx(expected, rel=1e-5)
    assert report["student"]["sampling"]["role"] == "generator" and report["teacher"]["sampling"]["role"] == "teacher"
    assert (tmp_path / "generator" / "evaluation_fid_sd.png").is_file()
    assert "| FID-SD | " in (tmp_path / "generator" / "evaluation.md").read_text()

    # FID-SD needs the teacher's samples of the same prompts; options that would not apply are refused.
    np.savez(tmp_path / "other.npz", images=arrays["teacher"]["images"], prompts=np.array(prompts[::-1]))
    for extra, message in [
        (["--teacher-samples", str(tmp_path / "other.npz"), "--features", "digits"],
         "image 0 is of 'a handwritten digit 0' in --samples but of 'a handwritten digit 7' in --teacher-samples"),
        (["--reward", "digits_gold", "--inception", "weights.pth"], "--inception sets the network of FID and FID-SD"),
        (["--teacher-samples", str(teacher)], "FID and FID-SD need --inception PATH"),
        (["--reward", "digits_gold", "--prompts-file", str(metadata)], "--prompts-file gives the prompts of an image folder"),
        (["--device", "cpu"], "nothing to evaluate: give --reward, --reference or --teacher-samples"),
        (["--reward", "digits_gold", "--reward", "digits_gold"], "two --reward are named 'DigitsGoldReward'"),
    ]:
        with pytest.raises(SystemExit):
            main(["evaluate", "--samples", str(student), *extra])
        assert message in capsys.readouterr().err


def write_pngs(folder: Path, images: Tensor) -> Path:
    folder.mkdir()
    for index, image in enumerate(images):
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"{index:03d}.png")
    return folder


def test_evaluate_an_image_folder_with_the_fid_inception(tmp_path, capsys):
    """One FID only: the root of a 2048×2048 covariance product takes seconds on a CPU (FID-SD and the teacher's
    entry are checked on digits above)."""
    from rdm_lightning.evaluation.inception import FIDInceptionV3

    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_published_state(seed=2), weights)
    generator = torch.Generator().manual_seed(5)
    # Exactly representable in 8 bits, so the PNGs hold the very images the features are checked on.
    sets = {name: torch.randint(0, 256, (3, 3, 12, 12), generator=generator).float() / 255 for name in ("student", "real")}
    prompts = ["a red car", "a cat", "a tree"]
    student = write_pngs(tmp_path / "student", sets["student"])
    (student / "prompts.txt").write_text("\n".join(prompts) + "\n")
    real = write_pngs(tmp_path / "real", sets["real"])
    spec = tmp_path / "rewards.yaml"
    spec.write_text(yaml.safe_dump([{"class_path": "stroke_contrast", "init_args": {"name": "half", "ink_fraction": 0.5}}]))
    main(["evaluate", "--samples", str(student), "--reference", str(real), "--inception", str(weights),
          "--cache-dir", str(tmp_path / "cache"), "--reward", "stroke_contrast",
          "--reward", '{"class_path": "stroke_contrast", "init_args": {"name": "x100", "report_scale": 100}}',
          "--reward", str(spec)])
    report = json.loads((tmp_path / "student_evaluation" / "evaluation.json").read_text())
    assert list(report) == ["student"] and set(report["student"]) == {"num_images", "rewards", "fid"}
    with torch.no_grad():
        features = {name: FIDInceptionV3.from_file(weights)(images).double().numpy() for name, images in sets.items()}
    assert report["student"]["fid"] == pytest.approx(frechet_of_rows(features["student"], features["real"]), rel=1e-4)
    rewards = report["student"]["rewards"]
    contrast = StrokeContrastReward().score(sets["student"], prompts).double()
    assert list(rewards) == ["StrokeContrastReward", "x100", "half"]
    assert rewards["StrokeContrastReward"]["mean"] == pytest.approx(contrast.mean().item(), rel=1e-5)
    assert rewards["x100"]["mean"] == pytest.approx(100 * contrast.mean().item(), rel=1e-5)
    assert rewards["x100"]["std"] == pytest.approx(100 * contrast.std().item(), rel=1e-4)
    assert len(list((tmp_path / "cache").glob("fid_statistics_*.npz"))) == 1

    # Each --reward form, and a folder's prompts: --prompts-file, else its prompts.txt, one per image.
    (tmp_path / "two.txt").write_text("a red car\na cat\n")
    capsys.readouterr()
    for extra, message in [
        (["--reward", '{"class_path": "stroke_contrast", "init_args": [1]}'], "init_args of reward 'stroke_contrast' must be a dict"),
        (["--reward", "{class_path: [unclosed"], "is not valid JSON/YAML"),
        (["--reward", str(tmp_path / "missing.yaml")], "--reward file"),
        (["--reward", "no_such_reward"], "unknown reward 'no_such_reward'"),
        (["--prompts-file", str(spec)], "unknown prompt file suffix '.yaml'"),
        (["--prompts-file", str(tmp_path / "two.txt")], "holds 3 images but its prompts file has 2 prompts"),
        (["--reference", str(real), "--features", "digits"], "--features digits takes 8×8 grey digits, but the student's images are (3, 12, 12)"),
    ]:
        with pytest.raises(SystemExit):
            main(["evaluate", "--samples", str(student), "--reward", "stroke_contrast", *extra])
        assert message in capsys.readouterr().err, extra
    (student / "prompts.txt").unlink()
    with pytest.raises(SystemExit):
        main(["evaluate", "--samples", str(student), "--reward", "stroke_contrast"])
    assert "is an image folder: its prompts come from --prompts-file or a prompts.txt in it" in capsys.readouterr().err
