"""Calibration and evaluation by lookup tables: the same numbers as the product, progress, stopping, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbirds import evaluate, memory, model
from jaxbirds.errors import MemoryBudgetError


def random_model(vocab, context, embedding, hidden, dtype=jnp.float32, seed=0):
    """Standard normal parameters of these shapes, drawn by numpy (no program to compile)."""
    config = model.ModelConfig(vocab_size=vocab, context_size=context, embedding_dim=embedding, hidden=hidden)
    rng = np.random.default_rng(seed)
    return {name: jnp.asarray(rng.normal(size=shape), dtype) for name, shape in model.param_shapes(config).items()}


#: Jitted references: one compiled program per shape instead of one per operation.
product_hidden_preactivation = jax.jit(model.hidden_preactivation)
product_loss = jax.jit(model.loss)
lookup_hidden_preactivation = jax.jit(evaluate.lookup_hidden_preactivation)


def random_ids(n, context, vocab, seed=0):
    """Context ids with every id present, and two all-zero rows as the padding of a last batch looks."""
    ids = np.random.default_rng(seed).integers(0, vocab, (n, context)).astype(np.int32)
    ids[: min(n, vocab), 0] = np.arange(min(n, vocab))
    ids[-2:] = 0
    return ids


SHAPES = [  # (vocabulary, context, embedding, hidden)
    (29, 1, 1, 5),
    (29, 3, 1, 7),
    (29, 3, 10, 16),
    (5, 2, 7, 3),
    (11, 4, 3, 9),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("vocab,context,embedding,hidden", SHAPES)
def test_lookup_tables_give_the_products_hidden_preactivation(vocab, context, embedding, hidden, dtype):
    with jax.enable_x64(dtype == "float64"):
        params = random_model(vocab, context, embedding, hidden, jnp.dtype(dtype), seed=context * 100 + embedding)
        X = random_ids(40, context, vocab, seed=hidden)
        tables = evaluate.position_tables(params["C"], params["W1"])
        assert tables.shape == (context, vocab, hidden) and tables.dtype == jnp.dtype(dtype)
        got = np.asarray(lookup_hidden_preactivation(tables, params["b1"], X))
        want = np.asarray(product_hidden_preactivation(params, X))
    assert got.dtype == want.dtype == np.dtype(dtype)
    tolerance = 1e-5 if dtype == "float32" else 1e-13  # rounding only: the algebra is exact
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)


def test_each_table_is_the_embedding_times_its_block_of_w1():
    """Pinned against numpy: T_j = C @ W1[jE:(j+1)E]."""
    params = jax.device_get(random_model(6, 3, 4, 5))
    tables = np.asarray(evaluate.position_tables(params["C"], params["W1"]))
    for j in range(3):
        np.testing.assert_allclose(tables[j], params["C"] @ params["W1"][4 * j : 4 * (j + 1)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_calibration_and_split_loss_equal_the_product_formulas(dataset, dtype):
    """50 rows in batches of 8: a padded last batch of 2 rows; references from the product path."""
    X, Y = dataset.dev.X[:50], dataset.dev.Y[:50]
    tolerance = 1e-5 if dtype == "float32" else 1e-11
    with jax.enable_x64(dtype == "float64"):
        params = random_model(dataset.vocab.size, 3, 10, 24, jnp.dtype(dtype))
        stats = evaluate.calibrate(params, X, batch=8)
        hprebn = np.asarray(product_hidden_preactivation(params, X), np.float64)
        loss = evaluate.split_loss(params, stats, X, Y, batch=8)
        reference = float(product_loss(params, X, Y, stats))
    assert stats.mean.dtype == stats.var.dtype == np.dtype(dtype)
    np.testing.assert_allclose(stats.mean[0], hprebn.mean(axis=0), rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(stats.var[0], hprebn.var(axis=0, ddof=1), rtol=tolerance)
    assert loss == pytest.approx(reference, rel=tolerance)


class Recorder:
    """A progress callback that remembers its calls, and a should_stop that says yes after ``stop_after`` of them."""

    def __init__(self, stop_after: int | None = None):
        self.calls, self.stop_after = [], stop_after

    def __call__(self, done, total):
        self.calls.append((done, total))

    def should_stop(self):
        return self.stop_after is not None and len(self.calls) >= self.stop_after


@pytest.fixture(scope="module")
def small(dataset):
    params = random_model(dataset.vocab.size, 3, 10, 16)
    X, Y = dataset.dev.X[:10], dataset.dev.Y[:10]
    return params, evaluate.calibrate(params, X), X, Y


def test_progress_counts_the_rows_of_every_batch(small):
    params, stats, X, Y = small
    calibration, loss = Recorder(), Recorder()
    evaluate.calibrate(params, X, batch=4, progress=calibration)
    evaluate.split_loss(params, stats, X, Y, batch=4, progress=loss)
    assert calibration.calls == [(4, 20), (8, 20), (10, 20), (14, 20), (18, 20), (20, 20)]  # two passes
    assert loss.calls == [(4, 10), (8, 10), (10, 10)]


@pytest.mark.parametrize("stop_after", [0, 1])
def test_a_stop_request_ends_calibration_and_evaluation_before_the_next_batch(small, stop_after):
    """``should_stop`` turns True after the first batch (or before any): no further batch runs."""
    params, stats, X, Y = small
    for function in (
        lambda **kw: evaluate.calibrate(params, X, batch=2, **kw),
        lambda **kw: evaluate.split_loss(params, stats, X, Y, batch=2, **kw),
    ):
        recorder = Recorder(stop_after=stop_after)
        with pytest.raises(evaluate.Stopped):
            function(progress=recorder, should_stop=recorder.should_stop)
        assert len(recorder.calls) == stop_after


def test_throttled_progress_skips_calls_closer_than_the_interval_but_never_the_last():
    now = [0.0]
    recorder = Recorder()
    report = evaluate.throttled(recorder, seconds=1.0, clock=lambda: now[0])
    for t, done in [(0.5, 1), (1.2, 2), (1.5, 3), (2.3, 4), (2.4, 5)]:
        now[0] = t
        report(done, 5)
    assert recorder.calls == [(2, 5), (4, 5), (5, 5)]


def test_a_phase_shorter_than_the_interval_reports_nothing():
    now = [0.0]
    recorder = Recorder()
    report = evaluate.throttled(recorder, seconds=1.0, clock=lambda: now[0])
    for t, done in [(0.3, 1), (0.6, 2), (0.9, 3)]:
        now[0] = t
        report(done, 3)
    assert recorder.calls == []


def test_a_wide_embedding_keeps_full_batches_because_no_embedded_input_is_built():
    """Embedding 100,000 (W1 is 300,000 x 200, 240 MB): the (N, 300,000) embedded context of the product
    would allow ~160 rows in 1 GiB; the tables need none of it. W1 still counts: a budget below it fails."""
    config = model.ModelConfig(vocab_size=29, context_size=3, embedding_dim=100_000, hidden=200)
    wide = {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in model.param_shapes(config).items()}
    assert evaluate.batch_size_for(wide, budget=2**30) == evaluate.MAX_BATCH
    with pytest.raises(MemoryBudgetError):
        evaluate.batch_size_for(wide, budget=200 * 2**20)


def test_the_batch_size_counts_what_the_compiled_programs_keep_alive(small):
    """XLA's own memory analysis of both per-batch programs, at the batch the budget allows, fits the budget."""
    params, stats, X, Y = small
    budget = 4 * 2**20
    batch = evaluate.batch_size_for(params, budget=budget)
    assert 1 < batch < evaluate.MAX_BATCH
    tables = evaluate.position_tables(params["C"], params["W1"])
    rows, valid = np.zeros((batch, 3), np.int32), np.ones(batch, np.float32)
    programs = [
        evaluate._column_sums.lower(tables, params["b1"], rows, valid, stats.mean),
        evaluate._summed_nll.lower(tables, evaluate._after_lookup(params), stats, rows, rows[:, 0], valid),
    ]
    param_bytes = sum(p.size * p.dtype.itemsize for p in params.values())
    for lowered in programs:
        needed = memory.compiled_bytes(lowered.compile())
        if needed is None:
            pytest.skip("this backend gives no memory analysis")
        assert param_bytes + needed <= budget
