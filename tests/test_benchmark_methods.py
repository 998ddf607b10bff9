"""benchmarks/methods.py: a kept run is reused only while its config files and setting (thread count
included) are unchanged; a second stage finds its own first stage."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "methods.py"
spec = importlib.util.spec_from_file_location("methods_benchmark", SCRIPT)
methods_benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(methods_benchmark)


def test_config_digest_follows_the_settings_not_the_comments_and_a_second_stage_follows_its_first(tmp_path, monkeypatch):
    monkeypatch.setattr(methods_benchmark, "CONFIGS", tmp_path)
    for name in ("gndm", "rtdmd_stage1", "rtdmd_stage2"):
        (tmp_path / f"{name}.yaml").write_text(f"# {name}\nmodel: {{lr: 1.0e-4, name: {name}}}\n")
    gndm, stage2 = methods_benchmark.config_digest("gndm"), methods_benchmark.config_digest("rtdmd_stage2")
    assert len(gndm) == 12 and gndm == methods_benchmark.config_digest("gndm")

    (tmp_path / "gndm.yaml").write_text("# gndm, K = 2 (another comment)\nmodel:\n  name: gndm\n  lr: 0.0001\n")
    assert methods_benchmark.config_digest("gndm") == gndm
    (tmp_path / "gndm.yaml").write_text("model: {lr: 1.0e-4, name: gndm, group_size: 2}\n")
    assert methods_benchmark.config_digest("gndm") != gndm
    (tmp_path / "rtdmd_stage1.yaml").write_text("model: {lr: 3.0e-6, name: rtdmd_stage1}\n")
    assert methods_benchmark.config_digest("rtdmd_stage2") != stage2


def test_a_second_stage_starts_from_the_first_stage_run_of_its_own_seed_and_tag(tmp_path):
    for name in ("rtdmd_stage1_seed0", "rtdmd_stage1_shared_lora_seed0", "rtdmd_stage1_shared_lora_seed1"):
        checkpoint = tmp_path / name / "version_0" / "checkpoints" / "last.ckpt"
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_text(name)
    first = methods_benchmark.SECOND_STAGES["rtdmd_stage2"]
    for tag, seed in ((None, 0), ("shared_lora", 0), ("shared_lora", 1)):
        found = methods_benchmark.first_stage_checkpoint(methods_benchmark.run_name(first, tag, seed), tmp_path)
        assert found.read_text() == methods_benchmark.run_name(first, tag, seed)
    with pytest.raises(FileNotFoundError, match="rtdmd_stage1_shared_lora_seed2"):
        methods_benchmark.first_stage_checkpoint(methods_benchmark.run_name(first, "shared_lora", 2), tmp_path)


def test_a_kept_run_is_reused_only_with_the_setting_it_was_trained_with(tmp_path):
    wanted = {"updates": 400, "num_samples": 1000, "overrides": [], "threads": 2, "config": "abc"}
    path = tmp_path / "dmd_seed0.json"
    assert methods_benchmark.kept_run(path, wanted) is None
    path.write_text(json.dumps({"setting": wanted, "scores": {"digits_fd": 20.0}}))
    assert methods_benchmark.kept_run(path, wanted)["scores"] == {"digits_fd": 20.0}
    assert methods_benchmark.kept_run(path, {**wanted, "threads": 1}) is None
    assert methods_benchmark.kept_run(path, {**wanted, "config": "abd"}) is None
    # A run kept before overrides were recorded had none.
    path.write_text(json.dumps({"setting": {k: v for k, v in wanted.items() if k != "overrides"}, "scores": {}}))
    assert methods_benchmark.kept_run(path, wanted) is not None
    assert methods_benchmark.kept_run(path, {**wanted, "overrides": ["a=1"]}) is None
