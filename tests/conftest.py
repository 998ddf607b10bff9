"""Fixtures shared across the test suite."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Run the suite on one torch thread: the test models are tiny, so thread start-up dominates
    and two threads on a busy 2-core machine are many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seeded_torch():
    """Seed torch's global RNG before every test, so a random input that fails fails every time."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def rdm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary cache root for the whole session; tests point ``$RDM_CACHE`` here with monkeypatch."""
    return tmp_path_factory.mktemp("rdm_cache")


@pytest.fixture(scope="session")
def digits_classifier(rdm_cache: Path):
    """The seed-0 digits classifier and its test accuracy, trained once per session into ``rdm_cache``."""
    from rdm_lightning.evaluation.digits import load_digits_classifier

    return load_digits_classifier(seed=0, cache=rdm_cache)


@pytest.fixture(scope="session")
def tiny_digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random (untrained) digits model folder with ``channels=8``, identical on every build (seed 0)."""
    import torch

    from rdm_lightning.backbones.digits import DigitsConfig, DigitsDenoiser, DigitsTextEncoder, save_digits_model

    config = DigitsConfig(channels=8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        text_encoder = DigitsTextEncoder(config.text_dim, config.max_tokens)
        denoiser = DigitsDenoiser(config.channels, config.text_dim)
    return save_digits_model(tmp_path_factory.mktemp("tiny_digits_teacher"), config, text_encoder, denoiser)


@pytest.fixture(scope="session")
def digits_gold_classifier(rdm_cache: Path):
    """The seed-1 gold digits MLP and its test accuracy, trained once per session into ``rdm_cache``."""
    from rdm_lightning.rewards.digits import load_gold_classifier

    return load_gold_classifier(seed=1, cache=rdm_cache)
