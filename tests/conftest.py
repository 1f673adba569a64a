"""Shared fixtures: the shipped dataset (loaded once) and a small model."""

import os
from pathlib import Path

import jax
import pytest

from jaxbirds import cli, data, model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def compile_cache_in_a_temporary_directory(tmp_path_factory):
    """One persistent compilation cache per test process, in its temporary directory, set up as the
    scripts set up theirs: a program that several tests compile is compiled once, and the scripts under
    test (in this process or a child) use it instead of the user's cache directory. Not shared between
    pytest-xdist workers, so that one worker's tests never depend on what another compiled first."""
    cache = tmp_path_factory.mktemp("xla-cache")
    os.environ["JAXBIRDS_CACHE_DIR"] = str(cache)
    cli.enable_compile_cache(cache)


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


@pytest.fixture(autouse=True)
def full_precision_matmuls():
    """Pin float32 matrix products to full precision in every test. On NVIDIA GPUs JAX may run them
    in TF32 (10-bit mantissas) by default, and every gradient comparison would then measure TF32's
    rounding instead of the rules under test. (A no-op on CPUs, which have no TF32.)"""
    with jax.default_matmul_precision("highest"):
        yield
