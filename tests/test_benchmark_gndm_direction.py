"""benchmarks/gndm_direction.py: the parameter-space direction consistency of DMD's and A1's normalisers."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from rdm_lightning.backbones import DigitsBackbone
from rdm_lightning.methods import GNDM, DMDConfig, DMDRConfig, GNDMConfig

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gndm_direction.py"
spec = importlib.util.spec_from_file_location("gndm_direction", SCRIPT)
gndm_direction = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gndm_direction)


def make_gndm(teacher, group_size):
    return GNDM(DigitsBackbone(str(teacher)), dmdr=DMDRConfig(cold_start_updates=0), gndm=GNDMConfig(group_size=group_size),
                dmd=DMDConfig(norm_eps=1e-8))


def measure(module, groups=3, draws=6, seed=0):
    module.rng.manual_seed(seed)
    prompts = gndm_direction.group_prompts(groups, module.gndm.group_size, None)
    return gndm_direction.measure(module, prompts, draws)


def test_group_size_one_gives_both_normalisers_the_same_statistics(tiny_digits_teacher):
    # K = 1: n̄ = n_i, so A1 is DMD down to the parameter gradients (docs/methods/gndm.md,
    # "Group size and the direction of one update").
    result = measure(make_gndm(tiny_digits_teacher, group_size=1), groups=8)
    assert result["per_sample_cosine"] == result["group_mean_cosine"]
    assert result["per_sample_snr"] == result["group_mean_snr"]
    assert result["n_cv"] == 0  # one sample a group: no spread


def test_groups_of_four_are_measured_reproducibly_and_differ_between_normalisers(tiny_digits_teacher):
    module = make_gndm(tiny_digits_teacher, group_size=4)
    result = measure(module)
    assert result == measure(module)
    assert result["n_cv"] > 0
    assert result["per_sample_cosine"] != result["group_mean_cosine"]
    for name in ("per_sample", "group_mean"):
        assert -1 <= result[f"{name}_cosine"] <= 1 and result[f"{name}_snr"] > 0


def test_prompts_are_k_repeated_digits_or_a_file_long_enough(tmp_path):
    assert gndm_direction.group_prompts(3, 2, None) == [
        "a handwritten digit 0", "a handwritten digit 0", "a handwritten digit 1", "a handwritten digit 1",
        "a handwritten digit 2", "a handwritten digit 2",
    ]
    short = tmp_path / "prompts.txt"
    short.write_text("a cat\na dog\n")
    assert gndm_direction.group_prompts(2, 2, short) == ["a cat", "a cat", "a dog", "a dog"]
    with pytest.raises(ValueError, match=r"holds 2 prompts, the batch needs 3"):
        gndm_direction.group_prompts(3, 2, short)
