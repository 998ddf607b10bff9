"""benchmarks/methods.py: a kept run is reused only while its config files are unchanged."""
from __future__ import annotations

import importlib.util
from pathlib import Path

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
