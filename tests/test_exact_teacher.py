"""The exact-teacher domain: the closed-form posterior mean, its metrics, and DMD through it."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from rdm_lightning.backbones.mixture import (
    UNCONDITIONAL,
    GaussianMixture,
    MixtureBackbone,
    MixtureDataModule,
    MixtureLayout,
    mixture_posterior_mean,
)
from rdm_lightning.core.sampling import few_step_sample
from rdm_lightning.evaluation.mixture import (
    mixture_entropy,
    mode_coverage,
    negative_log_likelihood,
    share_near_modes,
    sliced_wasserstein1,
    unit_projections,
)
from rdm_lightning.methods import DMD
from rdm_lightning.methods.base import StudentConfig
from rdm_lightning.methods.dmd import DMDConfig
from rdm_lightning.methods.optim import OptimizerConfig


def test_posterior_mean_equals_monte_carlo_on_a_tiny_mixture():
    # Self-normalised importance sampling of x0 from the prior, weighted by p(x_t | x0).
    mixture = MixtureLayout(2, 2, separation=1.5, mode_std=0.4, seed=3).mixture()
    x_t = torch.tensor([[0.3, -0.2], [1.0, 0.5], [-0.7, 0.9]], dtype=torch.float64)
    classes = torch.tensor([0, 1, UNCONDITIONAL])
    alpha, sigma = torch.full((3, 1), 0.6, dtype=torch.float64), torch.full((3, 1), 0.4, dtype=torch.float64)
    exact = mixture_posterior_mean(x_t, alpha, sigma, mixture.means, mixture.std, mixture.weights(classes))
    generator = torch.Generator().manual_seed(0)
    for row in range(3):
        x0 = mixture.sample(classes[row].repeat(400_000), generator)
        log_w = -((x_t[row] - alpha[row] * x0) ** 2).sum(1) / (2 * sigma[row] ** 2)
        estimate = (torch.softmax(log_w, 0)[:, None] * x0).sum(0)
        torch.testing.assert_close(exact[row], estimate, atol=1e-2, rtol=0)


def test_fresh_denoiser_is_the_exact_predictor_and_trainable():
    backbone = MixtureBackbone(MixtureLayout(num_classes=2, modes_per_class=2))
    network = backbone.load_denoiser()
    assert any(p.requires_grad for p in network.parameters())
    x_t = torch.randn(5, 2)
    level = torch.full((5,), 0.3)
    prompts = ["class 0", "class 1", "", "class 1", "class 0"]
    x0 = backbone.predict_x0(network, x_t, level, backbone.encode_prompts(prompts))
    weights = backbone.mixture.weights(backbone.classes(prompts))
    exact = mixture_posterior_mean(x_t, 1 - level[:, None], level[:, None], backbone.mixture.means, backbone.mixture.std, weights)
    torch.testing.assert_close(x0.double(), exact, atol=1e-5, rtol=0)


@pytest.mark.parametrize("depth", [1, 3])
def test_residual_depth_sets_the_hidden_layers_and_keeps_the_fresh_network_exact(depth):
    backbone = MixtureBackbone(MixtureLayout(num_classes=2, modes_per_class=2), hidden=16, depth=depth)
    network = backbone.load_denoiser()
    linears = [m for m in network.residual if isinstance(m, torch.nn.Linear)]
    assert len(linears) == depth + 1 and [m.out_features for m in linears] == [16] * depth + [2]
    x_t, level = torch.randn(4, 2), torch.full((4,), 0.5)
    weights = torch.zeros(4, 4, dtype=torch.float64).index_fill_(1, torch.tensor([0]), 1.0)
    torch.testing.assert_close(network(x_t, level, weights), network.exact_velocity(x_t, level, weights).float())


def test_teacher_ode_sampler_reaches_the_data_nll():
    backbone = MixtureBackbone()
    mixture = backbone.mixture
    classes = torch.arange(8000) % mixture.num_classes
    cond = backbone.encode_prompts([f"class {c}" for c in classes.tolist()])
    network = backbone.load_denoiser()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        samples = few_step_sample(
            lambda x, t: backbone.predict_x0(network, x, t, cond), torch.randn(8000, 2, generator=generator),
            backbone.schedule.generator_levels(50), backbone.schedule, "ode",
        )
    entropy = mixture_entropy(mixture, classes, generator)
    assert abs(negative_log_likelihood(samples, classes, mixture) - entropy) < 0.15
    assert mode_coverage(samples, classes, mixture) == 1.0
    # Sliced-W1 between two finite draws is dominated by binomial noise in each mode's mass.
    reference = mixture.sample(classes, generator)
    floor = sliced_wasserstein1(mixture.sample(classes, generator), reference)
    assert sliced_wasserstein1(samples, reference) < floor + 0.03


def test_bad_layout_and_prompts_are_named():
    with pytest.raises(ValueError, match="modes_per_class"):
        MixtureLayout(modes_per_class=0)
    with pytest.raises(ValueError, match="mode_std"):
        MixtureLayout(mode_std=-1.0)
    with pytest.raises(ValueError, match="depth must be an integer >= 1, got 0"):
        MixtureBackbone(depth=0)
    with pytest.raises(ValueError, match="'class 4'"):
        MixtureBackbone(MixtureLayout(num_classes=4)).encode_prompts(["class 4"])
    with pytest.raises(ValueError, match="group_size"):
        MixtureDataModule(batch_size=10, group_size=4)


def test_nll_of_a_single_gaussian_at_its_mean():
    mixture = GaussianMixture(torch.tensor([[1.0, -2.0]], dtype=torch.float64), torch.tensor([0]), 0.5, 1)
    nll = negative_log_likelihood(torch.tensor([[1.0, -2.0]]), torch.tensor([0]), mixture)
    assert nll == pytest.approx(math.log(2 * math.pi * 0.5**2))


def test_sliced_w1_closed_forms():
    # Two point masses at a and b: W1 of each projection is |⟨θ, a − b⟩|.
    shift = torch.tensor([[0.7, -1.2]], dtype=torch.float64)
    theta = unit_projections(64, 2, seed=0)
    expected = (theta @ shift.T).abs().mean().item()
    assert sliced_wasserstein1(torch.zeros(1, 2), shift, 64) == pytest.approx(expected)
    # Shifted samples: each projection is shifted by ⟨θ, d⟩, whatever the samples.
    samples = torch.randn(500, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert sliced_wasserstein1(samples, samples + shift, 64) == pytest.approx(expected)
    assert sliced_wasserstein1(samples, samples) == 0.0


def test_coverage_of_half_the_modes_and_share_near_modes():
    mixture = MixtureLayout(2, 2, separation=3.0, mode_std=0.1, seed=0).mixture()
    first_modes = torch.tensor([int((mixture.mode_class == c).nonzero()[0]) for c in range(2)])
    classes = torch.arange(200) % 2
    samples = mixture.means[first_modes[classes]] + 0.1 * torch.randn(200, 2, dtype=torch.float64)
    assert mode_coverage(samples, classes, mixture) == 0.5
    assert share_near_modes(samples, classes, mixture, k_std=5.0) == 1.0
    assert share_near_modes(samples + 1.0, classes, mixture, k_std=3.0) == 0.0


def test_dmd_updates_run_through_the_mixture_backbone():
    backbone = MixtureBackbone()
    module = DMD(
        backbone,
        dmd=DMDConfig(guidance_scale=1.0, generator_update_ratio=5),
        generator_optimizer=OptimizerConfig(lr=1e-3),
        fake_score_optimizer=OptimizerConfig(lr=1e-3),
        student=StudentConfig(num_steps=4),
        max_generator_updates=3,
    )
    before = [p.detach().clone() for p in module.generator.parameters()]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=MixtureDataModule(batch_size=64))
    assert module.generator_updates == 3 and module.iterations == 11
    assert any(not torch.equal(a, b) for a, b in zip(before, module.generator.parameters()))
    samples = module.generate(["class 0", "class 3"])
    assert samples.shape == (2, 2) and torch.isfinite(samples).all()


def _train_mixture_dmd(dmd: DMDConfig, monkeypatch=None, updates: int = 3) -> tuple[DMD, list]:
    """A 4-step DMD on the mixture for ``updates`` generator updates; records the critic's samples."""
    torch.manual_seed(0)
    module = DMD(
        MixtureBackbone(), dmd=dmd, generator_optimizer=OptimizerConfig(lr=1e-3),
        fake_score_optimizer=OptimizerConfig(lr=1e-3), student=StudentConfig(num_steps=4), seed=0,
        max_generator_updates=updates,
    )
    seen = []
    original = module.fake_score_loss
    module.fake_score_loss = lambda x0, state: (seen.append(x0.clone()), original(x0, state))[1]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=MixtureDataModule(batch_size=32, seed=0))
    return module, seen


def test_critic_on_final_step_off_changes_nothing(monkeypatch):
    assert DMDConfig().critic_on_final_step is False
    with pytest.raises(ValueError, match="critic_on_final_step"):
        DMDConfig(critic_on_final_step=1)
    calls = []
    monkeypatch.setattr(DMD, "final_step_samples", lambda self, cond, n: calls.append(n))
    default, seen_default = _train_mixture_dmd(DMDConfig(guidance_scale=1.0, generator_update_ratio=2))
    off, seen_off = _train_mixture_dmd(DMDConfig(guidance_scale=1.0, generator_update_ratio=2, critic_on_final_step=False))
    assert calls == []  # off: no rollout, no extra random draws
    for a, b in zip(seen_default, seen_off, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for a, b in zip(default.generator.parameters(), off.generator.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_critic_on_final_step_fits_the_rollout_output(monkeypatch):
    rollouts = []
    original = DMD.final_step_samples

    def record(self, cond, n):
        rollouts.append(original(self, cond, n))
        return rollouts[-1]

    monkeypatch.setattr(DMD, "final_step_samples", record)
    module, seen = _train_mixture_dmd(DMDConfig(guidance_scale=1.0, generator_update_ratio=2, critic_on_final_step=True))
    assert len(rollouts) == len(seen) == module.iterations
    for a, b in zip(rollouts, seen, strict=True):
        assert a is not None and torch.equal(a, b)


def _four_step_sliced_w1(module: DMD | None, backbone: MixtureBackbone, classes: torch.Tensor, reference: torch.Tensor) -> float:
    """Sliced-W1 of a 4-step SDE sampler's samples (``module``'s generator, or the exact teacher)."""
    network = backbone.load_denoiser() if module is None else module.generator
    cond = backbone.encode_prompts([f"class {c}" for c in classes.tolist()])
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        samples = few_step_sample(
            lambda x, t: backbone.predict_x0(network, x, t, cond), torch.randn(len(classes), 2, generator=generator),
            backbone.schedule.generator_levels(4), backbone.schedule, "sde", generator,
        )
    return sliced_wasserstein1(samples, reference)


@pytest.fixture
def one_thread():
    """Batches of a few hundred 2-D points: one thread is faster, as in the benchmark."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fast_exact_teacher_benchmark_four_step_student(one_thread):
    """The fast version of ``benchmarks/exact_teacher.py`` (``docs/methods/dmd.md``, student fidelity):
    100 updates of the issue's 4-step DMD from the exact teacher. With the DM loss on the whole
    rollout's output (``generator_samples: rollout``), or the fake score fit to the final-step output,
    the student stays where the teacher's own 4-step sampler put it; the DMD2 default (every
    backward-simulation step's x̂0 asked to look like data) drifts off the data."""
    backbone = MixtureBackbone()
    classes = torch.arange(4000) % backbone.mixture.num_classes
    reference = backbone.mixture.sample(classes, torch.Generator().manual_seed(8))
    variants = {"default": {}, "final-step critic": {"critic_on_final_step": True}, "rollout": {"generator_samples": "rollout"}}
    scores = {}
    for name, settings in variants.items():
        torch.manual_seed(0)
        module = DMD(
            backbone, dmd=DMDConfig(guidance_scale=1.0, generator_update_ratio=5, **settings),
            generator_optimizer=OptimizerConfig(lr=1e-3), fake_score_optimizer=OptimizerConfig(lr=1e-3),
            student=StudentConfig(num_steps=4, step_rule="sde"), seed=0, max_generator_updates=100,
        )
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        )
        trainer.fit(module, datamodule=MixtureDataModule(batch_size=256, seed=0))
        scores[name] = _four_step_sliced_w1(module, backbone, classes, reference)
    teacher = _four_step_sliced_w1(None, backbone, classes, reference)
    print(f"teacher {teacher:.3f}", {name: round(score, 3) for name, score in scores.items()})
    # Measured: teacher 0.090, final-step critic 0.104, rollout 0.084, default 0.258. Two 4,000-sample
    # draws of the data differ by ~0.04, so the margins are several times that noise.
    assert scores["final-step critic"] < teacher + 0.03
    assert scores["rollout"] < teacher + 0.03
    assert scores["default"] > teacher + 0.1


def _exact_teacher_benchmark():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "exact_teacher.py"
    spec = importlib.util.spec_from_file_location("exact_teacher_benchmark", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_oracle_fake_score_is_the_posterior_mean_of_the_generator_samples(monkeypatch):
    """The benchmark's ``--oracle-fake-score``: with a generator whose samples are true data, the
    fake x̂0 (a posterior mean over a bank of generator samples) is the exact teacher's, within
    Monte Carlo error, and each sample is scored against its own class's bank."""
    benchmark = _exact_teacher_benchmark()
    backbone = MixtureBackbone()
    module = benchmark.make_module("dmd", backbone, 1, 1e-3, 0, 1, oracle_fake_score=True)
    monkeypatch.setattr(type(module), "bank_size", 100_000)
    generator = torch.Generator().manual_seed(0)

    def true_samples(prompts, noise=None, role="generator", generator=generator):
        return backbone.mixture.sample(backbone.classes(prompts), generator).float()

    monkeypatch.setattr(module, "generate", true_samples)
    prompts = ["class 0", "class 3", "class 1", "class 0", "class 2"]
    cond = backbone.encode_prompts(prompts)
    level = torch.tensor([0.3, 0.5, 0.7, 0.9, 0.5])
    x_t = torch.randn(5, 2, generator=generator)
    oracle = module.fake_x0(x_t, level, cond)
    exact = backbone.predict_x0(module.teacher, x_t, level, cond)
    torch.testing.assert_close(oracle, exact, atol=2e-2, rtol=0)
    # Against another class's bank the estimate is far off: the bank follows each sample's class.
    wrong = module.fake_x0(x_t, level, backbone.encode_prompts(["class 1"] * 5))
    assert (wrong - exact).norm(dim=1).max() > 0.2
