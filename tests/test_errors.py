"""Bad input to the `rdm` command ends in one short message naming the value and what is accepted.

Each test gives one kind of bad input to `rdm_lightning.cli.main` and checks the message on
stderr, the exit status 2, and that no traceback or config dump is printed (``--debug`` and
``RDM_DEBUG`` keep the traceback).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rdm_lightning import errors, tools
from rdm_lightning.cli import main
from rdm_lightning.rewards.base import REWARD_ALIASES, resolve_reward_alias_args, resolve_reward_aliases

REPO = Path(__file__).resolve().parents[1]
MAX_ERROR_LINES = 3


def short_error(capsys, argv: list[str]) -> str:
    """The stderr of ``rdm argv`` that must exit with status 2 and a short message, without a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == errors.USAGE_EXIT_CODE
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and "Namespace(" not in stderr and "Given value" not in stderr, stderr
    error_lines = stderr[stderr.index(f"rdm {argv[0]}: error:") :].splitlines() if "error:" in stderr else []
    assert 1 <= len(error_lines) <= MAX_ERROR_LINES, stderr
    return stderr


@pytest.fixture
def digits_config(tmp_path, tiny_digits_teacher) -> Path:
    """A DMD config on the tiny digits teacher whose fit stops after one generator update."""
    config = {
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(tmp_path / "run"), "logger": False, "max_epochs": -1,
                    "limit_val_batches": 0, "enable_progress_bar": False, "enable_model_summary": False,
                    "enable_checkpointing": False},
        "model": {"class_path": "rdm_lightning.methods.DMD", "init_args": {
            "backbone": {"class_path": "rdm_lightning.backbones.DigitsBackbone", "init_args": {"path": str(tiny_digits_teacher)}},
            "max_generator_updates": 1, "dmd": {"generator_update_ratio": 1}, "student": {"num_steps": 1}}},
        "data": {"class_path": "rdm_lightning.data.DigitsDataModule", "init_args": {"batch_size": 4}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ---- rdm fit: config values --------------------------------------------------------------------


def test_a_config_check_is_one_short_message_naming_the_class_and_value(capsys, digits_config):
    stderr = short_error(capsys, ["fit", "--config", str(digits_config), "--model.init_args.dmd.generator_update_ratio=0"])
    assert "rdm fit: error: rdm_lightning.methods.dmd.DMDConfig: generator_update_ratio must be >= 1, got 0" in stderr
    assert "--debug" in stderr and "RDM_DEBUG=1" in stderr


def test_a_data_check_names_the_data_module(capsys, digits_config):
    stderr = short_error(capsys, ["fit", "--config", str(digits_config), "--data.init_args.batch_size=0"])
    assert "DigitsDataModule: batch_size must be >= 1, got 0" in stderr


def test_a_trainer_check_is_short(capsys, digits_config):
    stderr = short_error(capsys, ["fit", "--config", str(digits_config), "--trainer.max_steps=-5"])
    assert "`max_steps` must be a non-negative integer or -1" in stderr and "-5" in stderr


def test_debug_flag_and_env_keep_the_traceback(digits_config, monkeypatch):
    bad = ["fit", "--config", str(digits_config), "--model.init_args.dmd.generator_update_ratio=0"]
    with pytest.raises(ValueError, match="generator_update_ratio must be >= 1"):
        main([*bad, "--debug"])
    monkeypatch.setenv("RDM_DEBUG", "1")
    with pytest.raises(ValueError, match="generator_update_ratio must be >= 1"):
        main(bad)


def test_a_value_of_the_wrong_type_names_the_key_and_the_type(capsys, digits_config):
    stderr = short_error(capsys, ["fit", "--config", str(digits_config), "--trainer.max_epochs=abc"])
    assert "rdm fit: error: trainer.max_epochs: expected int, got 'abc'" in stderr
    stderr = short_error(capsys, ["fit", "--config", str(digits_config), "--seed_everything=abc"])
    assert "seed_everything: expected bool or expected int, got 'abc'" in stderr


@pytest.mark.parametrize(("option", "cls", "accepted"), [
    ("--model.init_args.nope=3", "rdm_lightning.methods.DMD", "max_generator_updates"),
    ("--data.init_args.nope=3", "rdm_lightning.data.DigitsDataModule", "batch_size"),
])
def test_an_unknown_option_lists_the_accepted_ones(capsys, digits_config, option, cls, accepted):
    stderr = short_error(capsys, ["fit", "--config", str(digits_config), option])
    assert f"{cls} has no option 'nope'; accepted: " in stderr and accepted in stderr


def test_a_choice_lists_the_choices(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    stderr = short_error(capsys, ["fit", "--config", "configs/digits/gndm.yaml", "--model.init_args.gndm.reward_combination=foo"])
    assert "model.init_args.gndm.reward_combination: expected one of 'auto', 'refl_sum', 'group_adv', got 'foo'" in stderr


def test_an_unknown_class_names_it(capsys, digits_config):
    stderr = short_error(capsys, ["fit", "--config", str(digits_config), "--model", "rdm_lightning.methods.Nope"])
    assert "model: rdm_lightning.methods.Nope: module 'rdm_lightning.methods' has no attribute 'Nope'" in stderr


def test_an_option_before_config_says_to_put_config_first(capsys, digits_config):
    stderr = short_error(capsys, ["fit", "--model.init_args.max_generator_updates=5", "--config", str(digits_config)])
    assert "--model.init_args.max_generator_updates=5 comes before --config" in stderr
    assert "put --config first" in stderr and "LightningModule" not in stderr


def test_a_model_option_without_any_class_says_to_give_the_class(capsys):
    stderr = short_error(capsys, ["fit", "--model.init_args.max_generator_updates=5"])
    assert "option 'max_generator_updates' was given before any class_path" in stderr


@pytest.mark.parametrize(("content", "expected"), [
    ("model: [unclosed\n", "is not valid YAML: expected ',' or ']'"),
    ("- a\n- b\n", "holds a list, not a mapping of sections"),
])
def test_a_bad_config_file_names_the_file(capsys, tmp_path, content, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    stderr = short_error(capsys, ["fit", "--config", str(path)])
    assert f"--config {str(path)!r} {expected}" in stderr


def test_a_missing_config_file_names_it(capsys, tmp_path):
    stderr = short_error(capsys, ["fit", "--config", str(tmp_path / "missing.yaml")])
    assert "File does not exist" in stderr and "missing.yaml" in stderr


def test_a_misspelt_config_section_names_it(capsys, digits_config, tmp_path):
    config = yaml.safe_load(digits_config.read_text())
    config["trainer"]["max_epochz"] = 3
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    assert "does not accept option 'trainer.max_epochz'" in short_error(capsys, ["fit", "--config", str(path)])


def test_an_unknown_command_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fitt"])
    assert exit_info.value.code == errors.USAGE_EXIT_CODE
    assert "rdm: error: unknown command 'fitt'; accepted: fit, validate, test, predict, sample, evaluate, export" in capsys.readouterr().err


def test_an_error_during_training_keeps_its_traceback(digits_config, monkeypatch):
    from rdm_lightning.methods import DMD

    def failing_step(self, batch, batch_idx):
        raise ValueError("a bug inside training")

    monkeypatch.setattr(DMD, "training_step", failing_step)
    with pytest.raises(ValueError, match="a bug inside training"):
        main(["fit", "--config", str(digits_config)])


# ---- reward aliases ----------------------------------------------------------------------------


def test_every_reward_alias_works_as_a_class_path_in_a_config(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    config = yaml.safe_load((REPO / "configs/digits/dmdr.yaml").read_text())
    clip = {"class_path": "clip_score", "init_args": {"model_path": str(tmp_path / "clip")}}
    init_args = config["model"]["init_args"]
    init_args["rewards"] = [
        {"class_path": "digits_logprob", "init_args": {"name": "digit_logprob"}},
        {"class_path": "stroke_contrast", "init_args": {"name": "stroke_contrast"}},
    ]
    init_args["gold_rewards"] = [
        {"class_path": "digits_gold"}, clip, {"class_path": "srpo", "init_args": {"name": "srpo", "scorer": clip}},
        {"class_path": "pickscore", "init_args": {"model_path": str(tmp_path / "pickscore")}},
        {"class_path": "hpsv2", "init_args": {"checkpoint_path": str(tmp_path / "hps.pt")}},
        {"class_path": "dfn_clip", "init_args": {"checkpoint_path": str(tmp_path / "dfn.bin")}},
        {"class_path": "aesthetic", "init_args": {"clip_model_path": str(tmp_path / "clip"), "mlp_path": str(tmp_path / "mlp.pth")}},
        {"class_path": "image_reward", "init_args": {"checkpoint_path": str(tmp_path / "ImageReward.pt"),
                                                     "med_config_path": str(tmp_path / "med_config.json"),
                                                     "tokenizer_path": str(tmp_path / "bert")}},
        {"class_path": "hpsv3", "init_args": {"checkpoint_path": str(tmp_path / "HPSv3.safetensors"),
                                              "base_model_path": str(tmp_path / "Qwen2-VL-7B-Instruct")}},
    ]
    path = tmp_path / "aliases.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    class_paths = [r["class_path"] for r in printed["rewards"] + printed["gold_rewards"]]
    assert set(class_paths) == set(REWARD_ALIASES.values())
    assert printed["gold_rewards"][2]["init_args"]["scorer"]["class_path"] == REWARD_ALIASES["clip_score"]


def test_a_reward_alias_works_on_the_command_line(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/digits/gndm.yaml", "--model.init_args.rewards+=digits_logprob",
              "--model.init_args.rewards+={class_path: stroke_contrast, init_args: {name: ink}}", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["rewards"]
    assert [r["class_path"] for r in printed] == [REWARD_ALIASES["digits_logprob"], REWARD_ALIASES["stroke_contrast"]]


def test_an_unknown_reward_lists_the_aliases(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    stderr = short_error(capsys, ["fit", "--config", "configs/digits/gndm.yaml", "--model.init_args.rewards+=digits_logprb"])
    assert "model.init_args.rewards: 'digits_logprb' is neither a class path" in stderr
    assert f"one of the aliases {', '.join(REWARD_ALIASES)}" in stderr


def test_an_unknown_reward_option_lists_the_reward_options(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    stderr = short_error(capsys, ["fit", "--config", "configs/digits/gndm.yaml",
                                  "--model.init_args.rewards+={class_path: digits_logprob, init_args: {nope: 1}}"])
    assert "rdm_lightning.rewards.digits.DigitsClassifierReward has no option 'nope'; accepted: seed, " in stderr


def test_resolve_reward_aliases_changes_only_alias_class_paths():
    config = {"rewards": [{"class_path": "srpo", "init_args": {"name": "srpo", "scorer": {"class_path": "clip_score"}}}],
              "prompts": ["srpo"], "other": {"class_path": "rdm_lightning.methods.DMD"}}
    resolved = resolve_reward_aliases(config)
    assert resolved["rewards"][0]["class_path"] == REWARD_ALIASES["srpo"]
    assert resolved["rewards"][0]["init_args"]["name"] == "srpo"  # a name, not a class
    assert resolved["rewards"][0]["init_args"]["scorer"]["class_path"] == REWARD_ALIASES["clip_score"]
    assert resolved["prompts"] == ["srpo"] and resolved["other"] == config["other"]
    args = ["--a.rewards+=srpo", "--a.scorer.class_path", "clip_score", "--a.init_args.name=srpo", "--a.prompts+=x"]
    assert resolve_reward_alias_args(args) == [
        f"--a.rewards+={REWARD_ALIASES['srpo']}", "--a.scorer.class_path", REWARD_ALIASES["clip_score"],
        "--a.init_args.name=srpo", "--a.prompts+=x",
    ]


# ---- rdm sample / evaluate / export ------------------------------------------------------------


@pytest.fixture
def never_loaded(tmp_path, monkeypatch) -> Path:
    """A checkpoint path whose loading fails the test: argument checks must come first."""
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"not loaded")
    monkeypatch.setattr(tools, "load_module", lambda checkpoint: pytest.fail("the checkpoint was loaded"))
    return path


@pytest.mark.parametrize(("extra", "expected"), [
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--num-per-prompt", "0"], "argument --num-per-prompt: must be >= 1, got 0"),
    (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["--steps", "two"], "argument --steps: expected an integer >= 1, got 'two'"),
    (["--role", "teacher", "--guidance", "nan"], "argument --guidance: must be a finite number, got 'nan'"),
    (["--role", "student"], "argument --role: invalid choice: 'student'"),
])
def test_sample_refuses_a_bad_argument_before_loading(capsys, never_loaded, tmp_path, extra, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--checkpoint", str(never_loaded), "--prompt", "a handwritten digit 1",
              "--output", str(tmp_path / "out"), *extra])
    assert exit_info.value.code == errors.USAGE_EXIT_CODE
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(("case", "expected"), [
    ("guidance_for_generator", "--guidance applies to --role teacher only"),
    ("empty_prompt", "--prompt must be a non-empty prompt"),
    ("missing_prompts_file", "prompt file not found: "),
    ("empty_prompts_file", "holds no prompts"),
    ("output_is_a_file", "is a file; give a folder to write into"),
    ("seed_out_of_range", "--seed must be in [-2**63, 2**64), got 18446744073709551616"),
])
def test_sample_checks_its_inputs_before_loading(capsys, never_loaded, tmp_path, case, expected):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    existing_file = tmp_path / "file.txt"
    existing_file.write_text("x")
    args = {"--checkpoint": str(never_loaded), "--prompt": "a handwritten digit 1", "--output": str(tmp_path / "out")}
    if case == "guidance_for_generator":
        args["--guidance"] = "3"
    elif case == "empty_prompt":
        args["--prompt"] = "  "
    elif case in ("missing_prompts_file", "empty_prompts_file"):
        del args["--prompt"]
        args["--prompts-file"] = str(tmp_path / "missing.txt" if case == "missing_prompts_file" else empty)
    elif case == "output_is_a_file":
        args["--output"] = str(existing_file)
    elif case == "seed_out_of_range":
        args["--seed"] = str(2**64)
    stderr = short_error(capsys, ["sample", *[item for pair in args.items() for item in pair]])
    assert expected in stderr


def write_bad_checkpoint(path: Path, kind: str) -> Path:
    if kind == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(256)}, "pytorch-lightning_version": "2"}, path)
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "tensor":
        torch.save(torch.zeros(2), path)
    elif kind == "folder":
        path.mkdir()
    return path


@pytest.mark.parametrize("command", ["sample", "export"])
@pytest.mark.parametrize(("kind", "expected"), [
    ("truncated", "cannot be read (RuntimeError: PytorchStreamReader failed reading zip archive"),
    ("text", "cannot be read (UnpicklingError"),
    ("tensor", "is not a Lightning checkpoint (no 'state_dict')"),
    ("folder", "is not a file"),
    ("missing", "is not a file"),
])
def test_an_unreadable_checkpoint_names_the_file(capsys, tmp_path, command, kind, expected):
    checkpoint = write_bad_checkpoint(tmp_path / "broken.ckpt", kind)
    rest = ["--prompt", "a handwritten digit 1"] if command == "sample" else []
    stderr = short_error(capsys, [command, "--checkpoint", str(checkpoint), *rest, "--output", str(tmp_path / "out")])
    assert f"rdm {command}: error: " in stderr and str(checkpoint) in stderr and expected in stderr


@pytest.mark.parametrize(("kind", "expected"), [
    ("text", "is not a readable .npz file (This file contains pickled (object) data)"),
    ("truncated", "is not a readable .npz file (File is not a zip file)"),
    ("npy", "holds one ndarray, not an .npz archive"),
    ("no_images", "lacks ['images']"),
    ("folder", "is a folder"),
])
def test_evaluate_names_a_file_that_is_not_samples(capsys, tmp_path, kind, expected):
    path = tmp_path / "samples.npz"
    if kind == "text":
        path.write_text("not an archive")
    elif kind == "truncated":
        np.savez(path, images=np.zeros((2, 8, 8, 1), np.float32), prompts=np.array(["a handwritten digit 1"] * 2))
        path.write_bytes(path.read_bytes()[:100])
    elif kind == "npy":
        with path.open("wb") as file:
            np.save(file, np.zeros(3))
    elif kind == "no_images":
        np.savez(path, prompts=np.array(["a handwritten digit 1"]))
    elif kind == "folder":
        path.mkdir()
    stderr = short_error(capsys, ["evaluate", "--samples", str(path)])
    assert str(path) in stderr and expected in stderr


def test_evaluate_names_the_file_of_images_it_cannot_score(capsys, tmp_path):
    path = tmp_path / "samples.npz"
    np.savez(path, images=np.zeros((2, 8, 8, 1), np.float32), prompts=np.array(["a cat", "a dog"]))
    stderr = short_error(capsys, ["evaluate", "--samples", str(path)])
    assert f"{str(path)!r}: prompt 'a cat' names no digit" in stderr


@pytest.fixture
def tiny_module(tiny_digits_teacher, monkeypatch):
    """`rdm export` loads an untrained DMD on the tiny teacher in place of a checkpoint."""
    from rdm_lightning.backbones import DigitsBackbone
    from rdm_lightning.methods import DMD

    module = DMD(DigitsBackbone(path=str(tiny_digits_teacher)))
    monkeypatch.setattr(tools, "load_module", lambda checkpoint: module)
    return module


def test_export_refuses_a_file_and_a_non_empty_folder_unless_overwrite(capsys, tmp_path, tiny_module):
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"replaced by tiny_module")
    existing_file = tmp_path / "file"
    existing_file.write_text("x")
    stderr = short_error(capsys, ["export", "--checkpoint", str(checkpoint), "--output", str(existing_file)])
    assert f"--output {str(existing_file)!r} is a file" in stderr

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    stderr = short_error(capsys, ["export", "--checkpoint", str(checkpoint), "--output", str(folder)])
    assert f"--output {str(folder)!r} is a non-empty folder" in stderr and "--overwrite" in stderr
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]

    main(["export", "--checkpoint", str(checkpoint), "--output", str(folder), "--overwrite"])
    assert (folder / "rdm_export.json").exists() and (folder / "notes.txt").read_text() == "keep me"


# ---- the pure helpers --------------------------------------------------------------------------


def test_split_debug_flag_reads_the_flag_and_the_environment(monkeypatch):
    monkeypatch.delenv("RDM_DEBUG", raising=False)
    assert errors.split_debug_flag(["fit", "--debug", "--config", "c.yaml"]) == (["fit", "--config", "c.yaml"], True)
    assert errors.split_debug_flag(["fit"]) == (["fit"], False)
    for value, debug in (("1", True), ("yes", True), ("0", False), ("false", False), ("", False)):
        monkeypatch.setenv("RDM_DEBUG", value)
        assert errors.split_debug_flag(["fit"])[1] is debug


def test_check_config_args_allows_options_after_the_first_config():
    errors.check_config_args(["fit", "--config", "missing.yaml", "--trainer.max_epochs=1", "--config", "also.yaml"])
    errors.check_config_args(["fit", "--print_config", "--config", "missing.yaml"])
    with pytest.raises(ValueError, match="--trainer.max_epochs=1 comes before --config"):
        errors.check_config_args(["fit", "--trainer.max_epochs=1", "-c", "missing.yaml"])


def test_only_input_errors_before_training_are_shortened():
    # A stand-in for Lightning's training stage: an error raised from under it keeps its traceback.
    stage = {"__name__": "lightning.pytorch.trainer.trainer"}
    exec("def _run_stage(error):\n    raise error", stage)
    with pytest.raises(ValueError) as in_training:
        stage["_run_stage"](ValueError("bad"))
    assert not errors.is_input_error(in_training.value)
    assert errors.is_input_error(ValueError("bad")) and errors.is_input_error(argparse.ArgumentError(None, "bad"))
    assert not errors.is_input_error(FloatingPointError("non-finite loss")) and not errors.is_input_error(RuntimeError())
