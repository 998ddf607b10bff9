"""benchmarks/memory.py: what each role layout holds, on the digits denoiser (one iteration)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"
spec = importlib.util.spec_from_file_location("memory_benchmark", SCRIPT)
memory_benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_benchmark)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore:.*LeafSpec")


def test_shared_adapters_hold_the_base_once_and_train_and_save_only_the_adapters(tmp_path, monkeypatch, rdm_cache):
    monkeypatch.setenv("RDM_CACHE", str(rdm_cache))  # no cached teacher: a random one of the shipped size
    full = memory_benchmark.measure("digits", "full/full", 1, 2, 4, tmp_path / "full")
    shared = memory_benchmark.measure("digits", "shared_lora/shared_lora", 1, 2, 4, tmp_path / "shared")
    assert full["updates"] == shared["updates"] == {"generator": 1, "fake_score": 1}
    # One frozen copy (the teacher) in both; the full roles train two more copies of the same size.
    assert shared["base MB"] == pytest.approx(full["base MB"])
    assert full["trainable MB"] == pytest.approx(2 * full["base MB"])
    assert shared["trainable MB"] < 0.2 * full["trainable MB"]
    assert shared["optimizer MB"] == pytest.approx(2 * shared["trainable MB"])  # AdamW's two moments
    assert shared["checkpoint MB"] < 0.5 * full["checkpoint MB"]
    assert 0 < shared["peak MB"] and 0 < full["peak MB"]
