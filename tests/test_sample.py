"""Sampling names: shapes, termination, determinism, temperature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbirds import evaluate, memory, model, sample
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
    biased = {**params, "b2": params["b2"].at[0].set(1e3)}  # the output layer's bias, at depth 1
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
    (block,) = stats
    shifted = (block._replace(mean=block.mean + 0.5),)  # statistics that differ from any batch's own
    samples = sample.sample_names(jax.random.key(5), params, shifted, vocab, 3, count=3, temperature=1e-6, max_length=8)
    assert samples.names == [greedy_name(params, shifted, vocab, 8)] * 3


one_context_logits = jax.jit(model.logits)  # one program for every context, instead of one per operation


def greedy_name(params, stats, vocab, max_length):
    """The most likely name, one character at a time, each from the model's logits for that one context."""
    context, name = [0, 0, 0], ""
    for _ in range(max_length):
        nxt = int(jnp.argmax(one_context_logits(params, jnp.asarray([context]), stats)[0]))
        if nxt == 0:
            break
        name += vocab.chars[nxt]
        context = context[1:] + [nxt]
    return name


@pytest.fixture(scope="module")
def deep(dataset):
    """A model of three blocks (12, 8, 10), calibrated on 1,000 rows of the dev split."""
    config = model.ModelConfig(vocab_size=dataset.vocab.size, hidden=(12, 8, 10))
    params = model.init_params(jax.random.key(6), config)
    return params, evaluate.calibrate(params, dataset.dev.X[:1000], batch=1000), dataset.vocab


def test_sampling_a_deep_model_uses_every_blocks_calibrated_statistics(deep):
    """Greedy names at depth 3 equal the one-context-at-a-time loop, with the last block's statistics shifted
    (so that a block given the batch's statistics, or another block's, draws other names)."""
    params, stats, vocab = deep
    shifted = (*stats[:2], stats[2]._replace(mean=stats[2].mean - 0.3))
    names = {}
    for label, block_stats in (("calibrated", stats), ("shifted", shifted)):
        samples = sample.sample_names(
            jax.random.key(7), params, block_stats, vocab, 3, count=2, temperature=1e-6, max_length=12
        )
        names[label] = samples.names
        assert samples.names == [greedy_name(params, block_stats, vocab, 12)] * 2, label
    assert names["calibrated"] != names["shifted"]


def test_the_sampling_estimate_counts_the_widest_block(dataset):
    """Blocks (8, 2048, 8): the estimate is at least XLA's own figure of the compiled sampling program, so a
    budget just below that figure is refused (counted by the first block's width, it would be ~12x too low)."""
    config = model.ModelConfig(vocab_size=dataset.vocab.size, hidden=(8, 2048, 8))
    params = model.init_params(jax.random.key(0), config)
    stats = tuple(model.BatchNormStats(jnp.zeros((1, h)), jnp.ones((1, h))) for h in config.hidden)
    count, max_length = 200, 20
    lowered = sample.sample_ids.lower(
        jax.random.key(1), params, stats, 1.0, count=count, max_length=max_length, context_size=3
    )
    needed = memory.compiled_bytes(lowered.compile())
    if needed is None:
        pytest.skip("this backend gives no memory analysis")
    with pytest.raises(MemoryBudgetError, match="sampling 200 names"):
        sample.check_fits(params, count, max_length, 3, budget=needed - 1)


def test_a_sampling_request_that_cannot_fit_in_memory_is_refused(trained_ish):
    params, stats, vocab = trained_ish
    with pytest.raises(MemoryBudgetError, match="--count"):
        sample.sample_names(jax.random.key(0), params, stats, vocab, 3, count=10**12)
