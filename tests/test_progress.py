"""UpdateProgressBar: generator updates (or steps) out of the budget, rate and time left, in a terminal and in a log."""
from __future__ import annotations

import re

import lightning as L
import pytest
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from rdm_lightning.backbones.digits import DigitsBackbone, DigitsConfig
from rdm_lightning.callbacks import UpdateProgressBar
from rdm_lightning.callbacks.progress import format_rate, loss_summary, progress_line, seconds_left
from rdm_lightning.data.digits import DigitsDataModule
from rdm_lightning.methods import DMD, DigitsTeacherPretraining, DMDConfig, OptimizerConfig, StudentConfig


def tiny_dmd(teacher, budget: int = 4) -> DMD:
    optimizer = OptimizerConfig(lr=1e-3)
    return DMD(
        DigitsBackbone(path=str(teacher)), dmd=DMDConfig(generator_update_ratio=2), generator_optimizer=optimizer,
        fake_score_optimizer=optimizer, student=StudentConfig(num_steps=2), max_generator_updates=budget,
    )


def trainer(**kwargs) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                    num_sanity_val_steps=0, limit_val_batches=0, max_epochs=-1)
    return L.Trainer(**{**settings, **kwargs})


def the_bar(fit: L.Trainer) -> UpdateProgressBar:
    bars = [c for c in fit.callbacks if isinstance(c, (TQDMProgressBar, RichProgressBar))]
    assert len(bars) == 1 and isinstance(bars[0], UpdateProgressBar), bars
    return bars[0]


# ---- pure functions -------------------------------------------------------------------------------
def test_time_left_and_rate_closed_forms():
    assert seconds_left(done=25, remaining=75, elapsed_s=50.0) == 150.0  # 2 s per update
    assert seconds_left(done=0, remaining=75, elapsed_s=50.0) is None
    assert seconds_left(done=10, remaining=0, elapsed_s=5.0) == 0.0
    assert format_rate(10, 2.0, "update") == "5.00 updates/s"
    assert format_rate(2, 5.0, "update") == "2.50 s/update"
    assert format_rate(0, 5.0, "step") is None


def test_progress_line_reads_plainly():
    line = progress_line("generator updates", "update", 250, 1000, 200, 40.0, {"loss_dm": 0.012345, "loss_fake": 1.5})
    assert line == (
        "generator updates 250/1000 (25%) | 5.00 updates/s | elapsed 00:40 | left 02:30 | loss_dm 0.01235 loss_fake 1.5"
    )
    assert progress_line("steps", "step", 7, None, 7, 3.5, {}) == "steps 7 | 2.00 steps/s | elapsed 00:03"
    assert progress_line("steps", "step", 0, 10, 0, 0.0, {}) == "steps 0/10 (0%) | elapsed 00:00"


def test_loss_summary_keeps_the_losses_by_short_name():
    metrics = {"train/loss_dm": 0.5, "train/dmd_grad_abs": 2.0, "generator_updates": 3.0, "train/loss_fake": 0.25}
    assert loss_summary(metrics) == {"loss_dm": 0.5, "loss_fake": 0.25}


def test_settings_are_checked():
    with pytest.raises(ValueError, match=r"log_every_percent must lie in \(0, 100\], got 0"):
        UpdateProgressBar(log_every_percent=0)
    with pytest.raises(ValueError, match="log_every_seconds must be a finite number > 0, got inf"):
        UpdateProgressBar(log_every_seconds=float("inf"))


# ---- in a fit -------------------------------------------------------------------------------------
def test_terminal_bar_counts_generator_updates_out_of_the_budget(tiny_digits_teacher):
    bar = UpdateProgressBar(terminal=True)
    fit = trainer(callbacks=[bar])
    module = tiny_dmd(tiny_digits_teacher)
    fit.fit(module, DigitsDataModule(batch_size=8))
    assert the_bar(fit) is bar
    assert (bar.train_progress_bar.total, bar.train_progress_bar.n) == (4, module.generator_updates) == (4, 4)
    assert bar.train_progress_bar.desc == "generator updates"
    assert re.fullmatch(r"loss_dm=\S+, loss_fake=\S+", bar.train_progress_bar.postfix)


def test_log_lines_without_a_terminal(tiny_digits_teacher, capsys):
    """stderr captured is no terminal: plain lines at the start, each 25 % of the budget, and no carriage returns."""
    fit = trainer(callbacks=[UpdateProgressBar(log_every_percent=25)])
    fit.fit(tiny_dmd(tiny_digits_teacher), DigitsDataModule(batch_size=8))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("generator updates")]
    assert [line.split(" | ")[0] for line in lines] == [
        "generator updates 0/4 (0%)", "generator updates 1/4 (25%)", "generator updates 2/4 (50%)",
        "generator updates 3/4 (75%)", "generator updates 4/4 (100%)",
    ]
    assert re.search(r" updates/s \| elapsed \d\d:\d\d \| left \d\d:\d\d \| loss_dm \S+ loss_fake \S+$", lines[-1])
    assert "\r" not in err


def test_it_is_the_default_bar_of_a_distillation_fit(tiny_digits_teacher):
    """configure_callbacks replaces Lightning's default bar (TQDM, or Rich when installed), keeps a bar
    the trainer was given, and adds none when the bar is off."""
    fit = trainer()
    assert type(fit.progress_bar_callback) in (TQDMProgressBar, RichProgressBar)
    fit.fit(tiny_dmd(tiny_digits_teacher, budget=2), DigitsDataModule(batch_size=8))
    assert the_bar(fit).total == 2

    class OwnBar(TQDMProgressBar):
        pass

    own = OwnBar()
    fit = trainer(callbacks=[own])
    fit.fit(tiny_dmd(tiny_digits_teacher, budget=1), DigitsDataModule(batch_size=8))
    assert [c for c in fit.callbacks if isinstance(c, TQDMProgressBar)] == [own]

    fit = trainer(enable_progress_bar=False)
    fit.fit(tiny_dmd(tiny_digits_teacher, budget=1), DigitsDataModule(batch_size=8))
    assert fit.progress_bar_callback is None


def test_teacher_pretraining_counts_steps_out_of_max_steps(tmp_path):
    module = DigitsTeacherPretraining(DigitsConfig(channels=8), output_path=str(tmp_path / "teacher"))
    fit = trainer(max_steps=3, max_epochs=None)
    fit.fit(module, DigitsDataModule(batch_size=16))
    bar = the_bar(fit)
    assert (bar.label, bar.total, bar.shown_count) == ("steps", 3, 3)
