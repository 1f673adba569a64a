"""Sampling names: shapes, termination, determinism, temperature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbirds import evaluate, model, sample
from jaxbirds.data import Vocabulary
from jaxbirds.errors import MemoryBudgetError


@pytest.fixture(scope="module")
def trained_ish(dataset):
    config = model.ModelConfig(vocab_size=dataset.vocab.size, hidden=16)
    params = model.init_params(jax.random.key(0), config)
    return params, evaluate.calibrate(params, dataset.dev.X), dataset.vocab


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
            assert np.all(row[ends[0] :] == 0)
    assert (ids == 0).any()  # with 29 choices and 30 draws, some names do end


def test_a_model_that_always_ends_gives_empty_finished_names(trained_ish):
    params, stats, vocab = trained_ish
    biased = {**params, "b2": params["b2"].at[0].set(1e3)}
    samples = sample.sample_names(jax.random.key(4), biased, stats, vocab, 3, count=5)
    assert samples.names == [""] * 5 and all(samples.finished)


def test_low_temperature_approaches_the_most_likely_name(trained_ish):
    params, stats, vocab = trained_ish
    cold = [
        sample.sample_names(jax.random.key(k), params, stats, vocab, 3, count=3, temperature=1e-6).names
        for k in range(2)
    ]
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


def test_sampling_uses_the_calibrated_statistics(trained_ish):
    """Greedy decoding (temperature -> 0) of three names at once equals a one-name-at-a-time loop over
    the model in evaluation mode. With training-mode batch norm the three identical contexts of the
    first position would have zero variance, and the batch would decide the name."""
    params, stats, vocab = trained_ish
    shifted = stats._replace(mean=stats.mean + 0.5)  # statistics that differ from any batch's own
    samples = sample.sample_names(jax.random.key(5), params, shifted, vocab, 3, count=3, temperature=1e-6, max_length=8)
    context, expected = [0, 0, 0], ""
    for _ in range(8):
        logits = model.logits(params, jnp.asarray([context]), shifted)
        nxt = int(jnp.argmax(logits[0]))
        if nxt == 0:
            break
        expected += vocab.chars[nxt]
        context = context[1:] + [nxt]
    assert samples.names == [expected] * 3


def test_a_sampling_request_that_cannot_fit_in_memory_is_refused(trained_ish):
    params, stats, vocab = trained_ish
    with pytest.raises(MemoryBudgetError, match="--count"):
        sample.sample_names(jax.random.key(0), params, stats, vocab, 3, count=10**12)
