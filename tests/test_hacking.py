"""Reward hacking monitor: the trend signal against closed forms, and a real DMDR run on digits that hacks."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from rdm_lightning.backbones import DigitsBackbone
from rdm_lightning.backbones.digits import DigitsConfig
from rdm_lightning.callbacks import RewardHackingMonitor, RewardLogging, RunCheckpoint
from rdm_lightning.callbacks.hacking import HACKING_FILE, fitted_change, hacking_signal
from rdm_lightning.data import DigitsDataModule
from rdm_lightning.data.digits import digit_prompt
from rdm_lightning.methods import DMDR, DMDConfig, DMDRConfig, OptimizerConfig, StudentConfig
from rdm_lightning.methods.teacher import DigitsTeacherPretraining
from rdm_lightning.rewards import DigitsGoldReward, StrokeContrastReward

DIGIT_PROMPTS = [digit_prompt(i) for i in range(10)]


# ---- the signal -------------------------------------------------------------------------------
def test_fitted_change_is_the_least_squares_line_across_the_window():
    # A straight line: its slope times the span, wherever the points sit.
    assert fitted_change([1.0, 4.0, 10.0], [0, 10, 30]) == pytest.approx(0.3 * 30)
    assert fitted_change([1.0, 3.0]) == pytest.approx(2.0)  # two points: last − first
    # y = 0, 3, 0, 3 at x = 0..3: slope Σ(x−x̄)(y−ȳ)/Σ(x−x̄)² = 3/5, change 0.6·3 = 1.8 (last − first would say 3).
    assert fitted_change([0.0, 3.0, 0.0, 3.0]) == pytest.approx(1.8)
    assert fitted_change([2.0, 2.0, 2.0], [5, 6, 9]) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        fitted_change([1.0])
    with pytest.raises(ValueError, match="strictly increase"):
        fitted_change([1.0, 2.0], [3, 3])
    with pytest.raises(ValueError, match="finite"):
        fitted_change([1.0, float("nan")])


def test_signal_fires_when_the_optimized_reward_rises_and_the_gold_one_falls():
    signal = hacking_signal([0.5, 0.6, 0.7], [0.9, 0.8, 0.6], window=3)
    assert signal.hacking
    assert signal.rise == pytest.approx(0.2) and signal.fall == pytest.approx(0.3)
    assert not hacking_signal([0.5, 0.6, 0.7], [0.5, 0.55, 0.6], window=3).hacking  # both rise
    assert not hacking_signal([0.7, 0.6, 0.5], [0.9, 0.8, 0.6], window=3).hacking  # both fall
    assert not hacking_signal([0.5, 0.5, 0.5], [0.9, 0.8, 0.6], window=3).hacking  # flat optimized


def test_signal_reads_only_the_last_window_of_the_history():
    hacked_then_recovered = ([0.1, 0.5, 0.9, 0.9, 0.9], [0.9, 0.5, 0.1, 0.2, 0.3])
    assert hacking_signal(*hacked_then_recovered, window=3).hacking is False
    assert hacking_signal(*hacked_then_recovered, window=5).hacking is True
    fine_then_hacked = ([0.1, 0.1, 0.1, 0.2, 0.4], [0.1, 0.2, 0.9, 0.7, 0.2])
    signal = hacking_signal(*fine_then_hacked, window=3)
    # The last three: optimized 0.1, 0.2, 0.4 rises 0.3 (the line), gold 0.9, 0.7, 0.2 falls 0.7.
    assert signal.hacking and signal.rise == pytest.approx(0.15 * 2) and signal.fall == pytest.approx(0.35 * 2)
    # Uneven spacing: positions weigh the points (a line through (0, 0), (10, 1), (40, 4) rises 4).
    uneven = hacking_signal([9.0, 0.0, 1.0, 4.0], [0.0, 4.0, 3.0, 0.0], window=3, positions=[-5, 0, 10, 40])
    assert uneven.rise == pytest.approx(4.0) and uneven.fall == pytest.approx(-fitted_change([4.0, 3.0, 0.0], [0, 10, 40]))


def test_signal_thresholds_are_strict_and_checked():
    optimized, gold = [0.0, 0.1], [1.0, 0.8]  # rise 0.1, fall 0.2
    assert hacking_signal(optimized, gold, 2, min_rise=0.05, min_fall=0.15).hacking
    assert not hacking_signal(optimized, gold, 2, min_rise=0.15).hacking
    assert not hacking_signal(optimized, gold, 2, min_fall=0.25).hacking
    assert not hacking_signal([0.0, 0.5], [1.0, 0.5], 2, min_fall=0.5).hacking  # exactly at the threshold
    with pytest.raises(ValueError, match="window must be an integer >= 2"):
        hacking_signal(optimized, gold, 1)
    with pytest.raises(ValueError, match="needs at least 3 evaluations"):
        hacking_signal(optimized, gold, 3)
    with pytest.raises(ValueError, match="min_fall must be a finite number >= 0"):
        hacking_signal(optimized, gold, 2, min_fall=-0.1)
    with pytest.raises(ValueError, match="one entry per evaluation"):
        hacking_signal(optimized, [1.0], 2)


# ---- the callback -----------------------------------------------------------------------------
def test_monitor_refuses_unknown_reward_names_and_missing_sources(tiny_digits_teacher, rdm_cache):
    module = DMDR(DigitsBackbone(str(tiny_digits_teacher)), rewards=[StrokeContrastReward(name="stroke_contrast")],
                  gold_rewards=[DigitsGoldReward(name="digits_gold", cache=str(rdm_cache))],
                  dmdr=DMDRConfig(reward_weights={"stroke_contrast": 1.0}))
    logging = RewardLogging(DIGIT_PROMPTS)
    monitor = RewardHackingMonitor(["stroke_contrast"], ["gold/digit_gold"])
    with pytest.raises(ValueError, match=r"unknown rewards \['gold/digit_gold'\].*\['stroke_contrast', 'gold/digits_gold'\]"):
        monitor.setup(SimpleNamespace(callbacks=[logging, monitor]), module, "fit")
    with pytest.raises(ValueError, match="found none"):
        monitor.setup(SimpleNamespace(callbacks=[monitor]), module, "fit")
    with pytest.raises(ValueError, match="choose one with source"):
        monitor.setup(SimpleNamespace(callbacks=[logging, RewardLogging(DIGIT_PROMPTS)]), module, "fit")
    with pytest.raises(ValueError, match="both optimized and gold"):
        RewardHackingMonitor(["a"], ["a"])
    with pytest.raises(ValueError, match="window"):
        RewardHackingMonitor(["a"], ["b"], window=1)
    good = RewardHackingMonitor(["stroke_contrast"], ["gold/digits_gold"], source="RewardLogging")
    good.setup(SimpleNamespace(callbacks=[logging, good]), module, "fit")
    good.setup(SimpleNamespace(callbacks=[logging, good]), module, "fit")
    assert logging.observers == [good.observe]  # a second setup does not observe twice


@pytest.fixture(scope="module")
def briefly_trained_teacher(tmp_path_factory) -> Path:
    """A channels-8 digits teacher after 200 steps (~7 s): its 4-step samples already look like digits
    to the gold classifier (mean gold reward ≈ 0.5), so there is quality to lose."""
    path = tmp_path_factory.mktemp("teacher") / "digits"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = DigitsTeacherPretraining(DigitsConfig(channels=8), output_path=str(path), lr=4e-3, ema_decay=0.99)
        L.Trainer(max_steps=200, logger=False, enable_checkpointing=False, enable_model_summary=False,
                  enable_progress_bar=False).fit(module, DigitsDataModule(batch_size=64))
    return path


def hacking_fit(teacher: Path, cache: Path, run: Path, weight: float, budget: int, stop: bool = False,
                ckpt_path: Path | None = None) -> tuple[DMDR, RewardLogging, RewardHackingMonitor]:
    """DMDR on digits with only stroke contrast optimized, at ``weight``, and the gold classifier watched:
    RewardLogging every 2 generator updates, the monitor over 3 evaluations."""
    module = DMDR(
        DigitsBackbone(str(teacher)), rewards=[StrokeContrastReward(name="stroke_contrast")],
        gold_rewards=[DigitsGoldReward(name="digits_gold", cache=str(cache))],
        dmdr=DMDRConfig(cold_start_updates=0, dynamic_renoise_updates=0, guidance_jitter=0.0,
                        reward_weights={"stroke_contrast": weight}),
        dmd=DMDConfig(generator_update_ratio=5, norm_eps=1e-8), student=StudentConfig(num_steps=4),
        generator_optimizer=OptimizerConfig(lr=3e-4), fake_score_optimizer=OptimizerConfig(lr=3e-4),
        max_generator_updates=budget,
    )
    logging = RewardLogging(DIGIT_PROMPTS, num_samples=50, every_n_updates=2)
    monitor = RewardHackingMonitor(["stroke_contrast"], ["gold/digits_gold"], window=3, min_rise=0.01, min_fall=0.01, stop=stop)
    trainer = L.Trainer(max_epochs=-1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=run, limit_val_batches=0,
                        callbacks=[monitor, logging, RunCheckpoint(every_n_updates=0)])
    trainer.fit(module, DigitsDataModule(batch_size=8), ckpt_path=ckpt_path, weights_only=False)
    return module, logging, monitor


def test_an_over_weighted_reward_hacks_the_gold_one_and_the_monitor_stops_the_run(
        briefly_trained_teacher, digits_gold_classifier, rdm_cache, tmp_path):
    # Stroke contrast at weight 100 overrides DMD: contrast climbs while the gold classifier stops seeing digits.
    with pytest.warns(UserWarning, match=r"reward hacking suspected .* stroke_contrast rose by .* while gold/digits_gold fell"):
        _, logging, monitor = hacking_fit(briefly_trained_teacher, rdm_cache, tmp_path / "hacked", weight=100.0, budget=10)
    means = {name: [e["rewards"][name]["mean"] for e in logging.history] for name in ("stroke_contrast", "gold/digits_gold")}
    assert [e["generator_updates"] for e in logging.history] == [2, 4, 6, 8, 10]
    assert means["stroke_contrast"][-1] > means["stroke_contrast"][0] + 0.05
    assert means["gold/digits_gold"][-1] < means["gold/digits_gold"][0] - 0.1
    # From the third evaluation on, every window hacks; each event holds the figures of its window.
    assert [e["generator_updates"] for e in monitor.events] == [6, 8, 10]
    for event, end in zip(monitor.events, (3, 4, 5)):
        (pair,) = event["pairs"]
        updates = [2 * (i + 1) for i in range(end)]
        expected = hacking_signal(means["stroke_contrast"][:end], means["gold/digits_gold"][:end], 3, 0.01, 0.01, updates)
        assert event["window_updates"] == updates[-3:] and not event["stopped"]
        assert pair["rise"] == pytest.approx(expected.rise) and pair["fall"] == pytest.approx(expected.fall)
    written = json.loads((tmp_path / "hacked" / HACKING_FILE).read_text())
    assert written["events"] == monitor.events and written["gold"] == ["gold/digits_gold"]

    # stop=True: the same run ends at the first event, its budget unspent.
    with pytest.warns(UserWarning, match="stopping the run"):
        stopped, _, stopping = hacking_fit(briefly_trained_teacher, rdm_cache, tmp_path / "stopped", weight=100.0,
                                           budget=10, stop=True)
    assert stopped.generator_updates == 6 and [e["generator_updates"] for e in stopping.events] == [6]
    assert stopping.events[0]["stopped"] and stopping.events[0]["pairs"] == monitor.events[0]["pairs"]

    # A run resumed from its checkpoint keeps the history and the events, and continues them.
    hacking_fit(briefly_trained_teacher, rdm_cache, tmp_path / "resumed", weight=100.0, budget=8)
    _, resumed_logging, resumed = hacking_fit(
        briefly_trained_teacher, rdm_cache, tmp_path / "resumed", weight=100.0, budget=10,
        ckpt_path=tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert resumed_logging.history == logging.history and resumed.events == monitor.events


def test_a_sanely_weighted_reward_does_not_fire(briefly_trained_teacher, digits_gold_classifier, rdm_cache, tmp_path):
    _, logging, monitor = hacking_fit(briefly_trained_teacher, rdm_cache, tmp_path, weight=0.1, budget=10)
    gold = [e["rewards"]["gold/digits_gold"]["mean"] for e in logging.history]
    assert len(gold) == 5 and gold[-1] >= gold[0]  # DMD keeps the samples digits
    assert monitor.events == [] and not (tmp_path / HACKING_FILE).exists()
