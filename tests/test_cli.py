"""The `rdm` command end to end on tiny models: fit, validate, sample, evaluate, export."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rdm_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml"))




@pytest.mark.parametrize("config", SHIPPED_CONFIGS)
def test_print_config_works_for_every_shipped_config(config, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("rdm_lightning.methods.")


METHOD_CLASSES = ("DMD", "DMDR", "GNDM", "GDMD", "ACDMD", "RTDMD")
SHARED_ARGUMENTS = ("generator_optimizer", "fake_score_optimizer", "student", "teacher_sampling", "teacher_dtype",
                    "seed", "max_generator_updates", "roles")
CONFIG_ARGUMENTS = ("generator_optimizer", "fake_score_optimizer", "student", "teacher_sampling", "roles")
"""Shared arguments typed as config dataclasses: the CLI must list their fields (a method reading one from
``**kwargs`` by name would make jsonargparse treat it as untyped)."""
METHOD_DEFAULTS = {"RTDMD": {"generator_optimizer", "fake_score_optimizer"}}
"""Shared arguments a method re-declares because its defaults differ (RTDMD's optimizers)."""


@pytest.mark.parametrize("name", METHOD_CLASSES)
def test_shared_arguments_are_declared_once_and_documented_in_help(name, capsys):
    import inspect

    import rdm_lightning.methods as methods
    from rdm_lightning.methods.base import DistillationModule

    declared = set(inspect.signature(getattr(methods, name).__init__).parameters)
    assert declared & set(SHARED_ARGUMENTS) == METHOD_DEFAULTS.get(name, set())
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", name])
    text = " ".join(capsys.readouterr().out.split())
    base_doc = " ".join(inspect.getdoc(DistillationModule).split())
    for argument in SHARED_ARGUMENTS:
        assert f"--model.{argument} " in text or f"--model.{argument}." in text, argument
    for argument in CONFIG_ARGUMENTS:
        assert f"--model.{argument}." in text, f"{name}: {argument} is not typed in the CLI"
    assert "--model.roles.generator.layout LAYOUT ``full`` (own trainable copy)" in text
    # The base's docstring for a scalar argument, and a config field's attribute docstring.
    seed_doc = base_doc.split("seed: ", 1)[1].split(";", 1)[0]
    assert seed_doc in text
    assert "--model.generator_optimizer.lr LR Learning rate after warm-up." in text
    assert "--model.student.step_rule STEP_RULE Between steps:" in text


def test_the_method_tree_is_flat():
    """Every method sits at most two levels below DistillationModule (RTDMD: on ACDMD, three); shared
    behaviour comes in as parts (RewardedMethod, DMDRParts, GRPOMixin), not as a parent to switch off."""
    import rdm_lightning.methods as methods
    from rdm_lightning.methods.base import DistillationModule

    def lineage(cls) -> list[str]:
        return [k.__name__ for k in cls.__mro__ if issubclass(k, DistillationModule)]

    assert {name: lineage(getattr(methods, name)) for name in METHOD_CLASSES} == {
        "DMD": ["DMD", "DistillationModule"],
        "DMDR": ["DMDR", "DMD", "DistillationModule"],
        "GNDM": ["GNDM", "DMD", "DistillationModule"],
        "GDMD": ["GDMD", "DMD", "DistillationModule"],
        "ACDMD": ["ACDMD", "DMD", "DistillationModule"],
        "RTDMD": ["RTDMD", "ACDMD", "DMD", "DistillationModule"],
    }


def digits_config(tmp_path: Path, teacher: Path, **model_overrides) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(tmp_path / "run"),
            "logger": {"class_path": "rdm_lightning.loggers.RunCSVLogger", "init_args": {"save_dir": str(tmp_path), "name": "run"}},
            "max_epochs": -1,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {"class_path": "rdm_lightning.callbacks.GeneratorEMA", "init_args": {"decay": 0.5}},
                {"class_path": "rdm_lightning.callbacks.SampleGrid",
                 "init_args": {"prompts": ["a handwritten digit 1", "a handwritten digit 7"], "num_per_prompt": 3, "every_n_updates": 1}},
                {"class_path": "rdm_lightning.callbacks.DigitsEvaluation", "init_args": {"every_n_updates": 2, "num_samples": 20}},
                {"class_path": "rdm_lightning.callbacks.TrainingCurves", "init_args": {"every_n_updates": 1}},
                {"class_path": "rdm_lightning.callbacks.RunCheckpoint", "init_args": {"every_n_updates": 2}},
            ],
        },
        "model": {
            "class_path": "rdm_lightning.methods.DMD",
            "init_args": {
                "backbone": {"class_path": "rdm_lightning.backbones.DigitsBackbone", "init_args": {"path": str(teacher)}},
                "max_generator_updates": 3,
                "dmd": {"generator_update_ratio": 2},
                "student": {"num_steps": 2},
                "teacher_sampling": {"num_steps": 3, "guidance_scale": 1.5},
                **model_overrides,
            },
        },
        "data": {"class_path": "rdm_lightning.data.DigitsDataModule", "init_args": {"batch_size": 16}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory, tiny_digits_teacher, rdm_cache):
    """One tiny `rdm fit` of DMD on the digits backbone; returns its run folder."""
    tmp_path = tmp_path_factory.mktemp("cli_fit")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RDM_CACHE", str(rdm_cache))
        main(["fit", "--config", str(digits_config(tmp_path, tiny_digits_teacher))])
    return next((tmp_path / "run").glob("version_*"))


def test_fit_writes_metrics_grids_and_checkpoint(fitted_run):
    report = json.loads((fitted_run / "metrics.json").read_text())
    assert report["student"]["generator_updates"] == 3
    assert report["student"]["nfe"] == 2 and report["teacher"]["nfe"] == 6  # 3 steps × CFG
    assert [entry["generator_updates"] for entry in report["history"]] == [2]
    for entry in (report["student"], report["teacher"]):
        assert 0.0 <= entry["prompt_accuracy"] <= 1.0 and entry["digits_fd"] > 0 and entry["num_samples"] == 20
    grids = sorted(p.name for p in (fitted_run / "samples").glob("*.png"))
    assert grids == ["generator_final.png", "generator_u000001.png", "generator_u000002.png", "generator_u000003.png", "teacher.png"]
    assert (fitted_run / "checkpoints" / "last.ckpt").exists()
    assert "train/loss_fake" in (fitted_run / "metrics.csv").read_text().splitlines()[0]
    assert (fitted_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_curves_record_changes_and_plot(tmp_path):
    from PIL import Image

    from rdm_lightning.callbacks import plot_curves

    with pytest.raises(ValueError, match="no curves"):
        plot_curves({}, tmp_path / "empty.png")
    path = plot_curves({"train/loss_dm": [(1, 0.5), (2, 0.4)], "eval/digits_fd": [(2, 30.0)]}, tmp_path / "c.png", until=5)
    width, height = Image.open(path).size
    assert width > height  # two panels side by side


def test_a_constant_metric_is_held_to_the_last_update_not_drawn_as_one_dot():
    from rdm_lightning.callbacks.curves import held_until

    assert held_until([(1, 1.0)], until=200) == [(1, 1.0), (200, 1.0)]
    assert held_until([(1, 0.5), (7, 0.4)], until=7) == [(1, 0.5), (7, 0.4)]
    assert held_until([(1, 0.5)], until=None) == [(1, 0.5)]


def test_sample_writes_npz_and_grid(fitted_run, tmp_path):
    out = tmp_path / "samples"
    main(["sample", "--checkpoint", str(fitted_run / "checkpoints" / "last.ckpt"), "--prompt", "a handwritten digit 3",
          "--num-per-prompt", "5", "--steps", "2", "--seed", "0", "--output", str(out)])
    with np.load(out / "samples.npz") as data:
        images, prompts = data["images"], list(data["prompts"])
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert prompts == ["a handwritten digit 3"] * 5
    assert (out / "grid.png").exists()
    again = tmp_path / "again"
    main(["sample", "--checkpoint", str(fitted_run / "checkpoints" / "last.ckpt"), "--prompt", "a handwritten digit 3",
          "--num-per-prompt", "5", "--steps", "2", "--seed", "0", "--output", str(again)])
    with np.load(again / "samples.npz") as data:
        np.testing.assert_array_equal(data["images"], images)  # same seed, same images


def test_sample_teacher_from_prompts_file_and_evaluate(fitted_run, tmp_path, rdm_cache, monkeypatch, capsys):
    monkeypatch.setenv("RDM_CACHE", str(rdm_cache))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit 0\na handwritten digit 9\n")
    out = tmp_path / "teacher"
    main(["sample", "--checkpoint", str(fitted_run / "checkpoints" / "last.ckpt"), "--role", "teacher",
          "--prompts-file", str(prompts), "--num-per-prompt", "4", "--steps", "3", "--guidance", "2.0", "--output", str(out)])
    assert json.loads((out / "sampling.json").read_text())["nfe"] == 6
    capsys.readouterr()
    main(["evaluate", "--samples", str(out / "samples.npz")])
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["num_samples"] == 8 and metrics["nfe"] == 6
    assert metrics["pixel_fd"] > metrics["real_data_floor"]["pixel_fd"] > 0  # the second distance, beside its floor
    assert json.loads((out / "metrics.json").read_text())["digits_fd"] == metrics["digits_fd"]


def test_export_digits_student_is_the_ema_generator(fitted_run, tmp_path):
    from rdm_lightning.backbones import DigitsBackbone
    from rdm_lightning.tools import load_module

    out = tmp_path / "student"
    main(["export", "--checkpoint", str(fitted_run / "checkpoints" / "last.ckpt"), "--output", str(out)])
    module = load_module(fitted_run / "checkpoints" / "last.ckpt")
    assert module.generator_updates == 3  # last.ckpt holds the final state
    exported = DigitsBackbone(str(out)).load_denoiser()
    for name, value in module.generator_ema.state_dict().items():
        assert torch.equal(exported.state_dict()[name], value), name
    assert not torch.equal(exported.state_dict()["conv_out.weight"], module.teacher.state_dict()["conv_out.weight"])
    assert json.loads((out / "rdm_export.json").read_text())["num_inference_steps"] == 2


def test_validate_scores_generated_samples(fitted_run, tiny_digits_teacher, tmp_path, rdm_cache, monkeypatch):
    monkeypatch.setenv("RDM_CACHE", str(rdm_cache))
    config = digits_config(tmp_path, tiny_digits_teacher)
    main(["validate", "--config", str(config), "--trainer.limit_val_batches=2", "--data.init_args.val_size=20",
          "--ckpt_path", str(fitted_run / "checkpoints" / "last.ckpt")])
    rows = (next((tmp_path / "run").glob("version_*")) / "metrics.csv").read_text()
    assert "val/digits_fd" in rows and "val/prompt_accuracy" in rows


def test_fit_pretrains_the_digits_teacher_when_missing(tmp_path, monkeypatch):
    import rdm_lightning.methods.teacher as teacher

    calls = []
    monkeypatch.setattr(teacher, "ensure_digits_teacher", lambda prediction: calls.append(prediction) or (_ for _ in ()).throw(SystemExit(3)))
    config = yaml.safe_load(digits_config(tmp_path, Path("unused")).read_text())
    config["model"]["init_args"]["backbone"]["init_args"] = {"path": None, "prediction": "epsilon"}
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(path)])
    assert calls == ["epsilon"]


def test_ensure_digits_teacher_trains_once_into_the_cache(tmp_path, monkeypatch):
    from rdm_lightning.backbones import DigitsBackbone
    from rdm_lightning.methods import ensure_digits_teacher

    monkeypatch.setenv("RDM_CACHE", str(tmp_path))
    path = ensure_digits_teacher("epsilon", max_steps=3, batch_size=16)
    assert path == tmp_path / "digits" / "teacher-epsilon"
    stamp = (path / "denoiser.safetensors").stat().st_mtime_ns
    assert ensure_digits_teacher("epsilon", max_steps=3, batch_size=16) == path
    assert (path / "denoiser.safetensors").stat().st_mtime_ns == stamp
    backbone = DigitsBackbone(prediction="epsilon")
    assert backbone.prediction.value == "epsilon" and backbone.path == path


def fit_tiny_sd15(tmp_path: Path, model: Path, prompts: list[str], lr: float, **model_args) -> Path:
    """`rdm fit` of DMD for 2 generator updates (1-step student at t = 999) on a tiny SD1.5; its last.ckpt."""
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    config = {
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(tmp_path / "run"), "logger": False, "max_epochs": -1, "limit_val_batches": 0,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [{"class_path": "rdm_lightning.callbacks.RunCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt")}}]},
        "model": {"class_path": "rdm_lightning.methods.DMD", "init_args": {
            "backbone": {"class_path": "rdm_lightning.backbones.StableDiffusionBackbone", "init_args": {"path": str(model)}},
            "max_generator_updates": 2, "dmd": {"generator_update_ratio": 1},
            "generator_optimizer": {"lr": lr}, "student": {"num_steps": 1, "levels": [999]}, **model_args}},
        "data": {"class_path": "rdm_lightning.data.PromptDataModule",
                 "init_args": {"train_file": str(prompts_file), "batch_size": 2}},
    }
    path = tmp_path / "sd15.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    return tmp_path / "ckpt" / "last.ckpt"


def test_sd15_dmd_fit_then_export_loads_in_stock_diffusers(tmp_path):
    from diffusers import DiffusionPipeline

    from tiny_models import make_tiny_sd15
    from rdm_lightning.tools import load_module

    model = make_tiny_sd15(tmp_path / "sd15")
    checkpoint = fit_tiny_sd15(tmp_path, model, ["a photo of a cat", "a red car", "a bowl of soup", "a tree"], lr=1e-3)
    main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "export")])

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "export")
    module = load_module(checkpoint)
    latents = torch.randn(1, *module.backbone.latent_shape, generator=torch.Generator().manual_seed(0))
    ours = module.generate(["a photo of a cat"], latents)
    theirs = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=1.0, latents=latents, output_type="latent").images
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    teacher = module.backbone.predict_x0(module.teacher, latents, torch.tensor([999]), module.backbone.encode_prompts(["a photo of a cat"]))
    assert not torch.allclose(teacher, ours, atol=1e-4)  # the exported UNet is the trained student


def test_sd15_lora_only_export_loads_in_the_stock_pipeline_and_equals_the_merged_export(tmp_path):
    from diffusers import DiffusionPipeline

    from tiny_models import make_tiny_sd15

    model = make_tiny_sd15(tmp_path / "sd15")
    roles = {"generator": {"layout": "shared_lora", "rank": 4, "alpha": 8}}
    checkpoint = str(fit_tiny_sd15(tmp_path, model, ["a photo of a cat", "a red car"], lr=1e-2, roles=roles))
    main(["export", "--checkpoint", checkpoint, "--output", str(tmp_path / "merged")])
    main(["export", "--checkpoint", checkpoint, "--output", str(tmp_path / "lora"), "--lora-only"])
    assert [p.name for p in (tmp_path / "lora").iterdir()] == ["pytorch_lora_weights.safetensors"]

    merged = DiffusionPipeline.from_pretrained(tmp_path / "merged")
    teacher = DiffusionPipeline.from_pretrained(model)
    before = teacher.unet.state_dict()
    teacher.load_lora_weights(tmp_path / "lora")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, teacher.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 500])
    with torch.no_grad():
        ours = merged.unet(latents, t, encoder_hidden_states=text).sample
        theirs = teacher.unet(latents, t, encoder_hidden_states=text).sample
        teacher.unet.disable_lora()
        plain = teacher.unet(latents, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, ours, atol=1e-4)  # the adapter trained, and the file carries it
    assert all(torch.equal(before[k], v) for k, v in teacher.unet.state_dict().items() if k in before)


def test_lora_only_export_of_a_full_generator_is_refused(fitted_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(fitted_run / "checkpoints" / "last.ckpt"), "--output", str(tmp_path / "x"),
              "--lora-only"])
    assert "--lora-only exports the generator's LoRA, but roles.generator.layout is 'full'" in capsys.readouterr().err


def test_sample_at_another_size_in_batches(tmp_path, capsys):
    from tiny_models import make_tiny_sd15

    model = make_tiny_sd15(tmp_path / "sd15")
    checkpoint = str(fit_tiny_sd15(tmp_path, model, ["a photo of a cat", "a red car"], lr=1e-3))
    out = tmp_path / "samples"
    main(["sample", "--checkpoint", checkpoint, "--prompt", "a red car", "--num-per-prompt", "3", "--batch-size", "2",
          "--height", "24", "--width", "16", "--output", str(out)])
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (3, 24, 16, 3)
    info = json.loads((out / "sampling.json").read_text())
    assert info["device"] == "cpu" and info["precision"] == "float32" and info["num_images"] == 3
    assert "sampling (generator)" in capsys.readouterr().err  # the progress bar
    with pytest.raises(SystemExit):
        main(["sample", "--checkpoint", checkpoint, "--prompt", "a red car", "--height", "18", "--output", str(out)])
    assert "height must be a positive multiple of 4 pixels for this model, got 18" in capsys.readouterr().err
