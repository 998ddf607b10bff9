"""score_summary: mean, sample std and the Student-t 95% half-width, against tabulated values."""
import math

import numpy as np
import pytest
import torch

from rdm_lightning.evaluation.statistics import score_summary


def test_summary_of_four_scores_uses_the_tabulated_t_quantile():
    summary = score_summary(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    std = math.sqrt(5 / 3)  # squared deviations 2.25 + 0.25 + 0.25 + 2.25 over n - 1 = 3
    assert summary["n"] == 4 and summary["mean"] == pytest.approx(2.5)
    assert summary["std"] == pytest.approx(std)
    # t_{0.975, 3} = 3.182446 (statistical tables).
    assert summary["ci95"] == pytest.approx(3.182446 * std / 2, rel=1e-6)


def test_large_samples_approach_the_normal_interval():
    scores = np.random.default_rng(0).normal(size=100_000)
    summary = score_summary(scores)
    assert summary["ci95"] == pytest.approx(1.959964 * summary["std"] / math.sqrt(100_000), rel=1e-4)


def test_one_score_has_no_spread():
    summary = score_summary([0.3])
    assert summary["mean"] == 0.3 and summary["n"] == 1
    assert math.isnan(summary["std"]) and math.isnan(summary["ci95"])


@pytest.mark.parametrize("scores, message", [([], "non-empty 1-d"), ([[1.0, 2.0]], "non-empty 1-d"),
                                             ([1.0, float("nan")], "1 NaN or infinite")])
def test_bad_scores_are_refused(scores, message):
    with pytest.raises(ValueError, match=message):
        score_summary(scores)
