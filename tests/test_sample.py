"""Sampling names: shapes, termination, determinism, temperature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbirds import model, sample
from jaxbirds.data import Vocabulary


@pytest.fixture(scope="module")
def trained_ish(dataset):
    config = model.ModelConfig(vocab_size=dataset.vocab.size, hidden=16)
    params = model.init_params(jax.random.key(0), config)
    return params, model.calibrate(params, jnp.asarray(dataset.dev.X)), dataset.vocab


def test_shapes_and_determinism(trained_ish):
    params, stats, vocab = trained_ish
    ids = sample.sample_ids(jax.random.key(1), params, stats, 1.0, count=7, max_length=12, context_size=3)
    assert ids.shape == (7, 12) and ids.dtype == jnp.int32
    again = sample.sample_ids(jax.random.key(1), params, stats, 1.0, count=7, max_length=12, context_size=3)
    other = sample.sample_ids(jax.random.key(2), params, stats, 1.0, count=7, max_length=12, context_size=3)
    np.testing.assert_array_equal(ids, again)
    assert not np.array_equal(ids, other)


def test_a_name_stays_finished_after_its_end_token(trained_ish):
    params, stats, _ = trained_ish
    ids = np.asarray(sample.sample_ids(jax.random.key(3), params, stats, 1.0, count=64, max_length=30, context_size=3))
    for row in ids:
        ends = np.flatnonzero(row == 0)
        if ends.size:
            assert np.all(row[ends[0]:] == 0)
    assert (ids == 0).any()  # with 29 choices and 30 draws, some names do end


def test_a_model_that_always_ends_gives_empty_finished_names(trained_ish):
    params, stats, vocab = trained_ish
    biased = {**params, "b2": params["b2"].at[0].set(1e3)}
    samples = sample.sample_names(jax.random.key(4), biased, stats, vocab, 3, count=5)
    assert samples.names == [""] * 5 and all(samples.finished)


def test_low_temperature_approaches_the_most_likely_name(trained_ish):
    params, stats, vocab = trained_ish
    cold = [sample.sample_names(jax.random.key(k), params, stats, vocab, 3, count=3, temperature=1e-6).names
            for k in range(2)]
    assert cold[0] == cold[1] and len(set(cold[0])) == 1  # argmax decoding: the same name every time


def test_decode_and_memorised_share():
    vocab = Vocabulary.from_names(["emu", "kiwi"])
    e, m, u = vocab.encode("emu")
    samples = sample.decode(np.array([[e, m, u, 0, 0], [e, e, e, e, e]]), vocab)
    assert samples.names == ["emu", "eeeee"] and samples.finished == [True, False]
    assert samples.memorised_share(["emu"]) == 1.0  # unfinished names are not counted
    assert samples.memorised_share(["kiwi"]) == 0.0


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_bad_temperature_is_rejected(trained_ish, temperature):
    params, stats, vocab = trained_ish
    with pytest.raises(ValueError, match="temperature"):
        sample.sample_names(jax.random.key(0), params, stats, vocab, 3, temperature=temperature)
