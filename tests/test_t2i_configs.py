"""Every generated text-to-image config (``configs/<family>/<method>.yaml``, scripts/t2i_configs.py) end to end.

Each case loads the shipped YAML, applies the "tiny" transform below, writes it to a temporary file and runs
``rdm fit`` on it through :func:`rdm_lightning.cli.main`, then ``rdm sample`` (2 prompts) from its last
checkpoint and ``rdm export`` (and ``rdm export --lora-only`` for a ``shared_lora`` generator), and loads the
export with ``diffusers.DiffusionPipeline.from_pretrained``.

The tiny transform (:func:`tiny_config`) keeps every method setting of the config and changes only what a
2-core CPU run needs:

- backbone ``path``: a tiny random pipeline of the family (``tests/tiny_*.py``), built once per session;
  ``height``/``width`` 16 px; ``frozen_dtype`` (and ``vae_dtype``) float32; ``teacher_dtype`` float32;
  ``embedding_cache``: the family's prompts, encoded once per session with ``rdm cache-embeddings``;
- trainer: ``accelerator: cpu``, ``devices: 1``, ``strategy: auto``, ``precision: 32-true``, no progress bar or
  model summary; the logger writes under the test's temporary folder; ``SampleGrid`` is removed (``rdm
  sample`` samples the same generator); ``T2IEvaluation`` scores 2 samples of the tiny prompts at the end of fit;
  ``RunCheckpoint``, ``RewardHackingMonitor`` and RTDMD's ``GeneratorEMA`` stay;
- budget: ``max_generator_updates: 2`` at ``generator_update_ratio: 1`` (RTDMD stage 2 has none: one update per
  RL iteration), with the cold starts at 1 generator update and the DynaRS / DynaDG / reward ramps at 1-2, so
  that the second update runs the reward terms;
- batches of 2 (of 2 prompts × K = 2 for the group methods), teacher sampler 2 steps;
- LoRA roles: rank 2, alpha in the config's alpha/rank ratio; FLUX.2-klein's ``roles.generator.init``: the tiny
  distilled klein's ``transformer/`` folder;
- every reward's files: tiny random ones in the public formats (``tests/tiny_rewards.py``; one tiny CLIP
  folder for CLIP and PickScore), its other settings (names, scales, prompt prefix, resize) kept;
- RTDMD stage 2's ``stage1_checkpoint``: the ``last.ckpt`` of the same family's tiny stage-1 case (run here if
  the stage-1 case did not run first).
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tiny_models import make_tiny_clip
from tiny_rewards import (
    TINY,
    TINY_BLIP_VISION,
    TINY_QUICK,
    write_bpe,
    write_dfn_checkpoint,
    write_hps_checkpoint,
    write_image_reward_files,
)

from rdm_lightning.backbones.stable_diffusion import EXPORT_MANIFEST
from rdm_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "t2i_configs.py"
TINY_SIZE = 16
TINY_GROUP = 2
PROMPTS = ["a photo of a cat", "a red car", "a bowl of soup", "a tree on a hill", "two dogs in the snow",
           "a city at night", "a bird on a branch", "an old clock"]
SAMPLE_PROMPTS = ["a photo of a cat", "a red car"]


def load_generator():
    spec = importlib.util.spec_from_file_location("t2i_configs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


t2i = load_generator()
CASES = [pytest.param(family, method, id=f"{family}/{method}") for family, method in t2i.matrix()]

# family -> (module in tests/, builder, keyword arguments): the tiny random pipeline the family's configs run on.
BUILDERS = {
    "sd15": ("tiny_models", "make_tiny_sd15", {}),
    "sdxl": ("tiny_models", "make_tiny_sdxl", {}),
    "sd3": ("tiny_models", "make_tiny_sd3", {}),
    "sd35": ("tiny_models", "make_tiny_sd3", {"sd35": "medium"}),
    "flux1": ("tiny_flux", "make_tiny_flux", {"variant": "dev"}),
    "flux2": ("tiny_flux2", "make_tiny_flux2", {}),
    "flux2_klein": ("tiny_flux2", "make_tiny_flux2_klein", {}),
    "qwen_image": ("tiny_qwen_image", "make_tiny_qwen_image", {}),
    "z_image": ("tiny_z_image", "make_tiny_z_image", {}),
}


def build(folder: Path, module: str, builder: str, **kwargs) -> Path:
    # Imported per family: a family's builder is loaded only when one of its cases runs.
    with torch.random.fork_rng():
        return getattr(importlib.import_module(module), builder)(folder, **kwargs)


class TinyModels:
    """The tiny pipelines, the CLIP folder and the stage-1 checkpoints, each built once per session."""

    def __init__(self, root: Path):
        self.root = root
        self.pipelines: dict[str, Path] = {}
        self.caches: dict[str, Path] = {}
        self.stage1: dict[str, Path] = {}
        self._clip: Path | None = None
        self._open_clip: dict[str, Path] | None = None
        self._image_reward: dict[str, Path] | None = None
        self._klein_distilled: Path | None = None
        self.prompts = root / "prompts.txt"
        self.prompts.write_text("\n".join(PROMPTS) + "\n")
        self.sample_prompts = root / "sample_prompts.txt"
        self.sample_prompts.write_text("\n".join(SAMPLE_PROMPTS) + "\n")

    def pipeline(self, family: str) -> Path:
        if family not in self.pipelines:
            module, builder, kwargs = BUILDERS[family]
            self.pipelines[family] = build(self.root / family, module, builder, **kwargs)
        return self.pipelines[family]

    def embedding_cache(self, family: str, backbone: dict) -> Path:
        """The family's prompt embeddings, cached once with `rdm cache-embeddings` (docs/configs.md), so that
        the cases' fits, samples and exports never load the text encoders (they are the slow part of the
        tiny FLUX.2 and Qwen-Image pipelines)."""
        if family not in self.caches:
            folder = self.root / f"{family}_embeddings"
            config = self.root / f"{family}_embeddings.yaml"
            config.write_text(yaml.safe_dump({"model": {"init_args": {"backbone": backbone}}}, sort_keys=False))
            main(["cache-embeddings", "--config", str(config), "--prompts-file", str(self.prompts),
                  "--embedding-cache", str(folder)])
            self.caches[family] = folder
        return self.caches[family]

    def klein_distilled_transformer(self) -> Path:
        if self._klein_distilled is None:
            self._klein_distilled = build(self.root / "flux2_klein_distilled", "tiny_flux2", "make_tiny_flux2_klein",
                                          distilled=True)
        return self._klein_distilled / "transformer"

    def clip(self) -> Path:
        if self._clip is None:
            self._clip = make_tiny_clip(self.root / "tiny_clip")
        return self._clip

    def open_clip_files(self) -> dict[str, Path]:
        """A tiny BPE vocabulary, HPSv2 checkpoint and DFN5B checkpoint (tests/tiny_rewards.py)."""
        if self._open_clip is None:
            folder = self.root / "tiny_open_clip"
            folder.mkdir()
            self._open_clip = {"bpe": write_bpe(folder / "bpe_simple_vocab_16e6.txt.gz"),
                               "hpsv2": write_hps_checkpoint(folder / "HPS_v2.1_compressed.pt"),
                               "dfn_clip": write_dfn_checkpoint(folder / "open_clip_pytorch_model.bin")}
        return self._open_clip

    def reward(self, spec: dict) -> dict:
        """``spec`` (a config's reward entry) with its files replaced by tiny ones of the same format; every
        other argument (name, train_scale, prompt_prefix, resize_mode) kept."""
        args = dict(spec["init_args"])
        alias = spec["class_path"]
        if alias in ("clip_score", "pickscore"):
            args["model_path"] = str(self.clip())
        elif alias in ("hpsv2", "dfn_clip"):
            files = self.open_clip_files()
            args.update(checkpoint_path=str(files[alias]), bpe_path=str(files["bpe"]),
                        architecture=TINY if alias == "hpsv2" else TINY_QUICK)
        elif alias == "image_reward":
            if self._image_reward is None:
                self._image_reward = write_image_reward_files(self.root / "tiny_image_reward")
            args.update({key: str(path) for key, path in self._image_reward.items()}, vision_architecture=TINY_BLIP_VISION)
        else:
            raise AssertionError(f"no tiny files for the reward {alias!r}; add them to TinyModels.reward")
        return {"class_path": alias, "init_args": args}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("t2i_tiny"))


def tiny_config(config: dict, family: str, method: str, tiny: TinyModels, run_dir: Path) -> dict:
    """The tiny transform of the module docstring, on a copy of ``config``."""
    config = copy.deepcopy(config)
    trainer = config["trainer"]
    trainer.update(accelerator="cpu", devices=1, strategy="auto", precision="32-true", enable_progress_bar=False,
                   enable_model_summary=False)
    trainer["logger"]["init_args"]["save_dir"] = str(run_dir)
    # SampleGrid is dropped: `rdm sample` below samples the same generator, and each grid costs a rollout.
    trainer["callbacks"] = [c for c in trainer["callbacks"] if not c["class_path"].endswith("SampleGrid")]
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("T2IEvaluation"):  # one tiny batch, at the end of fit
            callback["init_args"].update(prompts=str(tiny.prompts), num_samples=2, batch_size=2, progress=False)

    args = config["model"]["init_args"]
    backbone = args["backbone"]["init_args"]
    backbone.update(path=str(tiny.pipeline(family)), height=TINY_SIZE, width=TINY_SIZE, frozen_dtype="float32")
    backbone.pop("vae_dtype", None)
    backbone["embedding_cache"] = str(tiny.embedding_cache(family, {
        "class_path": config["model"]["init_args"]["backbone"]["class_path"],
        "init_args": {"path": backbone["path"], "frozen_dtype": "float32"}}))
    args.update(teacher_dtype="float32", max_generator_updates=2)
    if "generator_update_ratio" in args["dmd"]:
        args["dmd"]["generator_update_ratio"] = 1
    for block, settings in (("dmdr", {"cold_start_updates": 1, "dynamic_renoise_updates": 2, "dynadg_updates": 1}),
                            ("gdmd", {"cold_start_updates": 1, "dynamic_renoise_updates": 2, "group_size": TINY_GROUP,
                                      "b2_ramp_updates": 1}),
                            ("gndm", {"group_size": TINY_GROUP, "lambda_ramp_updates": 1}),
                            ("rtdmd", {"group_size": TINY_GROUP})):
        for name, value in settings.items():
            if block in args and args[block].get(name):  # only what the config sets (0 stays 0: switched off)
                args[block][name] = value
    for role in args["roles"].values():
        if role.get("rank"):
            role["alpha"] = 2 * role["alpha"] / role["rank"]
            role["rank"] = 2
        if "init" in role:
            role["init"] = str(tiny.klein_distilled_transformer())
    args["teacher_sampling"]["num_steps"] = 2
    if "stage1_checkpoint" in args:
        args["stage1_checkpoint"] = str(stage1_checkpoint(family, tiny, run_dir.parent))
    for key in ("rewards", "gold_rewards"):
        if key in args:
            args[key] = [tiny.reward(spec) for spec in args[key]]

    data = config["data"]["init_args"]
    data["train_file"] = str(tiny.prompts)
    if data.get("group_size", 1) > 1:
        data.update(group_size=TINY_GROUP, batch_size=2 * TINY_GROUP)
    else:
        data["batch_size"] = 2
    return config


def shipped(family: str, method: str) -> dict:
    return yaml.safe_load((REPO / "configs" / family / f"{method}.yaml").read_text())


def fit(config: dict, path: Path) -> Path:
    """``rdm fit`` of ``config`` (written to ``path``); its last checkpoint."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    main(["fit", "--config", str(path)])
    logger = config["trainer"]["logger"]["init_args"]
    checkpoints = sorted((Path(logger["save_dir"]) / logger["name"]).glob("version_*/checkpoints/last.ckpt"))
    assert len(checkpoints) == 1, checkpoints
    return checkpoints[0]


def stage1_checkpoint(family: str, tiny: TinyModels, root: Path) -> Path:
    """The family's tiny RTDMD stage-1 checkpoint: the stage-1 case's, or a fit of its own."""
    if family not in tiny.stage1:
        run_dir = root / f"{family}_stage1_for_stage2"
        run_dir.mkdir(parents=True, exist_ok=True)
        config = tiny_config(shipped(family, "rtdmd_stage1"), family, "rtdmd_stage1", tiny, run_dir)
        tiny.stage1[family] = fit(config, run_dir / "rtdmd_stage1.yaml")
    return tiny.stage1[family]


@pytest.mark.parametrize(("family", "method"), CASES)
def test_config_fits_samples_and_exports(family, method, tiny, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    monkeypatch.chdir(tmp_path)  # anything a run writes relative to the working directory stays here
    config = shipped(family, method)
    checkpoint = fit(tiny_config(config, family, method, tiny, tmp_path / "runs"), tmp_path / "tiny.yaml")
    if method == "rtdmd_stage1":
        tiny.stage1.setdefault(family, checkpoint)
    rewards = config["model"]["init_args"].get("rewards")
    if rewards:  # T2IEvaluation scored the optimized and the gold rewards of the final generator
        report = json.loads((checkpoint.parents[1] / "metrics.json").read_text())
        expected = {spec["init_args"]["name"] for spec in rewards} | {"gold/image_reward"}
        assert set(report["student"]["rewards"]) == expected and report["student"]["generator_updates"] == 2

    main(["sample", "--checkpoint", str(checkpoint), "--prompts-file", str(tiny.sample_prompts),
          "--output", str(tmp_path / "samples")])
    assert (tmp_path / "samples" / "samples.npz").is_file()

    main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "export")])
    manifest = json.loads((tmp_path / "export" / EXPORT_MANIFEST).read_text())
    # The manifest says what the stock loader needs besides the folder (SD3 without T5: text_encoder_3=None).
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "export", **manifest.get("from_pretrained_kwargs", {}))
    assert pipe is not None
    if config["model"]["init_args"]["roles"]["generator"].get("layout") == "shared_lora":
        main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "lora"), "--lora-only"])
        # The stock teacher pipeline loads the adapter (diffusers' LoRA format) and, fused, is the merged export.
        teacher = DiffusionPipeline.from_pretrained(tiny.pipeline(family), **manifest.get("from_pretrained_kwargs", {}))
        teacher.load_lora_weights(tmp_path / "lora")
        assert any(name.endswith("lora_A") for name, _ in teacher.transformer.named_modules())
        teacher.fuse_lora()
        teacher.unload_lora_weights()
        merged = pipe.transformer.state_dict()
        fused = teacher.transformer.state_dict()
        assert fused.keys() == merged.keys()
        for key, value in merged.items():
            torch.testing.assert_close(fused[key], value, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["rtdmd_stage1", "rtdmd_stage2"])
def test_rtdmd_on_an_epsilon_family_is_a_clear_error(method, tiny, tmp_path, capsys, monkeypatch):
    """SD1.5 has no RTDMD config: asked for anyway (sd3's with an SD1.5 backbone) it stops before any network loads."""
    monkeypatch.chdir(tmp_path)
    config = tiny_config(shipped("sd3", method), "sd3", method, tiny, tmp_path / "runs")
    config["model"]["init_args"]["backbone"] = {
        "class_path": "rdm_lightning.backbones.StableDiffusionBackbone",
        "init_args": {"path": str(tiny.pipeline("sd15")), "frozen_dtype": "float32"},
    }
    config["model"]["init_args"].pop("stage1_checkpoint", None)
    path = tmp_path / "sd15_rtdmd.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "FlowSchedule" in error and "StableDiffusionBackbone" in error, error


def test_generated_configs_are_up_to_date():
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_lists_stale_missing_and_unknown_files(tmp_path, monkeypatch):
    module = load_generator()
    for family, method in module.matrix():
        target = tmp_path / "configs" / family / f"{method}.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(module.render(family, method))
    docs = tmp_path / "docs" / "configs.md"
    docs.parent.mkdir()
    docs.write_text(f"# x\n{module.MATRIX_BEGIN}\n{module.MATRIX_END}\n")
    monkeypatch.setattr(module, "REPO", tmp_path)
    monkeypatch.setattr(module, "CONFIGS", tmp_path / "configs")
    monkeypatch.setattr(module, "DOCS", docs)
    assert module.check() == ["stale: docs/configs.md (the matrix table)"]
    module.write()
    assert module.check() == []

    (tmp_path / "configs" / "sd3" / "dmd.yaml").write_text("seed_everything: 1\n")
    (tmp_path / "configs" / "flux1" / "gndm.yaml").unlink()
    (tmp_path / "configs" / "sd15" / "rtdmd_stage1.yaml").write_text("{}\n")
    assert module.check() == [
        "stale: configs/sd3/dmd.yaml",
        "missing: configs/flux1/gndm.yaml",
        "not generated (remove it or add it to the tables): configs/sd15/rtdmd_stage1.yaml",
    ]
    assert module.main(["--check"]) == 1


def test_matrix_covers_every_family_and_method():
    assert len(t2i.matrix()) == 59
    for family in ("sd15", "sdxl"):
        assert not any(m.startswith("rtdmd") for m in t2i.methods_of(family))
    for family, fam in t2i.FAMILIES.items():
        layout = t2i.config(family, "dmd")["model"]["init_args"]["roles"]["generator"].get("layout", "full")
        assert layout == ("shared_lora" if fam["params"] >= 8 else "full"), family
