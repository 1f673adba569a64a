"""Shared fixtures: the shipped dataset (loaded once) and a small model."""

from pathlib import Path

import jax
import pytest

from jaxbirds import data, model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def dataset() -> data.Dataset:
    return data.load_dataset(ROOT / "datasets" / "birds" / "birds.csv")


@pytest.fixture(scope="session")
def small_config(dataset) -> model.ModelConfig:
    return model.ModelConfig(vocab_size=dataset.vocab.size, hidden=64)


@pytest.fixture(scope="session")
def batch(dataset):
    """A fixed batch of 32 training examples."""
    return dataset.train.X[:32], dataset.train.Y[:32]


@pytest.fixture
def key():
    return jax.random.key(0)
