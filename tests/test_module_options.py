"""Each config option of the DMD module, its samplers and callbacks changes what it says it does."""
from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from rdm_lightning.backbones import DigitsBackbone
from rdm_lightning.callbacks import DigitsEvaluation, GeneratorEMA, SampleGrid
from rdm_lightning.core.sampling import few_step_sample
from rdm_lightning.data import DigitsDataModule
from rdm_lightning.evaluation.grid import image_grid
from rdm_lightning.methods import DMD, DMDConfig, DigitsTeacherPretraining, StudentConfig, TeacherSamplingConfig
from rdm_lightning.methods import dmd as dmd_module

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
PROMPTS = ["a handwritten digit 1", "a handwritten digit 4"]




def module(teacher, **kwargs) -> DMD:
    return DMD(DigitsBackbone(str(teacher)), **kwargs)


def fit(model: DMD, tmp_path, updates: int, callbacks=()) -> L.Trainer:
    model.max_generator_updates = updates
    trainer = L.Trainer(
        max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks), limit_val_batches=0,
    )
    trainer.fit(model, DigitsDataModule(batch_size=8))
    return trainer


def test_first_step_samples_train_the_generator_from_pure_noise(tiny_digits_teacher, monkeypatch):
    model = module(tiny_digits_teacher, dmd=DMDConfig(generator_samples="first_step"))
    monkeypatch.setattr(model, "shared_randint", lambda high: pytest.fail("no step is drawn without backward simulation"))
    cond = model.backbone.encode_prompts(PROMPTS)
    state = model.rng.get_state()
    x_in, level = model.generator_input(cond, 2)
    model.rng.set_state(state)
    torch.testing.assert_close(x_in, model.randn((2, 1, 8, 8)))
    assert level.tolist() == [1.0, 1.0]


def test_ode_student_ignores_the_sampler_seed_and_sde_does_not(tiny_digits_teacher):
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for rule, same in (("ode", True), ("sde", False)):
        model = module(tiny_digits_teacher, student=StudentConfig(num_steps=3, step_rule=rule))
        a = model.generate(PROMPTS, noise, generator=torch.Generator().manual_seed(1))
        b = model.generate(PROMPTS, noise, generator=torch.Generator().manual_seed(2))
        assert torch.equal(a, b) is same, rule


def test_explicit_student_levels_are_the_conditioning_levels(tiny_digits_teacher, monkeypatch):
    model = module(tiny_digits_teacher, student=StudentConfig(num_steps=2, levels=[0.9, 0.4]))
    seen = []
    predict = model.backbone.predict_x0
    monkeypatch.setattr(model.backbone, "predict_x0", lambda net, x, t, *a, **k: seen.append(t[0].item()) or predict(net, x, t, *a, **k))
    model.generate(PROMPTS)
    assert seen == pytest.approx([0.9, 0.4])
    assert model.nfe() == 2


def test_dm_level_range_and_norm_eps_reach_the_dmd_gradient(tiny_digits_teacher, monkeypatch):
    model = module(tiny_digits_teacher, dmd=DMDConfig(dm_level_range=(0.5, 0.5), norm_eps=0.25))
    levels, epsilons = [], []
    teacher_x0 = model.teacher_x0
    monkeypatch.setattr(model, "teacher_x0", lambda x, t, *a, **k: levels.append(t) or teacher_x0(x, t, *a, **k))
    gradient = dmd_module.dmd_gradient
    monkeypatch.setattr(dmd_module, "dmd_gradient", lambda x, r, f, eps, **k: epsilons.append(eps) or gradient(x, r, f, eps, **k))
    cond = model.backbone.encode_prompts(PROMPTS)
    model.distribution_matching_loss(torch.randn(2, 1, 8, 8), cond, model.backbone.empty_conditioning(2))
    assert torch.allclose(levels[0].double(), torch.full((2,), 0.5, dtype=torch.float64))
    assert epsilons == [0.25]


def test_bfloat16_teacher_is_stored_in_bfloat16_and_predicts_in_float32(tiny_digits_teacher):
    full = module(tiny_digits_teacher)
    half = module(tiny_digits_teacher, teacher_dtype="bfloat16")
    assert {p.dtype for p in half.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.generator.parameters()} == {torch.float32}
    cond = full.backbone.encode_prompts(PROMPTS)
    x, level = torch.randn(2, 1, 8, 8), torch.tensor([0.7, 0.3])
    reference = full.teacher_x0(x, level, cond, 1.5)
    reduced = half.teacher_x0(x, level, cond, 1.5)
    assert reduced.dtype == torch.float32
    torch.testing.assert_close(reduced, reference, atol=0.1, rtol=0.1)
    assert not torch.equal(reduced, reference)


def test_teacher_sampling_without_guidance_counts_one_evaluation_per_step(tiny_digits_teacher):
    model = module(tiny_digits_teacher, teacher_sampling=TeacherSamplingConfig(num_steps=5, guidance_scale=1.0))
    assert model.nfe("teacher") == 5
    model.teacher_sampling = TeacherSamplingConfig(num_steps=5, guidance_scale=3.0)
    assert model.nfe("teacher") == 10
    with pytest.raises(ValueError, match="'critic'"):
        model.generate(PROMPTS, role="critic")


def test_ema_copies_the_generator_until_start_after(tiny_digits_teacher, tmp_path):
    snapshots = []

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if pl_module.generator_updates > len(snapshots):
                snapshots.append((pl_module.generator.conv_out.weight.clone(), pl_module.generator_ema.conv_out.weight.clone()))

    model = module(tiny_digits_teacher, dmd=DMDConfig(generator_update_ratio=1))
    fit(model, tmp_path, updates=3, callbacks=[GeneratorEMA(decay=0.5, start_after=2), Snapshot()])
    (g1, e1), (g2, e2), (g3, e3) = snapshots
    assert torch.equal(e1, g1) and torch.equal(e2, g2)
    torch.testing.assert_close(e3, 0.5 * g2 + 0.5 * g3)


def test_digits_evaluation_can_skip_the_teacher(tiny_digits_teacher, tmp_path, rdm_cache, monkeypatch):
    monkeypatch.setenv("RDM_CACHE", str(rdm_cache))
    model = module(tiny_digits_teacher, dmd=DMDConfig(generator_update_ratio=1))
    fit(model, tmp_path, updates=1, callbacks=[DigitsEvaluation(num_samples=10, evaluate_teacher=False)])
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert set(report) == {"student", "real_data_floor", "history"}
    assert set(report["real_data_floor"]) == {"digits_fd", "pixel_fd", "num_samples"}


def test_sample_grid_layout_and_fixed_noise(tiny_digits_teacher):
    grid = SampleGrid(PROMPTS, num_per_prompt=3, scale=2)
    model = module(tiny_digits_teacher)
    images = grid.sample(model)
    assert images.shape == (6, 1, 8, 8)
    torch.testing.assert_close(grid.sample(model), images)
    array = image_grid(images, columns=3, scale=2)
    assert array.shape == (2 * (16 + 1) + 1, 3 * (16 + 1) + 1, 1)
    with pytest.raises(ValueError, match="at least one prompt"):
        SampleGrid([])


def test_teacher_pretraining_rejects_bad_settings():
    with pytest.raises(ValueError, match="prompt_dropout"):
        DigitsTeacherPretraining(prompt_dropout=1.0)
    with pytest.raises(ValueError, match="ema_decay"):
        DigitsTeacherPretraining(ema_decay=1.5)
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got nan"):
        DigitsTeacherPretraining(lr=float("nan"))


def test_generate_matches_the_core_sampler(tiny_digits_teacher):
    model = module(tiny_digits_teacher, student=StudentConfig(num_steps=2))
    noise = torch.randn(2, 1, 8, 8)
    cond = model.backbone.encode_prompts(PROMPTS)
    expected = few_step_sample(
        lambda x, t: model.backbone.predict_x0(model.generator, x, t, cond), noise,
        model.student_levels(), model.backbone.schedule, "sde", torch.Generator().manual_seed(5),
    )
    torch.testing.assert_close(model.generate(PROMPTS, noise, generator=torch.Generator().manual_seed(5)), expected)


def test_teacher_pretraining_ema_decay_after_each_step_is_the_warm_up_closed_form():
    """After optimizer step n the EMA takes decay min(ema_decay, (1 + n)/(10 + n)): 2/11, then 3/12."""
    import copy

    from rdm_lightning.backbones.digits import DigitsConfig

    class Recording(DigitsTeacherPretraining):
        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            self.seen.append((copy.deepcopy(self.denoiser.state_dict()), copy.deepcopy(self.ema["denoiser"].state_dict())))

    module = Recording(DigitsConfig(channels=8), output_path="unused")
    module.seen = [(None, copy.deepcopy(module.ema["denoiser"].state_dict()))]
    module.on_fit_end = lambda: None  # nothing to save
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, DigitsDataModule(batch_size=128))
    for step, decay in ((1, 2 / 11), (2, 3 / 12)):
        live, ema = module.seen[step]
        previous = module.seen[step - 1][1]
        for key, value in ema.items():
            if value.is_floating_point():
                torch.testing.assert_close(value, decay * previous[key] + (1 - decay) * live[key], rtol=1e-6, atol=1e-7)
