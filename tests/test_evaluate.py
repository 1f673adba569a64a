"""Calibration and evaluation by lookup tables: the same numbers as the product, progress, stopping, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbirds import evaluate, memory, model, ops
from jaxbirds.errors import ConfigError, MemoryBudgetError


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
        all_stats = evaluate.calibrate(params, X, batch=8)
        hprebn = np.asarray(product_hidden_preactivation(params, X), np.float64)
        loss = evaluate.split_loss(params, all_stats, X, Y, batch=8)
        reference = float(product_loss(params, X, Y, all_stats))
    (stats,) = all_stats  # one block, one set of statistics
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
    assert_the_programs_fit(params, stats, batch, budget)


def assert_the_programs_fit(params, stats, batch, budget):
    """XLA's memory analysis of every per-batch program (each block's column sums, the loss) at ``batch`` rows,
    besides the parameters, fits ``budget``."""
    tables = evaluate.position_tables(params["C"], params["W1"])
    rest = evaluate._after_lookup(params)
    rows, valid = np.zeros((batch, 3), np.int32), np.ones(batch, np.float32)
    programs = [evaluate._column_sums.lower(tables, params["b1"], rows, valid, stats[0].mean)]
    programs += [
        evaluate._later_column_sums.lower(tables, rest, stats[: layer - 1], rows, valid, stats[layer - 1].mean)
        for layer in range(2, len(stats) + 1)
    ]
    programs.append(evaluate._summed_nll.lower(tables, rest, stats, rows, rows[:, 0], valid))
    param_bytes = sum(p.size * p.dtype.itemsize for p in params.values())
    for lowered in programs:
        needed = memory.compiled_bytes(lowered.compile())
        if needed is None:
            pytest.skip("this backend gives no memory analysis")
        assert param_bytes + needed <= budget


def test_the_batch_size_counts_the_widest_block_of_a_deep_model(dataset):
    """Depth 3 with a wide middle block (8, 1024, 8): every program, the middle block's and the later ones, fits
    at the batch the budget allows; sized by the first block's width alone, they would need ~20x the memory."""
    params = random_model(dataset.vocab.size, 3, 10, (8, 1024, 8))
    stats = evaluate.calibrate(params, dataset.dev.X[:10], batch=8)
    budget = 4 * 2**20
    batch = evaluate.batch_size_for(params, budget=budget)
    assert 1 < batch < evaluate.MAX_BATCH
    assert_the_programs_fit(params, stats, batch, budget)


# --- any depth: block l is calibrated with the blocks before it in evaluation mode ---


def reference_statistics(params, X):
    """Each block's mean and unbiased variance of hprebn[l] over all of ``X``, blocks first to last, each
    block after the first fed by the one before in evaluation mode with its statistics: plain float64 numpy,
    by the product concat(C[X]) @ W1 (no lookup tables, no batches)."""
    p = {name: np.asarray(value, np.float64) for name, value in params.items()}
    h = p["C"][X].reshape(len(X), -1)
    stats = []
    for layer in range(1, model.depth_of(params) + 1):
        hprebn = h @ p[f"W{layer}"] + p[f"b{layer}"]
        mean, var = hprebn.mean(axis=0, keepdims=True), hprebn.var(axis=0, ddof=1, keepdims=True)
        stats.append((mean, var))
        h = np.tanh(p[f"bngain{layer}"] * (hprebn - mean) / np.sqrt(var + ops.BN_EPS) + p[f"bnbias{layer}"])
    return stats


#: Three blocks of different widths, so that a block given another block's statistics or width fails.
DEEP = (7, 5, 6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_calibration_at_depth_three_equals_a_direct_float64_computation(dataset, dtype):
    """50 rows in batches of 8 (a padded last batch of 2): against :func:`reference_statistics`. Run in training
    mode on each batch, or with another block's statistics, blocks 2 and 3 would be far off."""
    X = dataset.dev.X[:50]
    tolerance = 2e-5 if dtype == "float32" else 1e-11
    with jax.enable_x64(dtype == "float64"):
        params = random_model(dataset.vocab.size, 3, 4, DEEP, jnp.dtype(dtype), seed=3)
        stats = evaluate.calibrate(params, X, batch=8)
    assert len(stats) == 3
    for layer, (got, (mean, var)) in enumerate(zip(stats, reference_statistics(params, X), strict=True), start=1):
        assert got.mean.shape == got.var.shape == (1, DEEP[layer - 1]), layer
        assert got.mean.dtype == got.var.dtype == np.dtype(dtype)
        np.testing.assert_allclose(got.mean, mean, rtol=tolerance, atol=tolerance, err_msg=f"block {layer}")
        np.testing.assert_allclose(got.var, var, rtol=tolerance, err_msg=f"block {layer}")


def test_split_loss_at_depth_two_equals_the_models_loss_with_those_statistics(dataset):
    """The lookup-table evaluation of a two-block model (padded batches of 8) against :func:`model.loss` on all
    50 rows at once with the same statistics. They are calibrated on other rows (the dev split's first 200,
    the loss is of its last 50), so a block run in training mode, or given the other block's statistics,
    would not match."""
    X, Y = dataset.dev.X[-50:], dataset.dev.Y[-50:]
    params = random_model(dataset.vocab.size, 3, 10, (16, 16), seed=1)  # one width: wrong statistics do not crash
    stats = evaluate.calibrate(params, dataset.dev.X[:200], batch=64)
    loss = evaluate.split_loss(params, stats, X, Y, batch=8)
    assert loss == pytest.approx(float(product_loss(params, X, Y, stats)), rel=1e-5)
    assert loss != pytest.approx(float(product_loss(params, X, Y)), rel=1e-3)  # training mode is another number
    swapped = (stats[0], stats[1]._replace(mean=stats[1].mean + 1.0))  # block 2's statistics matter
    assert evaluate.split_loss(params, swapped, X, Y, batch=8) != pytest.approx(loss, rel=1e-3)


@pytest.mark.slow
def test_stacked_models_at_depth_two_equal_each_model_alone(dataset):
    """Three two-block models stacked and evaluated together (``models=True``, one vmapped program per batch)
    give each model's own statistics (K, 1, H_l) and losses."""
    X, Y = dataset.dev.X[:30], dataset.dev.Y[:30]
    members = [random_model(dataset.vocab.size, 3, 10, (12, 9), seed=seed) for seed in range(3)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *members)
    stats = evaluate.calibrate(stacked, X, batch=8, models=True)
    losses = evaluate.split_loss(stacked, stats, X, Y, batch=8, models=True)
    assert [(s.mean.shape, s.var.shape) for s in stats] == [((3, 1, 12),) * 2, ((3, 1, 9),) * 2]
    for k, params in enumerate(members):
        alone = evaluate.calibrate(params, X, batch=8)
        for layer, (together, own) in enumerate(zip(stats, alone, strict=True), start=1):
            np.testing.assert_allclose(together.mean[k], own.mean, rtol=1e-5, atol=1e-6, err_msg=f"{k} {layer}")
            np.testing.assert_allclose(together.var[k], own.var, rtol=1e-5, err_msg=f"model {k} block {layer}")
        assert losses[k] == pytest.approx(evaluate.split_loss(params, alone, X, Y, batch=8), rel=1e-6)
    assert len(set(losses)) == 3


def test_progress_and_stopping_count_both_passes_of_every_block(dataset):
    """Two blocks, 10 rows in batches of 4: 2 blocks x 2 passes x 10 rows; a stop after the 7th batch (in
    block 2's second pass) ends calibration there."""
    params = random_model(dataset.vocab.size, 3, 10, (6, 5))
    X = dataset.dev.X[:10]
    recorder = Recorder()
    evaluate.calibrate(params, X, batch=4, progress=recorder)
    assert recorder.calls == [(done, 40) for done in (4, 8, 10, 14, 18, 20, 24, 28, 30, 34, 38, 40)]
    stopping = Recorder(stop_after=7)
    with pytest.raises(evaluate.Stopped, match="24 of 40"):
        evaluate.calibrate(params, X, batch=4, progress=stopping, should_stop=stopping.should_stop)
    assert len(stopping.calls) == 7


def test_statistics_for_another_depth_are_refused(dataset):
    params = random_model(dataset.vocab.size, 3, 10, (6, 5))
    X, Y = dataset.dev.X[:10], dataset.dev.Y[:10]
    stats = evaluate.calibrate(params, X)
    with pytest.raises(ConfigError, match="1 sets of batch-norm statistics for a model of 2 blocks"):
        evaluate.split_loss(params, stats[:1], X, Y)


def test_the_per_batch_programs_read_every_parameter_but_c_and_w1():
    params = random_model(5, 2, 3, (4, 3, 2))
    assert evaluate.after_lookup_names(params) == (
        *("b1", "bngain1", "bnbias1"),
        *("W2", "b2", "bngain2", "bnbias2"),
        *("W3", "b3", "bngain3", "bnbias3"),
        *("W4", "b4"),
    )
    assert evaluate.widest_block(params) == 4
